"""Pipeline parallelism in process (two stage workers, vLLM's mp executor, compiled: the
CPU runner allocates a later stage's input buffers only while warming up a compiled
model): each stage's TP rank 0 writes its own part of the store, holding its own MoE
layers; the reader's join equals the one-stage capture of the same prompts, array for
array, and the planted truth."""

from __future__ import annotations

import numpy as np
import pytest

from capture_server.specimens.planted import planted_topk

PROMPTS = [[5, 9, 13, 200], [7, 8, 9], list(range(1, 60))]
HIDDEN = [1, 2]  # MoE layers whose router inputs are kept: one in each stage


def _capture(path, store, **engine):
    from capture_server.capture.api import CaptureEngine

    eng = CaptureEngine(
        str(path), dtype="float32", max_model_len=256, hidden_layers=HIDDEN, **engine
    )
    try:
        result = eng.generate_to_store(PROMPTS, str(store), max_tokens=6, temperature=0.0)
        stats = eng.stats()
    finally:
        eng.close()
    return result, stats


@pytest.mark.slow
def test_pipeline_stages_write_one_store_that_equals_one_stage(specimen, tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # one NUMA node, two workers
    path = specimen("qwen3_moe", planted=True)
    pp2, stats = _capture(path, tmp_path / "pp2", pipeline_parallel_size=2)
    pp1, _ = _capture(path, tmp_path / "pp1", enforce_eager=True)
    assert pp2.attrs["format_version"] == 2 and pp1.attrs["format_version"] == 1
    assert stats["routing"]["num_layers"] == 4 and len(stats["expert_load"]) == 4  # 2 + 2
    assert len(pp2.index) == len(PROMPTS) == len(pp1.index)
    for row in pp2.index.iter_rows(named=True):
        got = pp2.sequence(row["sequence_id"])
        same = pp1.index.filter(pp1.index["prompt_index"] == row["prompt_index"]).row(0, named=True)
        ref = pp1.sequence(same["sequence_id"])
        assert sorted(got) == sorted(ref) and "hidden_states_2" in got
        for name, want in ref.items():
            if want.dtype.kind == "f":
                np.testing.assert_allclose(got[name], want, atol=1e-4, err_msg=name)
            else:
                np.testing.assert_array_equal(got[name], want, err_msg=name)
        for layer in range(got["topk_ids"].shape[1]):
            want = planted_topk(got["token_ids"], layer)
            np.testing.assert_array_equal(got["topk_ids"][:, layer], want)
