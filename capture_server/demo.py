"""End-to-end demo: tiny MoE -> capture server -> rollout job via the CLI -> analyzer -> report.

python -m capture_server.demo [--out demo-out]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
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
    out = Path(args.out).resolve()
    for stale in ("data", "analysis"):  # a rerun starts fresh
        shutil.rmtree(out / stale, ignore_errors=True)

    from capture_server.specimens import build_specimen

    model = build_specimen("qwen3_moe", out / "model")
    print(f"[1/5] built a tiny Qwen3-MoE specimen at {model}")

    from capture_server.api.launch import launch

    server, url = launch([model], out / "data", out / "server.log")
    print(f"[2/5] capture server ready on {url} (log: {out / 'server.log'})")
    try:
        prompts = out / "prompts.jsonl"
        prompts.write_text(
            "\n".join(
                json.dumps({"prompt": p, "labels": {"domain": d, "question": i}})
                for i, (d, p) in enumerate(PROMPTS)
            )
        )
        print("[3/5] submitting a rollout job with the CLI:")
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "clients",
                "submit",
                "--model",
                "model",
                "--prompts",
                str(prompts),
                "--n",
                str(args.samples),
                "--max-tokens",
                "48",
                "--temperature",
                "0.8",
                "--wait",
                "--url",
                url,
            ],
            check=True,
            stdout=subprocess.PIPE,  # the progress bar shows on stderr
            text=True,
        )
        job = json.loads(done.stdout[done.stdout.index("{") :])
        print(
            f"      job {job['id']}: {job['state']}, {job['sequences_done']} sequences, "
            f"{job['tokens_done']} tokens at {job['tokens_per_s']:.0f} tok/s"
        )
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)

    from capture_server.store import open_store

    store = open_store(job["store"])
    print(
        f"[4/5] routing store {job['store']}: {len(store.index)} sequences, "
        f"{store.num_tokens} token rows"
    )
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
            job["store"],
            "--out",
            str(analysis),
            "--committee-variant",
            "softmax",
        ],
        check=True,
    )
    print(f"[5/5] analysis tables, plots and report: {analysis / 'report.html'}")


if __name__ == "__main__":
    main()
