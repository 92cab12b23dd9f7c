"""A server killed with SIGKILL mid-job and restarted finishes the job, each sequence once."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from capture_server.specimens.planted import planted_topk
from capture_server.store import open_store
from tests.api.conftest import start_server, stop_server


@pytest.mark.slow
def test_sigkill_mid_job_then_restart(specimen, tmp_path):
    model = specimen("qwen3_moe", planted=True)
    data = tmp_path / "data"
    server = start_server([model], data, tmp_path / "first.log")
    body = {
        "kind": "rollout",
        "model": "qwen3_moe-planted",
        "prompts": [{"prompt": f"the cell divides {i}"} for i in range(128)],
        "sampling": {"n": 2, "max_tokens": 400, "temperature": 1.0},
    }
    job_id = server.client.post("/v1/jobs", json=body).json()["id"]
    deadline = time.monotonic() + 120
    committed_before = 0
    while time.monotonic() < deadline:  # kill once some sequences are committed
        committed_before = server.client.get(f"/v1/jobs/{job_id}/sequences").json()["count"]
        if committed_before > 0:
            break
        time.sleep(0.1)
    job = server.client.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "running", "the job must still be running when the server dies"
    assert 0 < committed_before < 256
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(timeout=30)

    restarted = start_server([model], data, tmp_path / "second.log")
    try:
        job = restarted.wait_job(job_id, timeout=600)
    finally:
        stop_server(restarted)
    assert job["state"] == "done", job
    store = open_store(job["store"])
    keys = list(
        zip(store.index["request_id"].to_list(), store.index["sample_index"].to_list(), strict=True)
    )
    assert len(keys) == len(set(keys)) == 256, "every sequence exactly once"
    for sid in store.index["sequence_id"].to_list():
        arrays = store.sequence(sid, ("token_ids", "topk_ids"))
        assert len(arrays["token_ids"]) > 0
        for layer in range(4):
            np.testing.assert_array_equal(
                arrays["topk_ids"][:, layer], planted_topk(arrays["token_ids"], layer)
            )
