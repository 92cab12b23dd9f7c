"""Format version 2: one logical store written by several writers, one part each.

A data-parallel rank's engine and a pipeline stage's worker each write their own part,
a complete version-1 store under ``parts/dp<rank>-pp<stage>/``, holding the MoE layers
of its stage. Nothing is shared between writers but the root's attributes, which any of
them writes once, atomically, when absent. So every part keeps version 1's guarantees
(one writer per chunk, a sequence visible only after its rows) without coordination.

The reader (`PartedStore`) joins them:
- data-parallel ranks hold disjoint sequences and are unioned; rank d's rows sit at
  ``d * DP_STRIDE`` on the logical token axis, so offsets never move as parts grow;
- pipeline stages hold the same sequences with disjoint layers and are joined on
  (request_id, sample_index); their rows are matched by position and must carry the
  same token ids;
- a sequence is visible only when every stage of its rank (``pp_size`` of them) has
  committed it; a rank with a stage part missing shows nothing.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import polars as pl

from capture_server import protocol
from capture_server.capture.records import ModelSummary
from capture_server.errors import StoreCorruptError, StoreFormatError
from capture_server.store import _raw
from capture_server.store.format import (
    FORMAT_NAME,
    INFO_PREFIX,
    StoreOptions,
    group_document,
)
from capture_server.store.index import read_index_parts
from capture_server.store.reader import RoutingStore, join_annotations, open_single

PARTS_VERSION = 2
PARTS_PREFIX = "parts/"
DP_STRIDE = 1 << 40
"""Logical token offset between data-parallel ranks: a multiple of every chunk size."""
PER_LAYER = (protocol.TOPK_IDS, protocol.TOPK_WEIGHTS, protocol.ROUTER_LOGITS)
"""Row arrays with a layer axis (axis 1): stages contribute their layers."""


@dataclass(frozen=True, slots=True)
class PartId:
    """Which writer of a parted store a part belongs to."""

    dp_rank: int = 0
    """Data-parallel rank: parts of different ranks hold disjoint sequences."""
    pp_stage: int = 0
    """Pipeline stage: parts of one rank's stages hold the same sequences, other layers."""
    pp_size: int = 1
    """Stages a rank has: its sequences are visible once all of them committed."""

    @property
    def name(self) -> str:
        return f"dp{self.dp_rank}-pp{self.pp_stage}"

    def url(self, root: str) -> str:
        return f"{root.rstrip('/')}/{PARTS_PREFIX}{self.name}"


def ensure_root(root_url: str) -> None:
    """Write the root group's attributes once (atomically; writers racing to do it write
    the same format, and either wins)."""
    store = _raw.make_store(root_url)
    if _raw.get_many(store, ["zarr.json"])[0] is not None:
        return
    attrs = {
        "format": FORMAT_NAME,
        "format_version": PARTS_VERSION,
        "layout": "parts",
        "created_at": time.time(),
    }
    _raw.set_bytes(store, "zarr.json", group_document(attrs))


def part_ids(root_url: str) -> list[str]:
    """Names of the parts present (``dp0-pp0``, ...)."""
    store = _raw.make_store(root_url, read_only=True)
    keys = _raw.list_keys(store, PARTS_PREFIX)
    names = {k[len(PARTS_PREFIX) :].split("/", 1)[0] for k in keys if k.endswith("zarr.json")}
    return sorted(names)


@dataclass
class _Rank:
    """One data-parallel rank of a parted store: its stages, and the rows that match."""

    dp_rank: int
    stages: list[RoutingStore]
    """One part per pipeline stage, in stage order."""
    offsets: np.ndarray
    """(sequences, stages) token offset of each visible sequence in each stage's part,
    sorted by the first stage's offset."""
    rows: np.ndarray
    """(sequences,) rows of each visible sequence."""
    hidden: dict[int, tuple[int, str]]
    """Logical MoE-layer index -> (stage, array name in its part)."""

    @property
    def base(self) -> int:
        return self.dp_rank * DP_STRIDE

    def matched(self, stage: int, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows of `stage`'s part, their places in ``[a, b)`` of the first stage's rows)
        for the visible sequences overlapping ``[a, b)``."""
        first, n = self.offsets[:, 0], self.rows
        lo = int(np.searchsorted(first + n, a, side="right"))
        hi = int(np.searchsorted(first, b, side="left"))
        starts = np.maximum(first[lo:hi], a)
        stops = np.minimum(first[lo:hi] + n[lo:hi], b)
        lengths = np.maximum(stops - starts, 0)
        place = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
        shift = np.repeat(self.offsets[lo:hi, stage] - first[lo:hi], lengths)
        return place + shift, place - a


class PartedStore(RoutingStore):
    """A version-2 store read as one `RoutingStore` (see the module docstring). Use
    `open_store`."""

    def __init__(
        self, url: str, attrs: dict[str, Any], ranks: list[_Rank], index: pl.DataFrame
    ) -> None:
        self.url, self.attrs, self.index, self._ranks = url, attrs, index, ranks
        self._by_rank = {rank.dp_rank: rank for rank in ranks}
        first = ranks[0].stages
        layers = [layer for part in first for layer in part.model.moe_layers]
        self.model = ModelSummary(**{**first[0].model.summary(), "moe_layers": layers})
        self.options = StoreOptions(
            **{**asdict(first[0].options), "hidden_layers": tuple(sorted(ranks[0].hidden))}
        )
        self.chunk_tokens = first[0].chunk_tokens
        self.created_at = float(attrs["created_at"])

    @property
    def num_tokens(self) -> int:
        """Committed rows of the visible sequences, over every rank."""
        return int(self.index["num_rows"].sum()) if len(self.index) else 0

    @property
    def array_rows(self) -> int:
        return max(r.base + r.stages[0].array_rows for r in self._ranks)

    @property
    def array_names(self) -> list[str]:
        first = self._ranks[0].stages
        layered = [n for n in PER_LAYER if all(n in part.array_names for part in first)]
        hidden = [protocol.hidden_array(layer) for layer in sorted(self._ranks[0].hidden)]
        return sorted([*layered, protocol.TOKEN_IDS, protocol.POSITIONS, *hidden])

    def row_nbytes(self, name: str) -> int:
        first = self._ranks[0].stages
        if name in PER_LAYER:
            return sum(part.row_nbytes(name) for part in first)
        layer = protocol.hidden_layer_of(name)
        if layer is not None:
            stage, local = self._ranks[0].hidden[layer]
            return first[stage].row_nbytes(local)
        return first[0].row_nbytes(name)

    def router_weights(self) -> dict[str, np.ndarray]:
        parts = [part.router_weights() for part in self._ranks[0].stages]
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    def read_rows(
        self, start: int, stop: int, names: tuple[str, ...] | None = None
    ) -> dict[str, np.ndarray]:
        """Rows ``[start, stop)`` of the logical token axis, within one rank; rows of
        sequences that are not visible are zeros."""
        rank = self._by_rank.get(start // DP_STRIDE)
        a, b = start % DP_STRIDE, stop - start + start % DP_STRIDE
        if rank is None or b > DP_STRIDE:
            raise ValueError(f"{self.url}: rows {start}:{stop} cross a data-parallel rank")
        wanted = [n for n in (names or tuple(self.array_names)) if n in self.array_names]
        return _read_rank(self.url, rank, a, b, wanted)


def _read_rank(url: str, rank: _Rank, a: int, b: int, names: list[str]) -> dict[str, np.ndarray]:
    stages = rank.stages
    fixed = (protocol.TOKEN_IDS, protocol.POSITIONS)
    own = {  # array names each stage contributes
        s: [n for n in names if n in PER_LAYER]
        + [
            local
            for layer, (st, local) in rank.hidden.items()
            if st == s and protocol.hidden_array(layer) in names
        ]
        for s in range(len(stages))
    }
    first = stages[0].read_rows(a, min(b, stages[0].array_rows), (*fixed, *own[0]))
    pieces: dict[str, list[np.ndarray]] = {n: [] for n in names if n in PER_LAYER}
    out: dict[str, np.ndarray] = {}
    for s, part in enumerate(stages):
        if s == 0:
            got = {name: _padded(array, b - a) for name, array in first.items()}
        else:
            src, dst = rank.matched(s, a, b)
            got = {}
            if len(src):
                lo, hi = int(src.min()), int(src.max()) + 1
                chunk = part.read_rows(lo, hi, (*fixed, *own[s]))
                for name in fixed:
                    if not np.array_equal(chunk[name][src - lo], first[name][dst]):
                        raise StoreCorruptError(
                            f"{url}: pipeline stage {s} of rank {rank.dp_rank} has other "
                            f"{name} than stage 0 at the same rows"
                        )
            for name in own[s]:
                shape, dtype = part.row_spec(name)
                full = np.zeros((b - a, *shape), dtype=dtype)
                if len(src):
                    full[dst] = chunk[name][src - lo]
                got[name] = full
        for name in own[s]:
            if name in pieces:
                pieces[name].append(got[name])
        for layer, (st, local) in rank.hidden.items():
            if st == s and local in got:
                out[protocol.hidden_array(layer)] = got[local]
    for name in fixed:
        if name in names:
            out[name] = _padded(first[name], b - a)
    for name, parts in pieces.items():
        out[name] = np.concatenate(parts, axis=1)
    return out


def _padded(array: np.ndarray, rows: int) -> np.ndarray:
    """`array` with zero rows appended up to `rows` (reads past a part's arrays)."""
    if len(array) >= rows:
        return array
    pad = np.zeros((rows - len(array), *array.shape[1:]), dtype=array.dtype)
    return np.concatenate([array, pad])


def open_parted(url: str, attrs: dict[str, Any]) -> PartedStore:
    """Open every part of a version-2 store and join them."""
    by_rank: dict[int, dict[int, tuple[PartId, RoutingStore]]] = {}
    for name in part_ids(url):
        part_store = open_single(f"{url.rstrip('/')}/{PARTS_PREFIX}{name}")
        part = PartId(**part_store.attrs["part"])
        by_rank.setdefault(part.dp_rank, {})[part.pp_stage] = (part, part_store)
    joined = []
    for dp_rank, stages in sorted(by_rank.items()):
        pp_size = next(iter(stages.values()))[0].pp_size
        if sorted(stages) != list(range(pp_size)):
            continue  # a stage has not written yet: none of this rank's sequences is whole
        joined.append(_join_stages(url, dp_rank, [stages[s][1] for s in range(pp_size)]))
    if not joined:
        raise StoreFormatError(f"{url}: no data-parallel rank has all its pipeline stages yet")
    for rank, _ in joined[1:]:
        _check_same_model(url, joined[0][0], rank)
    ranks, frames = [rank for rank, _ in joined], [frame for _, frame in joined]
    index = pl.concat(frames, how="diagonal_relaxed").sort("dp_rank", "part_sequence_id")
    index = index.with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias("sequence_id"))
    root = _raw.make_store(url, read_only=True)
    index = join_annotations(index, read_index_parts(root, INFO_PREFIX))
    return PartedStore(url, attrs, ranks, index)


def _check_same_model(url: str, a: _Rank, b: _Rank) -> None:
    for sa, sb in zip(a.stages, b.stages, strict=True):
        if sa.model != sb.model:
            raise StoreFormatError(
                f"{url}: data-parallel ranks {a.dp_rank} and {b.dp_rank} describe other models"
            )


def _join_stages(url: str, dp_rank: int, stages: list[RoutingStore]) -> tuple[_Rank, pl.DataFrame]:
    """The rank's visible sequences (committed by every stage, with the same rows) and
    their index rows, at logical offsets."""
    keys = ["request_id", "sample_index"]
    joined = stages[0].index.drop([c for c in stages[0].index.columns if c.startswith("label_")])
    for s, part in enumerate(stages[1:], 1):
        other = part.index.select(
            *keys,
            pl.col("token_offset").alias(f"offset_{s}"),
            pl.col("num_rows").alias(f"rows_{s}"),
        )
        joined = joined.join(other, on=keys, how="inner")
        differ = joined.filter(pl.col(f"rows_{s}") != pl.col("num_rows"))
        if len(differ):
            raise StoreCorruptError(
                f"{url}: pipeline stage {s} of rank {dp_rank} committed "
                f"{differ['request_id'][0]!r} with other rows than stage 0"
            )
    joined = joined.sort("token_offset")
    offsets = np.stack(
        [joined["token_offset"].to_numpy()]
        + [joined[f"offset_{s}"].to_numpy() for s in range(1, len(stages))],
        axis=1,
    ).astype(np.int64)
    hidden, first_layer = {}, 0
    for s, part in enumerate(stages):
        for local in part.options.hidden_layers:
            hidden[first_layer + local] = (s, protocol.hidden_array(local))
        first_layer += len(part.model.moe_layers)
    rank = _Rank(dp_rank, stages, offsets, joined["num_rows"].to_numpy().astype(np.int64), hidden)
    frame = joined.select(
        pl.col("sequence_id").alias("part_sequence_id"),
        *[
            c
            for c in joined.columns
            if c not in ("sequence_id", "labels") and not c.startswith(("offset_", "rows_"))
        ],
        "labels",
    ).with_columns(
        pl.lit(dp_rank, dtype=pl.Int32).alias("dp_rank"),
        (pl.col("token_offset") + rank.base).alias("token_offset"),
    )
    return rank, frame
