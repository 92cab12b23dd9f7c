"""The cross-process protocol: every name and format that one moetrace process writes and
another reads.

Engine configuration (``additional_config["moetrace"]``), per-request options
(``SamplingParams.extra_args["moetrace"]``), the worker RPCs reached through vLLM's
``collective_rpc``, sequence keys, store array names and annotation rows are defined
here and nowhere else. Pure Python: importing it loads neither numpy nor vLLM.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

# -- engine configuration and request options ---------------------------------------------

CONFIG_KEY = "moetrace"
"""Key of the capture settings in vLLM's ``additional_config`` (capture is on when
present), of the capture options in ``SamplingParams.extra_args``, of the store's Zarr
attributes, and of the capture extension in the service's OpenAI-compatible bodies."""


CAPTURE_DTYPES = ("float32", "float16")


def engine_config(
    hidden_layers: list[int] | tuple[int, ...] = (),
    logits: bool = True,
    interventions: bool = False,
    capture_dtype: str = "float32",
) -> dict:
    """``additional_config`` that switches capture on for an engine; with
    `interventions`, requests may also change their routing (`CaptureOptions.intervention`).

    `capture_dtype` is the dtype router logits and hidden states are captured in:
    ``float32`` (exact) or ``float16``, cast on the device inside the forward's copy. It
    halves their device buffers, device-to-host copies and host memory, and the store's
    writer, which keeps them in float16 by default, then has nothing to convert. Stores
    of such an engine keep them in float16 only."""
    if capture_dtype not in CAPTURE_DTYPES:
        raise ValueError(f"capture_dtype: expected one of {CAPTURE_DTYPES}, got {capture_dtype!r}")
    config: dict[str, Any] = {"hidden_layers": [int(x) for x in hidden_layers], "logits": logits}
    if interventions:
        config["interventions"] = True
    if capture_dtype != "float32":
        config["capture_dtype"] = capture_dtype
    return {CONFIG_KEY: config}


def capture_settings(additional_config: Any) -> dict[str, Any] | None:
    """The engine-level capture settings in an ``additional_config``, or None when capture
    is off for that engine."""
    if not isinstance(additional_config, dict) or CONFIG_KEY not in additional_config:
        return None
    return dict(additional_config[CONFIG_KEY] or {})


# -- worker RPCs --------------------------------------------------------------------------


class RpcTarget(Protocol):
    """What `WorkerRpc.run` needs: vLLM's ``LLM`` or ``AsyncLLM``."""

    def collective_rpc(self, method: str, args: tuple = ...) -> Any: ...


@dataclass(frozen=True, slots=True)
class WorkerRpc:
    """One call of a moetrace method on every worker (vLLM's ``collective_rpc``).

    ``run`` works on a ``vllm.LLM`` (returns the per-worker results) and on an
    ``AsyncLLM`` (returns an awaitable of them).
    """

    method: str
    args: tuple = ()

    def run(self, engine: RpcTarget) -> list[Any] | Awaitable[list[Any]]:
        core = getattr(engine, "engine_core", None)
        if len(getattr(core, "core_engines", ())) > 1:  # an AsyncLLM of several DP engines
            return self._run_on_every_engine(core)
        return engine.collective_rpc(self.method, args=self.args)

    async def _run_on_every_engine(self, core: Any) -> list[Any]:
        """``AsyncLLM.collective_rpc`` reaches the first data-parallel engine only
        (`AsyncMPClient.collective_rpc_async` in vllm/v1/engine/core_client.py); every
        DP rank writes its own store part, so ask each engine: their workers' results,
        engine after engine."""
        per_engine = await core.call_utility_all_async(
            "collective_rpc", self.method, None, self.args, None
        )
        return [worker for workers in per_engine for worker in workers]


RPC_FLUSH = "moetrace_flush"
RPC_STATS = "moetrace_stats"
RPC_CLOSE = "moetrace_close"
RPC_SINK_STATES = "moetrace_sink_states"
RPC_ANNOTATE = "moetrace_annotate"
RPC_COMMIT = "moetrace_commit"
RPC_METHODS = (RPC_FLUSH, RPC_STATS, RPC_CLOSE, RPC_SINK_STATES, RPC_ANNOTATE, RPC_COMMIT)
"""Names of the worker methods the plugin installs on vLLM's ``WorkerBase``."""


def flush_rpc(
    finished_ids: list[str] | None = None, sink_urls: list[str] | None = None
) -> WorkerRpc:
    """Complete the in-flight step, end the named finished requests (external ids) and
    commit the named stores (every open one when None). Each worker returns the number
    of requests its collector still tracks (-1: no collector)."""
    return WorkerRpc(RPC_FLUSH, (finished_ids, sink_urls))


def stats_rpc() -> WorkerRpc:
    """Each worker's capture counters, expert load and writer metrics ({}: no collector)."""
    return WorkerRpc(RPC_STATS)


def workers_without_collector(stats: list[dict[str, Any]]) -> list[int]:
    """Positions, in `stats_rpc`'s per-worker results, of the workers that capture
    nothing: an engine configured for capture whose workers did not load the plugin."""
    return [i for i, worker in enumerate(stats) if not worker]


def writer_stats(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """One engine's capture stats from `stats_rpc`'s per-worker results: its writer's,
    or those of its writers combined, one per (data-parallel rank, pipeline stage).

    Data-parallel ranks hold different tokens, so their counters, expert load and store
    metrics add up. Pipeline stages hold the same tokens and different layers: counters
    are the first stage's, expert load and MoE layers are the stages' joined in order,
    and every stage's bytes written count. A store's commit lag is the largest, and
    every writer's store errors are kept. {} when no worker writes."""
    writers = [w for w in stats if w.get("role") == "writer"]
    if len(writers) <= 1:
        return writers[0] if writers else {}
    stages: dict[int, list[dict[str, Any]]] = {}
    for w in writers:
        stages.setdefault((w.get("part") or {}).get("pp_stage", 0), []).append(w)
    per_stage = [_merged_ranks(stages[s]) for s in sorted(stages)]
    merged = per_stage[0]
    for stage in per_stage[1:]:
        merged["expert_load"] = [*merged["expert_load"], *stage["expert_load"]]
        merged["routing"] = {
            **merged["routing"],
            "num_layers": merged["routing"]["num_layers"] + stage["routing"]["num_layers"],
        }
        merged["sink_errors"] = {**stage["sink_errors"], **merged["sink_errors"]}
        for url, metrics in stage["sinks"].items():
            mine = merged["sinks"].setdefault(url, {})
            mine["bytes_written"] = mine.get("bytes_written", 0.0) + metrics.get(
                "bytes_written", 0.0
            )
    return merged


def _merged_ranks(writers: list[dict[str, Any]]) -> dict[str, Any]:
    """One pipeline stage's writers of different data-parallel ranks, added up (new
    dicts: the workers' results are left as they are)."""
    merged: dict[str, Any] = dict(writers[0])
    merged["sinks"] = _merged_sink_metrics(merged.get("sinks", {}), {})
    for other in writers[1:]:
        for key, value in other.items():
            mine = merged.get(key)
            if key == "expert_load":
                merged[key] = [
                    [a + b for a, b in zip(x, y, strict=True)]
                    for x, y in zip(mine, value, strict=True)
                ]
            elif key == "sinks":
                merged[key] = _merged_sink_metrics(mine, value)
            elif key == "sink_errors":
                merged[key] = {**value, **mine}
            elif isinstance(value, (int, float)) and isinstance(mine, (int, float)):
                merged[key] = mine + value
    return merged


def _merged_sink_metrics(
    a: dict[str, dict[str, float]], b: dict[str, dict[str, float]]
) -> dict[str, dict[str, float]]:
    merged = {url: dict(m) for url, m in a.items()}
    for url, metrics in b.items():
        mine = merged.setdefault(url, {})
        for name, value in metrics.items():
            combine = max if name == "lag_seconds" else float.__add__
            mine[name] = combine(float(mine.get(name, 0.0)), float(value))
    return merged


def merged_sink_states(states: list[dict[str, str]], sink_urls: list[str]) -> dict[str, str]:
    """Each store's state across `sink_states_rpc`'s per-worker results: a store written
    by several writers (one part per data-parallel rank) is failed when any writer
    failed, closing while any closes, committing while any commits, open while any has
    it open, else closed."""
    order = ("closed", "open", "committing", "closing")
    merged: dict[str, str] = {}
    for url in sink_urls:
        seen = [worker[url] for worker in states if url in worker]
        failed = [state for state in seen if state.startswith("failed")]
        merged[url] = failed[0] if failed else max(seen, key=order.index, default="closed")
    return merged


def close_rpc(sink_urls: list[str], finished_ids: list[str] | None = None) -> WorkerRpc:
    """End a finished job's requests and have its stores commit and close, without
    blocking the engine; `sink_states_rpc` tells when they are closed."""
    return WorkerRpc(RPC_CLOSE, (sink_urls, finished_ids))


def sink_states_rpc(sink_urls: list[str]) -> WorkerRpc:
    """Per store: ``open``, ``committing``, ``closing``, ``closed`` or ``failed: <error>``."""
    return WorkerRpc(RPC_SINK_STATES, (sink_urls,))


def annotate_rpc(texts: dict[str, list[Annotation]]) -> WorkerRpc:
    """Hand sequences' texts, per store, to the worker writing the stores, which commits
    each sequence together with its texts (`CaptureOptions.texts`). Several stores go in
    one call (concurrent jobs' texts: one engine call, not one each). Annotations travel
    as plain dicts of every field: the engine's RPC transport serialises primitives only."""
    return WorkerRpc(
        RPC_ANNOTATE, ({url: [asdict(a) for a in rows] for url, rows in texts.items()},)
    )


def commit_rpc(texts: dict[str, list[Annotation]], finished_ids: list[str]) -> WorkerRpc:
    """`annotate_rpc`, then the end of the finished requests and a commit of the stores
    named in `texts` that does not block the engine, then `sink_states_rpc` of those
    stores, in one engine call: each engine call waits for the end of a step, so one
    call instead of three answers sooner. A store is ``committing`` until its commit is
    done; poll `sink_states_rpc` (as `api.online` does)."""
    rows = {url: [asdict(a) for a in annotations] for url, annotations in texts.items()}
    return WorkerRpc(RPC_COMMIT, (rows, finished_ids))


def sink_error(state: str) -> str | None:
    """The error of a ``failed: <error>`` sink state, else None."""
    return state.removeprefix("failed: ") if state.startswith("failed") else None


# -- sequence keys ------------------------------------------------------------------------
# A sequence is named in a store by (key, sample index). The key is the caller's, one per
# prompt; vLLM names the i-th of n samples of request R "i_R" (vllm/v1/engine/
# parallel_sampling.py, ParentRequest.get_child_info).


def job_sequence_key(prompt_index: int) -> str:
    """Key of prompt `prompt_index` of a service job (rollout or score)."""
    return f"p{prompt_index}"


def online_sequence_key(number: int) -> str:
    """Key of the `number`-th prompt captured by an OpenAI-compatible job."""
    return f"c{number}"


def call_sequence_key(call: int, prompt_index: int) -> str:
    """Key of prompt `prompt_index` of the `call`-th call of an in-process engine."""
    return f"c{call}p{prompt_index}"


def split_sample(request_id: str, n: int) -> tuple[int, str]:
    """(sample index, parent request id) of an external request id: vLLM prefixes the
    sample index of each of n > 1 samples as ``"<index>_"``."""
    if n > 1 and "_" in request_id:
        head, rest = request_id.split("_", 1)
        if head.isdigit():
            return int(head), rest
    return 0, request_id


# -- store arrays -------------------------------------------------------------------------

TOPK_IDS = "topk_ids"
TOPK_WEIGHTS = "topk_weights"
TOKEN_IDS = "token_ids"
POSITIONS = "positions"
ROUTER_LOGITS = "router_logits"
HIDDEN_PREFIX = "hidden_states"


def hidden_array(layer: int) -> str:
    """Name of the array holding MoE layer `layer`'s router input."""
    return f"{HIDDEN_PREFIX}_{int(layer)}"


def hidden_layer_of(name: str) -> int | None:
    """The MoE layer of a hidden-state array name, None for any other array."""
    head, _, tail = name.rpartition("_")
    return int(tail) if head == HIDDEN_PREFIX and tail.isdigit() else None


# -- annotation rows ----------------------------------------------------------------------


def forwarded_positions(prompt_tokens: int, output_tokens: int) -> int:
    """Positions a returned output forwarded: its last sampled token never is (a scored
    text generates one token, so every token of the text is forwarded)."""
    return prompt_tokens + max(output_tokens, 1) - 1


@dataclass(frozen=True, slots=True)
class Annotation:
    """What the process that knows a sequence's texts adds to its store (the store's
    ``info/`` parts), joined onto the index by (request_id, sample_index)."""

    request_id: str
    """Sequence key."""
    sample_index: int
    completion_text: str | None
    """None for a scored text given as token ids only."""
    finish_reason: str
    """vLLM's finish reason (``stop``, ``length``, ...), or ``scored`` for scored texts."""
    generated_len: int
    """Tokens generated (0 for scored texts)."""
    completion_token_ids: list[int] | None = None
    prompt_text: str | None = None
    positions: int | None = None
    """Positions the returned output forwarded: engine prompt tokens + generated tokens
    - 1 (`forwarded_positions`). The engine may forward more (a stop string ends the
    output inside a step; async scheduling forwards a finished request once more); the
    reader drops the rows past it."""
    prompt_nll: list[float | None] | None = None
    """Score jobs: each prompt token's NLL given those before it (None for the first)."""
    completion_nll: list[float] | None = None
    """Score jobs: each completion token's NLL given the prompt and those before it."""

    def row(self) -> dict[str, Any]:
        """The parquet row: optional fields are left out when not given."""
        return {k: v for k, v in asdict(self).items() if v is not None}
