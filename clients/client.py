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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from clients.errors import MoetraceHTTPError

FINISHED = ("done", "failed", "cancelled")
MAX_WAIT = 60.0  # seconds the server holds a status request at most
JSONL = {"content-type": "application/jsonl"}
UPLOAD_CHUNK = 1 << 16  # bytes read at a time from an uploaded file


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


@dataclass(frozen=True, slots=True)
class _Call:
    """One API call, before it is sent: what both clients send the same way."""

    method: str
    path: str
    params: dict[str, Any] | None = None
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)

    def request(self, content: Any = None) -> dict[str, Any]:
        """Keyword arguments of httpx's ``request``, with the body `content` if any."""
        return {
            "method": self.method,
            "url": self.path,
            "params": self.params,
            "json": self.json,
            "headers": self.headers,
            "content": content,
        }


class _BaseClient:
    """Request building and response handling, shared by `Client` and `AsyncClient`,
    which differ only in how they send a `_Call` and wait."""

    @staticmethod
    def _submit(job: dict[str, Any]) -> _Call:
        return _Call("POST", "/v1/jobs", json=job)

    @staticmethod
    def _status(job_id: str, wait: float = 0.0) -> _Call:
        params = {"wait": round(min(wait, MAX_WAIT), 3)} if wait > 0 else {}
        return _Call("GET", f"/v1/jobs/{job_id}", params=params)

    @staticmethod
    def _list(offset: int, limit: int) -> _Call:
        return _Call("GET", "/v1/jobs", params={"offset": offset, "limit": limit})

    @staticmethod
    def _cancel(job_id: str) -> _Call:
        return _Call("DELETE", f"/v1/jobs/{job_id}")

    @staticmethod
    def _sequences(job_id: str, offset: int, limit: int) -> _Call:
        params = {"offset": offset, "limit": limit}
        return _Call("GET", f"/v1/jobs/{job_id}/sequences", params=params)

    @staticmethod
    def _experiment_result(job_id: str) -> _Call:
        return _Call("GET", f"/v1/jobs/{job_id}/result")

    @staticmethod
    def _upload(path: str | Path) -> _Call:
        """The server checks the declared length before reading the body."""
        size = {"content-length": str(Path(path).stat().st_size)}
        return _Call("POST", "/v1/files", headers={**JSONL, **size})

    @staticmethod
    def _result(response: httpx.Response) -> Any:
        if response.is_error:
            raise MoetraceHTTPError(response)
        return response.json()

    @staticmethod
    def _wait_for(poll: float, deadline: float | None) -> float:
        """Seconds the next long poll may wait: `poll`, or less before the deadline."""
        if deadline is None:
            return poll
        return max(min(poll, deadline - time.monotonic()), 0.001)

    @staticmethod
    def _finished(
        job: dict[str, Any],
        deadline: float | None,
        timeout: float | None,
        on_progress: Callable[[dict[str, Any]], None] | None,
    ) -> bool:
        """One poll of `wait`: True when the job is over; raises past the deadline."""
        if on_progress:
            on_progress(job)
        if job["state"] in FINISHED:
            return True
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job['id']} still {job['state']} after {timeout} s")
        return False


class Client(_BaseClient):
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

    def _send(self, call: _Call, content: Any = None) -> Any:
        return self._result(self._http.request(**call.request(content)))

    def submit(self, job: dict[str, Any]) -> dict[str, Any]:
        """Create a job (`JobCreate` body); returns the job record."""
        return self._send(self._submit(job))

    def upload(self, path: str | Path) -> dict[str, Any]:
        """Upload a JSONL file of prompts (streamed); returns ``{"id", "prompts", "bytes"}``.
        A job then names it: ``{"prompts_file": id, ...}`` instead of ``prompts``."""
        with open(path, "rb") as body:  # httpx streams a file and sends its length
            return self._send(self._upload(path), content=body)

    def status(self, job_id: str) -> dict[str, Any]:
        return self._send(self._status(job_id))

    def list(self, offset: int = 0, limit: int = 50) -> dict[str, Any]:
        return self._send(self._list(offset, limit))

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._send(self._cancel(job_id))

    def sequences(self, job_id: str, offset: int = 0, limit: int = 100) -> dict[str, Any]:
        return self._send(self._sequences(job_id, offset, limit))

    def experiment_result(self, job_id: str) -> dict[str, Any]:
        """A finished experiment job's table (``{"data": [rows]}``)."""
        return self._send(self._experiment_result(job_id))

    def wait(
        self,
        job_id: str,
        poll: float = 0.5,
        timeout: float | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Wait until the job is done, failed or cancelled; returns the final record.

        Each request is a long poll: the server answers when the job ends, or after
        `poll` seconds with its progress (for `on_progress`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        job = self.status(job_id)
        while not self._finished(job, deadline, timeout, on_progress):
            wait, asked = self._wait_for(poll, deadline), time.monotonic()
            job = self._send(self._status(job_id, wait))
            if job["state"] not in FINISHED:  # a server that does not hold the request
                time.sleep(max(wait - (time.monotonic() - asked), 0.0))
        return job


class AsyncClient(_BaseClient):
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

    async def _send(self, call: _Call, content: Any = None) -> Any:
        return self._result(await self._http.request(**call.request(content)))

    async def submit(self, job: dict[str, Any]) -> dict[str, Any]:
        """Create a job (`JobCreate` body); returns the job record."""
        return await self._send(self._submit(job))

    async def upload(self, path: str | Path) -> dict[str, Any]:
        """Upload a JSONL file of prompts, streamed in chunks read off the event loop."""

        async def chunks() -> AsyncIterator[bytes]:
            with open(path, "rb") as body:
                while chunk := await asyncio.to_thread(body.read, UPLOAD_CHUNK):
                    yield chunk

        return await self._send(self._upload(path), content=chunks())

    async def status(self, job_id: str) -> dict[str, Any]:
        return await self._send(self._status(job_id))

    async def list(self, offset: int = 0, limit: int = 50) -> dict[str, Any]:
        return await self._send(self._list(offset, limit))

    async def cancel(self, job_id: str) -> dict[str, Any]:
        return await self._send(self._cancel(job_id))

    async def sequences(self, job_id: str, offset: int = 0, limit: int = 100) -> dict[str, Any]:
        return await self._send(self._sequences(job_id, offset, limit))

    async def experiment_result(self, job_id: str) -> dict[str, Any]:
        """A finished experiment job's table (``{"data": [rows]}``)."""
        return await self._send(self._experiment_result(job_id))

    async def wait(
        self,
        job_id: str,
        poll: float = 0.5,
        timeout: float | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Wait until the job is done, failed or cancelled; returns the final record.

        Each request is a long poll: the server answers when the job ends, or after
        `poll` seconds with its progress (for `on_progress`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        job = await self.status(job_id)
        while not self._finished(job, deadline, timeout, on_progress):
            wait, asked = self._wait_for(poll, deadline), time.monotonic()
            job = await self._send(self._status(job_id, wait))
            if job["state"] not in FINISHED:  # a server that does not hold the request
                await asyncio.sleep(max(wait - (time.monotonic() - asked), 0.0))
        return job
