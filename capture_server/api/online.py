"""Named job stores for OpenAI-compatible requests ("online" jobs).

A request carrying ``moetrace: {"job": NAME, ...}`` records into the open online job of
that name (created on first use, closed by ``DELETE /v1/jobs/{id}``). Each prompt of a
request becomes one sequence ``c{k}``, numbered in arrival order. Commits are batched:
concurrent requests that finish together share one commit, which the engine does not
wait for, and a response returns only after its routing is committed.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from capture_server.api.jobs_db import JobsDB
from capture_server.api.runner import close_store, sink_state
from capture_server.api.schemas import Capture
from capture_server.protocol import Annotation, commit_rpc, merged_sink_states, sink_error

COMMIT_POLL_SECONDS = 0.005
"""How often a waiting batch asks whether its store's commit is done. Each ask is an
engine call, answered between two steps; a commit takes tens of milliseconds."""


class CaptureConflictError(ValueError):
    """A request's capture options differ from those its named job store was made with."""


@dataclass
class _Pending:
    """A job's requests waiting for a commit, and what each waits on: the store's error
    (or None) once the commit that took its rows is done."""

    request_ids: list[str] = field(default_factory=list)
    annotations: list[Annotation] = field(default_factory=list)
    waiters: list[asyncio.Future[str | None]] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class OnlineRecorder:
    def __init__(self, db: JobsDB, store_path: Any) -> None:
        self.db = db
        self.store_path = store_path
        self._pending: dict[str, _Pending] = {}
        self._create_lock = asyncio.Lock()
        self._open_jobs: dict[tuple[str, str], tuple[str, Capture]] = {}  # (name, model)
        self._name_of: dict[str, tuple[str, str]] = {}  # job -> its key in `_open_jobs`
        self._last_commit: dict[str, tuple[float, Any]] = {}  # job -> (time, engine)

    async def close_idle(self, idle_seconds: float) -> None:
        """Close the store writers of online jobs idle for `idle_seconds` (the job stays
        open; its next request reopens the store). Runs for the server's lifetime: an RL
        loop naming a job per step would otherwise keep a writer thread per step."""
        while True:
            await asyncio.sleep(max(idle_seconds / 4, 0.5))
            now = time.monotonic()
            for job_id, (last, engine) in list(self._last_commit.items()):
                pending = self._pending.get(job_id)
                busy = pending is not None and pending.lock.locked()
                if now - last >= idle_seconds and not busy:
                    del self._last_commit[job_id]
                    self.forget(job_id)  # looked up again if it comes back: memory stays flat
                    await close_store(engine, self.store_path(job_id), [])

    async def job_for(self, name: str, model: str, capture: Capture) -> str:
        """The open online job `name` on `model`, created with `capture` if absent.
        Open jobs are kept in memory: a request looks its job up without the database."""
        known = self._open_jobs.get((name, model))
        if known is None:
            async with self._create_lock:
                known = self._open_jobs.get((name, model)) or self._find_or_create(
                    name, model, capture
                )
                self._open_jobs[(name, model)] = known
                self._name_of[known[0]] = (name, model)
        job_id, made_with = known
        for key in Capture.model_fields:
            if getattr(made_with, key) != getattr(capture, key):
                raise CaptureConflictError(
                    f"moetrace.{key}: job {name!r} records {getattr(made_with, key)!r}; "
                    "use another job name for other capture options"
                )
        return job_id

    def _find_or_create(self, name: str, model: str, capture: Capture) -> tuple[str, Capture]:
        job = self.db.find_open(name, model)
        if job is not None:
            return job["id"], Capture(**job["request"]["capture"])
        request = {
            "kind": "online",
            "model": model,
            "name": name,
            "capture": capture.model_dump(mode="json"),
        }
        return self.db.create(request, 0, state="open"), capture

    def forget(self, job_id: str) -> None:
        """Drop the job from memory: it is being closed (the next request of its name
        opens a new one) or idle (the next one finds it in the database)."""
        key = self._name_of.pop(job_id, None)
        if key is not None:
            self._open_jobs.pop(key, None)

    def reserve(self, job_id: str, prompts: int, n: int, engine: Any) -> int:
        """Number the request's prompts; the job counts as active from now on."""
        self._last_commit[job_id] = (time.monotonic(), engine)
        return self.db.reserve(job_id, prompts, n)

    async def commit(
        self,
        job_id: str,
        engine: Any,
        request_ids: list[str],
        annotations: list[Annotation],
        tokens: int,
    ) -> str | None:
        """Hand the texts to the store's writer, end the requests in the worker and
        commit: each sequence is committed together with its texts. Returns the store's
        error, if it failed. Requests that finish together share one commit and one
        look at the store's state: one engine call per batch (`protocol.commit_rpc`)."""
        pending = self._pending.setdefault(job_id, _Pending())
        committed: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        pending.request_ids += request_ids
        pending.annotations += annotations
        pending.waiters.append(committed)
        async with pending.lock:  # whoever gets the lock commits everyone's so far
            if not committed.done():  # shielded: the others' rows go with this request's
                await asyncio.shield(self._commit_pending(job_id, engine, pending))
        error = await committed
        self.db.add_progress(job_id, done=len(annotations), tokens=tokens)
        self._last_commit[job_id] = (time.monotonic(), engine)
        return error

    async def _commit_pending(self, job_id: str, engine: Any, pending: _Pending) -> None:
        """Commit every waiting request's rows and texts; resolve their waiters."""
        ids, pending.request_ids = pending.request_ids, []
        rows, pending.annotations = pending.annotations, []
        waiters, pending.waiters = pending.waiters, []
        store = self.store_path(job_id)
        try:
            states = await commit_rpc({store: rows}, ids).run(engine)
            state = merged_sink_states(states, [store])[store]
            while state == "committing":  # the engine steps on while the store commits
                await asyncio.sleep(COMMIT_POLL_SECONDS)
                state = await sink_state(engine, store)
            error = sink_error(state)
        except Exception as exc:  # every request of the batch sees the failure
            for waiter in waiters:
                if not waiter.cancelled():
                    waiter.set_exception(exc)
            return
        for waiter in waiters:
            if not waiter.cancelled():
                waiter.set_result(error)
