"""The independent reference: transformers' forward on the same weights, with router hooks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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
    nll: np.ndarray | None = None  # (T,) -log p(token t | tokens before t), NaN at t = 0


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
                logits = self.model(torch.tensor([token_ids])).logits[0].float()
        finally:
            for h in handles:
                h.remove()
        hidden = [h.reshape(len(token_ids), -1).float().numpy() for h, _ in seen]
        routing = self._stack(hidden, [o for _, o in seen], len(token_ids))
        logprobs = torch.log_softmax(logits, dim=-1)
        nll = np.full(len(token_ids), np.nan)
        nll[1:] = -logprobs[:-1].gather(1, torch.tensor(token_ids[1:])[:, None])[:, 0].numpy()
        routing.nll = nll
        return routing

    @contextlib.contextmanager
    def intervene(
        self,
        mask: dict[int, list[int]] | None = None,
        zero: dict[int, list[int]] | None = None,
    ) -> Iterator[None]:
        """Test-only patch of the transformers routers, written from the intervention's
        definition and independent of moetrace's tables:

        - `mask` (MoE layer -> experts): the router's logits for those experts are −inf
          before its own softmax and top-k (kept experts = the complement masked);
        - `zero` (MoE layer -> experts): after the router's own selection, their weights
          are 0 and the rest are rescaled to the selection's original sum.
        """
        import torch.nn.functional as F

        originals = {}
        for layer, (_, router) in enumerate(self.routers):
            masked = list((mask or {}).get(layer, []))
            zeroed = list((zero or {}).get(layer, []))
            if not masked and not zeroed:
                continue
            originals[layer] = router.forward

            def forward(hidden, _orig=router.forward, _masked=masked, _zeroed=zeroed):
                real_linear = F.linear

                def linear(x, w, b=None):
                    out = real_linear(x, w, b)
                    out[..., _masked] = float("-inf")
                    return out

                F.linear = linear
                try:
                    logits, weights, ids = _orig(hidden)
                finally:
                    F.linear = real_linear
                if _zeroed:
                    hit = torch.isin(ids, torch.tensor(_zeroed))
                    total = weights.sum(-1, keepdim=True)
                    kept = torch.where(hit, torch.zeros_like(weights), weights)
                    weights = kept * (total / kept.sum(-1, keepdim=True).clamp_min(1e-30))
                return logits, weights, ids

            router.forward = forward
        try:
            yield
        finally:
            for layer in originals:
                del self.routers[layer][1].forward  # the class's forward again

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
