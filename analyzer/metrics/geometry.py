"""Hidden-state geometry of routing, paper (a) A8-A11 (reconstructions, see the spec).

Shapes: ``h`` is (tokens, hidden) router inputs of one layer; ``z`` is (tokens, experts)
router logits; ``w`` is (experts, hidden) router weights of that layer.
"""

from __future__ import annotations

import numpy as np

from analyzer.metrics.usage import cosine


def pooled_similarity(h_a: np.ndarray, h_b: np.ndarray, mean: np.ndarray | None = None) -> float:
    """A8: cosine of the mean router inputs of two sequences; `mean` centres them first."""
    a, b = h_a.mean(0), h_b.mean(0)
    if mean is not None:
        a, b = a - mean, b - mean
    return float(cosine(a, b))


def rms_distances(x: np.ndarray) -> np.ndarray:
    """A9, Eq. 5: sqrt(mean((x_t - x_s)^2)) for every pair of rows, (T, T)."""
    sq = (x**2).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0)
    return np.sqrt(d2 / x.shape[1])


def triangle(
    h: np.ndarray, z: np.ndarray, center_logits: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """A9: (hidden distance, logit distance) of every token pair (upper triangle).

    Logits are centred over experts by default: softmax routing ignores shifts common
    to all experts.
    """
    if center_logits:
        z = z - z.mean(1, keepdims=True)
    iu = np.triu_indices(len(h), 1)
    return rms_distances(h)[iu], rms_distances(z)[iu]


def lipschitz_ratio(h: np.ndarray, z: np.ndarray, w: np.ndarray) -> dict[str, float]:
    """A9 (i): max over pairs of |z_t - z_s| / |h_t - h_s| next to the router's operator norm.

    For a linear router the ratio can never exceed |W|_op; how far below it sits says how
    little of W's strongest direction the data uses.
    """
    iu = np.triu_indices(len(h), 1)
    dh = np.linalg.norm(h[:, None] - h[None], axis=-1)[iu]
    dz = np.linalg.norm(z[:, None] - z[None], axis=-1)[iu]
    keep = dh > 0
    ratio = float((dz[keep] / dh[keep]).max()) if keep.any() else 0.0
    op = float(np.linalg.norm(w, ord=2))
    return {"empirical": ratio, "operator_norm": op, "fraction": ratio / op if op else 0.0}


def shared_direction(h: np.ndarray, w: np.ndarray) -> dict[str, float]:
    """A10: energy of the first singular direction v1 of H and the router's response to it.

    ``hidden_energy`` = s1^2 / sum s_i^2 (rank collapse); ``router_energy`` =
    |C W v1|^2 / (|C W|_F^2 / d) with C centring over experts (Prop. 2 predicts << 1 for
    load-balanced routers); ``retained_logit_energy`` = |C W (H - H v1 v1^T)^T|_F^2 /
    |C W H^T|_F^2.
    """
    _, s, vt = np.linalg.svd(h, full_matrices=False)
    v1 = vt[0]
    e, d = w.shape
    cw = w - w.mean(0, keepdims=True)  # C W
    hidden_energy = float(s[0] ** 2 / (s**2).sum())
    router_energy = float(np.sum((cw @ v1) ** 2) / (np.sum(cw**2) / d))
    removed = h - np.outer(h @ v1, v1)
    full = np.sum((cw @ h.T) ** 2)
    retained = float(np.sum((cw @ removed.T) ** 2) / full) if full else 0.0
    return {
        "hidden_energy": hidden_energy,
        "router_energy": router_energy,
        "retained_logit_energy": retained,
    }


def same_token_overlap(token_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """A11: mean top-k overlap |K_t ∩ K_s| / k over pairs of rows with the same token id,
    per layer. ``ids`` is (tokens, layers, k); returns (layers,), NaN without repeats."""
    k = ids.shape[-1]
    total, pairs = np.zeros(ids.shape[1]), 0
    for token in np.unique(token_ids):
        rows = np.flatnonzero(token_ids == token)
        for i in range(len(rows)):
            for j in range(i + 1, len(rows)):
                a, b = ids[rows[i]], ids[rows[j]]  # (layers, k)
                total += (a[:, :, None] == b[:, None, :]).any(-1).sum(-1) / k
                pairs += 1
    return total / pairs if pairs else np.full(ids.shape[1], np.nan)
