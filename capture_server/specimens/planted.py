"""A specimen whose routing is a known function of the token id at every layer.

Construction (Qwen3-MoE, hidden 64, 8 experts, top-2):
1. Attention output projections and expert down projections are zero, so the
   residual stream stays the token embedding at every layer.
2. Token t is embedded as one-hot(a) in dims 0-7 plus one-hot(8 + b) in dims 8-15,
   with a = t % 8 and b = (t // 8) % 8.
3. The router of layer l gives logit 4*s to expert (a + l) % 4, 2*s to expert
   4 + (b + l) % 4 and 1*s to expert (a + l + 1) % 4 (s is the RMSNorm scale), 0 to all
   others.
So the top-2 set of token t at layer l is exactly `planted_topk(t, l)`, and the first
three of its ranking are `planted_ranking(t, l)`: with one of them masked, the top-2
are the other two.
"""

from __future__ import annotations

from typing import Any

import numpy as np

FIRST_LOGIT = 4.0
SECOND_LOGIT = 2.0
THIRD_LOGIT = 1.0


def planted_topk(token_ids: np.ndarray, layer: int) -> np.ndarray:
    """Planted top-2 expert ids, ordered by weight: shape (tokens, 2)."""
    t = np.asarray(token_ids, dtype=np.int64)
    a, b = t % 8, (t // 8) % 8
    return np.stack([(a + layer) % 4, 4 + (b + layer) % 4], axis=-1)


def planted_ranking(token_ids: np.ndarray, layer: int) -> np.ndarray:
    """The planted first, second and third experts: shape (tokens, 3)."""
    t = np.asarray(token_ids, dtype=np.int64)
    third = (t % 8 + layer + 1) % 4
    return np.concatenate([planted_topk(t, layer), third[:, None]], axis=-1)


def plant(model: Any) -> None:
    """Rewrite a freshly initialised Qwen3-MoE model in place (see module docstring)."""
    import torch

    from capture_server.specimens.routers import router_modules

    inner = model.model
    emb = inner.embed_tokens.weight
    vocab = emb.shape[0]
    t = torch.arange(vocab)
    emb.zero_()
    emb[t, t % 8] = 1.0
    emb[t, 8 + (t // 8) % 8] = 1.0
    for layer in inner.layers:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.experts.down_proj.zero_()
    for layer_idx, router in router_modules(model):
        w = torch.zeros_like(router.weight)
        for j in range(8):
            w[(j + layer_idx) % 4, j] = FIRST_LOGIT
            w[(j + layer_idx + 1) % 4, j] = THIRD_LOGIT
            w[4 + (j + layer_idx) % 4, 8 + j] = SECOND_LOGIT
        router.weight.copy_(w)
