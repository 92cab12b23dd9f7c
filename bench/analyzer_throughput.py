"""Analyzer throughput on a synthetic store of >= 50 million (token, layer) records.

Two workloads over the same store: the expert-id analyses (usage, rollout, overlap: ids
and positions are read) and all analyses (the committee audit also reads gate weights).
Each runs four ways, in one run: one process without Ray (the map step in a loop),
counting with numpy (`numpy`) or with the analyzer's compiled loop (`single`); Ray with
1 worker and with 2. Also: where one core's time goes (store read, counting,
per-sequence statistics) against the rate at which one core streams the bytes a record
needs from memory, and peak memory for the store and a store half its size.

    .venv/bin/python bench/analyzer_throughput.py [--tokens 12800000] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from analyzer.parts import TableParts

# -- defaults ---------------------------------------------------------------------------
L, E, K = 16, 64, 8  # OLMoE-shaped routing: 16 MoE layers, 64 experts, top-8
SEQ_ROWS = 512
SEED = 0
REPEATS = 3  # passes per measurement; the best is reported (this machine is noisy)
WORKLOADS = {
    "ids": ["usage", "rollout", "overlap"],
    "all": ["usage", "rollout", "overlap", "committee"],
}
BYTES_PER_RECORD = {
    "ids": K + 4 / L,
    "all": K + 2 * K + 4 / L,
}  # uint8 ids, fp16 weights, int32 positions


def build_store(path: str, tokens: int) -> None:
    from capture_server.capture.records import ModelMeta, RoutingRows, SequenceEnd
    from capture_server.store import StoreOptions
    from capture_server.store.writer import StoreWriter

    rng = np.random.default_rng(SEED)
    meta = ModelMeta.synthetic(list(range(L)), E, K, 8)
    writer = StoreWriter(path, StoreOptions(logits=False, weights_dtype="float16"))
    writer.open(meta)
    pool = []
    for _ in range(4):
        ids = np.argsort(rng.random((SEQ_ROWS, L, E)), -1)[..., :K].astype(np.int32)
        pool.append(
            RoutingRows(
                request_ids=np.array(["x"] * SEQ_ROWS, dtype=object),
                sample_index=np.zeros(SEQ_ROWS, np.int32),
                positions=np.arange(SEQ_ROWS),
                token_ids=rng.integers(0, 50000, SEQ_ROWS),
                is_prompt=np.arange(SEQ_ROWS) < 64,
                topk_ids=ids,
                topk_weights=rng.random((SEQ_ROWS, L, K)).astype(np.float32),
            )
        )
    for n in range(tokens // SEQ_ROWS):
        writer.add_sequence(
            SequenceEnd(
                f"s{n}", 0, 64, 0, SEQ_ROWS, prompt_index=n, labels={"domain": f"d{n % 5}"}
            ),
            pool[n % 4],
        )
        if writer.staged_rows >= writer.chunk:
            writer.flush(partial=False)
    writer.close()


def single_process(path: str, analyses: list[str], parts: TableParts) -> int:
    """The map step without Ray: every block profiled and folded in this process."""
    from analyzer.fold import StoreFold, fold_block
    from analyzer.params import Params
    from analyzer.plan import BlockPlan
    from analyzer.registry import arrays_needed, chosen
    from capture_server.store import open_store

    fold = StoreFold("bench", Params(), keep=set())
    arrays = arrays_needed(chosen(analyses))
    store = open_store(path)
    plan = BlockPlan(store, None, fold.keep, arrays)
    for number, block in enumerate(plan.blocks):
        empty = StoreFold("bench", Params())
        created = store.created_at
        rows = plan.rows(block)
        block_fold, block_rows = fold_block(
            path, block.start, block.stop, rows, arrays, empty, created
        )
        parts.add(number, block_rows)
        fold.merge(block_fold)
    return fold.num_sequences


@contextlib.contextmanager
def table_parts() -> Iterator[TableParts]:
    """Where a pass writes its `sequences` table parts, as the analyzer does."""
    with tempfile.TemporaryDirectory() as scratch:
        yield TableParts(Path(scratch))


def numpy_count_cells(
    ids: np.ndarray, row_cell: np.ndarray, cells: int, num_experts: int
) -> np.ndarray:
    """`analyzer.kernels.count_cells` as one numpy bincount (the baseline's counting)."""
    kept = row_cell >= 0
    layers = ids.shape[1]
    keys = ((row_cell[kept, None] * layers + np.arange(layers)) * num_experts)[:, :, None]
    flat = np.bincount((keys + ids[kept]).ravel(), minlength=cells * layers * num_experts)
    return flat.reshape(cells, layers, num_experts).astype(np.int32)


def warm_up() -> None:
    """A worker's start-up: import the map code and load the compiled counting loop."""
    from analyzer.kernels import count_cells

    count_cells(np.zeros((1, 1, 1), np.uint8), np.zeros(1, np.int64), 1, 1)


def ray_workers_cpu_seconds() -> float:
    """CPU time used so far by this machine's Ray worker processes."""
    import psutil

    total = 0.0
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(part.startswith("ray::") for part in proc.info["cmdline"] or ()):
                times = proc.cpu_times()
                total += times.user + times.system
        except psutil.Error:
            continue
    return total


def ray_run(
    path: str, analyses: list[str], workers: int
) -> tuple[int, list[float], list[float], list[float]]:
    """Sequences, and seconds, worker CPU seconds and driver CPU seconds of each pass;
    Ray start-up excluded (workers are warmed up first)."""
    import ray

    from analyzer.fold import StoreFold
    from analyzer.params import Params
    from analyzer.pipeline import init_ray, map_store
    from analyzer.registry import chosen

    init_ray(num_cpus=workers)
    try:
        ray.get([ray.remote(warm_up).remote() for _ in range(workers * 4)])
        seconds, cpu, driver = [], [], []
        for _ in range(REPEATS):
            c0, d0, t0 = ray_workers_cpu_seconds(), time.process_time(), time.perf_counter()
            fold = StoreFold("bench", Params(), keep=set())  # sums and table rows only
            with table_parts() as parts:
                fold = map_store(path, chosen(analyses), None, lambda d, t: None, fold, parts)
                n = fold.num_sequences
            seconds.append(time.perf_counter() - t0)
            cpu.append(ray_workers_cpu_seconds() - c0)
            driver.append(time.process_time() - d0)
        return n, seconds, cpu, driver
    finally:
        ray.shutdown()


def breakdown(path: str) -> dict[str, float]:
    """Records/s of one core for each part of the map step, over the same blocks."""
    from analyzer.fold import StoreFold
    from analyzer.kernels import count_cells
    from analyzer.params import Params
    from analyzer.plan import BlockPlan
    from analyzer.profiles import profile_rows
    from capture_server.store import open_store

    warm_up()
    store = open_store(path)
    plan = BlockPlan(store, None, set())
    blocks = [(b, plan.rows(b)) for b in plan.blocks[:40]]
    records = sum(b.stop - b.start for b, _ in blocks) * L

    def rate(fn, inputs: list) -> float:
        """Best of REPEATS passes; results are dropped as they come, as in a worker."""
        best = float("inf")
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            for x in inputs:
                fn(x)
            best = min(best, time.perf_counter() - t0)
        return records / best

    read_ids = rate(
        lambda b: store.read_rows(b[0].start, b[0].stop, ("topk_ids", "positions")), blocks
    )
    read_weights = rate(lambda b: store.read_rows(b[0].start, b[0].stop, ("topk_weights",)), blocks)
    data = [store.read_rows(b.start, b.stop, ("topk_ids", "positions")) for b, _ in blocks]
    jobs = [
        ([dict(r, labels=json.loads(r["labels"] or "{}")) for r in rows], rows_data, b.start)
        for (b, rows), rows_data in zip(blocks, data, strict=True)
    ]
    profile = rate(lambda job: profile_rows(*job, E), jobs)
    profiles = [profile_rows(*job, E) for job in jobs]

    def fold(block_profiles, compiled: bool = True) -> None:
        """As a map task folds: per-sequence statistics by the compiled loop (or numpy)."""
        folded = StoreFold("bench", Params(), set())
        folded.compiled = compiled
        folded.add(block_profiles)

    stats = rate(fold, profiles)
    stats_numpy = rate(lambda p: fold(p, compiled=False), profiles)

    cells = [np.zeros(len(rows["topk_ids"]), np.int64) for rows in data]  # one cell
    inputs = [(rows["topk_ids"], c) for rows, c in zip(data, cells, strict=True)]
    loop = rate(lambda x: count_cells(*x, 1, E), inputs)
    bincount = rate(lambda x: numpy_count_cells(*x, 1, E), inputs)
    return {
        "read ids + positions": read_ids,
        "read weights": read_weights,
        "profile_rows (counting and profiles)": profile,
        "sequence statistics (fold), compiled": stats,
        "sequence statistics (fold), numpy": stats_numpy,
        "counting alone, compiled loop": loop,
        "counting alone, numpy bincount": bincount,
    }


def rss_tree_mb() -> float:
    """Peak RSS of this process plus the current RSS of its children (Ray workers)."""
    import psutil

    me = psutil.Process()
    children = sum(c.memory_info().rss for c in me.children(recursive=True) if c.is_running())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 + children / 2**20


def driver_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(mode: str, workload: str, path: str) -> dict[str, float]:
    import threading

    peak = [0.0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            peak[0] = max(peak[0], rss_tree_mb())

    threading.Thread(target=sample, daemon=True).start()
    if mode == "breakdown":
        return breakdown(path)
    if mode in ("numpy", "single"):
        if mode == "numpy":  # the same loop, counting with numpy instead of the compiled loop
            import analyzer.profiles

            analyzer.profiles.count_cells = numpy_count_cells
        warm_up()
        seconds, cpu = [], []
        for _ in range(REPEATS):
            c0, t0 = time.process_time(), time.perf_counter()
            with table_parts() as parts:
                n = single_process(path, WORKLOADS[workload], parts)
            seconds.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        driver = cpu
    else:
        n, seconds, cpu, driver = ray_run(path, WORKLOADS[workload], int(mode[-1]))
    stop.set()
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "driver_cpu_seconds": driver,
        "sequences": n,
        "peak_mb": max(peak[0], rss_tree_mb()),
        "driver_peak_mb": driver_peak_mb(),
    }


def stream_bytes_per_s() -> float:
    """Bytes per second one core copies from memory to memory (arrays far larger than
    its caches): the rate at which it can at best read a store's decoded arrays."""
    a = np.ones(256 * 2**20, dtype=np.uint8)
    b = np.empty_like(a)
    np.copyto(b, a)
    t0 = time.perf_counter()
    for _ in range(5):
        np.copyto(b, a)
    return 5 * a.nbytes / (time.perf_counter() - t0)


def cache_store(path: str) -> None:
    """Read every file of the store once, so that each measurement starts with the
    store in the page cache (this machine's memory manager evicts pages left cold for a
    few minutes, and a mode would otherwise pay for disk reads its predecessor did not)."""
    for file in Path(path).rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                while f.read(1 << 24):
                    pass


def run_child(env: dict[str, str], *args: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", *args],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(scratch: str, tokens: int) -> dict:
    """Build the stores under `scratch`, run every measurement, return the summary."""
    full, half = os.path.join(scratch, "full"), os.path.join(scratch, "half")
    t0 = time.perf_counter()
    build_store(full, tokens)
    build_store(half, tokens // 2)
    print(f"built stores in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    # one thread per process: a worker's rate is one core's rate
    env = dict(
        os.environ, RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1", ZARR_THREADING__MAX_WORKERS="1"
    )
    records = tokens // SEQ_ROWS * SEQ_ROWS * L
    rates: dict[str, dict[str, float]] = {}
    cpu_rates: dict[str, dict[str, float]] = {}  # records per CPU second of the workers
    driver_share: dict[str, dict[str, float]] = {}  # driver CPU seconds per wall second
    for workload in WORKLOADS:
        for mode in ("numpy", "single", "ray1", "ray2"):
            cache_store(full)
            r = run_child(env, mode, workload, full)
            best = int(np.argmin(r["seconds"]))
            rates.setdefault(workload, {})[mode] = records / r["seconds"][best]
            cpu_rates.setdefault(workload, {})[mode] = records / r["cpu_seconds"][best]
            driver_share.setdefault(workload, {})[mode] = (
                r["driver_cpu_seconds"][best] / r["seconds"][best]
            )
            print(
                f"{workload:4s} {mode:6s} {rates[workload][mode] / 1e6:7.1f} M records/s  "
                f"driver {r['driver_peak_mb']:.0f} MB, all processes {r['peak_mb']:.0f} MB",
                file=sys.stderr,
            )
    memory = {
        name: cache_store(path) or run_child(env, "ray2", "all", path)
        for name, path in (("store", full), ("half store", half))
    }
    cache_store(full)
    parts = run_child(env, "breakdown", "all", full)
    stream = stream_bytes_per_s()
    bounds = {w: stream / b for w, b in BYTES_PER_RECORD.items()}
    summary = {
        "records": records,
        "store_MB": round(
            sum(p.stat().st_size for p in Path(full).rglob("*") if p.is_file()) / 1e6, 1
        ),
        "records_per_s": {w: {m: round(v) for m, v in r.items()} for w, r in rates.items()},
        "speedup_ray2_over_ray1": {w: round(r["ray2"] / r["ray1"], 2) for w, r in rates.items()},
        "records_per_worker_cpu_second": {
            w: {m: round(v) for m, v in r.items()} for w, r in cpu_rates.items()
        },
        "driver_cpu_share": {
            w: {m: round(v, 2) for m, v in r.items() if m.startswith("ray")}
            for w, r in driver_share.items()
        },
        "one_core_records_per_s": {k: round(v) for k, v in parts.items()},
        "stream_GB_per_s": round(stream / 1e9, 1),
        "bytes_per_record": BYTES_PER_RECORD,
        "stream_bound_records_per_s": {w: round(b) for w, b in bounds.items()},
        "single_vs_stream_bound": {w: round(rates[w]["single"] / bounds[w], 3) for w in WORKLOADS},
        "peak_mb": {name: round(m["peak_mb"]) for name, m in memory.items()},
        "driver_peak_mb": {name: round(m["driver_peak_mb"]) for name, m in memory.items()},
    }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tokens", type=int, default=12_800_000, help="Token rows (records = tokens x 16 layers)."
    )
    parser.add_argument("--out", default=None, help="Write the results as JSON here.")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return

    scratch = tempfile.mkdtemp(prefix="moetrace-bench-analyzer-")
    try:
        summary = measure(scratch, args.tokens)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
