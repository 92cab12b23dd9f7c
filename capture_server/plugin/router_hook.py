"""Find the MoE layers of a vLLM model, describe their routing, and hook their routers.

The hook point is `FusedMoERouter.select_experts`: the one call that sees the router
input, the router logits and the top-k weights and ids, for every architecture. It is
wrapped per router instance, after the model is loaded and before it is compiled.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from capture_server.capture.intervention import RoutingShape
from capture_server.capture.records import ModelMeta
from capture_server.errors import CaptureError, CaptureUnsupportedError
from capture_server.plugin.buffers import CaptureBuffers
from capture_server.plugin.dp_rows import DataParallelRows
from capture_server.plugin.interventions import InterventionTables

logger = logging.getLogger(__name__)


def find_moe_runners(model: torch.nn.Module) -> list[tuple[int, Any]]:
    """(decoder block index, MoE runner) of every MoE layer, in block order."""
    from vllm.model_executor.layers.fused_moe.runner.moe_runner_interface import (
        MoERunnerInterface,
    )
    from vllm.model_executor.models.utils import extract_layer_index

    runners = [m for m in model.modules() if isinstance(m, MoERunnerInterface)]
    return sorted(((extract_layer_index(r.layer_name), r) for r in runners), key=lambda x: x[0])


def check_supported(runners: list[tuple[int, Any]]) -> None:
    """Raise `CaptureUnsupportedError` where the captured values would be wrong or missing."""
    if not runners:
        raise CaptureUnsupportedError("moetrace capture found no MoE layer in the model")
    for block, runner in runners:
        if runner.is_monolithic:
            raise CaptureUnsupportedError(
                f"moetrace capture is not supported with the monolithic MoE kernel of "
                f"layer {block} ({type(runner.routed_experts.quant_method).__name__}): it "
                "routes inside the kernel and never calls select_experts; choose a modular "
                "MoE backend, e.g. --moe-backend triton (see docs/deploy.md)"
            )
        if getattr(runner.router, "eplb_state", None) is not None:
            raise CaptureUnsupportedError(
                "moetrace capture is not supported with EPLB: select_experts returns "
                "physical expert ids; disable enable_eplb"
            )


_ROUTER_NAMES = ("gate", "router")


def checkpoint_router_tensors(
    model_dir: str, blocks: list[int], num_experts: int
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Router weight, logit bias and correction bias of each MoE block, read from the checkpoint.

    Read from the safetensors files rather than the loaded model because some backends
    repack or drop the router weight after loading (the CPU GEMM path does).
    """
    from pathlib import Path

    from safetensors import safe_open

    path = Path(model_dir)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(model_dir, local_files_only=True))
    tensors: dict[str, np.ndarray] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                parts = key.split(".")
                if "layers" in parts and any(n in parts for n in _ROUTER_NAMES):
                    tensors[key] = f.get_tensor(key).float().numpy()

    def find(block: int, suffix: str, ndim: int) -> np.ndarray | None:
        for key, value in tensors.items():
            if (
                f"layers.{block}." in key
                and key.endswith(suffix)
                and value.ndim == ndim
                and value.shape[0] >= num_experts
                and any(f".{n}." in key for n in _ROUTER_NAMES)
            ):
                return value[:num_experts]
        return None

    weights = [find(b, ".weight", 2) for b in blocks]
    if any(w is None for w in weights):
        missing = [b for b, w in zip(blocks, weights, strict=True) if w is None]
        raise CaptureUnsupportedError(
            f"moetrace could not find the router weights of MoE blocks {missing} in {path}"
        )
    biases = [find(b, ".bias", 1) for b in blocks]
    corrections = [find(b, ".e_score_correction_bias", 1) for b in blocks]
    return (
        np.stack(weights),  # type: ignore[arg-type]
        None if biases[0] is None else np.stack(biases),  # type: ignore[arg-type]
        None if corrections[0] is None else np.stack(corrections),  # type: ignore[arg-type]
    )


def describe_model(runners: list[tuple[int, Any]], model_dir: str, hf_config: Any) -> ModelMeta:
    """Routing metadata and router weights (float32, on the host)."""
    router = runners[0][1].router
    num_experts = int(router.global_num_experts)
    blocks = [block for block, _ in runners]
    weights, biases, corrections = checkpoint_router_tensors(model_dir, blocks, num_experts)
    return ModelMeta(
        architecture=(getattr(hf_config, "architectures", None) or ["unknown"])[0],
        moe_layers=blocks,
        num_experts=num_experts,
        top_k=int(router.top_k),
        scoring_func=str(getattr(router, "scoring_func", "softmax")),
        renormalize=bool(getattr(router, "renormalize", False)),
        routed_scaling_factor=float(getattr(hf_config, "routed_scaling_factor", None) or 1.0),
        num_shared_experts=int(
            getattr(hf_config, "n_shared_experts", None)
            or (1 if getattr(hf_config, "shared_expert_intermediate_size", 0) else 0)
        ),
        hidden_size=int(weights.shape[2]),
        router_weights=weights,
        router_bias=biases,
        correction_bias=corrections,
    )


def routing_shape(runners: list[tuple[int, Any]]) -> RoutingShape:
    """The routing interventions are checked against, from the routers themselves (every
    rank has them; only the writer reads the checkpoint)."""
    router = runners[0][1].router
    return RoutingShape(
        num_layers=len(runners),
        num_experts=int(router.global_num_experts),
        top_k=int(router.top_k),
        correction_bias=getattr(router, "e_score_correction_bias", None) is not None,
    )


def output_scale(runner: Any) -> float:
    """Scaling the runner applies to the routed output instead of to the weights."""
    return float(getattr(runner, "routed_scaling_factor", 1.0) or 1.0)


def hook_routers(
    runners: list[tuple[int, Any]],
    buffers: CaptureBuffers | None,
    interventions: InterventionTables | None = None,
    dp_rows: DataParallelRows | None = None,
) -> None:
    """Wrap each runner's `router.select_experts` so it records into `buffers` (the
    writer; None on a TP replica) and applies each row's intervention (`interventions`,
    when the engine runs them). Under data parallelism (`dp_rows`) it records only the
    rank's own rows of a call that routes every rank's tokens.

    The wrapper's steps:
        1. add each row's mask (−inf for experts it may not select) to the router logits;
        2. run the model's own selection on them;
        3. zero each row's zeroed experts among the selected and rescale the rest;
        4. record the router's own logits and the routing that runs.

    Re-entrant: a router already wrapped is left alone.
    """
    for slot, (_, runner) in enumerate(runners):
        router = runner.router
        if getattr(router, "_moetrace_slot", None) is not None:
            continue
        original = router.select_experts

        def select_experts(
            hidden_states: torch.Tensor,
            router_logits: torch.Tensor,
            topk_indices_dtype: torch.dtype | None = None,
            *,
            input_ids: torch.Tensor | None = None,
            _original: Any = original,
            _slot: int = slot,
        ) -> tuple[torch.Tensor, torch.Tensor]:
            intervene = interventions is not None and interventions.applies()
            # Step 1
            logits = interventions.mask_logits(_slot, router_logits) if intervene else router_logits
            # Step 2
            topk_weights, topk_ids = _original(
                hidden_states=hidden_states,
                router_logits=logits,
                topk_indices_dtype=topk_indices_dtype,
                input_ids=input_ids,
            )
            # Step 3
            if intervene:
                topk_weights = interventions.zero_weights(_slot, topk_weights, topk_ids)
            # Step 4
            if buffers is not None:
                if dp_rows is None:
                    buffers.record(_slot, hidden_states, router_logits, topk_weights, topk_ids)
                else:
                    a, b = dp_rows.span(topk_ids.shape[0])
                    buffers.record(
                        _slot,
                        hidden_states[a:b],
                        router_logits[a:b],
                        topk_weights[a:b],
                        topk_ids[a:b],
                    )
            return topk_weights, topk_ids

        select_experts._moetrace = True  # type: ignore[attr-defined]
        router.select_experts = select_experts
        router._moetrace_slot = slot


def verify_hooked(runners: list[tuple[int, Any]]) -> None:
    """Raise unless every MoE runner's router calls the capture's wrapper."""
    missing = [
        block
        for block, runner in runners
        if not getattr(runner.router.select_experts, "_moetrace", False)
        or getattr(runner.router, "_moetrace_slot", None) is None
    ]
    if missing:
        raise CaptureError(
            f"moetrace capture could not hook the routers of MoE blocks {missing}; "
            "their routing would not be recorded"
        )
