"""Preallocated device buffers the router hooks copy into during the forward pass."""

from __future__ import annotations

import torch


class CaptureBuffers:
    """Per-step routing of every token row, for every MoE layer.

    Invariants:
        - Shapes are fixed at start-up: ``ids``/``weights`` are (L, T, k),
          ``logits`` is (L, T, E) unless logits are off, ``hidden[l]`` is (T, d) for each configured
          MoE-layer index l, with T the largest token count of a step.
        - ``logits`` and ``hidden`` have the engine's capture dtype (float32 or float16):
          ``copy_`` casts inside the same kernel, rounding to nearest even on CPU and
          CUDA alike, as the store's writer would (tests/capture/test_float_cast.py).
        - Inside the forward only `record` touches them, and it only does
          ``copy_`` into a leading slice: no allocation, no host sync, no branch
          on tensor values, so CUDA graphs and compiled graphs replay it.
        - The step collector reads rows ``[:num_tokens]`` after the step and
          before the next forward overwrites them.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        max_tokens: int,
        top_k: int,
        num_experts: int,
        hidden_size: int,
        hidden_layers: tuple[int, ...],
        logits: bool,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.num_experts = num_experts
        self.dtype = dtype  # of logits and hidden states
        self.ids = torch.zeros(num_layers, max_tokens, top_k, dtype=torch.int32, device=device)
        self.weights = torch.zeros(
            num_layers, max_tokens, top_k, dtype=torch.float32, device=device
        )
        self.logits = (
            torch.zeros(num_layers, max_tokens, num_experts, dtype=dtype, device=device)
            if logits
            else None
        )
        self.hidden = {
            layer: torch.zeros(max_tokens, hidden_size, dtype=dtype, device=device)
            for layer in hidden_layers
        }

    def nbytes(self) -> int:
        tensors = [self.ids, self.weights, self.logits, *self.hidden.values()]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def record(
        self,
        layer: int,
        hidden_states: torch.Tensor,
        router_logits: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
    ) -> None:
        """Copy one MoE layer's routing of this step's rows into the buffers."""
        n = topk_ids.shape[0]
        self.ids[layer, :n].copy_(topk_ids)
        self.weights[layer, :n].copy_(topk_weights)
        if self.logits is not None:
            # A fused shared-expert gate appends columns after the routed experts.
            self.logits[layer, :n].copy_(router_logits[:, : self.num_experts])
        hidden = self.hidden.get(layer)
        if hidden is not None:
            # MXFP4 backends pad the router input past hidden_size (gpt-oss: 2880 -> 3072,
            # vllm/model_executor/layers/fused_moe/oracle/mxfp4.py): the model's columns
            # come first.
            hidden[:n].copy_(hidden_states[:, : hidden.shape[1]])

    def arm_proof(self) -> None:
        """Mark row 0 of every layer's ids as not recorded (-1), before a step with rows:
        after the step, a layer whose row 0 is still -1 did not record (`unrecorded`)."""
        self.ids[:, 0].fill_(-1)

    def unrecorded(self) -> list[int]:
        """MoE-layer slots that did not record since `arm_proof` (syncs the device)."""
        return (self.ids[:, 0, 0] < 0).nonzero().flatten().tolist()
