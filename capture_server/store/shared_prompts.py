"""Prompt rows a request's samples have in common, stored once.

The n samples of one request share their prompt. With prefix caching their prompt rows
are one forward's, recalled by KV slot (`plugin.prefix_rows`), so they are equal byte
for byte; without it each sample forwards the prompt itself and its rows are usually,
not always, the same. The writer keeps the first sample's prompt rows of each request
(the holder) and stores of every later sample only the rows after the longest leading
run equal to the holder's in every array, byte for byte: what a reader joins back is
exactly what was captured.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np

from capture_server import protocol

MAX_HELD_ENV = "MOETRACE_SHARED_PROMPTS_MAX_GIB"
MAX_HELD_BYTES = 256 * 2**20
"""Prompt rows one store's writer holds for matching, at most (default; the environment
variable `MAX_HELD_ENV` sets it in GiB). The oldest requests' go first, and a later
sample of such a request then stores its prompt rows itself: nothing is lost, the store
is only larger. Rows are held as the capture gives them (float32 logits): at Qwen3-30B-A3B
shapes with logits, 27.7 kB a row, the default holds about 9,700 prompt rows."""


def max_held_bytes() -> int:
    value = os.environ.get(MAX_HELD_ENV)
    return MAX_HELD_BYTES if not value else int(float(value) * 2**30)


def leading_equal_rows(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading rows of `a` and `b` are equal byte for byte (NaN included)."""
    m = min(len(a), len(b))
    if m == 0 or a.dtype != b.dtype or a.shape[1:] != b.shape[1:]:
        return 0
    x = np.ascontiguousarray(a[:m]).reshape(m, -1).view(np.uint8)
    y = np.ascontiguousarray(b[:m]).reshape(m, -1).view(np.uint8)
    differs = (x != y).any(axis=1)
    return int(np.argmax(differs)) if differs.any() else m


class SharedPrompts:
    """The holder's prompt rows of each recent request, and the match of a later sample
    against them."""

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = max_held_bytes() if max_bytes is None else max_bytes
        self._held: OrderedDict[str, tuple[int, dict[str, np.ndarray]]] = OrderedDict()
        self._bytes = 0

    def match(
        self,
        request_id: str,
        prompt_len: int,
        token_offset: int,
        columns: dict[str, np.ndarray],
        *,
        hold: bool = True,
    ) -> tuple[int, int]:
        """(rows shared, the holder's first row) for a sequence about to be stored at
        `token_offset` with these `columns`; (0, -1) when it shares nothing, in which
        case the first sequence of a request becomes its holder (unless `hold` is false:
        no other sample of it will come)."""
        held = self._held.get(request_id)
        if held is None and not hold:
            return 0, -1
        prompt = int(np.count_nonzero(columns[protocol.POSITIONS] < prompt_len))
        if held is None:
            if prompt:
                # copies: a view would keep the capture's whole step arrays alive
                self._hold(
                    request_id, token_offset, {k: v[:prompt].copy() for k, v in columns.items()}
                )
            return 0, -1
        offset, rows = held
        self._held.move_to_end(request_id)
        shared = prompt
        for name, values in columns.items():
            if name not in rows:
                return 0, -1
            shared = min(shared, leading_equal_rows(rows[name], values[:prompt]))
            if shared == 0:
                return 0, -1
        return shared, offset

    def _hold(self, request_id: str, offset: int, rows: dict[str, np.ndarray]) -> None:
        size = sum(v.nbytes for v in rows.values())
        if size > self.max_bytes:
            return
        self._held[request_id] = (offset, rows)
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, (_, dropped) = self._held.popitem(last=False)
            self._bytes -= sum(v.nbytes for v in dropped.values())
