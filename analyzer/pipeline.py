"""Ray orchestration: map store blocks to sequence profiles, reduce them to tables.

Work is split by the store's chunk-aligned blocks of whole sequences, so each task reads
its rows once. A task folds its block's profiles (`reduce.StoreFold`) and returns the
fold: sums, per-sequence table rows and whole profiles for a bounded sample only; the
driver writes the table rows to disk and merges the rest as folds arrive. Ray joins the
cluster named by ``RAY_ADDRESS`` (set under ``ray job submit``) and starts a local one
otherwise.
"""

from __future__ import annotations

import heapq
import json
import os
import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from analyzer import parts, reduce
from analyzer.profiles import SequenceProfile, arrays_to_read, profile_block
from capture_server.store import Block, RoutingStore, open_store

ANALYSES = {
    "usage": "Expert share of top-k slots per layer (heatmap), load entropy and router "
    "confidence per sequence.",
    "rollout": "Prompt-vs-rollout usage similarity per sequence; similarity of sample "
    "pairs through growing rollout windows, cumulative and generated-only.",
    "overlap": "Top-p (P=0.8) Jaccard and usage cosine of sequence pairs by label "
    "condition (question / author / seed), with label-shuffle and "
    "random-routing baselines; with several stores, an alignment table pairing their "
    "sequences by labels / prompt index (do the models find the same pairs alike?).",
    "geometry": "Layers with captured router inputs: pooled hidden-state similarity vs usage "
    "similarity, Lipschitz ratio vs the router's operator norm, shared-direction energy, "
    "same-token overlap across contexts.",
    "committee": "Standing committee per layer across `domain` labels: members, coverage, "
    "influence density ratio, Gini, cross-domain Jaccard.",
}


@dataclass
class StoreResult:
    name: str
    tables: dict[str, pl.DataFrame | pl.LazyFrame]  # lazy: read from parts on disk
    profiles: list[SequenceProfile]


MAX_BLOCK_CHUNKS = 4  # store chunks per map task, at most
IN_FLIGHT_PER_CPU = 4  # map tasks submitted ahead per CPU (bounds driver and object store)
# Rows of one array a map task reads at once, at most: larger arrays are fresh memory
# maps (glibc's allocator maps anything above 32 MB), whose first touch costs more than
# decoding them (bench/analyzer_throughput.py).
MAX_BLOCK_BYTES = 16 * 2**20
CURVE_PROMPTS = 64  # first samples of this many prompts form the "other prompt" curves
CURVE_SAMPLED_PROMPTS = 256  # prompts sampled more than once whose samples are paired
PAIR_SEQUENCES = 4096  # sequences kept whole for pair statistics (per store)


# A map task allocates and frees arrays of up to MAX_BLOCK_BYTES per block. In Ray
# workers (unlike in a plain process) glibc was measured to map and unmap such arrays
# afresh for every block, and first-touching fresh pages cost more than decoding into
# them: reading ids, positions and weights ran 3x slower. Fixed thresholds above the
# block size keep that memory in the worker's heap.
WORKER_MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(4 * MAX_BLOCK_BYTES),
    "MALLOC_TRIM_THRESHOLD_": str(8 * MAX_BLOCK_BYTES),
}


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
        key = reduce.alignment_key(labels, row["prompt_index"], row["sample_index"])
        return zlib.crc32(repr(key).encode()), row["sequence_id"]

    rows = index.select("sequence_id", "prompt_index", "sample_index", "labels")
    return {sid for _, sid in heapq.nsmallest(limit, map(hashed, rows.iter_rows(named=True)))}


def arrays_needed(analyses: list[str]) -> tuple[str, ...]:
    """Row arrays the analyses read besides expert ids and positions: gate weights and
    logits feed the committee audit, logits the router confidence, hidden states the
    geometry. The rest is not read at all."""
    names = []
    if "committee" in analyses:
        names.append("topk_weights")
    if "committee" in analyses or "usage" in analyses:
        names.append("router_logits")
    if "geometry" in analyses:
        names.append("hidden_states")
    return tuple(names)


def fold_block(
    url: str,
    start: int,
    stop: int,
    sequences: list[dict],
    arrays: tuple[str, ...],
    fold: reduce.StoreFold,
    created_at: float | None = None,
) -> tuple[reduce.StoreFold, bytes]:
    """Map task: profile one block and fold its profiles into the empty `fold`, keeping
    whole only the sequences marked ``keep``, so that a task returns a few KB per
    sequence whatever the block's size. Returns the fold and the block's rows of the
    `sequences` table as parquet (encoded here, in parallel, rather than by the driver)."""
    fold.keep = {row["sequence_id"] for row in sequences if row["keep"]}
    fold.compiled = True  # profiling loads the compiled loops: statistics use them too
    fold.add(profile_block(url, start, stop, sequences, arrays, created_at))
    return fold, parts.encode(fold.pop_sequence_table())


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

    def rows(self, block: Block) -> list[dict]:
        at = np.searchsorted(self._ids, block.sequence_ids)
        if len(at) and np.array_equal(at, np.arange(at[0], at[0] + len(at))):
            rows = self._index.slice(int(at[0]), len(at)).to_dicts()  # the usual case
        else:
            rows = self._index[at].to_dicts()
        for row in rows:
            row["curve"] = row["sequence_id"] in self._curve
            row["keep"] = self._keep is None or row["sequence_id"] in self._keep
        return rows


def map_store(
    url: str,
    analyses: list[str],
    block_tokens: int | None,
    on_progress: Callable[[int, int], None],
    fold: reduce.StoreFold,
    table_parts: parts.TableParts,
    store: RoutingStore | None = None,
) -> reduce.StoreFold:
    """Profile every committed sequence of one store with one Ray task per block, write
    each task's rows of the `sequences` table as a part of `table_parts` (numbered by
    block) and merge the tasks' folds into `fold` as they arrive."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    arrays = arrays_needed(analyses)
    store = store or open_store(url)
    plan = BlockPlan(store, block_tokens, fold.keep, arrays, cpus)
    task = ray.remote(fold_block)
    empty = reduce.StoreFold(fold.store, fold.params)
    created = store.attrs["created_at"]
    todo = iter(enumerate(plan.blocks))
    pending: dict = {}  # task result -> block number

    def submit() -> None:
        number, block = next(todo, (None, None))
        if block is not None:
            rows = plan.rows(block)
            ref = task.remote(url, block.start, block.stop, rows, arrays, empty, created)
            pending[ref] = number

    for _ in range(IN_FLIGHT_PER_CPU * cpus):
        submit()
    done = 0
    while pending:
        [ready], _ = ray.wait(list(pending), num_returns=1)
        number = pending.pop(ready)
        submit()  # keep every worker busy, with a bounded number of tasks in flight
        block_fold, block_rows = ray.get(ready)
        table_parts.add(number, block_rows)
        fold.merge(block_fold)
        done += 1
        on_progress(done, len(plan.blocks))
    return fold


def analyse_store(
    url: str,
    analyses: list[str],
    params: reduce.Params,
    part_dir: Path,
    block_tokens: int | None = None,
    on_progress: Callable[[int, int], None] = lambda done, total: None,
) -> StoreResult:
    """One store's tables; the `sequences` table is left as parts under `part_dir`."""
    store = open_store(url)
    name = Path(url.rstrip("/")).name
    keep = curve_sequences(store.index) | pair_sequences(store.index)
    fold = reduce.StoreFold(name, params, keep)
    table_parts = parts.TableParts(part_dir)
    fold = map_store(url, analyses, block_tokens, on_progress, fold, table_parts, store)
    whole = fold.whole()  # pairs, curves and geometry use these; sums use every sequence
    k, e = int(store.model["top_k"]), int(store.model["num_experts"])
    tables: dict[str, pl.DataFrame | pl.LazyFrame] = {}
    if fold.usage is None:
        return StoreResult(name=name, tables=tables, profiles=[])
    if ("usage" in analyses or "rollout" in analyses) and (lazy := table_parts.scan()) is not None:
        tables["sequences"] = lazy
    if "usage" in analyses:
        tables["usage"] = reduce.usage_table(name, fold.usage)
    if "rollout" in analyses:
        tables["rollout_curve"] = reduce.rollout_curve_table(name, whole, params)
    if "overlap" in analyses:
        tables["conditions"] = reduce.condition_table(name, whole, params, k)
    if "geometry" in analyses:
        tables["geometry"], tables["triangle"] = reduce.geometry_tables(url, name, whole, params)
    if "committee" in analyses:
        tables["committee"] = reduce.committee_table(name, fold.committee, params, k, e)
    return StoreResult(name=name, tables=tables, profiles=whole)


def init_ray(num_cpus: int | None = None, address: str | None = None) -> None:
    """Join `address` (``auto``: the cluster this node is part of) or ``RAY_ADDRESS`` if
    set, else start a local Ray with the machine's cores."""
    import ray

    if ray.is_initialized():
        return
    root = str(Path(__file__).resolve().parents[1])
    runtime_env = {"env_vars": {"PYTHONPATH": root, **WORKER_MALLOC_ENV}}
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
    else:
        # "local": never attach to a cluster that an earlier `ray start` left registered
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            runtime_env=runtime_env,
            log_to_driver=False,
        )


def run(
    stores: list[str],
    analyses: list[str],
    out: Path,
    params: reduce.Params,
    block_tokens: int | None = None,
    on_progress: Callable[[str, int, int], None] = lambda s, d, t: None,
    address: str | None = None,
) -> dict[str, Path]:
    """Analyse every store; write one parquet per table (all stores stacked) under `out`."""
    unknown = sorted(set(analyses) - set(ANALYSES))
    if unknown:
        raise ValueError(f"analyses: unknown {unknown}; expected some of {sorted(ANALYSES)}")
    init_ray(address=address)
    part_root = out / ".parts"  # tables that grow with the stores, until written whole
    shutil.rmtree(part_root, ignore_errors=True)  # left by an interrupted run
    results = [
        analyse_store(
            url,
            analyses,
            params,
            part_root / str(n),
            block_tokens,
            lambda d, t, url=url: on_progress(url, d, t),
        )
        for n, url in enumerate(stores)
    ]
    if len({r.name for r in results}) < len(results):  # same last path component
        for r, url in zip(results, stores, strict=True):
            r.name = url
    if len(results) > 1 and "overlap" in analyses:
        aligned = reduce.alignment_table({r.name: r.profiles for r in results}, params)
        results.append(StoreResult(name="", tables={"alignment": aligned}, profiles=[]))
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    names = sorted({t for r in results for t in r.tables})
    for table in names:
        frames = [
            frame.lazy()
            for r in results
            if (frame := r.tables.get(table)) is not None
            and (isinstance(frame, pl.LazyFrame) or len(frame))
        ]
        if frames:
            path = out / f"{table}.parquet"
            pl.concat(frames, how="diagonal_relaxed").sink_parquet(path)  # streams the parts
            written[table] = path
    shutil.rmtree(part_root, ignore_errors=True)
    return written
