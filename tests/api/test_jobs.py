"""Rollout and score jobs through the REST service, checked against independent captures."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from capture_server.specimens.planted import planted_topk
from capture_server.store import open_store

PROMPTS = [f"the bank raised interest rates {i} and" for i in range(64)]


SAMPLING = {"n": 2, "max_tokens": 10, "temperature": 1.0, "seed": 1234, "ignore_eos": True}


@pytest.fixture(scope="module")
def sampled_job(server):
    """64 prompts x n=2, sampled with a seed: reproducible by an in-process engine."""
    body = {
        "kind": "rollout",
        "model": "qwen3_moe",
        "prompts": [{"prompt": p, "labels": {"question": i}} for i, p in enumerate(PROMPTS)],
        "sampling": SAMPLING,
        "capture": {"hidden_layers": [1], "logits_dtype": "float32"},
    }
    created = server.client.post("/v1/jobs", json=body)
    assert created.status_code == 201, created.text
    job = server.wait_job(created.json()["id"])
    assert job["state"] == "done", job
    return job


def test_rollout_store_matches_in_process_capture(sampled_job, specimen):
    from capture_server.capture.api import CaptureEngine

    store = open_store(sampled_job["store"])
    assert len(store.index) == 128 and sampled_job["sequences_done"] == 128
    engine = CaptureEngine(
        str(specimen("qwen3_moe")),
        hidden_layers=[1],
        dtype="float32",
        max_model_len=512,
        enable_chunked_prefill=False,  # per-request seeds on CPU, as the service runs
        enforce_eager=True,
    )
    try:
        direct = engine.generate(PROMPTS, **SAMPLING)
    finally:
        engine.close()
    assert len(direct.sequences) == 128
    samples: dict[int, list[list[int]]] = {}
    for seq in direct.sequences:
        samples.setdefault(seq.prompt_index, []).append(seq.output_token_ids)
    differ = sum(a != b for a, b in samples.values())
    assert differ > 32, "the two samples of most prompts differ: this is sampling"
    for seq in direct.sequences:
        row = store.index.filter(
            (store.index["prompt_index"] == seq.prompt_index)
            & (store.index["sample_index"] == seq.sample_index)
        ).row(0, named=True)
        got = store.sequence(row["sequence_id"])
        np.testing.assert_array_equal(got["token_ids"], seq.rows.token_ids)
        np.testing.assert_array_equal(got["topk_ids"], seq.rows.topk_ids)
        np.testing.assert_allclose(got["topk_weights"], seq.rows.topk_weights, atol=1e-5)
        np.testing.assert_allclose(got["router_logits"], seq.rows.router_logits, atol=1e-4)
        np.testing.assert_allclose(got["hidden_states_1"], seq.rows.hidden_states[1], atol=1e-2)
        assert row["completion_text"] == seq.text
        assert row["label_question"] == seq.prompt_index


def test_sampled_rollout_follows_the_plant(server):
    """64 prompts x n=2 on the planted model: every stored row routes as planted."""
    body = {
        "kind": "rollout",
        "model": "qwen3_moe-planted",
        "prompts": [{"prompt": p} for p in PROMPTS],
        "sampling": {"n": 2, "max_tokens": 8, "temperature": 1.0, "ignore_eos": True},
    }
    job = server.wait_job(server.client.post("/v1/jobs", json=body).json()["id"])
    assert job["state"] == "done" and job["sequences_done"] == 128
    store = open_store(job["store"])
    assert len(store.index) == 128
    assert sorted(set(store.index["sample_index"].to_list())) == [0, 1]
    assert store.index["generated_len"].to_list() == [8] * 128, "every sample has its text"
    for sid in store.index["sequence_id"].to_list():
        arrays = store.sequence(sid, ("token_ids", "topk_ids"))
        for layer in range(4):
            want = planted_topk(arrays["token_ids"], layer)
            np.testing.assert_array_equal(arrays["topk_ids"][:, layer], want)


def test_concurrent_small_jobs_each_commit_their_own_texts(server):
    """Eight 2-prompt jobs at once: their texts and closes reach the engine in shared
    calls (`WriterStates`); each store holds its own job's sequences with its own texts
    (each job generates a different length, so a text in the wrong store shows)."""
    ids = []
    for j in range(8):
        body = {
            "kind": "rollout",
            "model": "qwen3_moe",
            "prompts": [{"prompt": p} for p in PROMPTS[2 * j : 2 * j + 2]],
            "sampling": {"max_tokens": 3 + j, "temperature": 0, "ignore_eos": True},
        }
        ids.append(server.client.post("/v1/jobs", json=body).json()["id"])
    for j, job_id in enumerate(ids):
        job = server.wait_job(job_id)
        assert job["state"] == "done" and job["sequences_done"] == 2, job
        index = open_store(job["store"]).index
        assert sorted(index["prompt_index"].to_list()) == [0, 1]
        assert index["generated_len"].to_list() == [3 + j] * 2, "each job's own texts"
        assert all(len(t) == 3 + j for t in index["completion_token_ids"].to_list())


def test_stop_strings_leave_exactly_the_rows_of_the_returned_output(server):
    """Stop strings end a sample inside a step; the engine (its own process, running
    ahead of the detokenizer) may forward more. Every sequence reads P + G - 1 rows of
    its returned output, and its stored token ids are its prompt and completion."""
    body = {
        "kind": "rollout",
        "model": "qwen3_moe",
        "prompts": [{"prompt": p} for p in PROMPTS[:32]],
        "sampling": {"n": 2, "max_tokens": 24, "temperature": 1.0, "seed": 5, "stop": ["e", "a"]},
    }
    job = server.wait_job(server.client.post("/v1/jobs", json=body).json()["id"])
    assert job["state"] == "done" and job["sequences_done"] == 64, job
    store = open_store(job["store"])
    index = store.index
    stopped = index.filter(index["finish_reason"] == "stop")
    assert len(stopped) > 16, "the stop strings end most samples"
    for row in index.iter_rows(named=True):
        assert row["num_rows"] == row["prompt_len"] + row["generated_len"] - 1, row
        assert row["rows_written"] >= row["num_rows"]
        tokens = store.sequence(row["sequence_id"], ("token_ids",))["token_ids"]
        assert tokens[row["prompt_len"] :].tolist() == row["completion_token_ids"][:-1]


def test_score_job_reproduces_the_rollout(server, sampled_job):
    rollout = open_store(sampled_job["store"])
    rows = rollout.index.sort("prompt_index").head(16)
    body = {
        "kind": "score",
        "model": "qwen3_moe",
        "prompts": [
            {
                "prompt": PROMPTS[r["prompt_index"]],
                "completion_token_ids": r["completion_token_ids"],
            }
            for r in rows.iter_rows(named=True)
        ],
        "capture": {"logits_dtype": "float32"},
    }
    job = server.wait_job(server.client.post("/v1/jobs", json=body).json()["id"])
    assert job["state"] == "done", job
    scored = open_store(job["store"])
    compared = 0
    for i, r in enumerate(rows.iter_rows(named=True)):
        s = scored.index.filter(scored.index["prompt_index"] == i).row(0, named=True)
        a = rollout.sequence(r["sequence_id"])
        b = scored.sequence(s["sequence_id"])
        assert s["prompt_len"] == r["prompt_len"]
        n = len(a["token_ids"])  # the scored text has one more row: the last sampled token
        assert len(b["token_ids"]) == n + 1
        np.testing.assert_array_equal(b["token_ids"][:n], a["token_ids"])
        np.testing.assert_array_equal(b["topk_ids"][:n], a["topk_ids"])
        np.testing.assert_allclose(b["router_logits"][:n], a["router_logits"], atol=1e-4)
        np.testing.assert_array_equal(
            b["is_prompt"], np.arange(len(b["is_prompt"])) < s["prompt_len"]
        )
        compared += 1
    assert compared == 16


def test_list_metrics_and_models(server, sampled_job):
    listed = server.client.get("/v1/jobs", params={"limit": 2}).json()
    assert listed["count"] >= 1 and len(listed["data"]) <= 2
    models = {m["id"] for m in server.client.get("/v1/models").json()["data"]}
    assert models == {"qwen3_moe", "qwen3_moe-planted"}
    metrics = server.client.get("/metrics").text
    assert 'moetrace_jobs{state="done"}' in metrics
    seqs = server.client.get(
        f"/v1/jobs/{sampled_job['id']}/sequences", params={"offset": 60, "limit": 10}
    ).json()
    assert seqs["count"] == 128 and len(seqs["data"]) == 10


def test_seeded_jobs_reproduce(server):
    """The same seeded sampled job twice gives the same texts and routing, with prompts
    long enough that a step cannot hold them all."""
    long = " ".join(["the bank raised interest rates"] * 30)
    body = {
        "kind": "rollout",
        "model": "qwen3_moe",
        "prompts": [{"prompt": f"{long} {i}"} for i in range(16)],
        "sampling": {"n": 2, "max_tokens": 6, "temperature": 1.0, "seed": 7},
        "capture": {"logits": False},
    }
    jobs = [server.client.post("/v1/jobs", json=body).json()["id"] for _ in range(2)]
    stores = []
    for job_id in jobs:
        job = server.wait_job(job_id)
        assert job["state"] == "done" and job["sequences_done"] == 32, job
        stores.append(open_store(job["store"]))
    a, b = (s.index.sort(["prompt_index", "sample_index"]) for s in stores)
    assert a["completion_text"].to_list() == b["completion_text"].to_list()
    assert a["completion_text"].n_unique() > 1, "samples differ from each other"
    for x, y in zip(a["sequence_id"], b["sequence_id"], strict=True):
        np.testing.assert_array_equal(
            stores[0].sequence(x, ("topk_ids",))["topk_ids"],
            stores[1].sequence(y, ("topk_ids",))["topk_ids"],
        )


def test_cancel_is_idempotent_and_final(server):
    """Two cancels at once both answer 200; the job ends cancelled with its store
    committed and closed, and a third cancel changes nothing."""
    import httpx

    from tests.api.conftest import TOKEN

    body = {
        "kind": "rollout",
        "model": "qwen3_moe",
        # ~50k tokens: long enough that the job cannot end before the cancels arrive on a
        # loaded machine (16 x 400 once did); cancelled, it costs a few steps
        "prompts": [{"prompt": f"a long story {i}"} for i in range(128)],
        "sampling": {"max_tokens": 400, "ignore_eos": True},
    }
    job_id = server.client.post("/v1/jobs", json=body).json()["id"]
    deadline = time.monotonic() + 60
    while server.client.get(f"/v1/jobs/{job_id}").json()["state"] == "queued":
        assert time.monotonic() < deadline
        time.sleep(0.05)

    def cancel(_: int) -> httpx.Response:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=server.url, headers=headers, timeout=60) as client:
            return client.delete(f"/v1/jobs/{job_id}")

    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(cancel, range(2)))
    assert [a.status_code for a in answers] == [200, 200]
    assert {a.json()["state"] for a in answers} <= {"cancelling", "cancelled"}
    job = server.wait_job(job_id, timeout=120)
    assert job["state"] == "cancelled", job
    again = server.client.delete(f"/v1/jobs/{job_id}")
    assert again.status_code == 200 and again.json()["state"] == "cancelled"
    store = open_store(job["store"])  # committed sequences stay, whole
    for sid in store.index["sequence_id"].to_list():
        assert len(store.sequence(sid, ("token_ids",))["token_ids"]) > 0


def test_a_cancel_survives_a_restart(tmp_path):
    """The job record: a cancel under way when the server stops is final after restart;
    a job being cancelled never starts."""
    from capture_server.api.jobs_db import JobsDB

    db = JobsDB(tmp_path / "jobs.sqlite")
    job_id = db.create({"kind": "rollout", "model": "m"}, 4)
    assert db.request_cancel(job_id) and not db.request_cancel(job_id)
    assert db.unfinished() == [] and not db.start(job_id, sequences_done=0)
    assert db.finish_interrupted_cancels() == 1
    assert db.get(job_id)["state"] == "cancelled"
    assert not db.request_cancel(job_id)


def test_a_long_poll_answers_when_the_job_ends(server):
    """``GET /v1/jobs/{id}?wait=S`` holds the request until the job ends: one request
    sees it running at the start and done at the end; bounds are checked by name."""
    body = {
        "kind": "rollout",
        "model": "qwen3_moe",
        "prompts": [{"prompt": f"a long poll {i}"} for i in range(4)],
        "sampling": {"max_tokens": 8, "temperature": 0.0},
    }
    job_id = server.client.post("/v1/jobs", json=body).json()["id"]
    job = server.client.get(f"/v1/jobs/{job_id}", params={"wait": 60}).json()
    assert job["state"] == "done" and job["sequences_done"] == 4, job
    held = server.client.get(f"/v1/jobs/{job_id}", params={"wait": 60})
    assert held.json()["state"] == "done", "an ended job answers at once"
    bad = server.client.get(f"/v1/jobs/{job_id}", params={"wait": 61})
    assert bad.status_code == 422 and "wait" in bad.text
