"""Where captured rows go: the `RoutingSink` interface and the in-memory sink.

The capture calls a sink from the worker process after each model step. A sink must
accept rows of many sequences interleaved, in step order, and treat `end_sequence`
as the point after which a sequence is complete. `capture.registry` opens sinks by URL;
the routing store's sink is `capture_server.store.sink.StoreSink`.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import defaultdict

import numpy as np

from capture_server.capture.records import ModelMeta, RoutingRows, SequenceEnd
from capture_server.protocol import Annotation

__all__ = ["MemorySink", "RoutingSink"]


class RoutingSink(ABC):
    """Receives routing rows from the capture, in step order."""

    @abstractmethod
    def open(self, meta: ModelMeta) -> None:
        """Called once before the first rows, with the model's routing metadata."""

    @abstractmethod
    def write(self, rows: RoutingRows) -> None:
        """Rows of one step (one or more sequences, positions increasing per sequence)."""

    @abstractmethod
    def end_sequence(self, end: SequenceEnd) -> None:
        """The sequence is complete; all its rows were passed to `write` before."""

    def annotate(self, annotations: list[Annotation]) -> None:  # noqa: B027 - optional
        """Texts of sequences (`CaptureOptions.texts`); a sink that keeps no texts
        ignores them."""

    def flush(self) -> None:  # noqa: B027 - no-op default for sinks that hold no backlog
        """Block until everything passed so far is durable (committed, for a store)."""

    def request_commit(self) -> None:
        """Ask the sink to make everything passed so far durable without waiting
        (`committing` tells when it is); the default flushes at once."""
        self.flush()

    @property
    def committing(self) -> bool:
        """A commit asked for by `request_commit` is not done yet."""
        return False

    @property
    def error(self) -> str | None:
        """Why the sink can take nothing more, if it failed."""
        return None

    def close(self) -> None:
        """Flush and release resources; the default marks the sink closed."""
        self._closed = True

    def request_close(self) -> None:
        """Ask the sink to flush and close without waiting (`closed` tells when it is);
        the default closes at once."""
        self.close()

    @property
    def closed(self) -> bool:
        """True once `close` has finished."""
        return getattr(self, "_closed", False)

    def metrics(self) -> dict[str, float]:
        """Gauges and counters for monitoring, safe to call from any thread; a sink
        without a writer has none."""
        return {}


class MemorySink(RoutingSink):
    """Keeps everything in memory: for tests and the one-process Python API."""

    def __init__(self) -> None:
        self.meta: ModelMeta | None = None
        # Each sequence keeps (step rows, start, stop) references; rows are sliced lazily.
        self._parts: dict[tuple[str, int], list[tuple[RoutingRows, int, int]]] = defaultdict(list)
        self.ended: dict[tuple[str, int], SequenceEnd] = {}
        self.texts: dict[tuple[str, int], Annotation] = {}
        self._lock = threading.Lock()

    def open(self, meta: ModelMeta) -> None:
        self.meta = meta

    def write(self, rows: RoutingRows) -> None:
        keys, bounds = rows.segments()
        with self._lock:
            for key, start, stop in zip(
                keys, bounds[:-1].tolist(), bounds[1:].tolist(), strict=True
            ):
                self._parts[key].append((rows, start, stop))

    def end_sequence(self, end: SequenceEnd) -> None:
        with self._lock:
            self.ended[(end.request_id, end.sample_index)] = end

    def annotate(self, annotations: list[Annotation]) -> None:
        with self._lock:
            self.texts.update({(a.request_id, a.sample_index): a for a in annotations})

    def keys(self) -> list[tuple[str, int]]:
        """(sequence key, sample index) of every sequence seen so far."""
        with self._lock:
            return list(self._parts)

    def sequence(self, request_id: str, sample_index: int = 0, *, pop: bool = False) -> RoutingRows:
        """All rows of one sequence, ordered by position; `pop` forgets them afterwards."""
        key = (request_id, sample_index)
        with self._lock:
            if key not in self._parts:
                raise KeyError(f"no rows for sequence {request_id!r} sample {sample_index}")
            parts = self._parts.pop(key) if pop else self._parts[key]
            if pop:
                self.ended.pop(key, None)
        rows = RoutingRows.gather(parts)
        if np.all(rows.positions[1:] > rows.positions[:-1]):  # steps come in position order
            return rows
        return rows.select(np.argsort(rows.positions, kind="stable"))
