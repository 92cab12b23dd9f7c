"""One poller of, and one sender to, the store writers in an engine's worker, shared by
every running job.

A job needs two things of its store's writer, which lives in the engine's worker: to
learn soon when it fails (generating on is then wasted), and to learn when its final
commit is done. Both are answered by `protocol.sink_states_rpc`, a utility call the
engine core serves between steps. Asked per job, 32 small jobs made 32 calls a second
while running and 50 a second each while committing; here one call a tick asks for
every store at once, however many jobs there are. Jobs also hand their texts to the
writers and close their stores here: what concurrent jobs ask for while a call is on its
way goes in one call (each is a round trip through the engine's step loop).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from capture_server.protocol import (
    Annotation,
    WorkerRpc,
    annotate_rpc,
    close_rpc,
    merged_sink_states,
    sink_error,
    sink_states_rpc,
)

RUNNING_TICK = 1.0  # seconds between polls while no store is committing its end
CLOSING_TICK = 0.02  # while one is: a finished job learns its commit is done this soon


class WriterStates:
    """Waits on the store writers of one engine for any number of jobs."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self._failure: dict[str, list[asyncio.Future[str]]] = {}
        self._closing: dict[str, list[asyncio.Future[str]]] = {}
        self._wake = asyncio.Event()
        self._poller: asyncio.Task | None = None
        self._to_close: list[tuple[tuple[str, list[str]], asyncio.Future[None]]] = []
        self._to_annotate: list[tuple[tuple[str, list[Annotation]], asyncio.Future[None]]] = []
        self._sender: asyncio.Task | None = None  # sends what is queued, one call per kind

    async def failure(self, store: str) -> str:
        """The error, once `store`'s writer has failed (wait on it while the job runs,
        and cancel the wait when it ends)."""
        return sink_error(await self._wait(self._failure, store)) or "failed"

    async def close(self, store: str, request_ids: list[str]) -> str | None:
        """End a job's requests in the worker, then wait until its store is committed
        and closed, never blocking the engine on the commit. Returns the store's error.

        Closes asked for while a call is on its way go together in the next one
        (`protocol.close_rpc` takes many stores): jobs that end together, as small jobs
        of one batch do, cost one call to the engine, not one each."""
        await self._queued_call(self._to_close, (store, request_ids))
        return sink_error(await self._wait(self._closing, store))

    async def annotate(self, store: str, annotations: list[Annotation]) -> None:
        """Hand a job's texts to its store's writer; texts asked for while a call is on
        its way go together in the next one (`protocol.annotate_rpc` takes many stores).
        Each call is a round trip through the engine's step loop: 32 small jobs sent 64."""
        await self._queued_call(self._to_annotate, (store, annotations))

    async def _queued_call(self, queue: list[tuple[Any, asyncio.Future[None]]], item: Any) -> None:
        sent: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append((item, sent))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send())
        await sent

    async def _send(self) -> None:
        """Until nothing is queued: the queued texts in one call, then the queued closes
        in one (a job queues its close only once its texts are sent)."""
        while self._to_annotate or self._to_close:
            if self._to_annotate:
                batch, self._to_annotate = self._to_annotate, []
                texts: dict[str, list[Annotation]] = {}
                for (store, annotations), _ in batch:
                    texts.setdefault(store, []).extend(annotations)
                await self._call(annotate_rpc(texts), batch)
            if self._to_close:
                batch, self._to_close = self._to_close, []
                stores = [store for (store, _), _ in batch]
                ids = [rid for (_, request_ids), _ in batch for rid in request_ids]
                await self._call(close_rpc(stores, ids), batch)

    async def _call(self, rpc: WorkerRpc, batch: list[tuple[Any, asyncio.Future[None]]]) -> None:
        try:
            await rpc.run(self.engine)
        except Exception as exc:  # each job learns it, as it would from its own call
            for _, sent in batch:
                if not sent.done():
                    sent.set_exception(exc)
            return
        for _, sent in batch:
            if not sent.done():
                sent.set_result(None)

    async def _wait(self, waiters: dict[str, list[asyncio.Future[str]]], store: str) -> str:
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        waiters.setdefault(store, []).append(future)
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll())
        self._wake.set()  # a closing store shortens the current tick
        try:
            return await future
        finally:
            pending = waiters.get(store, [])
            if future in pending:
                pending.remove(future)
            if not pending:
                waiters.pop(store, None)

    async def _poll(self) -> None:
        """Until nobody waits: one sink-state call per tick for every store waited on."""
        while self._failure or self._closing:
            self._wake.clear()
            tick = CLOSING_TICK if self._closing else RUNNING_TICK
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), tick)
            stores = sorted(self._failure.keys() | self._closing.keys())
            if not stores:
                continue
            try:
                per_worker = await sink_states_rpc(stores).run(self.engine)
                states = merged_sink_states(per_worker, stores)
            except Exception as exc:  # the engine is gone: every waiter learns why
                states = dict.fromkeys(stores, f"failed: engine: {exc}")
            for store in stores:
                state = states.get(store, "closed")
                if sink_error(state):
                    self._resolve(self._failure, store, state)
                if state != "closing":
                    self._resolve(self._closing, store, state)

    @staticmethod
    def _resolve(waiters: dict[str, list[asyncio.Future[str]]], store: str, state: str) -> None:
        for future in waiters.get(store, []):
            if not future.done():
                future.set_result(state)
