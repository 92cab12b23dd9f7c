"""Where captured rows go: the `RoutingSink` interface, the in-memory sink and the sink registry.

The capture calls a sink from the worker process after each model step. A sink must
accept rows of many sequences interleaved, in step order, and treat `end_sequence`
as the point after which a sequence is complete.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import defaultdict
from typing import Any

import numpy as np

from capture_server.capture.records import ModelMeta, RoutingRows, SequenceEnd

__all__ = ["MemorySink", "RoutingSink", "memory_sink", "open_sink"]


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

    def close(self) -> None:  # noqa: B027 - optional hook with a no-op default
        """Flush and release resources; the default does nothing."""


class MemorySink(RoutingSink):
    """Keeps everything in memory: for tests and the one-process Python API."""

    def __init__(self) -> None:
        self.meta: ModelMeta | None = None
        # Each sequence keeps (step rows, start, stop) references; rows are sliced lazily.
        self._parts: dict[tuple[str, int], list[tuple[RoutingRows, int, int]]] = defaultdict(list)
        self.ended: dict[tuple[str, int], SequenceEnd] = {}
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
        rows = RoutingRows.concat([r.slice(a, b) for r, a, b in parts])
        return rows.select(np.argsort(rows.positions, kind="stable"))


_registry: dict[str, RoutingSink] = {}
_registry_lock = threading.Lock()


def memory_sink(name: str) -> MemorySink:
    """The process-wide memory sink called `name` (created on first use)."""
    sink = open_sink(f"memory://{name}")
    assert isinstance(sink, MemorySink)
    return sink


def forget_sink(url: str) -> None:
    """Drop a closed sink from the registry: the next `open_sink` for `url` makes a new
    one (a store resumes from what it committed)."""
    with _registry_lock:
        _registry.pop(url, None)


def open_sink(url: str, store_options: dict[str, Any] | None = None) -> RoutingSink:
    """The sink for `url`, created once per process and then shared.

    ``memory://NAME`` is an in-process `MemorySink`; anything else is a routing store
    path or URL handled by `capture_server.store`, created with `store_options`
    (`StoreOptions` fields) when it does not exist yet.
    """
    with _registry_lock:
        if url not in _registry:
            if url.startswith("memory://"):
                _registry[url] = MemorySink()
            else:
                from capture_server.store.format import StoreOptions
                from capture_server.store.writer import StoreSink

                opts = dict(store_options or {})
                if "hidden_layers" in opts:
                    opts["hidden_layers"] = tuple(opts["hidden_layers"])
                _registry[url] = StoreSink(url, StoreOptions(**opts))
        return _registry[url]
