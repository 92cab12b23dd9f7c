"""The running batch's requests as arrays, so a step's rows are attributed by a few array
operations instead of Python loops over its requests.

At 64 decode rows a step, looking every request up and updating its progress one by one
was most of the collector's fixed cost per step (cProfile: 64 state lookups and `max`
calls, two loops over requests). `RequestProgress` keeps each open request's progress in
columns indexed by a slot of its own; `BatchView` is one batch composition's per-request
arrays, built when the batch changes and reused while it does not (decode steps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


class RequestProgress:
    """Where each open request's capture stands, by the slot `open` gave it:

    - ``next_position``: positions below it were captured already (a preempted request's
      recomputed rows are dropped);
    - ``first_position``: its first captured position (-1 until it has one);
    - ``num_rows``: rows delivered so far.
    """

    def __init__(self, capacity: int = 64) -> None:
        self.next_position = np.full(capacity, -1, dtype=np.int64)
        self.first_position = np.full(capacity, -1, dtype=np.int64)
        self.num_rows = np.zeros(capacity, dtype=np.int64)
        self._free = list(range(capacity - 1, -1, -1))

    def open(self) -> int:
        """A fresh slot for a new request."""
        if not self._free:
            self._grow()
        slot = self._free.pop()
        self.next_position[slot] = -1
        self.first_position[slot] = -1
        self.num_rows[slot] = 0
        return slot

    def close(self, slot: int) -> tuple[int, int]:
        """(first position, rows) of a finished request; its slot is free again."""
        self._free.append(slot)
        return int(self.first_position[slot]), int(self.num_rows[slot])

    def advance(
        self, slots: np.ndarray, seg_min: np.ndarray, seg_max: np.ndarray, kept: np.ndarray
    ) -> None:
        """One step's rows, a segment per request (distinct `slots`): the lowest and
        highest position forwarded, and how many rows were kept."""
        first = self.first_position[slots]
        fresh = first < 0
        self.first_position[slots[fresh]] = seg_min[fresh]
        self.next_position[slots] = np.maximum(self.next_position[slots], seg_max + 1)
        self.num_rows[slots] += kept

    def _grow(self) -> None:
        old = len(self.num_rows)
        self.next_position = np.concatenate([self.next_position, np.full(old, -1, np.int64)])
        self.first_position = np.concatenate([self.first_position, np.full(old, -1, np.int64)])
        self.num_rows = np.concatenate([self.num_rows, np.zeros(old, np.int64)])
        self._free.extend(range(2 * old - 1, old - 1, -1))


@dataclass(frozen=True, slots=True, eq=False)
class BatchView:
    """One composition of the runner's persistent batch (requests in batch order), with
    what the collector needs of each request as arrays indexed by batch position.
    Uncaptured requests have state None, slot -1."""

    req_ids: list[str]
    states: list[Any]  # the collector's request state, or None
    captured: np.ndarray  # bool
    all_captured: bool  # every request is: every row of a step is
    slots: np.ndarray  # RequestProgress slot
    keys: np.ndarray  # sequence key (object)
    samples: np.ndarray  # sample index (int32)
    prompt_len: np.ndarray  # int64
    sink_of_req: np.ndarray  # index into `sinks`
    sinks: list[int]  # per sink, in first-seen order: its first request's batch position
    want_logits: bool  # some request asks for router logits
    hidden_layers: frozenset[int]  # model MoE layers whose router input some request asks for

    @classmethod
    def of(cls, req_ids: list[str], states: list[Any]) -> BatchView:
        """The view of `states` (each with ``options``, ``key``, ``sample_index``,
        ``prompt_len`` and ``slot``, or None) in batch order."""
        sink_index: dict[str, int] = {}
        sinks: list[int] = []
        sink_of_req = np.zeros(len(states), dtype=np.int64)
        hidden: set[int] = set()
        for r, state in enumerate(states):
            if state is None:
                continue
            hidden.update(state.options.hidden_layers)
            url = state.options.sink
            if url not in sink_index:
                sink_index[url] = len(sinks)
                sinks.append(r)
            sink_of_req[r] = sink_index[url]
        captured = np.array([s is not None for s in states], dtype=bool)
        return cls(
            req_ids=req_ids,
            states=states,
            captured=captured,
            all_captured=bool(captured.all()),
            slots=np.array([-1 if s is None else s.slot for s in states], dtype=np.int64),
            keys=np.array([None if s is None else s.key for s in states], dtype=object),
            samples=np.array([0 if s is None else s.sample_index for s in states], np.int32),
            prompt_len=np.array([0 if s is None else s.prompt_len for s in states], np.int64),
            sink_of_req=sink_of_req,
            sinks=sinks,
            want_logits=any(s is not None and s.options.logits for s in states),
            hidden_layers=frozenset(hidden),
        )
