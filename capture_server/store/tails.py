"""Tail segments: committed rows of a chunk that is not complete yet.

A commit must not re-encode the last, partial chunk of every array (its cost would grow
with how full that chunk is). Instead a commit writes the rows new since the last one as
one small object per array, a tail segment:

    tail/<array>/<first row>-<end row>.npy      (numpy's .npy format, the stored dtype)

and a chunk object is written only when the chunk is complete (or padded, when the
writer closes). The rules that keep a reader right at every moment:

    - a chunk object that exists holds every committed row of its chunk (chunk objects
      are only replaced whole, atomically);
    - a committed row of a chunk without an object is in some tail segment, and every
      tail segment holding a committed row holds its committed value;
    - the writer deletes a chunk's tail segments only after the chunk object exists.

So a reader takes a chunk's rows from its object when there is one, and from the tail
segments otherwise (`TailIndex.patch`). A closed store has no tail segments: plain zarr
reads all of it.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from zarr.abc.store import Store

from capture_server.store import _raw

TAIL_PREFIX = "tail/"
_NAME = re.compile(r"(\d+)-(\d+)\.npy$")


def tail_key(array: str, start: int, stop: int) -> str:
    return f"{TAIL_PREFIX}{array}/{start:012d}-{stop:012d}.npy"


def encode_npy(rows: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(rows), allow_pickle=False)
    return buffer.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)


def chunk_index(chunk_key: str) -> int:
    """Row-axis index of a chunk key relative to its array ("c.12.0.0" or "c/12/0/0")."""
    return int(re.split(r"[./]", chunk_key.removeprefix("c"), maxsplit=2)[1])


@dataclass(frozen=True, slots=True)
class Segment:
    array: str
    start: int
    stop: int

    @property
    def key(self) -> str:
        return tail_key(self.array, self.start, self.stop)


def list_segments(store: Store) -> list[Segment]:
    segments = []
    for key in _raw.list_keys(store, TAIL_PREFIX):
        array, _, name = key[len(TAIL_PREFIX) :].rpartition("/")
        match = _NAME.search(name)
        if match:
            segments.append(Segment(array, int(match[1]), int(match[2])))
    return segments


class TailIndex:
    """The tail segments a reader saw when it opened the store, and how to patch rows
    read through zarr with them."""

    def __init__(self, store: Store, chunk_rows: int) -> None:
        self.store = store
        self.chunk_rows = chunk_rows
        self.segments: dict[str, list[Segment]] = {}
        for segment in list_segments(store):
            self.segments.setdefault(segment.array, []).append(segment)

    def __bool__(self) -> bool:
        return bool(self.segments)

    def patch(
        self,
        array: str,
        start: int,
        rows: np.ndarray,
        chunk_exists: Callable[[int], bool],
        reread: Callable[[int, int], np.ndarray],
        committed_end: int,
    ) -> None:
        """Make `rows` (rows [start, start + len(rows)) of `array`, read through zarr
        before this call) right where their chunk had no object: from the chunk if it has
        one now (`reread` reads rows [lo, hi) through zarr again), else from the tail
        segments. Raises KeyError when a committed row is in neither."""
        segments = self.segments.get(array)
        if not segments:
            return
        stop = start + len(rows)
        first, last = start // self.chunk_rows, (stop - 1) // self.chunk_rows
        for chunk in range(first, last + 1):
            lo = max(start, chunk * self.chunk_rows)
            hi = min(stop, (chunk + 1) * self.chunk_rows)
            covering = [s for s in segments if s.start < hi and s.stop > lo]
            if not covering:
                continue
            if chunk_exists(chunk):
                rows[lo - start : hi - start] = reread(lo, hi)
                continue
            blobs = _raw.get_many(self.store, [s.key for s in covering])
            if any(blob is None for blob in blobs) and chunk_exists(chunk):
                # sealed since this reader listed the tails
                rows[lo - start : hi - start] = reread(lo, hi)
                continue
            filled = np.zeros(hi - lo, dtype=bool)
            for segment, blob in zip(covering, blobs, strict=True):
                if blob is None:
                    continue
                values = decode_npy(blob)
                a, b = max(lo, segment.start), min(hi, segment.stop)
                rows[a - start : b - start] = values[a - segment.start : b - segment.start]
                filled[a - lo : b - lo] = True
            if not filled[: max(0, committed_end - lo)].all():
                raise KeyError(f"{array}: rows {lo}:{hi} are in neither a chunk nor a tail")
