"""The Python client against a fake transport: errors carry the response, wait polls."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from clients import AsyncClient, Client, MoetraceHTTPError


def test_error_names_status_url_and_detail():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"detail": "Job not found"})

    with Client("http://svc", transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(MoetraceHTTPError) as info:
            client.status("nope")
    err = info.value
    assert err.response.status_code == 404 and err.detail == "Job not found"
    assert "GET http://svc/v1/jobs/nope" in str(err)


def test_wait_polls_until_finished_and_sends_the_token():
    states = iter(["queued", "running", "done"])
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200, json={"id": "j", "state": next(states)})

    with Client("http://svc", token="t", transport=httpx.MockTransport(handler)) as client:
        assert client.wait("j", poll=0)["state"] == "done"
    assert seen == ["Bearer t"] * 3


def test_wait_long_polls_with_the_poll_interval():
    """After the first status, each request asks the server to hold it up to `poll`
    seconds (``wait``); a server that answers at once is not asked again at once."""
    states = iter(["running", "running", "done"])
    waits = []

    def handler(request: httpx.Request) -> httpx.Response:
        waits.append(request.url.params.get("wait"))
        return httpx.Response(200, json={"id": "j", "state": next(states)})

    with Client("http://svc", transport=httpx.MockTransport(handler)) as client:
        started = time.monotonic()
        assert client.wait("j", poll=0.2)["state"] == "done"
        assert time.monotonic() - started >= 0.2, "an old server's quick answer waits out poll"
    assert waits == [None, "0.2", "0.2"]


def test_async_client_submits():
    async def handler(request: httpx.Request) -> httpx.Response:
        assert request.method == "POST" and request.url.path == "/v1/jobs"
        return httpx.Response(201, json={"id": "j", "state": "queued"})

    async def run():
        async with AsyncClient("http://svc", transport=httpx.MockTransport(handler)) as c:
            return await c.submit({"kind": "rollout"})

    assert asyncio.run(run())["id"] == "j"
