"""End-to-end demo: build a tiny MoE, capture a rollout into a routing store, analyse it.

python -m capture_server.demo [--out demo-out]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

PROMPTS = [
    ("math", "the sum of two primes is"),
    ("math", "the integral of x is"),
    ("code", "def main return value for"),
    ("code", "sort the keys of a dict and"),
    ("history", "the empire fell after the war and"),
    ("history", "the king signed a treaty with"),
    ("biology", "the cell divides and the protein"),
    ("finance", "the bank raised interest rates and"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-out", help="Output directory.")
    parser.add_argument("--samples", type=int, default=4, help="Samples per prompt.")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    out = Path(args.out).resolve()

    from capture_server.specimens import build_specimen

    model = build_specimen("qwen3_moe", out / "model")
    print(f"[1/4] built tiny Qwen3-MoE specimen at {model}")

    from capture_server.capture.api import CaptureEngine

    engine = CaptureEngine(str(model), hidden_layers=[1], dtype="float32", max_model_len=512)
    store_path = out / "store"
    shutil.rmtree(store_path, ignore_errors=True)  # a rerun starts a fresh job
    store = engine.generate_to_store(
        [p for _, p in PROMPTS],
        str(store_path),
        labels=[{"domain": d, "question": i} for i, (d, _) in enumerate(PROMPTS)],
        store_options={"hidden_layers": [1]},
        n=args.samples,
        max_tokens=48,
        temperature=0.8,
        ignore_eos=True,
    )
    engine.close()
    print(f"[2/4] captured {len(store.index)} sequences, {store.num_tokens} token rows")
    print(f"[3/4] routing store at {store_path}:")
    print(
        store.index.select(
            "sequence_id",
            "prompt_index",
            "sample_index",
            "num_rows",
            "label_domain",
            "finish_reason",
        ).head(6)
    )

    analysis = out / "analysis"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "analyzer",
            "run",
            str(store_path),
            "--out",
            str(analysis),
            "--committee-variant",
            "softmax",
        ],
        check=True,
    )
    print(f"[4/4] analysis tables, plots and report: {analysis / 'report.html'}")


if __name__ == "__main__":
    main()
