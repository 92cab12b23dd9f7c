"""Python clients of the capture service (sync and async, httpx).

Example:
    >>> from clients import Client
    >>> with Client("http://127.0.0.1:8000", token="...") as client:
    ...     job = client.submit({"kind": "rollout", "model": "moe",
    ...                          "prompts": [{"prompt": "Hi"}]})
    ...     job = client.wait(job["id"])
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from clients.errors import MoetraceHTTPError

FINISHED = ("done", "failed", "cancelled")
JSONL = {"content-type": "application/jsonl"}


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _check(response: httpx.Response) -> Any:
    if response.is_error:
        raise MoetraceHTTPError(response)
    return response.json()


class Client:
    """Synchronous client. `transport` lets tests plug in `httpx.MockTransport`."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = httpx.Client(
            base_url=url, headers=_headers(token), timeout=timeout, transport=transport
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def submit(self, job: dict[str, Any]) -> dict[str, Any]:
        """Create a job (`JobCreate` body); returns the job record."""
        return _check(self._http.post("/v1/jobs", json=job))

    def upload(self, path: str | Path) -> dict[str, Any]:
        """Upload a JSONL file of prompts (streamed); returns ``{"id", "prompts", "bytes"}``.
        A job then names it: ``{"prompts_file": id, ...}`` instead of ``prompts``."""
        with open(path, "rb") as body:
            return _check(self._http.post("/v1/files", content=body, headers=JSONL))

    def status(self, job_id: str) -> dict[str, Any]:
        return _check(self._http.get(f"/v1/jobs/{job_id}"))

    def list(self, offset: int = 0, limit: int = 50) -> dict[str, Any]:
        return _check(self._http.get("/v1/jobs", params={"offset": offset, "limit": limit}))

    def cancel(self, job_id: str) -> dict[str, Any]:
        return _check(self._http.delete(f"/v1/jobs/{job_id}"))

    def sequences(self, job_id: str, offset: int = 0, limit: int = 100) -> dict[str, Any]:
        return _check(
            self._http.get(
                f"/v1/jobs/{job_id}/sequences", params={"offset": offset, "limit": limit}
            )
        )

    def wait(
        self,
        job_id: str,
        poll: float = 0.5,
        timeout: float | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll until the job is done, failed or cancelled; returns the final record."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.status(job_id)
            if on_progress:
                on_progress(job)
            if job["state"] in FINISHED:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['state']} after {timeout} s")
            time.sleep(poll)


class AsyncClient:
    """Asynchronous client with the same methods as `Client`."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=url, headers=_headers(token), timeout=timeout, transport=transport
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def submit(self, job: dict[str, Any]) -> dict[str, Any]:
        return _check(await self._http.post("/v1/jobs", json=job))

    async def upload(self, path: str | Path) -> dict[str, Any]:
        body = await asyncio.to_thread(Path(path).read_bytes)
        return _check(await self._http.post("/v1/files", content=body, headers=JSONL))

    async def status(self, job_id: str) -> dict[str, Any]:
        return _check(await self._http.get(f"/v1/jobs/{job_id}"))

    async def list(self, offset: int = 0, limit: int = 50) -> dict[str, Any]:
        return _check(await self._http.get("/v1/jobs", params={"offset": offset, "limit": limit}))

    async def cancel(self, job_id: str) -> dict[str, Any]:
        return _check(await self._http.delete(f"/v1/jobs/{job_id}"))

    async def sequences(self, job_id: str, offset: int = 0, limit: int = 100) -> dict[str, Any]:
        return _check(
            await self._http.get(
                f"/v1/jobs/{job_id}/sequences", params={"offset": offset, "limit": limit}
            )
        )

    async def wait(self, job_id: str, poll: float = 0.5) -> dict[str, Any]:
        while True:
            job = await self.status(job_id)
            if job["state"] in FINISHED:
                return job
            await asyncio.sleep(poll)
