"""The routing store as a capture sink: bounded hand-over to one background writer thread,
so the model loop only enqueues.

A step's rows are appended to a deque without waking the writer: a thread woken at every
step of every open store costs the step loop a GIL hand-over each (32 small jobs' stores
halved an engine's rate here, at the same CPU time: docs/benchmarks.md). The writer
takes the rows when something needs it (a sequence's end, texts, a commit, a close, a
tick), or when the rows reach the bound. Writer threads outlive their stores and serve
the next one (`WriterThreads`)."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from capture_server.capture.records import ModelMeta, RoutingRows, SequenceEnd
from capture_server.capture.sink import RoutingSink
from capture_server.errors import StoreWriteError
from capture_server.protocol import Annotation
from capture_server.store.format import StoreOptions
from capture_server.store.parts import PartId
from capture_server.store.writer import StoreWriter

logger = logging.getLogger("moetrace.store")

COMMIT_INTERVAL_ENV = "MOETRACE_COMMIT_INTERVAL"
"""Seconds between a store's commits of finished sequences (each commit writes an index
part and a tail segment per array): lower commits sooner, higher writes fewer files."""


class WriterThreads:
    """Threads that run store writers' loops, each kept for the next store once its
    store closes. Starting a thread makes the starter wait until the new thread runs:
    the starter is the engine's step loop (a store opens at its first rows), and on a
    busy host that wait was most of what a small job's store cost the step loop
    (docs/benchmarks.md, small jobs)."""

    MAX_IDLE = 64  # idle threads kept; more concurrent stores than that start new ones

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[queue.SimpleQueue[Callable[[], None]]] = []
        self._pid = os.getpid()

    def run(self, loop: Callable[[], None]) -> None:
        """Run `loop` (which handles its own errors) on an idle thread, or a new one."""
        with self._lock:
            if self._pid != os.getpid():  # a forked child has the list, not the threads
                self._idle, self._pid = [], os.getpid()
            inbox = self._idle.pop() if self._idle else None
        if inbox is None:
            inbox = queue.SimpleQueue()
            threading.Thread(
                target=self._serve, args=(inbox,), name="moetrace-store-writer", daemon=True
            ).start()
        inbox.put(loop)

    @property
    def idle(self) -> int:
        return len(self._idle)

    def _serve(self, inbox: queue.SimpleQueue[Callable[[], None]]) -> None:
        while True:
            inbox.get()()
            with self._lock:
                if len(self._idle) >= self.MAX_IDLE or self._pid != os.getpid():
                    return
                self._idle.append(inbox)


WRITER_THREADS = WriterThreads()


class StoreSink(RoutingSink):
    """A capture sink that streams into a routing store from a background thread.

    Args:
        url: store directory or URL.
        options: what to keep and how (used when the store is created).
        queue_steps: bound of the queue between capture and writer, in steps.
        on_full: ``wait`` (default: capture blocks, nothing is lost) or ``drop`` (the
            step's rows are dropped, the sequences they belong to are never committed,
            and `stats["dropped_steps"]` counts them).
        flush_interval: seconds after which staged sequences are committed even when
            they do not fill a chunk (default: `COMMIT_INTERVAL_ENV` in the environment,
            else 2).
        part: this writer's part of a store with several writers (`store.parts`).
    """

    def __init__(
        self,
        url: str | Path,
        options: StoreOptions | None = None,
        *,
        job: dict[str, Any] | None = None,
        queue_steps: int = 256,
        on_full: str = "wait",
        flush_interval: float | None = None,
        part: PartId | None = None,
    ) -> None:
        if on_full not in ("wait", "drop"):
            raise ValueError(f"on_full: expected 'wait' or 'drop', got {on_full!r}")
        self.writer = StoreWriter(url, options, job, part)
        self.on_full = on_full
        if flush_interval is None:
            flush_interval = float(os.environ.get(COMMIT_INTERVAL_ENV) or 2.0)
        self.flush_interval = flush_interval
        self._queue: queue.Queue[tuple[str, Any, int]] = queue.Queue(maxsize=queue_steps)
        """Messages that wake the writer, each with the number of rows appended before it
        (the writer takes those first, so it sees everything in the order it was sent)."""
        self._rows: deque[RoutingRows] = deque()
        self._room = threading.Semaphore(queue_steps)  # free places for steps' rows
        self._appended = 0  # rows appended (by the capture side)
        self._taken = 0  # rows taken (by the writer thread)
        self._send_lock = threading.Lock()  # appends and messages in one order
        self._started = False
        self._finished = threading.Event()  # the writer loop has returned
        self._error: BaseException | None = None
        self._dropped_keys: set[tuple[str, int]] = set()
        self._lock = threading.Lock()
        self._uncommitted_since: float | None = None  # oldest ended, uncommitted sequence
        self._meta: ModelMeta | None = None
        self._commits_asked = 0  # commit tickets handed out (`request_commit`)
        self._commits_done = 0  # the last ticket whose commit is done
        self._commit_done = threading.Condition()
        self.stats = {"dropped_steps": 0, "dropped_sequences": 0, "duplicates_skipped": 0}
        """`dropped_*`: lost to a full queue (``on_full="drop"``); the writer's
        `dropped_without_texts` counts sequences whose promised texts never came."""

    # -- RoutingSink -------------------------------------------------------------------

    def open(self, meta: ModelMeta) -> None:
        """Start the writer thread, which creates or resumes the store first: creating
        arrays takes milliseconds the engine's step loop should not wait for. An error
        doing so surfaces on the next call, like any writer error."""
        self._meta = meta
        self.start()

    def start(self) -> None:
        """Start the writer loop (`open` does; separate so tests can hold it back)."""
        self._started = True
        WRITER_THREADS.run(self._run)

    def write(self, rows: RoutingRows) -> None:
        self._raise_if_failed()
        if not self._room.acquire(blocking=False):
            self._send("rows", None, block=False)  # full: the writer takes what is there
            if self.on_full == "drop":
                keys, _ = rows.segments()
                with self._lock:
                    self._dropped_keys.update(keys)
                    self.stats["dropped_steps"] += 1
                return
            while not self._room.acquire(timeout=0.05):
                self._raise_if_failed()
        with self._send_lock:
            self._rows.append(rows)
            self._appended += 1

    def end_sequence(self, end: SequenceEnd) -> None:
        self._raise_if_failed()
        if self._uncommitted_since is None:
            self._uncommitted_since = time.monotonic()
        self._send("end", end)

    def annotate(self, annotations: list[Annotation]) -> None:
        """Texts of sequences; each awaiting sequence commits together with its texts."""
        self._raise_if_failed()
        self._send("texts", annotations)

    def flush(self) -> None:
        """Block until everything enqueued so far is committed."""
        ticket = self._ask_commit()
        with self._commit_done:
            while not self._commit_done.wait_for(lambda: self._commits_done >= ticket, 0.05):
                self._raise_if_failed()
        self._raise_if_failed()

    def request_commit(self) -> None:
        """Ask the writer to commit everything enqueued so far, without waiting.
        `committing` is true until every commit asked for is done: the engine's step
        loop goes on while the store commits (`plugin.commit`)."""
        self._ask_commit()

    def _ask_commit(self) -> int:
        """Queue a commit; its ticket, done once `_commits_done` reaches it."""
        self._raise_if_failed()
        with self._send_lock:  # tickets in the order their messages are queued
            self._commits_asked += 1
            ticket = self._commits_asked
            self._put("flush", ticket)
        return ticket

    @property
    def committing(self) -> bool:
        """A commit asked for (`request_commit`) is not done yet."""
        return self._commits_done < self._commits_asked and self._error is None

    @property
    def error(self) -> str | None:
        """Why the writer thread stopped, if it failed (what the capture side raises)."""
        err = self._error
        if err is None:
            return None
        if isinstance(err, StoreWriteError):
            return str(err)
        return f"{self.writer.url}: store writer failed: {err}"

    def close(self) -> None:
        self.request_close()
        if self._started:
            self._finished.wait()
        self._raise_if_failed()

    def request_close(self) -> None:
        """Ask the writer thread to commit everything and stop, without waiting."""
        if self._started and not self._finished.is_set():
            self._send("close", None)

    @property
    def closed(self) -> bool:
        return not self._started or self._finished.is_set()

    def committed_keys(self) -> set[tuple[str, int]]:
        return self.writer.committed_keys()

    def metrics(self) -> dict[str, float]:
        """Gauges and counters for monitoring; safe to call from any thread."""
        since = self._uncommitted_since
        return {
            "queue_depth": self._queue.qsize() + self._appended - self._taken,
            # how long the oldest finished sequence has waited to be committed
            "lag_seconds": 0.0 if since is None else time.monotonic() - since,
            "bytes_written": self.writer.bytes_written,
            "sequences_committed": self.writer.sequences_committed,
            "dropped_without_texts": self.writer.dropped_without_texts,
            **self.stats,
        }

    def _send(self, kind: str, item: Any, block: bool = True) -> None:
        """A message to the writer thread, after the rows appended so far."""
        with self._send_lock:
            self._put(kind, item, block)

    def _put(self, kind: str, item: Any, block: bool = True) -> None:
        """`_send`, by a caller holding the send lock."""
        try:
            self._queue.put((kind, item, self._appended), block=block)
        except queue.Full:  # only a wake-up is sent without blocking: one is queued
            pass

    # -- writer thread -----------------------------------------------------------------

    def _raise_if_failed(self) -> None:
        if (error := self.error) is not None:
            raise StoreWriteError(error)

    def _run(self) -> None:
        parts: dict[tuple[str, int], list[tuple[RoutingRows, int, int]]] = defaultdict(list)
        last_commit = time.monotonic()
        try:
            if not self.writer.is_open:
                assert self._meta is not None, "open() the sink, or the writer, first"
                self.writer.open(self._meta)
            while True:
                timeout = max(0.0, self.flush_interval - (time.monotonic() - last_commit))
                try:
                    kind, item, rows_before = self._queue.get(timeout=timeout)
                except queue.Empty:
                    kind, item, rows_before = "tick", None, self._appended
                self._take_rows(rows_before, parts)
                if kind == "texts":
                    self.writer.add_texts(item)
                elif kind == "end":
                    self._end(item, parts)
                    if self.writer.staged_rows >= self.writer.chunk:
                        self.writer.flush(partial=False)
                elif kind in ("tick", "flush", "close"):
                    pending_before = self._queue.qsize()
                    if kind == "close":  # commit, seal the last chunk, stop the encoders
                        self.writer.close()
                    else:
                        self.writer.flush(partial=True)
                    last_commit = time.monotonic()
                    if pending_before == 0 and not self.writer.staged_sequences:
                        self._uncommitted_since = None
                    if kind in ("flush", "close"):  # a close commits every ticket before it
                        with self._commit_done:
                            self._commits_done = item if kind == "flush" else self._commits_asked
                            self._commit_done.notify_all()
                    if kind == "close":
                        return
        except BaseException as exc:  # surfaced to the capture side by _raise_if_failed
            logger.error("store writer for %s failed: %s", self.writer.url, exc)
            self._error = exc
        finally:
            self._finished.set()

    def _take_rows(
        self, upto: int, parts: dict[tuple[str, int], list[tuple[RoutingRows, int, int]]]
    ) -> None:
        """Sort the rows appended before message `upto` into their sequences' pieces."""
        while self._taken < upto:
            rows = self._rows.popleft()
            self._taken += 1
            self._room.release()
            keys, bounds = rows.segments()
            for key, a, b in zip(keys, bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
                parts[key].append((rows, a, b))  # sliced once, when the sequence ends

    def _end(
        self, end: SequenceEnd, parts: dict[tuple[str, int], list[tuple[RoutingRows, int, int]]]
    ) -> None:
        key = (end.request_id, end.sample_index)
        pieces = parts.pop(key, [])
        with self._lock:
            dropped = key in self._dropped_keys
            self._dropped_keys.discard(key)
        if dropped:
            self.stats["dropped_sequences"] += 1
            return
        rows = RoutingRows.gather(pieces) if pieces else None
        if not self.writer.add_sequence(end, rows):
            self.stats["duplicates_skipped"] += 1
