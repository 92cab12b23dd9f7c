"""The independent reference: transformers' forward on the same weights, with router hooks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class ReferenceRouting:
    ids: np.ndarray  # (T, L, k), ordered by descending weight then id
    weights: np.ndarray  # (T, L, k)
    logits: np.ndarray  # (T, L, E)
    hidden: list[np.ndarray]  # per MoE layer, (T, d) router input
    moe_blocks: list[int]


def canonical(ids: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort the top-k axis by descending weight, then by id (the capture's order)."""
    order = np.lexsort((ids, -weights), axis=-1)
    return np.take_along_axis(ids, order, -1), np.take_along_axis(weights, order, -1)


class TransformersReference:
    """Loads a checkpoint with transformers once and routes token sequences through it."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoModelForCausalLM

        from capture_server.specimens.routers import router_modules

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.routers = router_modules(self.model)
        self.moe_blocks = [b for b, _ in self.routers]
        self.router_weights = np.stack([r.weight.detach().float().numpy() for _, r in self.routers])

    def route_hidden(self, hidden: list[np.ndarray]) -> ReferenceRouting:
        """Run each transformers router module on given router inputs (one per MoE layer)."""
        outs = []
        with torch.no_grad():
            for (_, router), h in zip(self.routers, hidden, strict=True):
                outs.append(router(torch.from_numpy(h)))
        return self._stack(hidden, outs, len(hidden[0]))

    def route(self, token_ids: list[int]) -> ReferenceRouting:
        """Step 1: hook every router; step 2: one forward; step 3: stack per layer."""
        seen: list[tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = []
        handles = [
            router.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
            for _, router in self.routers
        ]
        try:
            with torch.no_grad():
                self.model(torch.tensor([token_ids]))
        finally:
            for h in handles:
                h.remove()
        hidden = [h.reshape(len(token_ids), -1).float().numpy() for h, _ in seen]
        return self._stack(hidden, [o for _, o in seen], len(token_ids))

    def _stack(self, hidden: list[np.ndarray], seen: list, t: int) -> ReferenceRouting:
        logits = np.stack([o[0].reshape(t, -1).float().numpy() for o in seen], axis=1)
        weights = np.stack([o[1].reshape(t, -1).float().numpy() for o in seen], axis=1)
        ids = np.stack([o[2].reshape(t, -1).numpy() for o in seen], axis=1).astype(np.int32)
        ids, weights = canonical(ids, weights)
        return ReferenceRouting(
            ids=ids,
            weights=weights,
            logits=logits,
            hidden=hidden,
            moe_blocks=self.moe_blocks,
        )
