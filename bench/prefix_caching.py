"""Prefix caching on against off for RL-style rollouts (n samples of long prompts), with
every row captured into a store either way, side by side in one engine.

Workload: a tiny Qwen3-MoE specimen, 16 prompts x 384 tokens, n = 8 seeded samples of 16
new tokens each, ids + weights + logits into a new Zarr store per call. Calls alternate
between the prefix cache read (on) and skipped (`skip_reading_prefix_cache`, off), each
on fresh prompts so that only a prompt's own samples can share its blocks. A third
mode reads the cache but stores every sample's prompt rows in full
(`share_prompt_rows=False`: what stores held before prompt rows were shared). Reports
seconds per call (generation and commit), rows stored and bytes on disk.

    .venv/bin/python bench/prefix_caching.py [--rounds 3] [--out docs/results/prefix.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ARCH = "qwen3_moe"
PROMPTS, PROMPT_TOKENS, SAMPLES, NEW_TOKENS = 16, 384, 8, 16


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="Pairs of calls (on, off).")
    parser.add_argument("--out", default=None, help="Write the results as JSON here.")
    args = parser.parse_args()
    os.environ.update(
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        VLLM_CPU_KVCACHE_SPACE="2",
        VLLM_CPU_OMP_THREADS_BIND="nobind",
        TOKENIZERS_PARALLELISM="false",
    )
    import numpy as np

    from capture_server.capture.api import CaptureEngine
    from capture_server.specimens import build_specimen

    work = Path(tempfile.mkdtemp(prefix="moetrace-bench-prefix-"))
    model = str(build_specimen(ARCH, str(work / "model")))
    engine = CaptureEngine(
        model,
        dtype="float32",
        max_model_len=512,
        enforce_eager=True,
        enable_chunked_prefill=False,  # per-request seeds on a CPU
        seed=0,
    )
    vocab = len(engine.tokenizer)
    rng = np.random.default_rng(0)
    sampling = dict(n=SAMPLES, max_tokens=NEW_TOKENS, temperature=1.0, seed=3, ignore_eos=True)
    calls = iter(range(10_000))

    def run(mode: str) -> tuple[float, int, int, int]:
        """One call on fresh prompts: (seconds, store bytes, rows reused from slots,
        rows stored)."""
        prompts = [rng.integers(1, vocab, PROMPT_TOKENS).tolist() for _ in range(PROMPTS)]
        store = work / f"store{next(calls)}"
        reused = engine.stats()["prefix_rows_reused"]
        start = time.perf_counter()
        result = engine.generate_to_store(
            prompts,
            str(store),
            skip_reading_prefix_cache=mode == "off",
            store_options={"share_prompt_rows": mode != "on, stored in full"},
            **sampling,
        )
        seconds = time.perf_counter() - start
        reused = engine.stats()["prefix_rows_reused"] - reused
        return seconds, disk_bytes(store), reused, result.num_tokens

    modes = ("on", "off", "on, stored in full")
    for mode in modes:  # warm-up
        run(mode)
    results: dict[str, list[tuple[float, int, int, int]]] = {mode: [] for mode in modes}
    for r in range(args.rounds):
        for mode in modes[r % 3 :] + modes[: r % 3]:
            results[mode].append(run(mode))
            seconds, size, reused, stored = results[mode][-1]
            print(
                f"round {r} caching {mode:18s} {seconds:6.2f} s {size / 2**20:7.1f} MiB "
                f"{reused} rows reused, {stored} rows stored",
                file=sys.stderr,
            )
    engine.close()

    summary = {
        mode: {
            "seconds": round(statistics.median(x[0] for x in runs), 3),
            "store_mib": round(statistics.median(x[1] for x in runs) / 2**20, 2),
            "rows_reused": int(statistics.median(x[2] for x in runs)),
            "rows_stored": int(statistics.median(x[3] for x in runs)),
            "each_round_seconds": [round(x[0], 3) for x in runs],
        }
        for mode, runs in results.items()
    }
    tokens = PROMPTS * SAMPLES * NEW_TOKENS
    ratios = {
        "speed_on_over_off": round(summary["off"]["seconds"] / summary["on"]["seconds"], 3),
        "disk_on_over_off": round(summary["on"]["store_mib"] / summary["off"]["store_mib"], 3),
        "disk_on_over_stored_in_full": round(
            summary["on"]["store_mib"] / summary["on, stored in full"]["store_mib"], 3
        ),
    }
    for mode, row in summary.items():
        print(
            f"caching {mode:18s} {row['seconds']:6.2f} s  {tokens / row['seconds']:8.1f} "
            f"generated tok/s  {row['store_mib']:7.1f} MiB  {row['rows_stored']} rows stored"
        )
    print(
        f"speed on/off {ratios['speed_on_over_off']}x, disk on/off "
        f"{ratios['disk_on_over_off']}x, disk on/stored in full "
        f"{ratios['disk_on_over_stored_in_full']}x"
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "workload": f"{ARCH} {PROMPTS} prompts x {PROMPT_TOKENS} tokens, "
                    f"n={SAMPLES}, {NEW_TOKENS} new tokens, ids+weights+logits to a store",
                    "rounds": args.rounds,
                    "results": summary,
                    "ratios": ratios,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
