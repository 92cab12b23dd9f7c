"""A job whose store writer fails stops generating, fails with the store's error, and
counts only what the store committed (here: nothing, the store cannot be created)."""

from __future__ import annotations

import pytest

from tests.api.conftest import start_server, stop_server


@pytest.mark.slow
def test_a_failed_writer_stops_the_job(specimen, tmp_path):
    # not a directory: every write of the store fails, even as root
    env = {"MOETRACE_STORE_ROOT": "/dev/null/stores"}
    server = start_server([specimen("qwen3_moe")], tmp_path / "data", tmp_path / "s.log", env)
    try:
        body = {
            "kind": "rollout",
            "model": "qwen3_moe",
            "prompts": [{"prompt": f"a long story {i}"} for i in range(16)],
            "sampling": {"max_tokens": 400, "ignore_eos": True},
        }
        job = server.wait_job(server.client.post("/v1/jobs", json=body).json()["id"], 300)
    finally:
        stop_server(server)
    assert job["state"] == "failed", job
    assert any(e.startswith("store:") for e in job["errors"]), job["errors"]
    assert job["sequences_done"] == 0
    assert job["tokens_done"] < 16 * 400 // 2, "generation stopped well before the end"
