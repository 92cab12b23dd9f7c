"""Wrap the model runner so capture is set up after loading and collected after each step."""

from __future__ import annotations

import functools
import logging
from typing import Any

from capture_server.errors import CaptureSettingsError
from capture_server.plugin.buffers import CaptureBuffers
from capture_server.plugin.collector import StepCollector
from capture_server.plugin.layout import REPLICA, capture_role
from capture_server.plugin.router_hook import (
    check_supported,
    describe_model,
    find_moe_runners,
    hook_routers,
    output_scale,
    verify_hooked,
)
from capture_server.protocol import capture_settings

logger = logging.getLogger("moetrace.capture")


def install_capture(runner: Any) -> StepCollector | None:
    """Hook every MoE router of `runner.model`; return the collector (None if capture is
    off, or on a replica: a TP rank other than 0, marked ``_moetrace_replica``)."""
    # on when additional_config has a "moetrace" entry, e.g.
    # --additional-config '{"moetrace": {"hidden_layers": [1]}}'
    config = capture_settings(getattr(runner.vllm_config, "additional_config", None))
    if config is None:
        return None
    model = runner.get_model()
    runners = find_moe_runners(model)
    check_supported(runners)
    hidden_layers = tuple(int(x) for x in config.get("hidden_layers", ()))
    for layer in hidden_layers:
        if not 0 <= layer < len(runners):
            raise CaptureSettingsError(
                f"moetrace hidden_layers: expected MoE-layer indices in [0, {len(runners)}), "
                f"got {layer}"
            )
    from vllm.distributed import get_tensor_model_parallel_rank

    if capture_role(runner.vllm_config, get_tensor_model_parallel_rank()) == REPLICA:
        runner._moetrace_replica = True  # TP rank 0 routes the same rows and writes them
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
    )
    hook_routers(runners, buffers)
    verify_hooked(runners)
    logger.info(
        "moetrace capture on: %d MoE layers %s, %d experts, top-%d, hidden states of "
        "MoE layers %s; device buffers %.1f MiB",
        len(runners),
        meta.moe_layers,
        meta.num_experts,
        meta.top_k,
        list(hidden_layers),
        buffers.nbytes() / 2**20,
    )
    return StepCollector(buffers, meta, weight_scale=output_scale(runners[0][1]))


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

    if original_load is not None:
        cls.load_model = load_model
    if original_execute is not None:
        cls.execute_model = execute_model
    cls._moetrace_patched = True
