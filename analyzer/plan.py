"""Planning a store's map step: blocks of whole sequences, and which sequences are kept
whole (rollout curves, pair statistics). No Ray here."""

from __future__ import annotations

import heapq
import json
import zlib

import numpy as np
import polars as pl

from analyzer.reads import arrays_to_read
from analyzer.tables.alignment import alignment_key
from capture_server.store import Block, RoutingStore

MAX_BLOCK_CHUNKS = 4  # store chunks per map task, at most
# Rows of one array a map task reads at once, at most: larger arrays are fresh memory
# maps (glibc's allocator maps anything above 32 MB), whose first touch costs more than
# decoding them (bench/analyzer_throughput.py).
MAX_BLOCK_BYTES = 16 * 2**20
CURVE_PROMPTS = 64  # first samples of this many prompts form the "other prompt" curves
CURVE_SAMPLED_PROMPTS = 256  # prompts sampled more than once whose samples are paired
PAIR_SEQUENCES = 4096  # sequences kept whole for pair statistics (per store)


def curve_sequences(index: pl.DataFrame) -> set[int]:
    """Sequences the rollout curves need: every sample of the first
    `CURVE_SAMPLED_PROMPTS` prompts sampled more than once, and the first sample of the
    first `CURVE_PROMPTS` prompts."""
    multi = (
        index.group_by("prompt_index")
        .len()
        .filter(pl.col("len") > 1)
        .sort("prompt_index")
        .head(CURVE_SAMPLED_PROMPTS)["prompt_index"]
    )
    same = index.filter(pl.col("prompt_index").is_in(multi.implode()))["sequence_id"]
    firsts = (
        index.sort("prompt_index", "sample_index")
        .group_by("prompt_index", maintain_order=True)
        .first()
        .head(CURVE_PROMPTS)["sequence_id"]
    )
    return set(same.to_list()) | set(firsts.to_list())


def pair_sequences(index: pl.DataFrame, limit: int = PAIR_SEQUENCES) -> set[int]:
    """At most `limit` sequences for pair statistics, chosen by a hash of their alignment
    key (labels or prompt index, and sample): stores of other models over the same prompts
    choose the same sequences, so their alignment keeps every pair."""
    if len(index) <= limit:
        return set(index["sequence_id"].to_list())

    def hashed(row: dict) -> tuple[int, int]:
        labels = json.loads(row["labels"] or "{}")
        key = alignment_key(labels, row["prompt_index"], row["sample_index"])
        return zlib.crc32(repr(key).encode()), row["sequence_id"]

    rows = index.select("sequence_id", "prompt_index", "sample_index", "labels")
    return {sid for _, sid in heapq.nsmallest(limit, map(hashed, rows.iter_rows(named=True)))}


def prompt_representatives(index: pl.DataFrame) -> set[int]:
    """One sequence per prompt (its lowest committed sample): analyses that count
    prompts, as the committee audit does, count each prompt once whatever its n."""
    if not len(index):
        return set()
    first = index.sort("sample_index").unique("request_id", keep="first")
    return set(first["sequence_id"].to_list())


class BlockPlan:
    """A store's blocks, and on demand the index rows of a block's sequences (marked
    ``curve`` and ``keep``), which its map task is sent instead of reading the index.
    Rows are made per block as tasks are submitted, not for the whole store at once."""

    COLUMNS = (
        "sequence_id",
        "prompt_index",
        "sample_index",
        "prompt_len",
        "token_offset",
        "num_rows",
        "shared_offset",
        "shared_rows",
        "labels",
    )

    def __init__(
        self,
        store: RoutingStore,
        block_tokens: int | None,
        keep: set[int] | None,
        arrays: tuple[str, ...] | None = None,
        cpus: int = 1,
    ) -> None:
        if block_tokens is None:
            # about four tasks per CPU, whole chunks at least, and at most MAX_BLOCK_CHUNKS
            # chunks and MAX_BLOCK_BYTES per array: a task's temporaries grow with its
            # block, and cache-sized work is faster
            widest = max(store.row_nbytes(name) for name in arrays_to_read(store, arrays))
            per_cpu = -(-store.num_tokens // (4 * cpus))
            most = MAX_BLOCK_BYTES // (widest * store.chunk_tokens)
            chunks = max(1, min(MAX_BLOCK_CHUNKS, most))
            block_tokens = max(store.chunk_tokens, min(per_cpu, chunks * store.chunk_tokens))
        self.blocks = list(store.blocks(block_tokens))
        self._index = store.index.select(self.COLUMNS).sort("sequence_id")
        self._ids = self._index["sequence_id"].to_numpy()
        self._curve = curve_sequences(store.index)
        self._keep = keep
        self._prompt_first = prompt_representatives(store.index)

    def rows(self, block: Block) -> list[dict]:
        at = np.searchsorted(self._ids, block.sequence_ids)
        if len(at) and np.array_equal(at, np.arange(at[0], at[0] + len(at))):
            rows = self._index.slice(int(at[0]), len(at)).to_dicts()  # the usual case
        else:
            rows = self._index[at].to_dicts()
        for row in rows:
            row["curve"] = row["sequence_id"] in self._curve
            row["keep"] = self._keep is None or row["sequence_id"] in self._keep
            row["prompt_first"] = row["sequence_id"] in self._prompt_first
        return rows
