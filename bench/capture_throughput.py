"""Generation throughput with and without routing capture, side by side in one run.

Workload: a tiny Qwen3-MoE specimen, 64 sequences x 64 new tokens (greedy, eos ignored).
Each mode runs in its own process (one engine per process), modes interleaved over
`ROUNDS` rounds; the report takes each mode's median tokens/s and divides by plain vLLM.

    .venv/bin/python bench/capture_throughput.py [--rounds 3] [--out docs/bench-capture.json]

`--paired CALLS` keeps every mode's engine alive at once and takes one call of each in
turn, in a fresh random order each turn, CALLS times; each call's ratio is against plain
vLLM's call of the same turn (a store's commit is inside its call), so this machine's
drift over minutes cancels out. A second plain engine (the control row) shows what is
left of the harness's own bias: its ratio should be 1.00.

`--compiled` runs every engine as users run it by default (`enforce_eager=False`: the
model compiled, and on a GPU its decode steps replayed as CUDA graphs); each engine
then spends about two minutes compiling here before its timed calls.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

from capture_server.protocol import call_sequence_key, close_rpc, flush_rpc, sink_states_rpc

# -- defaults ---------------------------------------------------------------------------
ARCH = "qwen3_moe"
NUM_SEQS = 64
NEW_TOKENS = 64
PROMPT_TOKENS = 32
REPEATS = 5  # timed generate calls per engine, after one warm-up call
MODES = {
    "plain vLLM": None,
    # a second plain engine: the harness's own bias and noise (paired runs; expect 1.00)
    "plain vLLM, a second engine (control)": None,
    "hooks on, nothing recorded": {"logits": True, "hidden_layers": [], "record": False},
    "ids + weights": {"logits": False, "hidden_layers": []},
    "ids + weights + logits": {"logits": True, "hidden_layers": []},
    "+ hidden states of 1 layer": {"logits": True, "hidden_layers": [1]},
    # interventions (per-request expert masks) next to the same capture
    "ids + weights, interventions on, none used": {
        "logits": False,
        "hidden_layers": [],
        "interventions": 0,
    },
    "ids + weights, half the requests masked": {
        "logits": False,
        "hidden_layers": [],
        "interventions": 2,  # every 2nd request masks two experts at every MoE layer
    },
    # a new store per call (a 64-prompt job); the commit either blocks the engine before
    # the next call, or runs in the writer thread while the next call generates, as the
    # service commits a finished job (`moetrace_close`)
    "ids + weights + logits -> Zarr store, commit blocking": {
        "logits": True,
        "hidden_layers": [],
        "store": "blocking",
    },
    "same, commit in the background (service)": {
        "logits": True,
        "hidden_layers": [],
        "store": "background",
    },
    # the same 64 prompts as 32 jobs of 2, each with its own store (the service's many
    # small jobs, without its HTTP and job records): the engine side of a store per job
    "same, 32 stores of 2 sequences": {
        "logits": True,
        "hidden_layers": [],
        "store": "background",
        "stores": 32,
    },
}


def prepare_mode(model: str, mode: str, compiled: bool = False):
    """Build one engine for `mode`; returns (one call, the capture's stats, a wait until
    stores closed in the background have committed)."""
    import numpy as np
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    config = MODES[mode]
    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    common = dict(dtype="float32", max_model_len=512, enforce_eager=not compiled, seed=0)
    if config is None:
        from vllm import LLM

        llm = LLM(model, **common)  # vLLM's defaults, as capture engines (prefix caching on)
        vocab = len(llm.get_tokenizer())
        prompts = [
            TokensPrompt(prompt_token_ids=rng.integers(1, vocab, PROMPT_TOKENS).tolist())
            for _ in range(NUM_SEQS)
        ]

        def generate() -> None:
            llm.generate(prompts, params, use_tqdm=False)

        def stats() -> dict[str, float]:
            return {}

        def wait_committed() -> None:
            pass
    else:
        from capture_server.capture.api import CaptureEngine

        engine = CaptureEngine(
            model,
            logits=config["logits"],
            hidden_layers=config["hidden_layers"],
            interventions="interventions" in config,
            **common,
        )
        vocab = len(engine.tokenizer)
        token_prompts = [rng.integers(1, vocab, PROMPT_TOKENS).tolist() for _ in range(NUM_SEQS)]

        store_dir = tempfile.mkdtemp(prefix="moetrace-bench-store-")
        calls = iter(range(1000))
        closing: list[str] = []

        def generate() -> None:
            if config.get("store"):  # the service's path: rows stream to a store writer thread
                from capture_server.capture.options import CaptureOptions

                call = next(calls)
                per_store = NUM_SEQS // config.get("stores", 1)
                sinks = [f"{store_dir}/run{call}-{i // per_store}" for i in range(NUM_SEQS)]
                batch = []
                for i in range(len(token_prompts)):
                    q = params.clone()
                    q.extra_args = CaptureOptions(
                        sink=sinks[i], sequence=call_sequence_key(call, i)
                    ).to_extra_args()
                    batch.append(q)
                outs = engine.llm.generate(
                    [TokensPrompt(prompt_token_ids=p) for p in token_prompts], batch, use_tqdm=False
                )
                ids = [o.request_id for o in outs]
                if config["store"] == "blocking":
                    flush_rpc(ids).run(engine.llm)
                else:
                    stores = list(dict.fromkeys(sinks))
                    close_rpc(stores, ids).run(engine.llm)
                    closing.extend(stores)
            elif "interventions" in config:
                every = config["interventions"]
                mask = {"mask": {layer: [0, 5] for layer in range(engine.routing["num_layers"])}}
                masks = [mask if every and i % every == 0 else None for i in range(NUM_SEQS)]
                engine.generate(token_prompts, params, intervention=masks)
            elif config.get("record", True):
                engine.generate(token_prompts, params)
            else:  # requests without capture options: only the in-forward copies run
                engine.llm.generate(
                    [TokensPrompt(prompt_token_ids=p) for p in token_prompts],
                    params,
                    use_tqdm=False,
                )

        def wait_committed() -> None:
            """Until every store closed in the background has committed and closed."""
            while closing:
                states = sink_states_rpc(closing).run(engine.llm)[0]
                closing[:] = [url for url in closing if states[url] == "closing"]
                time.sleep(0.005)

        stats = engine.stats
    return generate, stats, wait_committed


def run_mode(model: str, mode: str, compiled: bool = False) -> dict[str, float]:
    """Build one engine, warm up, time `REPEATS` generate calls; return tokens/s and stats."""
    config = MODES[mode]
    generate, stats, wait_committed = prepare_mode(model, mode, compiled)
    generate()  # warm-up
    wait_committed()
    warm = stats().get("host_seconds", 0.0)
    warm_interventions = stats().get("intervention_seconds", 0.0)
    times = []
    start = time.perf_counter()
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        generate()
        times.append(time.perf_counter() - t0)
    if config and config.get("store") == "background":
        # commits overlap the next call: time the whole series, up to the last commit
        wait_committed()
        times = [(time.perf_counter() - start) / REPEATS] * REPEATS
    host = stats().get("host_seconds", 0.0) - warm
    interventions = stats().get("intervention_seconds", 0.0) - warm_interventions
    best = statistics.median(times)
    return {
        "tokens_per_s": NUM_SEQS * NEW_TOKENS / best,
        "host_share": host / sum(times) if config else 0.0,
        # host time giving requests their intervention slots, of the timed calls
        "intervention_share": interventions / sum(times) if config else 0.0,
    }


PAIRED_MARK = "moetrace-paired "  # the child's result lines, among vLLM's log lines
PAIRED_PAUSE = 0.5
"""Seconds between calls: an engine's OpenMP threads keep spinning for a while after its
call ends (the default wait policy), taking cores from the next engine's call."""


def serve_mode(model: str, mode: str, compiled: bool) -> None:
    """Paired child: build and warm the engine, then time one call per ``run`` line on
    stdin (a store's commit included), answering on stdout."""
    generate, stats, wait_committed = prepare_mode(model, mode, compiled)
    generate()
    wait_committed()
    print(PAIRED_MARK + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            return
        host = stats().get("host_seconds", 0.0)
        cpu = _process_cpu_seconds()
        start = time.perf_counter()
        generate()
        wait_committed()
        seconds = time.perf_counter() - start
        cpu = _process_cpu_seconds() - cpu
        host = stats().get("host_seconds", 0.0) - host
        print(PAIRED_MARK + json.dumps({"seconds": seconds, "host": host, "cpu": cpu}), flush=True)


def _process_cpu_seconds() -> float:
    """CPU time of every thread of this process (engine, OpenMP, store writer)."""
    times = os.times()
    return times.user + times.system


def _answer(child: subprocess.Popen) -> dict:
    for line in child.stdout:
        if line.startswith(PAIRED_MARK):
            return json.loads(line[len(PAIRED_MARK) :])
    raise RuntimeError(f"a paired child ended early (exit {child.wait()})")


def run_paired(model: str, modes: list[str], calls: int, env: dict, compiled: bool) -> dict:
    """Every mode's engine alive at once, one call each in turn (in a random order),
    `calls` times: each call is paired with plain vLLM's call of the same turn, so the
    machine's drift (minutes here) cancels out of the ratios."""
    children = {}
    for mode in modes:
        child_env = dict(env, VLLM_PLUGINS="none") if MODES[mode] is None else env
        flags = ["--compiled"] if compiled else []
        children[mode] = subprocess.Popen(
            [sys.executable, __file__, "--serve", model, mode, *flags],
            env=child_env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
    try:
        for child in children.values():
            _answer(child)  # built and warm
        turns: dict[str, list[dict]] = {m: [] for m in modes}
        order = random.Random(0)
        for _ in range(calls):
            # a fresh order each turn: a call slowed by what the call before it left
            # running (threads still spinning or writing) is slowed for every mode alike
            for mode in order.sample(modes, len(modes)):
                time.sleep(PAIRED_PAUSE)
                children[mode].stdin.write("run\n")
                children[mode].stdin.flush()
                turns[mode].append(_answer(children[mode]))
    finally:
        for child in children.values():
            child.stdin.close()
            child.wait(timeout=120)
    plain = [t["seconds"] for t in turns["plain vLLM"]]
    summary = {}
    for mode, results in turns.items():
        ratios = sorted(p / r["seconds"] for p, r in zip(plain, results, strict=True))
        summary[mode] = {
            "tokens_per_s": round(
                NUM_SEQS * NEW_TOKENS / statistics.median(r["seconds"] for r in results), 1
            ),
            "paired_ratio_median": round(statistics.median(ratios), 3),
            "paired_ratio_quartiles": [round(q, 3) for q in statistics.quantiles(ratios, n=4)],
            "capture_host_share": round(
                sum(r["host"] for r in results) / sum(r["seconds"] for r in results), 3
            ),
            # plain vLLM's CPU seconds per call over this mode's, paired by turn: less
            # moved by the other processes than wall time, though spinning OpenMP
            # threads count in it
            "cpu_ratio_median": round(
                statistics.median(
                    p["cpu"] / r["cpu"] for p, r in zip(turns["plain vLLM"], results, strict=True)
                ),
                3,
            ),
            "each_call_seconds": [round(r["seconds"], 4) for r in results],
        }
        print(
            f"{mode:52s} {summary[mode]['tokens_per_s']:9.1f} tok/s  paired ratio "
            f"{summary[mode]['paired_ratio_median']:5.3f} "
            f"(quartiles {summary[mode]['paired_ratio_quartiles'][0]:.3f}-"
            f"{summary[mode]['paired_ratio_quartiles'][2]:.3f})  capture host time "
            f"{100 * summary[mode]['capture_host_share']:4.1f}%  CPU ratio "
            f"{summary[mode]['cpu_ratio_median']:5.3f}"
        )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved rounds over all modes.")
    parser.add_argument("--out", default=None, help="Write the results as JSON here.")
    parser.add_argument(
        "--modes",
        default="",
        help="Run only these modes (exact names, separated by '|'); plain vLLM always runs.",
    )
    parser.add_argument(
        "--compiled", action="store_true", help="Compiled engines (enforce_eager=False)."
    )
    parser.add_argument(
        "--engine-threads",
        type=int,
        default=None,
        help="Torch threads of each engine (OMP_NUM_THREADS; default: vLLM's, every core). "
        "1 leaves a core to the store's writer, as a GPU node's engine does: there the "
        "GPU computes and the host's cores are free.",
    )
    parser.add_argument(
        "--paired",
        type=int,
        default=0,
        metavar="CALLS",
        help="Instead of rounds: every mode's engine alive at once, CALLS calls each, "
        "taken in turn; ratios are per turn against plain vLLM's call (`run_paired`).",
    )
    parser.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(run_mode(*args.child, compiled=args.compiled)))
        return
    if args.serve:
        serve_mode(*args.serve, compiled=args.compiled)
        return

    from capture_server.specimens import build_specimen

    model = str(build_specimen(ARCH, tempfile.mkdtemp(prefix="moetrace-bench-") + "/model"))
    env = dict(
        os.environ,
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_CPU_OMP_THREADS_BIND="nobind",
        TOKENIZERS_PARALLELISM="false",
    )
    if args.engine_threads:
        env["OMP_NUM_THREADS"] = str(args.engine_threads)
    wanted = {w.strip() for w in args.modes.split("|") if w.strip()}
    unknown = wanted - set(MODES)
    if unknown:
        parser.error(f"--modes: unknown {sorted(unknown)}; expected some of {list(MODES)}")
    modes = [m for m in MODES if m == "plain vLLM" or not wanted or m in wanted]
    if args.paired == 1:
        parser.error("--paired: at least 2 calls (the ratios' quartiles)")
    if args.paired:
        summary = run_paired(model, modes, args.paired, env, args.compiled)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"paired_calls": args.paired, "modes": summary}, f, indent=2)
        return
    results: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for mode in modes:
            child_env = dict(env, VLLM_PLUGINS="none") if MODES[mode] is None else env
            compiled = ["--compiled"] if args.compiled else []
            out = subprocess.run(
                [sys.executable, __file__, "--child", model, mode, *compiled],
                env=child_env,
                capture_output=True,
                text=True,
                check=True,
            )
            results[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(
                f"round {r} {mode:52s} {results[mode][-1]['tokens_per_s']:9.1f} tok/s",
                file=sys.stderr,
            )

    base = statistics.median(x["tokens_per_s"] for x in results["plain vLLM"])
    summary = {}
    for mode, runs in results.items():
        tps = statistics.median(x["tokens_per_s"] for x in runs)
        share = statistics.median(x["host_share"] for x in runs)
        intervening = statistics.median(x.get("intervention_share", 0.0) for x in runs)
        summary[mode] = {
            "tokens_per_s": round(tps, 1),
            "ratio": round(tps / base, 3),
            "capture_host_share": round(share, 3),
            "intervention_host_share": round(intervening, 5),
            "each_round": [round(x["tokens_per_s"], 1) for x in runs],
        }
        print(
            f"{mode:52s} {tps:9.1f} tok/s  ratio {tps / base:5.3f}  "
            f"capture host time {100 * share:4.1f}%"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "workload": f"{ARCH} {NUM_SEQS}x{NEW_TOKENS}",
                    "engine": "compiled" if args.compiled else "eager",
                    "rounds": args.rounds,
                    "results": summary,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
