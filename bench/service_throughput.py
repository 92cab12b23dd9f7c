"""Capture throughput through the REST service vs the in-process API, one run.

Workload: a tiny Qwen3-MoE specimen, 64 prompts of 32 random tokens x 64 new tokens
(greedy, eos ignored), ids + weights + logits streamed to a Zarr store. Modes:

- plain vLLM: `AsyncLLM` without capture (no plugin), the same engine arguments: the
  cost a user pays for capture is every other mode against this one;
- in-process: `CaptureEngine` with a store sink (vLLM's one-process `LLM`);
- AsyncLLM direct: vLLM's async engine, which the service runs (engine core and worker
  in their own processes), driven without HTTP;
- REST job: one ``POST /v1/jobs`` of the 64 prompts, timed until the job is done;
- concurrent jobs: the same 64 prompts as 8 jobs of 8 and as 32 jobs of 2, submitted
  at once, timed until all are done;
- OpenAI endpoint: 64 concurrent ``/v1/completions`` requests recording into one job,
  each call next to the same requests without capture on the same server (paired);
- vLLM's OpenAI server: the same requests to vLLM's own server without the plugin and
  the same engine arguments, so the OpenAI endpoint's cost separates into what any HTTP
  server pays on this machine (the client runs on the same cores) and what capture adds.

Engine settings are the service's (fp32, eager, whole prompts on CPU). Each mode is
timed `REPEATS` times (``--repeats``) after a warm-up, the server's modes interleaved;
rounds interleave the in-process child and a
fresh server; the report divides each mode's median tokens/s by the in-process one.

    .venv/bin/python bench/service_throughput.py [--rounds 2] [--out docs/results/service.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from capture_server.protocol import (
    close_rpc,
    engine_config,
    flush_rpc,
    job_sequence_key,
    sink_states_rpc,
)

ARCH = "qwen3_moe"
NUM_SEQS = 64
NEW_TOKENS = 64
PROMPT_TOKENS = 32
REPEATS = 3
ENGINE = dict(dtype="float32", max_model_len=512, enforce_eager=True, max_num_seqs=256)


def token_prompts(vocab: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(0)
    return [rng.integers(1, vocab, PROMPT_TOKENS).tolist() for _ in range(NUM_SEQS)]


def run_in_process(model: str) -> list[float]:
    """Seconds per timed call of the in-process API writing to a store."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.platforms import current_platform

    from capture_server.capture.api import CaptureEngine
    from capture_server.capture.options import CaptureOptions

    engine = CaptureEngine(
        model,
        enable_chunked_prefill=not current_platform.is_cpu(),
        seed=0,
        **ENGINE,
    )
    prompts = [TokensPrompt(prompt_token_ids=p) for p in token_prompts(len(engine.tokenizer))]
    store_dir = tempfile.mkdtemp(prefix="moetrace-bench-inproc-")

    def one(call: int) -> float:
        params = []
        for i in range(NUM_SEQS):
            options = CaptureOptions(sink=f"{store_dir}/run{call}", sequence=job_sequence_key(i))
            params.append(
                SamplingParams(
                    max_tokens=NEW_TOKENS,
                    temperature=0.0,
                    ignore_eos=True,
                    extra_args=options.to_extra_args(),
                )
            )
        t0 = time.perf_counter()
        outs = engine.llm.generate(prompts, params, use_tqdm=False)
        store = f"{store_dir}/run{call}"
        flush_rpc([o.request_id for o in outs]).run(engine.llm)
        close_rpc([store], []).run(engine.llm)
        while sink_states_rpc([store]).run(engine.llm)[0][store] == "closing":
            time.sleep(0.005)
        return time.perf_counter() - t0

    one(0)  # warm-up
    times = [one(call) for call in range(1, REPEATS + 1)]
    engine.close()
    return times


def run_async_engine(model: str, capture: bool = True) -> list[float]:
    """Seconds per timed call of vLLM's `AsyncLLM` (the service's engine) driven directly:
    the same processes as the service, without HTTP and jobs. Without `capture`, plain
    vLLM with the same engine arguments (run with ``VLLM_PLUGINS=none``): what a user
    pays for capture is measured against this."""
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    from capture_server.api.runner import close_store
    from capture_server.capture.options import CaptureOptions

    args = AsyncEngineArgs(
        model=model,
        enable_chunked_prefill=False,
        additional_config=engine_config() if capture else {},
        **ENGINE,
    )
    engine = AsyncLLM.from_engine_args(args)
    store_dir = tempfile.mkdtemp(prefix="moetrace-bench-async-")

    async def one(call: int) -> float:
        from transformers import AutoTokenizer

        prompts = token_prompts(len(AutoTokenizer.from_pretrained(model)))
        store = f"{store_dir}/run{call}"

        async def request(i: int, prompt: list[int]) -> None:
            params = SamplingParams(
                max_tokens=NEW_TOKENS,
                temperature=0.0,
                ignore_eos=True,
                output_kind=RequestOutputKind.FINAL_ONLY,
                extra_args=CaptureOptions(sink=store, sequence=job_sequence_key(i)).to_extra_args()
                if capture
                else None,
            )
            async for _ in engine.generate(TokensPrompt(prompt_token_ids=prompt), params, f"r{i}"):
                pass

        t0 = time.perf_counter()
        await asyncio.gather(*(request(i, p) for i, p in enumerate(prompts)))
        if capture:
            await close_store(engine, store, [f"r{i}" for i in range(len(prompts))])
        return time.perf_counter() - t0

    async def calls() -> list[float]:
        await one(0)  # warm-up
        return [await one(c) for c in range(1, REPEATS + 1)]

    try:
        return asyncio.run(calls())
    finally:
        engine.shutdown()


def job_body(prompts: list[list[int]]) -> dict:
    return {
        "kind": "rollout",
        "model": "model",
        "prompts": [{"prompt_token_ids": p} for p in prompts],
        "sampling": {"max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True},
    }


async def timed_jobs(url: str, prompts: list[list[int]], jobs: int) -> float:
    """Submit the prompts as `jobs` equal jobs at once; seconds until all are done."""
    import httpx

    size = len(prompts) // jobs
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        t0 = time.perf_counter()
        created = await asyncio.gather(
            *(
                http.post("/v1/jobs", json=job_body(prompts[j * size : (j + 1) * size]))
                for j in range(jobs)
            )
        )
        ids = [c.json()["id"] for c in created]

        async def ended(job_id: str) -> str:
            """The job's final state, learnt by long polls (the server answers as it ends)."""
            while True:
                job = (await http.get(f"/v1/jobs/{job_id}", params={"wait": 60})).json()
                if job["state"] not in ("queued", "running"):
                    return job["state"]

        states = await asyncio.gather(*(ended(job_id) for job_id in ids))
        assert set(states) == {"done"}, states
        return time.perf_counter() - t0


async def timed_openai(url: str, prompts: list[list[int]], job: str | None) -> float:
    """All prompts as concurrent /v1/completions requests into one named job (none:
    vLLM's own server, which takes the same body without ``moetrace``)."""
    import httpx

    capture = {"moetrace": {"job": job}} if job else {}
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        t0 = time.perf_counter()
        responses = await asyncio.gather(
            *(
                http.post(
                    "/v1/completions",
                    json={
                        "model": "model",
                        "prompt": p,
                        "max_tokens": NEW_TOKENS,
                        "temperature": 0,
                        "ignore_eos": True,
                        **capture,
                    },
                )
                for p in prompts
            )
        )
        for r in responses:
            r.raise_for_status()
        return time.perf_counter() - t0


def run_service(model: str, root: Path) -> dict[str, list[float]]:
    """Start a server, warm it up, time every REST mode `REPEATS` times."""
    from capture_server.api.launch import launch

    proc, url = launch([Path(model)], root / "data", root / "server.log", hidden_layers=())
    try:
        from transformers import AutoTokenizer

        prompts = token_prompts(len(AutoTokenizer.from_pretrained(model)))
        asyncio.run(timed_jobs(url, prompts, 1))  # warm-up
        modes = {
            "REST job (1 x 64 prompts)": lambda: asyncio.run(timed_jobs(url, prompts, 1)),
            "8 concurrent jobs x 8 prompts": lambda: asyncio.run(timed_jobs(url, prompts, 8)),
            "32 concurrent jobs x 2 prompts": lambda: asyncio.run(timed_jobs(url, prompts, 32)),
        }
        calls = iter(range(100))
        modes[OPENAI] = lambda: asyncio.run(timed_openai(url, prompts, f"bench{next(calls)}"))
        modes[OPENAI_PLAIN] = lambda: asyncio.run(timed_openai(url, prompts, None))
        times: dict[str, list[float]] = {name: [] for name in modes}
        for _ in range(REPEATS):  # modes interleaved: this machine's noise drifts in time
            for name, run in modes.items():
                times[name].append(run())
        return times
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


VLLM_SERVER = "vLLM's OpenAI server, no capture"
OPENAI = "OpenAI /v1/completions, 64 concurrent"
OPENAI_PLAIN = "OpenAI /v1/completions, 64 concurrent, no capture (same server)"
"""The same requests without ``moetrace`` on the same server, each call next to a
capture call: what capture adds to a request, paired, whatever the HTTP path costs."""


def run_vllm_server(model: str, log: Path, env: dict[str, str]) -> list[float]:
    """vLLM's own OpenAI server (no plugin) with the service's engine arguments, timed
    with the OpenAI mode's requests: what the same HTTP requests cost without capture."""
    from capture_server.api.launch import answers, free_port

    port = free_port()
    cmd = [
        *(sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model),
        *("--served-model-name", "model", "--host", "127.0.0.1", "--port", str(port)),
        *("--dtype", "float32", "--max-model-len", "512", "--enforce-eager"),
        *("--max-num-seqs", "256", "--no-enable-chunked-prefill"),
    ]
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd,
            env=dict(env, VLLM_PLUGINS="none"),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        if not answers(f"{url}/health", proc, timeout=300):
            raise RuntimeError(f"vLLM's server did not start; log: {log}")
        from transformers import AutoTokenizer

        prompts = token_prompts(len(AutoTokenizer.from_pretrained(model)))
        asyncio.run(timed_openai(url, prompts, None))  # warm-up
        return [asyncio.run(timed_openai(url, prompts, None)) for _ in range(REPEATS)]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def jobs_only(model: str, root: Path, rounds: int, out: str | None) -> None:
    """The server's modes against its one-job mode, per round and paired by repeat."""
    per_round = [run_service(model, root / f"round{r}") for r in range(rounds)]
    one = "REST job (1 x 64 prompts)"
    summary = {}
    for name in per_round[0]:
        medians, paired = [], []
        for times in per_round:
            medians.append(statistics.median(times[one]) / statistics.median(times[name]))
            paired.append(
                statistics.median(a / b for a, b in zip(times[one], times[name], strict=True))
            )
        summary[name] = {
            "vs_one_job_by_round": medians,
            "paired_by_round": paired,
            "seconds_by_round": [times[name] for times in per_round],
        }
        shown = ", ".join(f"{m:.2f} (paired {p:.2f})" for m, p in zip(medians, paired, strict=True))
        print(f"{name:40s} vs one job, by round: {shown}")
    if out:
        Path(out).write_text(json.dumps({"workload": {"sequences": NUM_SEQS}, "modes": summary}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="Interleaved rounds.")
    parser.add_argument("--out", default=None, help="Write the results as JSON here.")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="Timed calls per mode.")
    parser.add_argument(
        "--jobs-only",
        action="store_true",
        help="Only the server's modes, one server per round, each call paired with the "
        "one-job call of its repeat (many small jobs against one job of the same prompts).",
    )
    parser.add_argument(
        "--engine-threads",
        type=int,
        default=None,
        help="Torch threads of every engine, servers' included (OMP_NUM_THREADS; default: "
        "vLLM's, every core). 1 leaves a core to the API process and the store's writer, "
        "as a GPU node's engine does.",
    )
    parser.add_argument("--child", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--child-async", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--child-plain", metavar="MODEL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    globals()["REPEATS"] = args.repeats  # read by every mode, in this process and children
    if args.engine_threads:  # children and servers inherit it
        os.environ["OMP_NUM_THREADS"] = str(args.engine_threads)
    env = dict(
        os.environ,
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_CPU_OMP_THREADS_BIND="nobind",
        TOKENIZERS_PARALLELISM="false",
    )
    if args.child:
        print(json.dumps(run_in_process(args.child)))
        return
    if args.child_async:
        print(json.dumps(run_async_engine(args.child_async)))
        return
    if args.child_plain:
        print(json.dumps(run_async_engine(args.child_plain, capture=False)))
        return

    from capture_server.specimens import build_specimen

    root = Path(tempfile.mkdtemp(prefix="moetrace-bench-service-"))
    model = str(build_specimen(ARCH, root / "model"))
    if args.jobs_only:
        jobs_only(model, root, args.rounds, args.out)
        return
    plain = "plain vLLM AsyncLLM (no capture)"
    times: dict[str, list[float]] = {plain: [], "in-process API": [], "AsyncLLM direct": []}
    for r in range(args.rounds):
        for name, flag, multiprocessing in (
            (plain, "--child-plain", "1"),
            ("in-process API", "--child", "0"),
            ("AsyncLLM direct", "--child-async", "1"),
        ):
            plugins = {"VLLM_PLUGINS": "none"} if name == plain else {}
            child = subprocess.run(
                [sys.executable, __file__, flag, model, "--repeats", str(args.repeats)],
                env=dict(env, VLLM_ENABLE_V1_MULTIPROCESSING=multiprocessing, **plugins),
                capture_output=True,
                text=True,
                check=True,
            )
            times[name] += json.loads(child.stdout.strip().splitlines()[-1])
        log = root / f"vllm-server-{r}.log"
        times.setdefault(VLLM_SERVER, []).extend(run_vllm_server(model, log, env))
        for name, t in run_service(model, root / f"round{r}").items():
            times.setdefault(name, []).extend(t)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    tokens = NUM_SEQS * NEW_TOKENS
    base = tokens / statistics.median(times["in-process API"])
    user = tokens / statistics.median(times[plain])  # what a user would run without capture
    rows = []
    print(f"{'mode':40s} {'tok/s':>8s} {'vs in-process':>14s} {'vs plain AsyncLLM':>18s}")
    for name, t in times.items():
        rate = tokens / statistics.median(t)
        rows.append(
            {
                "mode": name,
                "tokens_per_s": rate,
                "ratio": rate / base,
                "ratio_to_plain_async": rate / user,
                "seconds": t,
            }
        )
        print(f"{name:40s} {rate:8.0f} {rate / base:13.2f}x {rate / user:17.2f}x")
    paired = statistics.median(
        plain / capture for plain, capture in zip(times[OPENAI_PLAIN], times[OPENAI], strict=True)
    )
    print(f"OpenAI endpoint with capture / without, same server, paired by call: {paired:.2f}x")
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "workload": {"sequences": NUM_SEQS, "new_tokens": tokens},
                    "modes": rows,
                    "openai_capture_vs_plain_paired": paired,
                }
            )
        )


if __name__ == "__main__":
    main()
