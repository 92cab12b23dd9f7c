"""Wrap the model runner so capture is set up after loading and collected after each step."""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from capture_server.capture.intervention import RoutingShape
from capture_server.errors import CaptureError, CaptureSettingsError, CaptureUnsupportedError
from capture_server.plugin.buffers import CaptureBuffers
from capture_server.plugin.collector import StepCollector
from capture_server.plugin.dp_rows import rows_of_rank
from capture_server.plugin.interventions import InterventionTables, RequestInterventions
from capture_server.plugin.layout import REPLICA, capture_role, stage_layers, writer_part
from capture_server.plugin.router_hook import (
    check_supported,
    describe_model,
    find_moe_runners,
    hook_routers,
    output_scale,
    routing_shape,
    verify_hooked,
)
from capture_server.protocol import CAPTURE_DTYPES, capture_settings

logger = logging.getLogger("moetrace.capture")


def install_capture(runner: Any) -> StepCollector | None:
    """Hook every MoE router of `runner.model`; return the collector (None if capture is
    off, or on a replica: a TP rank other than 0, marked ``_moetrace_replica``).

    With ``"interventions": true`` in the settings, every rank (replicas too) also gets
    the intervention tables, as ``runner._moetrace_interventions``.
    """
    # on when additional_config has a "moetrace" entry, e.g.
    # --additional-config '{"moetrace": {"hidden_layers": [1]}}'
    config = capture_settings(getattr(runner.vllm_config, "additional_config", None))
    if config is None:
        return None
    model = runner.get_model()
    runners = find_moe_runners(model)
    from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank

    pp_group = get_pp_group()
    # every worker, before anything can raise: stages exchange their MoE-layer counts
    offset, total = _stage_moe_layers(len(runners), pp_group)
    check_supported(runners)
    # MoE-layer indices of the whole model; this stage's buffers hold its own layers
    hidden_global = tuple(int(x) for x in config.get("hidden_layers", ()))
    for layer in hidden_global:
        if not 0 <= layer < total:
            raise CaptureSettingsError(
                f"moetrace hidden_layers: expected MoE-layer indices in [0, {total}), got {layer}"
            )
    hidden_layers = stage_layers(hidden_global, offset, len(runners))
    capture_dtype = config.get("capture_dtype", "float32")
    if capture_dtype not in CAPTURE_DTYPES:
        raise CaptureSettingsError(
            f"moetrace capture_dtype: expected one of {CAPTURE_DTYPES}, got {capture_dtype!r}"
        )
    role = capture_role(runner.vllm_config, get_tensor_model_parallel_rank())
    routing = routing_shape(runners)
    if config.get("interventions") and pp_group.world_size > 1:
        raise CaptureUnsupportedError(
            "moetrace interventions are not supported with pipeline parallelism: each "
            "stage holds only its layers; start the engine without interventions"
        )
    interventions = _install_interventions(runner, routing) if config.get("interventions") else None
    runner._moetrace_interventions = interventions
    tables = None if interventions is None else interventions.tables
    if role == REPLICA:
        runner._moetrace_replica = True  # TP rank 0 routes the same rows and writes them
        if tables is not None:
            hook_routers(runners, None, tables)
            verify_hooked(runners)
        return None
    # the router matrices are read from the checkpoint by the writer only
    meta = describe_model(runners, runner.model_config.model, runner.model_config.hf_config)
    buffers = CaptureBuffers(
        num_layers=len(runners),
        max_tokens=int(runner.max_num_tokens),
        top_k=meta.top_k,
        num_experts=meta.num_experts,
        hidden_size=meta.hidden_size,
        hidden_layers=hidden_layers,
        logits=bool(config.get("logits", True)),
        device=runner.device,
        dtype=getattr(torch, capture_dtype),
    )
    part = writer_part(runner.vllm_config, pp_group.rank_in_group)
    dp_rows = rows_of_rank(runners, runner.vllm_config)
    hook_routers(runners, buffers, tables, dp_rows)
    verify_hooked(runners)
    logger.info(
        "moetrace capture on%s: %d MoE layers %s, %d experts, top-%d, hidden states of "
        "MoE layers %s; logits and hidden states in %s; device buffers %.1f MiB; "
        "interventions %s",
        "" if part is None else f" (writes store part {part.name})",
        len(runners),
        meta.moe_layers,
        meta.num_experts,
        meta.top_k,
        list(hidden_layers),
        capture_dtype,
        buffers.nbytes() / 2**20,
        "on" if tables is not None else "off",
    )
    return StepCollector(
        buffers,
        meta,
        weight_scale=output_scale(runners[0][1]),
        routing=routing,
        interventions=interventions is not None,
        part=part,
        moe_offset=offset,
    )


def _stage_moe_layers(local: int, pp_group: Any) -> tuple[int, int]:
    """(MoE layers of the pipeline stages before this one, MoE layers of the model).

    Each stage's model holds only its decoder blocks (vLLM's `get_pp_indices`), so the
    stages tell each other their counts over the pipeline group's CPU group: a
    collective every worker of the group reaches at load time. A stage without MoE
    layers would write no part, and is refused."""
    if pp_group.world_size == 1:
        return 0, local
    import torch.distributed

    counts: list[Any] = [None] * pp_group.world_size
    torch.distributed.all_gather_object(counts, local, group=pp_group.cpu_group)
    if 0 in counts:
        raise CaptureUnsupportedError(
            f"moetrace capture: pipeline stages hold {counts} MoE layers; every stage "
            "must hold at least one (change --pipeline-parallel-size)"
        )
    stage = pp_group.rank_in_group
    return sum(counts[:stage]), sum(counts)


def _traced(compilation: Any) -> bool:
    """Whether the forward runs as a traced graph, where a Python branch is fixed at
    trace time: a CUDA graph replays the branch it was captured with, and vLLM's
    compiled graphs drop Dynamo's guards, so they never retrace when a value changes
    (on CPU the MoE forward is traced, not an opaque op: `MoERunner._select_forward` in
    vllm/model_executor/layers/fused_moe/runner/moe_runner.py). Unknown modes count as
    traced."""
    names = [
        getattr(getattr(compilation, attr, None), "name", "UNKNOWN")
        for attr in ("mode", "cudagraph_mode")
    ]
    return any(name != "NONE" for name in names)


def _install_interventions(runner: Any, shape: RoutingShape) -> RequestInterventions:
    """Intervention tables sized for the engine: one slot per request the batch can hold,
    plus slot 0 for "none"."""
    if not getattr(type(runner)._prepare_inputs, "_moetrace", False):
        raise CaptureError(
            f"moetrace interventions: {type(runner).__name__}._prepare_inputs is not "
            "wrapped, so rows would get no intervention"
        )
    tables = InterventionTables(
        num_layers=shape.num_layers,
        num_experts=shape.num_experts,
        max_tokens=int(runner.max_num_tokens),
        num_slots=int(runner.max_num_reqs) + 1,
        always_apply=_traced(runner.vllm_config.compilation_config),
        device=runner.device,
    )
    return RequestInterventions(tables, shape)


def patch_model_runner(cls: type) -> None:
    """Wrap `load_model` and `execute_model` where `cls` itself defines them (re-entrant).

    Methods inherited from a base class are wrapped on that base, never twice.
    """
    if cls.__dict__.get("_moetrace_patched", False):
        return
    original_load = cls.__dict__.get("load_model")
    original_execute = cls.__dict__.get("execute_model")

    @functools.wraps(original_load)
    def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original_load(self, *args, **kwargs)
        self._moetrace = install_capture(self)
        return result

    @functools.wraps(original_execute)
    def execute_model(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        collector = getattr(self, "_moetrace", None)
        if collector is not None:
            collector.before_step(scheduler_output)
        result = original_execute(self, scheduler_output, *args, **kwargs)
        if collector is not None:
            collector.after_step(self, scheduler_output)
        return result

    original_init_kv = cls.__dict__.get("initialize_kv_cache")

    @functools.wraps(original_init_kv)
    def initialize_kv_cache(self: Any, kv_cache_config: Any, *args: Any, **kwargs: Any) -> Any:
        result = original_init_kv(self, kv_cache_config, *args, **kwargs)
        collector = getattr(self, "_moetrace", None)
        if collector is not None:  # sized for the KV cache now allocated (prefix caching)
            collector.attach_kv_cache(self)
        return result

    original_prepare = cls.__dict__.get("_prepare_inputs")

    @functools.wraps(original_prepare)
    def _prepare_inputs(
        self: Any, scheduler_output: Any, num_scheduled_tokens: Any, *args: Any, **kwargs: Any
    ) -> Any:
        # the batch order of this step is final here; rows follow it
        interventions = getattr(self, "_moetrace_interventions", None)
        if interventions is not None:
            interventions.before_forward(self, scheduler_output, num_scheduled_tokens)
        return original_prepare(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)

    _prepare_inputs._moetrace = True  # type: ignore[attr-defined]

    if original_prepare is not None:
        cls._prepare_inputs = _prepare_inputs
    if original_load is not None:
        cls.load_model = load_model
    if original_execute is not None:
        cls.execute_model = execute_model
    if original_init_kv is not None:
        cls.initialize_kv_cache = initialize_kv_cache
    cls._moetrace_patched = True
