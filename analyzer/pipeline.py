"""Ray orchestration: map store blocks to sequence profiles, reduce them to tables.

Work is split by the store's chunk-aligned blocks of whole sequences (`plan`), so each
task reads its rows once. A task folds its block's profiles (`fold.StoreFold`) and
returns the fold: sums, per-sequence table rows and whole profiles for a bounded sample
only; the driver writes the table rows to disk and merges the rest as folds arrive.
Tables are made by the chosen analyses' registry entries (`registry.ANALYSES`). Ray
joins the cluster named by ``RAY_ADDRESS`` (set under ``ray job submit``) and starts a
local one otherwise.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from analyzer import parts, registry
from analyzer.fold import StoreFold, fold_block
from analyzer.params import Params
from analyzer.plan import MAX_BLOCK_BYTES, BlockPlan, curve_sequences, pair_sequences
from analyzer.profiles import SequenceProfile
from analyzer.registry import Analysis, StoreTables, Table
from analyzer.tables.findings import findings_table
from capture_server.store import RoutingStore, open_store


@dataclass
class StoreResult:
    name: str
    tables: dict[str, Table]  # lazy: read from parts on disk
    profiles: list[SequenceProfile]


IN_FLIGHT_PER_CPU = 4  # map tasks submitted ahead per CPU (bounds driver and object store)

# A map task allocates and frees arrays of up to MAX_BLOCK_BYTES per block. In Ray
# workers (unlike in a plain process) glibc was measured to map and unmap such arrays
# afresh for every block, and first-touching fresh pages cost more than decoding into
# them: reading ids, positions and weights ran 3x slower. Fixed thresholds above the
# block size keep that memory in the worker's heap.
WORKER_MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(4 * MAX_BLOCK_BYTES),
    "MALLOC_TRIM_THRESHOLD_": str(8 * MAX_BLOCK_BYTES),
}


def map_store(
    url: str,
    analyses: list[Analysis],
    block_tokens: int | None,
    on_progress: Callable[[int, int], None],
    fold: StoreFold,
    table_parts: parts.TableParts,
    store: RoutingStore | None = None,
) -> StoreFold:
    """Profile every committed sequence of one store with one Ray task per block, write
    each task's rows of the `sequences` table as a part of `table_parts` (numbered by
    block) and merge the tasks' folds into `fold` as they arrive."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    arrays = registry.arrays_needed(analyses)
    store = store or open_store(url)
    plan = BlockPlan(store, block_tokens, fold.keep, arrays, cpus)
    task = ray.remote(fold_block)
    empty = StoreFold(fold.store, fold.params, parts=fold.parts)
    todo = iter(enumerate(plan.blocks))
    pending: dict = {}  # task result -> block number

    def submit() -> None:
        number, block = next(todo, (None, None))
        if block is not None:
            rows = plan.rows(block)
            ref = task.remote(url, block.start, block.stop, rows, arrays, empty, store.created_at)
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


def store_name(spec: str) -> tuple[str, str]:
    """(name, url) of a store argument: ``NAME=PATH`` names the store in tables and the
    report (a model's name, say); a bare path is named by its last component."""
    head, sep, tail = spec.partition("=")
    if sep and head and not set(head) & set("/:\\") and tail:
        return head, tail
    return Path(spec.rstrip("/")).name, spec


def analyse_store(
    url: str,
    analyses: list[Analysis],
    params: Params,
    part_dir: Path,
    block_tokens: int | None = None,
    on_progress: Callable[[int, int], None] = lambda done, total: None,
) -> StoreResult:
    """One store's tables; the `sequences` table is left as parts under `part_dir`."""
    name, url = store_name(url)
    store = open_store(url)
    fold_parts = registry.fold_parts(analyses)
    keep = (
        curve_sequences(store.index) | pair_sequences(store.index)
        if "whole" in fold_parts
        else set()
    )
    fold = StoreFold(name, params, keep, fold_parts)
    table_parts = parts.TableParts(part_dir)
    fold = map_store(url, analyses, block_tokens, on_progress, fold, table_parts, store)
    if fold.usage is None:  # no committed sequence
        return StoreResult(name=name, tables={}, profiles=[])
    # pairs, curves and geometry use the whole profiles; sums use every sequence
    ctx = StoreTables(name, store, fold, fold.whole(), table_parts.scan())
    tables = {table: frame for a in analyses for table, frame in a.per_store(ctx).items()}
    return StoreResult(name=name, tables=tables, profiles=ctx.whole)


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


FINDINGS_FROM = (
    "conditions",
    "geometry",
    "committee",
    "rollout_curve",
    "rollout_prediction",
)  # small tables the claims are read from


def run(
    stores: list[str],
    analyses: list[str],
    out: Path,
    params: Params,
    block_tokens: int | None = None,
    on_progress: Callable[[str, int, int], None] = lambda s, d, t: None,
    address: str | None = None,
) -> dict[str, Path]:
    """Analyse every store; write one parquet per table (all stores stacked) under `out`."""
    chosen = registry.chosen(analyses)
    init_ray(address=address)
    part_root = out / ".parts"  # tables that grow with the stores, until written whole
    shutil.rmtree(part_root, ignore_errors=True)  # left by an interrupted run
    results = [
        analyse_store(
            url,
            chosen,
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
    profiles = {r.name: r.profiles for r in results}
    for analysis in chosen:
        if analysis.across is not None:
            across = analysis.across(profiles, params)
            results.append(StoreResult(name="", tables=across, profiles=[]))
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
    claims = findings_table({t: pl.read_parquet(written[t]) for t in FINDINGS_FROM if t in written})
    if len(claims):
        claims.write_parquet(out / "findings.parquet")
        written = {"findings": out / "findings.parquet", **written}
    return written
