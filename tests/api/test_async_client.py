"""The async client against the real server: upload, submit, wait with progress and a
deadline, list, sequences, cancel, errors; checked against what the server stored."""

from __future__ import annotations

import asyncio
import json

import pytest

from capture_server.store import open_store
from clients import AsyncClient, MoetraceHTTPError
from tests.api.conftest import TOKEN, UPLOAD_LIMIT


def test_async_client_runs_an_uploaded_job_end_to_end(server, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    lines = [{"prompt": f"async prompt {i}", "labels": {"question": i}} for i in range(3)]
    prompts.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    seen: list[str] = []

    async def run() -> tuple[dict, dict, dict, dict]:
        async with AsyncClient(server.url, token=TOKEN) as client:
            upload = await client.upload(prompts)
            job = await client.submit(
                {
                    "kind": "rollout",
                    "model": "qwen3_moe",
                    "prompts_file": upload["id"],
                    "sampling": {"max_tokens": 4, "temperature": 0.0},
                }
            )
            final = await client.wait(
                job["id"], poll=0.1, timeout=300, on_progress=lambda j: seen.append(j["state"])
            )
            listed = await client.list(limit=500)
            sequences = await client.sequences(job["id"])
            return upload, final, listed, sequences

    upload, final, listed, sequences = asyncio.run(run())
    assert upload["prompts"] == 3 and upload["bytes"] == prompts.stat().st_size
    assert final["state"] == "done" and final["sequences_done"] == 3, final
    assert seen[-1] == "done" and len(seen) >= 1
    assert final["id"] in {j["id"] for j in listed["data"]}
    store = open_store(final["store"])
    assert sorted(store.index["request_id"].to_list()) == ["p0", "p1", "p2"]
    # a three-prompt job gets the smallest chunks, not ones sized for a long rollout
    assert store.chunk_tokens == 256
    assert sequences["count"] == 3


def test_async_client_errors_and_deadline(server):
    async def run() -> None:
        async with AsyncClient(server.url, token=TOKEN) as client:
            with pytest.raises(MoetraceHTTPError) as missing:
                await client.status("no-such-job")
            assert missing.value.response.status_code == 404
            job = await client.submit(
                {
                    "kind": "rollout",
                    "model": "qwen3_moe",
                    "prompts": [{"prompt": "a long one"}] * 4,
                    "sampling": {"max_tokens": 200, "ignore_eos": True},
                }
            )
            with pytest.raises(TimeoutError, match=job["id"]):
                await client.wait(job["id"], poll=0.05, timeout=0.0)
            await client.cancel(job["id"])
            final = await client.wait(job["id"], poll=0.1, timeout=120)
            assert final["state"] in ("cancelled", "done")

        async with AsyncClient(server.url, token="wrong") as client:
            with pytest.raises(MoetraceHTTPError) as denied:
                await client.list()
            assert denied.value.response.status_code == 401

    asyncio.run(run())


def test_async_upload_over_the_limit_is_refused(server, tmp_path):
    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps({"prompt": "x" * (UPLOAD_LIMIT + 10)}) + "\n")

    async def run() -> None:
        async with AsyncClient(server.url, token=TOKEN) as client:
            with pytest.raises(MoetraceHTTPError) as refused:
                await client.upload(big)
            assert refused.value.response.status_code == 413

    asyncio.run(run())
