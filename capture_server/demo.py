"""End-to-end demo: two tiny MoEs -> capture server -> rollout and score jobs via the CLI ->
analyzer -> report with findings for both models and their cross-model alignment.

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


MODELS = ("qwen3_moe", "olmoe")  # two architectures; their specimens share a tokenizer


def _submit(url: str, model: str, prompts: Path, kind: str, samples: int) -> dict:
    """Run a job with the CLI (`clients`) and return its final record."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "clients",
            "submit",
            "--model",
            model,
            "--prompts",
            str(prompts),
            "--kind",
            kind,
            "--n",
            str(samples),
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
        f"      {kind} job {job['id']} on {model}: {job['state']}, {job['sequences_done']} "
        f"sequences, {job['tokens_done']} tokens at {job['tokens_per_s']:.0f} tok/s"
    )
    return job


def _texts_by_author(rollouts: dict[str, dict]) -> list[dict]:
    """Every rollout's completion as a text to teacher-force, labelled by question,
    author (the model that wrote it) and seed (its sample index): paper (a)'s design,
    where each analysing model reads every author's texts."""
    from capture_server.store import open_store

    texts = []
    for author, job in rollouts.items():
        index = open_store(job["store"]).index
        for row in index.iter_rows(named=True):
            question = row["prompt_index"]
            domain, prompt = PROMPTS[question]
            labels = {"domain": domain, "question": question, "author": author}
            labels["seed"] = row["sample_index"]
            ids = row["completion_token_ids"]
            texts.append({"prompt": prompt, "completion_token_ids": ids, "labels": labels})
    return texts


def _experiment_texts(rollout_store: str, out: Path) -> Path:
    """The rollouts of one model as prompt/completion texts, to score under interventions."""
    from capture_server.store import open_store

    index = open_store(rollout_store).index.sort("sequence_id")
    path = out / "experiment-texts.jsonl"
    path.write_text(
        "\n".join(
            json.dumps({"prompt": PROMPTS[row["prompt_index"]][1], "completion": text})
            for row, text in zip(
                index.iter_rows(named=True), index["completion_text"].to_list(), strict=True
            )
        )
    )
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-out", help="Output directory.")
    parser.add_argument("--samples", type=int, default=4, help="Samples per prompt.")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    for stale in ("data", "analysis"):  # a rerun starts fresh
        shutil.rmtree(out / stale, ignore_errors=True)

    from capture_server.specimens import build_specimen

    models = [build_specimen(arch, out / arch) for arch in MODELS]
    print(f"[1/7] built two tiny MoE specimens: {', '.join(map(str, models))}")

    from capture_server.api.launch import launch

    server, url = launch(models, out / "data", out / "server.log")
    print(f"[2/7] capture server ready on {url}, serving {', '.join(MODELS)}")
    try:
        prompts = out / "prompts.jsonl"
        prompts.write_text(
            "\n".join(
                json.dumps({"prompt": p, "labels": {"domain": d, "question": i}})
                for i, (d, p) in enumerate(PROMPTS)
            )
        )
        print("[3/7] each model answers every prompt (rollout jobs, with the CLI):")
        rollouts = {m: _submit(url, m, prompts, "rollout", args.samples) for m in MODELS}
        texts = out / "texts.jsonl"
        texts.write_text("\n".join(json.dumps(t) for t in _texts_by_author(rollouts)))
        print("[4/7] each model reads every model's answers (score jobs):")
        scored = {m: _submit(url, m, texts, "score", 1) for m in MODELS}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)

    from capture_server.store import open_store

    store = open_store(scored[MODELS[0]]["store"])
    print(
        f"[5/7] routing store of {MODELS[0]} reading both authors: {len(store.index)} "
        f"sequences, {store.num_tokens} token rows"
    )
    print(
        store.index.select(
            "sequence_id", "label_question", "label_author", "label_seed", "num_rows"
        ).head(6)
    )
    analysis = out / "analysis"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "analyzer",
            "run",
            *(f"{m}={scored[m]['store']}" for m in MODELS),
            "--out",
            str(analysis),
            "--committee-variant",
            "softmax",
        ],
        check=True,
    )
    print("[6/7] analysis tables, plots and report written")
    # the committee of the first model, zeroed one layer at a time against random experts
    # of similar usage (CommitteeAudit Table 6, with the controls it lacks)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "capture_server.experiments",
            "committee",
            str(models[0]),
            "--analysis",
            str(analysis),
            "--store",
            MODELS[0],
            "--texts",
            str(_experiment_texts(rollouts[MODELS[0]]["store"], out)),
            "--engine-args",
            json.dumps({"dtype": "float32", "enforce_eager": True, "max_model_len": 512}),
        ],
        check=True,
        env={"VLLM_CPU_KVCACHE_SPACE": "1", **os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
    )
    subprocess.run([sys.executable, "-m", "analyzer", "report", str(analysis)], check=True)
    print(f"[7/7] committee masking with random controls added: {analysis / 'report.html'}")


if __name__ == "__main__":
    main()
