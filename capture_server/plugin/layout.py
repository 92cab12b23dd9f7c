"""Which worker writes, and which engine layouts capture refuses, at model load.

Plain tensor parallelism: the router gate is a replicated linear on all-reduced input
(vllm/model_executor/layers/fused_moe/router/gate_linear.py), so every TP rank routes
the whole batch with the same ids, weights, logits and hidden states. TP rank 0 hooks
and writes; the other ranks are replicas that allocate nothing and write nothing.

Data and pipeline parallelism: each DP rank is its own engine core with its own
scheduler, and each pipeline stage's worker holds only its stage's layers; TP rank 0 of
each (DP rank, PP stage) writes its own part of the store (`store.parts`, format
version 2): the sequences its rank served, the MoE layers of its stage. The router hook
keeps only the rank's own rows of a router call that sees every rank's tokens
(`plugin.dp_rows`); stages run the same scheduled steps, so the reader joins their rows
by (sequence, sample, position).

Refused, each with what to change, because their rows would be wrong, duplicated or
missing (vLLM 0.32, read in its source):
    - prefill context parallelism and sequence-parallel MoE (TP rank r routes only its
      slice of the tokens; `ParallelConfig.use_sequence_parallel_moe`);
    - dual-batch overlap (`ParallelConfig.use_ubatching`: two threads write the same
      buffer rows);
    - speculative decoding (draft tokens are forwarded and some rejected).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from capture_server.errors import CaptureUnsupportedError
from capture_server.store.parts import PartId

WRITER, REPLICA = "writer", "replica"


def unsupported_layout(vllm_config: Any) -> str | None:
    """Why capture cannot be right on this engine's layout, or None."""
    parallel = vllm_config.parallel_config
    if getattr(parallel, "prefill_context_parallel_size", 1) > 1:
        return "prefill context parallelism (prefill_context_parallel_size > 1)"
    if getattr(parallel, "use_sequence_parallel_moe", False):
        return "sequence-parallel MoE (expert parallel with TP and DP)"
    if getattr(parallel, "use_ubatching", False):
        return "dual-batch overlap (--enable-dbo / ubatch_size > 1)"
    if getattr(vllm_config, "speculative_config", None) is not None:
        return "speculative decoding (rejected draft tokens would be recorded)"
    return None


def capture_role(vllm_config: Any, tp_rank: int) -> str:
    """`WRITER` for the worker that captures and writes, `REPLICA` for TP ranks > 0.

    Raises `CaptureUnsupportedError` on a layout capture does not handle.
    """
    reason = unsupported_layout(vllm_config)
    if reason is not None:
        raise CaptureUnsupportedError(
            f"moetrace capture does not support {reason}; turn it off for capture engines"
        )
    return WRITER if tp_rank == 0 else REPLICA


def stage_layers(layers: Sequence[int], first: int, count: int) -> tuple[int, ...]:
    """Of `layers` (MoE-layer indices of the whole model), those of the pipeline stage
    holding MoE layers ``first .. first + count - 1``, numbered from its first."""
    return tuple(layer - first for layer in layers if 0 <= layer - first < count)


def writer_part(vllm_config: Any, pp_stage: int = 0) -> PartId | None:
    """The part of a parted store this worker writes, as pipeline stage `pp_stage` of
    its DP rank; None (one writer, a version-1 store) without data or pipeline
    parallelism."""
    parallel = vllm_config.parallel_config
    if parallel.data_parallel_size == 1 and parallel.pipeline_parallel_size == 1:
        return None
    dp_rank = int(parallel.data_parallel_rank) if parallel.data_parallel_size > 1 else 0
    return PartId(dp_rank, pp_stage, int(parallel.pipeline_parallel_size))
