"""The vLLM plugin: a `vllm.general_plugins` entry point that installs routing capture.

vLLM loads general plugins in every process, the worker included, before the engine's
config is resolved and before the model is built. `register` only patches classes:
engines configured for capture (``additional_config={"moetrace": {...}}``) get the V1
model runner (`runner_choice`), and capture switches on when their model is loaded.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from capture_server import protocol

logger = logging.getLogger("moetrace.capture")


def register() -> None:
    """Patch vLLM's model runners and runner choice. Safe to call many times, in any
    process; engines without ``additional_config["moetrace"]`` are left as they are."""
    from vllm.config import VllmConfig
    from vllm.platforms import current_platform
    from vllm.v1.request import Request
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.worker_base import WorkerBase

    from capture_server.plugin import float_cast
    from capture_server.plugin.cache_salt import salt_intervened_requests
    from capture_server.plugin.runner_choice import choose_v1_for_capture, refuse_capture_on
    from capture_server.plugin.runner_patch import patch_model_runner

    choose_v1_for_capture(VllmConfig)
    float_cast.register()  # stores written in this process convert to float16 with torch
    # Reachable by name through collective_rpc from any process (see protocol.WorkerRpc).
    for name, method in zip(
        protocol.RPC_METHODS, (flush, stats, close, sink_states, annotate, commit), strict=True
    ):
        setattr(WorkerBase, name, method)

    patch_model_runner(GPUModelRunner)
    salt_intervened_requests(Request)
    if current_platform.is_cpu():
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        patch_model_runner(CPUModelRunner)
    try:
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2ModelRunner
    except ImportError:  # a platform without the V2 runner cannot run it either
        return
    refuse_capture_on(V2ModelRunner)


def flush(
    worker: Any, finished_request_ids: list[str] | None = None, sink_urls: list[str] | None = None
) -> int:
    """`protocol.flush_rpc`: complete the in-flight step,
    end the named finished requests and commit the named stores (all open ones if None).

    Returns the number of requests still tracked by the worker's collector.
    """
    collector = getattr(worker.model_runner, "_moetrace", None)
    if collector is None:
        return -1
    collector.flush(finished_request_ids, sink_urls)
    return len(collector._requests)


def stats(worker: Any) -> dict[str, Any]:
    """`protocol.stats_rpc`: the collector's counters, expert load per
    layer (captured tokens), each open store's writer metrics, and sink errors."""
    collector = getattr(worker.model_runner, "_moetrace", None)
    if collector is None:  # a TP replica captures by its rank 0; {}: capture is off
        return {"role": "replica"} if getattr(worker.model_runner, "_moetrace_replica", 0) else {}
    interventions = getattr(worker.model_runner, "_moetrace_interventions", None)
    return {
        "role": "writer",
        "part": None if collector.part is None else asdict(collector.part),
        **collector.stats,
        "intervention_seconds": 0.0 if interventions is None else interventions.seconds,
        "routing": {**asdict(collector.routing), "interventions": collector.interventions},
        "expert_load": collector.expert_load.tolist(),
        "sinks": collector.sink_metrics(),
        "sink_errors": dict(collector.sink_errors),
    }


def close(worker: Any, sink_urls: list[str], finished_request_ids: list[str] | None = None) -> None:
    """`protocol.close_rpc`: end a finished job's
    requests and have its stores commit and close, without blocking the engine (a later
    row for one reopens it). `protocol.sink_states_rpc` tells when they are closed."""
    collector = getattr(worker.model_runner, "_moetrace", None)
    if collector is not None:
        collector.close_sinks(sink_urls, finished_request_ids)


def sink_states(worker: Any, sink_urls: list[str]) -> dict[str, str]:
    """`protocol.sink_states_rpc`: ``open``, ``committing``, ``closing``,
    ``closed`` or ``failed: <error>`` per store."""
    collector = getattr(worker.model_runner, "_moetrace", None)
    if collector is None:
        return {}
    return collector.sink_states(sink_urls)


def annotate(worker: Any, texts: dict[str, list[dict[str, Any]]]) -> None:
    """`protocol.annotate_rpc`: hand sequences' texts to the stores that commit them."""
    collector = getattr(worker.model_runner, "_moetrace", None)
    if collector is not None:
        for sink_url, rows in texts.items():
            collector.annotate(sink_url, [protocol.Annotation(**row) for row in rows])


def commit(
    worker: Any, texts: dict[str, list[dict[str, Any]]], finished_request_ids: list[str]
) -> dict[str, str]:
    """`protocol.commit_rpc`: hand over the texts, end the finished requests, ask the
    stores named in `texts` to commit (without blocking the engine, unlike `flush`) and
    return their states: ``committing`` until the commit is done."""
    collector = getattr(worker.model_runner, "_moetrace", None)
    if collector is None:
        return {}
    urls = list(texts)
    annotate(worker, texts)
    collector.commit_sinks(urls, finished_request_ids)
    return collector.sink_states(urls)
