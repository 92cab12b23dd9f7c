"""A job whose store writer fails stops generating, fails with the store's error, and
counts only what the store committed (here: nothing, the store cannot be created).
OpenAI requests recording into a failed store are answered 500 with the store's error,
each of them, though requests that finish together share one commit."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.api.conftest import TOKEN, start_server, stop_server


async def _online_requests(url: str, count: int) -> list[httpx.Response]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=url, timeout=120, headers=headers) as http:
        body = {"model": "qwen3_moe", "max_tokens": 4, "moetrace": {"job": "broken"}}
        return await asyncio.gather(
            *(http.post("/v1/completions", json={**body, "prompt": f"p{i}"}) for i in range(count))
        )


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
        online = asyncio.run(_online_requests(server.url, 6))
    finally:
        stop_server(server)
    assert job["state"] == "failed", job
    assert any(e.startswith("store:") for e in job["errors"]), job["errors"]
    assert job["sequences_done"] == 0
    assert job["tokens_done"] < 16 * 400 // 2, "generation stopped well before the end"
    assert [r.status_code for r in online] == [500] * 6, [r.text for r in online]
    assert all(r.json()["detail"].startswith("store: ") for r in online)
