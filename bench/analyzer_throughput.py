"""Analyzer throughput on a synthetic store of >= 50 million (token, layer) records.

Three ways over the same store, in one run: a single-process numpy loop over blocks
(the profile code without Ray), Ray with 1 worker, Ray with 2 workers. Also: the
machine's memory-bandwidth-bound rate for the bytes each record needs, and peak memory
for the store and for a store half its size (flat memory = peak does not grow).

    .venv/bin/python bench/analyzer_throughput.py [--tokens 3200000] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# -- defaults ---------------------------------------------------------------------------
L, E, K = 16, 64, 8  # OLMoE-shaped routing: 16 MoE layers, 64 experts, top-8
SEQ_ROWS = 512
SEED = 0


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


def numpy_baseline(path: str) -> int:
    from analyzer.profiles import profile_block
    from capture_server.store import open_store

    store = open_store(path)
    rows = {r["sequence_id"]: r for r in store.index.iter_rows(named=True)}
    profiles = 0
    for block in store.blocks(store.chunk_tokens):
        seqs = [rows[s] for s in block.sequence_ids]
        profiles += len(profile_block(path, block.start, block.stop, seqs))
    return profiles


def ray_run(path: str, workers: int) -> tuple[int, float]:
    """Profiles and seconds, Ray start-up excluded (workers are warmed up first)."""
    import ray

    from analyzer.pipeline import init_ray, map_profiles
    from analyzer.reduce import Params, StoreFold

    init_ray(num_cpus=workers)
    try:
        # start-up: every worker process imports the profile and store code once
        warm = ray.remote(lambda: __import__("analyzer.profiles") and None)
        ray.get([warm.remote() for _ in range(workers * 4)])
        t0 = time.perf_counter()
        fold = StoreFold("bench", Params(), keep=set())  # sums only: bounded driver memory
        n = len(map_profiles(path, None, lambda done, total: None, fold).profiles)
        return n, time.perf_counter() - t0
    finally:
        ray.shutdown()


def rss_tree_mb() -> float:
    """Peak RSS of this process plus the current RSS of its children (Ray workers)."""
    import psutil

    me = psutil.Process()
    children = sum(c.memory_info().rss for c in me.children(recursive=True) if c.is_running())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 + children / 2**20


def driver_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(mode: str, path: str) -> dict[str, float]:
    import threading

    peak = [0.0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            peak[0] = max(peak[0], rss_tree_mb())

    threading.Thread(target=sample, daemon=True).start()
    if mode == "numpy":
        t0 = time.perf_counter()
        n = numpy_baseline(path)
        seconds = time.perf_counter() - t0
    else:
        n, seconds = ray_run(path, int(mode[-1]))
    stop.set()
    return {
        "seconds": seconds,
        "sequences": n,
        "peak_mb": max(peak[0], rss_tree_mb()),
        "driver_peak_mb": driver_peak_mb(),
    }


def memory_bound_records_per_s() -> tuple[float, int]:
    """Copy bandwidth of one core, divided by the stored bytes one record needs."""
    a = np.ones(64 * 2**20, dtype=np.uint8)
    b = np.empty_like(a)
    np.copyto(b, a)
    t0 = time.perf_counter()
    for _ in range(10):
        np.copyto(b, a)
    bandwidth = 10 * a.nbytes / (time.perf_counter() - t0)  # bytes/s read (and written)
    per_record = K * 1 + K * 2  # uint8 ids + float16 weights per (token, layer)
    return bandwidth / per_record, per_record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tokens", type=int, default=3_200_000, help="Token rows (records = tokens x 16 layers)."
    )
    parser.add_argument("--out", default=None, help="Write the results as JSON here.")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return

    scratch = tempfile.mkdtemp(prefix="moetrace-bench-analyzer-")
    full, half = os.path.join(scratch, "full"), os.path.join(scratch, "half")
    t0 = time.perf_counter()
    build_store(full, args.tokens)
    build_store(half, args.tokens // 2)
    print(f"built stores in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    env = dict(os.environ, RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1")
    records = args.tokens // SEQ_ROWS * SEQ_ROWS * L
    results = {}
    for mode in ("numpy", "ray1", "ray2"):
        out = subprocess.run(
            [sys.executable, __file__, "--child", mode, full],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["records_per_s"] = records / r["seconds"]
        results[mode] = r
        print(
            f"{mode:6s} {r['records_per_s'] / 1e6:6.2f} M records/s  peak {r['peak_mb']:.0f} MB",
            file=sys.stderr,
        )
    out = subprocess.run(
        [sys.executable, __file__, "--child", "ray2", half],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    half = json.loads(out.stdout.strip().splitlines()[-1])
    bound, per_record = memory_bound_records_per_s()
    summary = {
        "records": records,
        "store_MB": round(
            sum(p.stat().st_size for p in Path(full).rglob("*") if p.is_file()) / 1e6, 1
        ),
        "records_per_s": {m: round(r["records_per_s"]) for m, r in results.items()},
        "speedup_ray2_over_ray1": round(
            results["ray2"]["records_per_s"] / results["ray1"]["records_per_s"], 2
        ),
        "memory_bound_records_per_s_per_core": round(bound),
        "bytes_per_record": per_record,
        "numpy_vs_memory_bound": round(results["numpy"]["records_per_s"] / bound, 3),
        "peak_mb": {
            "store": round(results["ray2"]["peak_mb"]),
            "half store": round(half["peak_mb"]),
        },
        "driver_peak_mb": {
            "store": round(results["ray2"]["driver_peak_mb"]),
            "half store": round(half["driver_peak_mb"]),
        },
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
