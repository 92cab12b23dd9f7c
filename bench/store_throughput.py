"""Routing-store writer and reader throughput, compression and memory, in one run.

Records are shaped like Qwen3-30B-A3B (48 MoE layers, 128 experts, top-8, fp16
logits). For each codec the writer (one thread, `StoreWriter`) streams the same
sequences; the same bytes are also written raw with plain file writes to the same disk.
Memory: peak RSS of a writer process for a job and for a job 10x larger. Writers: the
same rows written by one writer process, and by two at once, each writing its half as a
data-parallel part of one store (format version 2), as aggregate MB/s. Budget: token
rows per second that one writer and two writers sustain for the routing of real model
shapes (`SHAPES`), ids + weights and with float16 logits.

    .venv/bin/python bench/store_throughput.py [--rows 20000] [--out docs/bench-store.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# -- defaults ---------------------------------------------------------------------------
SHAPES = {  # MoE layers, routed experts, top-k, hidden size (from each model's config.json)
    "OLMoE-1B-7B": (16, 64, 8, 2048),
    "Qwen3-30B-A3B": (48, 128, 8, 2048),
    "DeepSeek-V3": (58, 256, 8, 7168),
}
SHAPE = "Qwen3-30B-A3B"
L, E, K, D = SHAPES[SHAPE]
SEQ_ROWS = 512
BUDGET_BYTES = 256 * 2**20  # routing bytes per budget run: fixed costs stay a small share
POOL = 8  # distinct synthetic sequences, reused round-robin (generation is not measured)
CODECS = ["blosc-lz4-shuffle", "blosc-zstd-shuffle", "zstd", "none"]
SEED = 0


def _meta(shape: str = SHAPE):
    from capture_server.capture.records import ModelMeta

    layers, experts, k, hidden = SHAPES[shape]
    return ModelMeta.synthetic(list(range(layers)), experts, k, hidden)


def _pool(shape: str = SHAPE):
    """Sequences with routing-like structure: top-k ids and softmax weights of the logits."""
    from capture_server.capture.records import RoutingRows

    L, E, K, _ = SHAPES[shape]
    rng = np.random.default_rng(SEED)
    pool = []
    for i in range(POOL):
        logits = (rng.normal(size=(SEQ_ROWS, L, E)) * 2).astype(np.float32)
        ids = np.argsort(-logits, axis=-1)[..., :K].astype(np.int32)
        top = np.take_along_axis(logits, ids, -1)
        weights = np.exp(top) / np.exp(top).sum(-1, keepdims=True)
        pool.append(
            RoutingRows(
                request_ids=np.array([f"s{i}"] * SEQ_ROWS, dtype=object),
                sample_index=np.zeros(SEQ_ROWS, np.int32),
                positions=np.arange(SEQ_ROWS),
                token_ids=rng.integers(0, 150000, SEQ_ROWS),
                is_prompt=np.arange(SEQ_ROWS) < 128,
                topk_ids=ids,
                topk_weights=weights.astype(np.float32),
                router_logits=logits,
            )
        )
    return pool


def write_store(
    path: str,
    rows_total: int,
    codec: str,
    dp_rank: int | None = None,
    shape: str = SHAPE,
    logits: bool = True,
) -> dict[str, float]:
    """One writer's run; with `dp_rank`, as that data-parallel part of a parted store."""
    from capture_server.capture.records import SequenceEnd
    from capture_server.store import StoreOptions
    from capture_server.store.parts import PartId
    from capture_server.store.writer import StoreWriter

    pool = _pool(shape)
    part = None if dp_rank is None else PartId(dp_rank=dp_rank)
    options = StoreOptions(compressor=codec, weights_dtype="float16", logits=logits)
    writer = StoreWriter(path, options, part=part)
    writer.open(_meta(shape))
    started = time.time()
    t0 = time.perf_counter()
    n = 0
    while n * SEQ_ROWS < rows_total:
        rows = pool[n % POOL]
        writer.add_sequence(SequenceEnd(f"seq{n}", 0, 128, 0, SEQ_ROWS), rows)
        if writer.staged_rows >= writer.chunk:
            writer.flush(partial=False)
        n += 1
    writer.close()
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "started": started,
        "ended": started + seconds,
        "bytes": writer.bytes_written,
        "rows": n * SEQ_ROWS,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def write_raw(path: str, nbytes_per_seq: list[np.ndarray], rows_total: int) -> float:
    """The same bytes with plain file writes, one file per array, appended sequentially."""
    os.makedirs(path, exist_ok=True)
    files = [open(os.path.join(path, f"a{i}.bin"), "wb") for i in range(len(nbytes_per_seq))]
    t0 = time.perf_counter()
    n = 0
    while n * SEQ_ROWS < rows_total:
        for f, arr in zip(files, nbytes_per_seq, strict=True):
            f.write(arr.data)
        n += 1
    for f in files:
        f.close()
    return time.perf_counter() - t0


def du(path: str, prefix: str = "") -> int:
    return sum(p.stat().st_size for p in Path(path, prefix).rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000, help="Token rows per codec run.")
    parser.add_argument("--dir", default=None, help="Scratch directory (default: a temp dir).")
    parser.add_argument("--out", default=None, help="Write the results as JSON here.")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # PATH ROWS CODEC [DP]
    parser.add_argument("--shape", default=SHAPE, help=argparse.SUPPRESS)
    parser.add_argument("--no-logits", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        path, rows, codec, *dp = args.child
        dp_rank = int(dp[0]) if dp else None
        run = write_store(path, int(rows), codec, dp_rank, args.shape, not args.no_logits)
        print(json.dumps(run))
        return

    scratch = args.dir or tempfile.mkdtemp(prefix="moetrace-bench-")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    results: dict[str, dict] = {}

    def child(path: str, rows: int, codec: str) -> dict[str, float]:
        out = subprocess.run(
            [sys.executable, __file__, "--child", path, str(rows), codec],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    from capture_server.store.writer import StoreWriter  # noqa: F401  (warm imports)

    pool = _pool()
    per_seq = [
        pool[0].topk_ids.astype(np.uint8),
        pool[0].topk_weights.astype(np.float16),
        pool[0].router_logits.astype(np.float16),
        pool[0].token_ids.astype(np.int32),
        pool[0].positions.astype(np.int32),
    ]
    raw_dir = os.path.join(scratch, "raw")
    raw_s = write_raw(raw_dir, per_seq, args.rows)
    raw_bytes = du(raw_dir)
    raw_mbps = raw_bytes / raw_s / 1e6
    shutil.rmtree(raw_dir)
    print(f"raw file writes: {raw_mbps:8.1f} MB/s", file=sys.stderr)

    for codec in CODECS:
        path = os.path.join(scratch, codec)
        r = child(path, args.rows, codec)
        mbps = r["bytes"] / r["seconds"] / 1e6
        ratios = {}
        for name in ("topk_ids", "topk_weights", "router_logits", "token_ids", "positions"):
            from capture_server.store import open_store

            store = open_store(path)
            arr = store.read_rows(0, 1, (name,))[name]
            logical = store.num_tokens * arr[0].nbytes
            ratios[name] = round(logical / max(1, du(path, name)), 2)
        t0 = time.perf_counter()
        store = open_store(path)
        scanned = 0
        for block in store.blocks():
            scanned += sum(a.nbytes for a in store.read_rows(block.start, block.stop).values())
        read_mbps = scanned / (time.perf_counter() - t0) / 1e6
        results[codec] = {
            "write_MBps": round(mbps, 1),
            "vs_raw": round(mbps / raw_mbps, 2),
            "read_MBps": round(read_mbps, 1),
            "compression": ratios,
            "disk_MB": round(du(path) / 1e6, 1),
        }
        print(
            f"{codec:20s} write {mbps:7.1f} MB/s ({mbps / raw_mbps:4.2f}x raw) "
            f"read {read_mbps:7.1f} MB/s  ratio {ratios}",
            file=sys.stderr,
        )
        shutil.rmtree(path)

    mem = {}
    for scale in (1, 10):
        path = os.path.join(scratch, f"mem{scale}")
        mem[f"{scale}x"] = round(child(path, args.rows * scale, CODECS[0])["peak_rss_mb"], 1)
        shutil.rmtree(path)
    print(f"peak RSS: {mem}", file=sys.stderr)

    def writers(
        count: int, rows: int = args.rows, shape: str = SHAPE, logits: bool = True
    ) -> tuple[float, float]:
        """Aggregate MB/s and token rows/s of `count` writer processes splitting the
        rows, at once."""
        path = os.path.join(scratch, f"writers{count}")
        flags = ["--shape", shape] + ([] if logits else ["--no-logits"])
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, "--child", path, str(rows // count), CODECS[0]]
                + ([] if count == 1 else [str(d)])
                + flags,
                env=env,
                stdout=subprocess.PIPE,
                text=True,
            )
            for d in range(count)
        ]
        runs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
        shutil.rmtree(path)
        span = max(r["ended"] for r in runs) - min(r["started"] for r in runs)
        return sum(r["bytes"] for r in runs) / span / 1e6, sum(r["rows"] for r in runs) / span

    (one, _), (two, _) = writers(1), writers(2)
    parts = {"one_MBps": round(one, 1), "two_MBps": round(two, 1), "ratio": round(two / one, 2)}
    print(f"writers: {parts}", file=sys.stderr)

    budget = []  # tokens/s the writers sustain per model shape (blosc-lz4-shuffle)
    for shape in SHAPES:
        layers, experts, k, _ = SHAPES[shape]
        for logits in (False, True):
            row_bytes = layers * k * 3 + 8 + (layers * experts * 2 if logits else 0)
            rows = max(args.rows, BUDGET_BYTES // row_bytes)
            (mb1, rows1), (mb2, rows2) = (writers(count, rows, shape, logits) for count in (1, 2))
            budget.append(
                {
                    "model": shape,
                    "arrays": "ids + weights + fp16 logits" if logits else "ids + weights",
                    "one_writer_tokens_per_s": round(rows1),
                    "two_writers_tokens_per_s": round(rows2),
                    "row_bytes": row_bytes,
                    "one_writer_MBps": round(mb1, 1),
                }
            )
            print(f"budget: {budget[-1]}", file=sys.stderr)
    summary = {
        "rows": args.rows,
        "row_bytes": int(sum(a[0].nbytes for a in per_seq)),
        "raw_MBps": round(raw_mbps, 1),
        "codecs": results,
        "peak_rss_mb": mem,
        "writers": parts,
        "budget": budget,
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
