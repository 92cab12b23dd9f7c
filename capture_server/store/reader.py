"""Read routing stores: the sequence index as polars, per-sequence arrays, aligned blocks.

Needs numpy, zarr and polars only (no vLLM, no torch), so the analyzer and clients can
use it on machines without the inference stack.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import zarr

from capture_server import protocol
from capture_server.capture.records import ModelSummary
from capture_server.errors import StoreCorruptError, StoreFormatError, StoreNotFoundError
from capture_server.store import _raw
from capture_server.store.chunks import chunk_key
from capture_server.store.format import (
    ATTRS_KEY,
    FORMAT_NAME,
    FORMAT_VERSION,
    INFO_PREFIX,
    MODEL_GROUP,
    StoreOptions,
)
from capture_server.store.index import (
    INDEX_SCHEMA,
    read_index_parts,
    stored_end,
    stored_rows,
    with_shared_columns,
)
from capture_server.store.tails import TailIndex


@dataclass(frozen=True, slots=True)
class Block:
    """Whole sequences whose rows lie in one run of chunks: the unit of parallel work."""

    start: int
    """First token row (chunk-aligned)."""
    stop: int
    """One past the last token row."""
    sequence_ids: tuple[int, ...]
    """Sequences whose rows are all inside ``[start, stop)``."""


class RoutingStore:
    """A routing store opened for reading. Use `open_store`."""

    def __init__(
        self,
        url: str,
        root: zarr.Group,
        attrs: dict[str, Any],
        index: pl.DataFrame,
        tail_index: TailIndex | None = None,
    ):
        self.url = url
        self.root = root
        self.attrs = attrs
        self.index = index
        """One row per committed sequence, ordered by `sequence_id`."""
        self.model = ModelSummary.from_dict(attrs["model"])
        """The model's routing facts (the router matrices: `router_weights`)."""
        self.options = StoreOptions(
            **{**attrs["options"], "hidden_layers": tuple(attrs["options"]["hidden_layers"])}
        )
        """What the store keeps and how, as it was created."""
        self.chunk_tokens: int = self.options.chunk_tokens
        self.created_at: float = float(attrs["created_at"])
        """Creation time: a store made anew at the same URL has another."""
        self._arrays = {name: root[name] for name in attrs["arrays"]}
        self._tails = tail_index
        """Tail segments seen at opening (a store being written, or left by a crash)."""

    def __repr__(self) -> str:
        return (
            f"RoutingStore({self.url!r}, sequences={len(self.index)}, "
            f"tokens={self.num_tokens}, model={self.model.architecture})"
        )

    @property
    def num_tokens(self) -> int:
        """Committed token rows."""
        if not len(self.index):
            return 0
        return int(self.index.select(stored_end()).max().item())

    @property
    def array_rows(self) -> int:
        """Rows the arrays have room for, as opened (at least `num_tokens`)."""
        return int(self._arrays[protocol.TOPK_IDS].shape[0])

    def row_nbytes(self, name: str) -> int:
        """Bytes one token row of array `name` takes in memory."""
        array = self._arrays[name]
        return int(np.prod(array.shape[1:], dtype=np.int64)) * array.dtype.itemsize

    def row_spec(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        """(shape of one row, dtype) of array `name`."""
        array = self._arrays[name]
        return tuple(array.shape[1:]), np.dtype(array.dtype)

    @property
    def array_names(self) -> list[str]:
        return sorted(self._arrays)

    def router_weights(self) -> dict[str, np.ndarray]:
        """Router matrices (L, E, d), kept only in stores with hidden states, and
        biases, float32."""
        group = self.root[MODEL_GROUP]
        return {
            name: group[name][...]
            for name in ("router_weights", "router_bias", "correction_bias")
            if name in group
        }

    def read_rows(
        self, start: int, stop: int, names: tuple[str, ...] | None = None
    ) -> dict[str, np.ndarray]:
        """Arrays of token rows ``[start, stop)``."""
        out = {}
        committed_end = self.num_tokens if self._tails else 0
        for name in names or tuple(self._arrays):
            if name not in self._arrays:
                continue
            array = self._arrays[name]
            try:
                out[name] = array[start:stop]
                if self._tails and stop > start:
                    if len(out[name]) < stop - start:  # rows past the shape zarr knows
                        full = np.zeros((stop - start, *array.shape[1:]), array.dtype)
                        full[: len(out[name])] = out[name]
                        out[name] = full
                    self._tails.patch(
                        name,
                        start,
                        out[name],
                        lambda chunk, a=array, n=name: self._chunk_exists(n, a, chunk),
                        lambda lo, hi, a=array: a[lo:hi],
                        committed_end=committed_end,
                    )
            except Exception as exc:
                raise StoreCorruptError(
                    f"{self.url}: array {name} rows {start}:{stop} unreadable ({exc})"
                ) from None
        return out

    def _chunk_exists(self, name: str, array: zarr.Array, chunk: int) -> bool:
        return _raw.exists(self.root.store, chunk_key(name, array, chunk))

    def sequence(
        self, sequence_id: int, names: tuple[str, ...] | None = None
    ) -> dict[str, np.ndarray]:
        """All arrays of one sequence plus ``is_prompt``."""
        found = self.index.filter(pl.col("sequence_id") == sequence_id)
        if not len(found):
            raise KeyError(f"{self.url}: no committed sequence {sequence_id}")
        row = found.row(0, named=True)
        wanted = tuple(names or self.array_names)
        start = int(row["token_offset"])
        arrays, _ = self.read_sequences(
            [row], start, start + stored_rows(row), (*wanted, protocol.POSITIONS)
        )
        positions = arrays[protocol.POSITIONS]
        if protocol.POSITIONS not in wanted:
            del arrays[protocol.POSITIONS]
        arrays["is_prompt"] = positions < int(row["prompt_len"])
        return arrays

    def read_sequences(
        self,
        sequences: list[dict[str, Any]],
        start: int,
        stop: int,
        names: tuple[str, ...] | None = None,
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The rows of whole `sequences` (index rows whose stored rows lie in
        ``[start, stop)``), each sequence's rows contiguous, with the prompt rows it
        shares with another sample of its request joined in; and each one's first row.

        Without shared rows this is ``read_rows(start, stop)`` and the first rows are the
        offsets in it; with them the rows are gathered anew in the order of `sequences`.
        """
        rows = self.read_rows(start, stop, names)
        first = np.array([int(s["token_offset"]) - start for s in sequences], dtype=np.int64)
        shared = np.array([int(s.get("shared_rows") or 0) for s in sequences], dtype=np.int64)
        if not shared.any():
            return rows, first
        logical = np.array([int(s["num_rows"]) for s in sequences], dtype=np.int64)
        prefix = np.minimum(shared, logical)
        own = logical - prefix
        # the holders' rows outside [start, stop) are read once each, after the block's
        sources, take, outside = [rows], [], stop - start
        extra: dict[tuple[int, int], int] = {}
        for i, s in enumerate(sequences):
            if prefix[i]:
                a = int(s["shared_offset"])
                b = a + int(prefix[i])
                if start <= a and b <= stop:
                    at = a - start
                else:
                    if (a, b) not in extra:
                        extra[a, b] = outside
                        sources.append(self.read_rows(a, b, names))
                        outside += b - a
                    at = extra[a, b]
                take.append(np.arange(at, at + prefix[i]))
            take.append(np.arange(first[i], first[i] + own[i]))
        index = np.concatenate(take) if take else np.zeros(0, dtype=np.int64)
        out = {
            name: np.concatenate([src[name] for src in sources])[index]
            if len(sources) > 1
            else values[index]
            for name, values in rows.items()
        }
        return out, np.cumsum(logical) - logical

    def shared_prefixes(self) -> list[tuple[int, int]]:
        """(first row, rows) of every committed sequence's prompt rows that are stored
        with another sample of its request: counting every stored row once, plus these,
        counts each sequence's rows once."""
        shared = self.index.filter(pl.col("shared_rows") > 0)
        rows = pl.min_horizontal("shared_rows", "num_rows")
        pairs = shared.select("shared_offset", rows.alias("rows")).iter_rows()
        return [(int(a), int(n)) for a, n in pairs if n > 0]

    def blocks(self, target_tokens: int | None = None) -> Iterator[Block]:
        """Chunk-aligned runs of whole sequences, about `target_tokens` rows each.

        Each block starts on a chunk boundary and ends where its last sequence ends, so
        two blocks may share at most the chunk at their boundary (read by both, written
        by neither).
        """
        target = max(target_tokens or 16 * self.chunk_tokens, 1)
        idx = self.index.sort("token_offset")
        offsets = idx["token_offset"].to_numpy()
        ends = idx.select(stored_end().alias("end"))["end"].to_numpy()
        ids = idx["sequence_id"].to_numpy()
        i = 0
        while i < len(ids):
            start = int(offsets[i]) // self.chunk_tokens * self.chunk_tokens
            j = i
            while j < len(ids) and (j == i or ends[j] - start <= target):
                j += 1
            yield Block(
                start=start, stop=int(ends[j - 1]), sequence_ids=tuple(int(x) for x in ids[i:j])
            )
            i = j


def read_root(path_or_url: str | Path) -> tuple[str, Any, zarr.Group, dict[str, Any]]:
    """(url, zarr store, root group, moetrace attributes) of a store of any version.

    Raises:
        StoreNotFoundError: nothing at the path.
        StoreFormatError: not a moetrace store.
    """
    url = str(path_or_url)
    if "://" not in url and not Path(url).exists():
        raise StoreNotFoundError(f"{url}: no such store")
    store = _raw.make_store(url, read_only=True)
    try:
        root = zarr.open_group(store=store, mode="r")
    except Exception:
        raise StoreNotFoundError(f"{url}: no zarr group here, so no moetrace store") from None
    attrs = root.attrs.get(ATTRS_KEY)
    if not isinstance(attrs, dict) or attrs.get("format") != FORMAT_NAME:
        raise StoreFormatError(f"{url}: not a moetrace routing store")
    return url, store, root, attrs


def open_single(path_or_url: str | Path, *, read_index: bool = True) -> RoutingStore:
    """Open a store written by one writer (format version 1), or one part of a parted
    store; `open_store` opens either kind."""
    url, store, root, attrs = read_root(path_or_url)
    if attrs.get("format_version") != FORMAT_VERSION:
        raise StoreFormatError(
            f"{url}: format version {attrs.get('format_version')}, expected {FORMAT_VERSION}"
        )
    index = read_index_parts(store) if read_index else None
    if index is None:
        index = pl.DataFrame(schema=INDEX_SCHEMA)
    index = with_shared_columns(index.unique("sequence_id", keep="first").sort("sequence_id"))
    # stores written before interventions have no such column: nothing intervened there
    intervention = pl.col("intervention") if "intervention" in index.columns else pl.lit(None)
    index = index.with_columns(intervention.fill_null("").cast(pl.String).alias("intervention"))
    if read_index:
        index = join_annotations(index, read_index_parts(store, INFO_PREFIX))
    tail_index = TailIndex(store, int(attrs["options"]["chunk_tokens"]))
    return RoutingStore(url, root, attrs, index, tail_index)


def join_annotations(index: pl.DataFrame, info: pl.DataFrame | None) -> pl.DataFrame:
    """The index with its annotations (the newest per sequence) joined on, rows past
    the returned output clipped, and labels expanded into ``label_<key>`` columns."""
    if info is not None and len(info):
        info = info.unique(["request_id", "sample_index"], keep="last")
        index = _clip_to_output(index.join(info, on=["request_id", "sample_index"], how="left"))
    return _expand_labels(index)


def _clip_to_output(index: pl.DataFrame) -> pl.DataFrame:
    """Rows past the positions the returned output forwarded (annotation ``positions``)
    are extras the engine forwarded after the output ended: `num_rows` stops before
    them, and ``rows_written`` keeps what the writer committed."""
    if "positions" not in index.columns:
        return index
    clipped = (pl.col("positions") - pl.col("first_position")).clip(lower_bound=0)
    return index.with_columns(
        pl.col("num_rows").alias("rows_written"),
        pl.when(pl.col("positions").is_null())
        .then(pl.col("num_rows"))
        .otherwise(pl.min_horizontal(pl.col("num_rows"), clipped))
        .alias("num_rows"),
    )


def _expand_labels(index: pl.DataFrame) -> pl.DataFrame:
    """Turn the JSON ``labels`` column into one column per label key (``label_<key>``)."""
    if not len(index) or "labels" not in index.columns:
        return index
    decoded = [json.loads(x) if x else {} for x in index["labels"].to_list()]
    keys = sorted({k for d in decoded for k in d})
    for key in keys:
        values = [d.get(key) for d in decoded]
        index = index.with_columns(pl.Series(f"label_{key}", values, strict=False))
    return index
