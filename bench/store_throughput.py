"""Routing-store writer and reader throughput, compression and memory, in one run.

Records are shaped like Qwen3-30B-A3B (48 MoE layers, 128 experts, top-8, fp16
logits). Every comparison is measured side by side, in rounds, each measurement starting
after `sync` (no dirty pages left by the one before):

- writer vs raw, buffered: the writer (`StoreWriter`, its chunk pool at its default
  threads) streams the sequences with each codec; the same bytes are written raw with
  plain sequential file writes to the same disk.
- writer vs raw, durable: the writer fdatasyncs every chunk object (`durable=True`);
  raw fdatasyncs every chunk's worth of each array file.
- float16 in: both of the above with logits handed over in float16, as an engine
  capturing float16 (`capture_dtype`, cast on the device) gives them: no cast left to
  the writer.
- encoder threads: casting and encoding alone (no disk), and the whole writer, with one
  encoder thread and with two.
- commit cost: one commit of an 8-row sequence, by how full the last chunk already is.
- memory: peak RSS of a writer process for a job and for a job 10x larger.
- writers: the same rows written by one writer process, and by two at once, each writing
  its half as a data-parallel part of one store (format version 2), as aggregate MB/s.
- budget: token rows per second that one writer and two writers sustain for the routing
  of real model shapes (`SHAPES`), ids + weights and with float16 logits.

    .venv/bin/python bench/store_throughput.py [--rows 20000] [--rounds 3] [--out F.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
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


def _pool(shape: str = SHAPE, logits_dtype: str = "float32"):
    """Sequences with routing-like structure: top-k ids and softmax weights of the logits
    (`logits_dtype` float16: as an engine capturing float16 hands them over)."""
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
                router_logits=logits.astype(logits_dtype),
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
    threads: int | None = None,
    durable: bool = False,
    torch_cast: bool = True,
    warmup: bool = True,
    float16_in: bool = False,
) -> dict[str, float]:
    """One writer's run; with `dp_rank`, as that data-parallel part of a parted store.
    `warmup` false: writers started together time from their start (a warm-up of one
    would overlap the timed run of the other).
    `torch_cast`: float16 conversion as in a vLLM process (the plugin registers torch's);
    without it, numpy's (the store alone). `float16_in`: logits handed over in float16,
    as an engine capturing float16 (`capture_dtype`) gives them."""
    if torch_cast:
        from capture_server.plugin import float_cast

        float_cast.register()
    from capture_server.capture.records import SequenceEnd
    from capture_server.store import StoreOptions
    from capture_server.store.parts import PartId
    from capture_server.store.writer import StoreWriter

    pool = _pool(shape, "float16" if float16_in else "float32")
    part = None if dp_rank is None else PartId(dp_rank=dp_rank)
    options = StoreOptions(compressor=codec, weights_dtype="float16", logits=logits)
    pool_kwargs = {} if threads is None else {"encoder_threads": threads}

    def stream(url: str, rows: int) -> StoreWriter:
        writer = StoreWriter(url, options, part=part, durable=durable, **pool_kwargs)
        writer.open(_meta(shape))
        n = 0
        while n * SEQ_ROWS < rows:
            # single-sample requests, as most capture is (n = 1)
            end = SequenceEnd(f"seq{n}", 0, 128, 0, SEQ_ROWS, sole_sample=True)
            writer.add_sequence(end, pool[n % POOL])
            if writer.staged_rows >= writer.chunk:
                writer.flush(partial=False)
            n += 1
        writer.close()
        return writer

    # Same start for the writer and the raw writes (`main.raw_mbps`): a warm-up of the
    # same size, flushed to disk, then deleted just before the timed run. On this VM,
    # memory untouched for a few seconds is written at about a tenth of the rate of
    # memory just freed (docs/benchmarks.md), so both reuse the pages the warm-up freed.
    if warmup:
        stream(f"{path}-warmup", rows_total)
        os.sync()
        shutil.rmtree(f"{path}-warmup", ignore_errors=True)
    started = time.time()
    t0 = time.perf_counter()
    writer = stream(path, rows_total)
    n = math.ceil(rows_total / SEQ_ROWS)
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "started": started,
        "ended": started + seconds,
        "bytes": writer.bytes_written,
        "rows": n * SEQ_ROWS,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **{f"{k}_thread_seconds": v for k, v in writer.chunk_seconds.items()},
        "cpu_seconds": time.process_time(),
    }


def write_raw(
    path: str, nbytes_per_seq: list[np.ndarray], rows_total: int, durable: bool = False
) -> float:
    """The same bytes with plain file writes, one file per array, appended sequentially;
    `durable` fdatasyncs each file after every sequence (one chunk's worth of rows)."""
    os.makedirs(path, exist_ok=True)
    files = [open(os.path.join(path, f"a{i}.bin"), "wb") for i in range(len(nbytes_per_seq))]
    t0 = time.perf_counter()
    n = 0
    while n * SEQ_ROWS < rows_total:
        for f, arr in zip(files, nbytes_per_seq, strict=True):
            f.write(arr.data)
            if durable:
                f.flush()
                os.fdatasync(f.fileno())
        n += 1
    for f in files:
        f.close()
    return time.perf_counter() - t0


def encode_rate(
    threads: int, source_dtype: str, torch_cast: bool = True, chunks: int = 48
) -> float:
    """Stored MB/s of casting and encoding alone (the chunk writer's work without the
    disk): Qwen3-30B-A3B logits chunks, blosc-lz4-shuffle, `threads` encoder threads."""
    import zarr

    from capture_server.plugin.float_cast import torch_float16_cast
    from capture_server.store.chunks import ChunkWriter, encoder_for, use_float16_cast
    from capture_server.store.format import COMPRESSORS

    use_float16_cast(torch_float16_cast if torch_cast else None)

    class Discarding(ChunkWriter):
        def _put(self, key: str, data: bytes, **_: bool) -> None:
            pass

    logits = _pool()[0].router_logits.astype(source_dtype)
    array = zarr.create_array(
        zarr.storage.MemoryStore(),
        shape=logits.shape,
        chunks=logits.shape,
        dtype="float16",
        compressors=COMPRESSORS["blosc-lz4-shuffle"](2),
    )
    writer = Discarding(zarr.storage.MemoryStore(), threads=threads)
    encode = encoder_for(array)
    assert encode is not None
    t0 = time.perf_counter()
    for c in range(chunks):
        writer.submit(f"c/{c}", [logits], logits.shape, np.dtype("float16"), encode)
    writer.close()
    return chunks * logits.size * 2 / (time.perf_counter() - t0) / 1e6


def commit_ms(path: str, fill_rows: int, repeats: int = 5) -> float:
    """Median milliseconds of committing one 8-row sequence (`flush(partial=True)`) into
    a last chunk that committed rows fill `fill_rows` of 512 (after a whole chunk:
    steady state, the store exists and has room)."""
    from capture_server.capture.records import SequenceEnd
    from capture_server.plugin import float_cast
    from capture_server.store import StoreOptions
    from capture_server.store.writer import StoreWriter

    float_cast.register()
    full = _pool()[0]

    def head(n: int):
        fields = dataclasses.fields(full)
        return dataclasses.replace(
            full, **{f.name: _head(getattr(full, f.name), n) for f in fields}
        )

    times = []
    for r in range(repeats):
        writer = StoreWriter(f"{path}-{r}", StoreOptions(weights_dtype="float16"))
        writer.open(_meta())
        writer.add_sequence(SequenceEnd("whole", 0, 0, 0, SEQ_ROWS), full)
        writer.add_sequence(SequenceEnd("fill", 0, 0, 0, fill_rows), head(fill_rows))
        writer.flush(partial=True)
        writer.add_sequence(SequenceEnd("new", 0, 0, 0, 8), head(8))
        t0 = time.perf_counter()
        writer.flush(partial=True)
        times.append(time.perf_counter() - t0)
        writer.close()
        shutil.rmtree(f"{path}-{r}")
    return float(np.median(times) * 1e3)


def _head(value, n: int):
    if isinstance(value, dict):
        return {k: v[:n] for k, v in value.items()}
    return None if value is None else value[:n]


def du(path: str, prefix: str = "") -> int:
    return sum(p.stat().st_size for p in Path(path, prefix).rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000, help="Token rows per codec run.")
    parser.add_argument("--rounds", type=int, default=3, help="Rounds of side-by-side runs.")
    parser.add_argument("--dir", default=None, help="Scratch directory (default: a temp dir).")
    parser.add_argument("--out", default=None, help="Write the results as JSON here.")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # PATH ROWS CODEC [DP]
    parser.add_argument("--shape", default=SHAPE, help=argparse.SUPPRESS)
    parser.add_argument("--no-logits", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--durable", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--numpy-cast", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-warmup", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--float16-in", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        path, rows, codec, *dp = args.child
        dp_rank = int(dp[0]) if dp else None
        run = write_store(
            path,
            int(rows),
            codec,
            dp_rank,
            args.shape,
            not args.no_logits,
            args.threads,
            args.durable,
            not args.numpy_cast,
            not args.no_warmup,
            args.float16_in,
        )
        print(json.dumps(run))
        return

    scratch = args.dir or tempfile.mkdtemp(prefix="moetrace-bench-")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    results: dict[str, dict] = {}

    def child(path: str, rows: int, codec: str, *flags: str) -> dict[str, float]:
        out = subprocess.run(
            [sys.executable, __file__, "--child", path, str(rows), codec, *flags],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    def writer_mbps(codec: str, *flags: str, keep: bool = False) -> float:
        path = os.path.join(scratch, codec + "".join(flags).replace("-", ""))
        shutil.rmtree(path, ignore_errors=True)
        r = child(path, args.rows, codec, *flags)
        if not keep:
            shutil.rmtree(path)
        return r["bytes"] / r["seconds"] / 1e6

    pool = _pool()
    per_seq = [
        pool[0].topk_ids.astype(np.uint8),
        pool[0].topk_weights.astype(np.float16),
        pool[0].router_logits.astype(np.float16),
        pool[0].token_ids.astype(np.int32),
        pool[0].positions.astype(np.int32),
    ]
    raw_dir = os.path.join(scratch, "raw")

    def raw_mbps(durable: bool = False) -> float:
        """Raw writes, started as the writer's children start theirs (a warm-up of the
        same size written, synced and deleted just before)."""
        write_raw(raw_dir + "-warmup", per_seq, args.rows, durable)
        os.sync()
        shutil.rmtree(raw_dir + "-warmup")
        seconds = write_raw(raw_dir, per_seq, args.rows, durable)
        nbytes = du(raw_dir)
        shutil.rmtree(raw_dir)
        return nbytes / seconds / 1e6

    # -- writer vs raw, buffered and durable, in rounds ----------------------------------
    rounds: list[dict[str, float]] = []
    for r in range(args.rounds):
        one: dict[str, float] = {}
        for codec in CODECS:
            one[f"raw before {codec}"] = raw_mbps()
            one[codec] = writer_mbps(codec, keep=r == args.rounds - 1)
        one["raw before numpy cast"] = raw_mbps()
        one["numpy cast"] = writer_mbps(CODECS[0], "--numpy-cast")
        one["raw before float16 in"] = raw_mbps()
        one["float16 in"] = writer_mbps(CODECS[0], "--float16-in")
        one["raw durable"] = raw_mbps(durable=True)
        one["writer durable"] = writer_mbps(CODECS[0], "--durable")
        one["raw durable before float16 in"] = raw_mbps(durable=True)
        one["writer durable, float16 in"] = writer_mbps(CODECS[0], "--durable", "--float16-in")
        rounds.append(one)
        print(f"round {r}: {json.dumps({k: round(v) for k, v in one.items()})}", file=sys.stderr)

    def median_of(key: str) -> float:
        return float(np.median([one[key] for one in rounds]))

    def paired(key: str, raw_key: str) -> float:
        return float(np.median([one[key] / one[raw_key] for one in rounds]))

    for codec in CODECS:
        path = os.path.join(scratch, codec)
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
            "write_MBps": round(median_of(codec), 1),
            "raw_MBps": round(median_of(f"raw before {codec}"), 1),
            "vs_raw": round(paired(codec, f"raw before {codec}"), 2),
            "read_MBps": round(read_mbps, 1),
            "compression": ratios,
            "disk_MB": round(du(path) / 1e6, 1),
        }
        print(f"{codec:20s} {results[codec]}", file=sys.stderr)
        shutil.rmtree(path)
    durable = {
        "raw_MBps": round(median_of("raw durable"), 1),
        "writer_MBps": round(median_of("writer durable"), 1),
        "vs_raw": round(paired("writer durable", "raw durable"), 2),
    }
    print(f"durable: {durable}", file=sys.stderr)
    numpy_cast = {
        "writer_MBps": round(median_of("numpy cast"), 1),
        "vs_raw": round(paired("numpy cast", "raw before numpy cast"), 2),
    }
    print(f"numpy cast: {numpy_cast}", file=sys.stderr)
    float16_in = {  # an engine capturing float16 (`capture_dtype`): no cast in the writer
        "writer_MBps": round(median_of("float16 in"), 1),
        "vs_raw": round(paired("float16 in", "raw before float16 in"), 2),
        "durable_writer_MBps": round(median_of("writer durable, float16 in"), 1),
        "durable_vs_raw": round(
            paired("writer durable, float16 in", "raw durable before float16 in"), 2
        ),
    }
    print(f"float16 in: {float16_in}", file=sys.stderr)

    # -- encoder threads: encoding alone, and the whole writer ---------------------------
    encoding: dict[str, float] = {}
    for source, torch_cast in (("float16", True), ("float32", True), ("float32 numpy", False)):
        for threads in (1, 2):
            rate = encode_rate(threads, source.split()[0], torch_cast)
            encoding[f"{source} in, {threads} thread(s)"] = round(rate, 1)
    whole = [
        (writer_mbps(CODECS[0], "--threads", "1"), writer_mbps(CODECS[0], "--threads", "2"))
        for _ in range(args.rounds)
    ]
    threads_summary = {
        "encode_MBps": encoding,
        "encode_two_vs_one": {
            source: round(
                encoding[f"{source} in, 2 thread(s)"] / encoding[f"{source} in, 1 thread(s)"], 2
            )
            for source in ("float16", "float32", "float32 numpy")
        },
        "writer_one_thread_MBps": round(float(np.median([a for a, _ in whole])), 1),
        "writer_two_threads_MBps": round(float(np.median([b for _, b in whole])), 1),
        "writer_two_vs_one": round(float(np.median([b / a for a, b in whole])), 2),
    }
    print(f"encoder threads: {threads_summary}", file=sys.stderr)

    # -- commit cost by how full the last chunk is ---------------------------------------
    commits = {
        f"{fill} of 512 rows": round(commit_ms(os.path.join(scratch, f"commit{fill}"), fill), 1)
        for fill in (0, 128, 256, 496)
    }
    print(f"commit ms: {commits}", file=sys.stderr)

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
        flags = ["--shape", shape, "--no-warmup"] + ([] if logits else ["--no-logits"])
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
        "rounds": rounds,
        "row_bytes": int(sum(a[0].nbytes for a in per_seq)),
        "codecs": results,
        "durable": durable,
        "numpy_cast": numpy_cast,
        "float16_in": float16_in,
        "encoder_threads": threads_summary,
        "commit_ms": commits,
        "peak_rss_mb": mem,
        "writers": parts,
        "budget": budget,
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
