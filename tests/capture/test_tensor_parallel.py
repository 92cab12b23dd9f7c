"""Tensor parallelism in process (two worker processes, vLLM's mp executor): TP rank 0
writes the store, the other rank writes nothing; the capture equals the planted truth
and the TP=1 capture of the same prompts."""

from __future__ import annotations

import numpy as np
import pytest

from capture_server.errors import CaptureError
from capture_server.specimens.planted import planted_topk

PROMPTS = [[5, 9, 13, 200], [7, 8, 9], list(range(1, 60))]


def _capture(path, store, **engine):
    from capture_server.capture.api import CaptureEngine

    eng = CaptureEngine(str(path), dtype="float32", max_model_len=256, enforce_eager=True, **engine)
    try:
        result = eng.generate_to_store(PROMPTS, str(store), max_tokens=6, temperature=0.0)
        stats = eng.stats()
        if engine.get("tensor_parallel_size", 1) > 1:
            with pytest.raises(CaptureError, match="use generate_to_store"):
                eng.generate(PROMPTS, max_tokens=2)
    finally:
        eng.close()
    return result, stats


@pytest.mark.slow
def test_tensor_parallel_capture_has_one_writer_and_equals_tp1(specimen, tmp_path):
    path = specimen("qwen3_moe", planted=True)
    tp2, stats = _capture(path, tmp_path / "tp2", tensor_parallel_size=2)
    tp1, _ = _capture(path, tmp_path / "tp1")
    assert stats["role"] == "writer" and list(stats["sinks"]) == [str(tmp_path / "tp2")]
    assert len(tp2.index) == len(PROMPTS) == len(tp1.index)
    for row in tp2.index.iter_rows(named=True):
        assert row["num_rows"] == row["prompt_len"] + row["generated_len"] - 1
        got = tp2.sequence(row["sequence_id"])
        for layer in range(got["topk_ids"].shape[1]):
            want = planted_topk(got["token_ids"], layer)
            np.testing.assert_array_equal(got["topk_ids"][:, layer], want)
        same = tp1.index.filter(tp1.index["prompt_index"] == row["prompt_index"]).row(0, named=True)
        ref = tp1.sequence(same["sequence_id"])
        for name in ("topk_ids", "token_ids", "positions"):
            np.testing.assert_array_equal(got[name], ref[name])
        np.testing.assert_allclose(got["topk_weights"], ref["topk_weights"], atol=1e-5)
