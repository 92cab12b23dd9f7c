"""Hidden-state geometry of routing, paper (a) A8-A11 (reconstructions, see the spec).

Shapes: ``h`` is (tokens, hidden) router inputs of one layer; ``z`` is (tokens, experts)
router logits; ``w`` is (experts, hidden) router weights of that layer.
"""

from __future__ import annotations

import numpy as np

from analyzer.metrics.usage import TOP_P, cosine, top_p_jaccard, topk_overlap, usage_frequency


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


def reroute(
    h: np.ndarray,
    w: np.ndarray,
    top_k: int,
    scoring: str = "softmax",
    bias: np.ndarray | None = None,
    correction: np.ndarray | None = None,
) -> np.ndarray:
    """The experts a linear router picks for inputs `h`: (tokens, top_k) ids, best first.

    Selection follows the model's scores: softmax is monotone in the logits, so it picks
    the top-k logits (+ `bias`, gpt-oss); sigmoid routers pick the top-k of
    sigmoid(logit) + `correction` (DeepSeek-V3's selection-only bias). Group-limited
    selection (DeepSeek ``n_group`` > 1) is not modelled: agreement with the captured
    ids (`direction_ablation`) shows where that matters. Ties go to the lower id.
    """
    z = h @ w.T
    if bias is not None:
        z = z + bias
    if scoring == "sigmoid":
        z = 1.0 / (1.0 + np.exp(-z))
        if correction is not None:
            z = z + correction
    elif scoring != "softmax":
        raise ValueError(f"scoring: expected softmax or sigmoid, got {scoring!r}")
    return np.argsort(-z, axis=-1, kind="stable")[:, :top_k]


def direction_ablation(
    h: np.ndarray,
    w: np.ndarray,
    top_k: int,
    directions: tuple[int, ...],
    scoring: str = "softmax",
    bias: np.ndarray | None = None,
    correction: np.ndarray | None = None,
    top_p: float = TOP_P,
    captured: np.ndarray | None = None,
) -> list[dict[str, float]]:
    """Paper (a) E-a3 (reconstruction, spec §2.3): remove the top-K right singular
    directions V_K of the (uncentred) stacked router inputs, h' = h - V_K V_K^T h,
    re-route, and compare with re-routing the unchanged inputs.

    One row per K: ``removed_energy`` (share of the inputs' energy removed),
    ``token_overlap`` (mean |K_t ∩ K'_t| / k, A4), ``tokens_changed`` (share of tokens
    whose expert set changed), ``usage_cosine`` and ``top_p_jaccard`` (A2 and A3 of the
    usage of all tokens before and after). With `captured` (tokens, k) ids, each row
    also has ``captured_agreement``: the share of tokens whose captured set the
    re-routing of the unchanged inputs reproduces.
    """
    e = w.shape[0]
    before = reroute(h, w, top_k, scoring, bias, correction)
    f_before = usage_frequency(before[:, None], e)[0]
    _, s, vt = np.linalg.svd(h, full_matrices=False)  # once for every K
    energy = np.concatenate([[0.0], np.cumsum(s**2)]) / max(float((s**2).sum()), 1e-300)
    extra = {}
    if captured is not None:
        same = (np.sort(before, -1) == np.sort(captured, -1)).all(-1)
        extra["captured_agreement"] = float(same.mean())
    rows = []
    for k in directions:
        ablated = h - (h @ vt[:k].T) @ vt[:k]
        after = before if k == 0 else reroute(ablated, w, top_k, scoring, bias, correction)
        overlap = topk_overlap(before[:, None], after[:, None], e)["overlap"][:, 0]
        f_after = usage_frequency(after[:, None], e)[0]
        rows.append(
            {
                "directions": k,
                "removed_energy": float(energy[k]),
                "token_overlap": float(overlap.mean()),
                "tokens_changed": float((overlap < 1).mean()),
                "usage_cosine": float(cosine(f_before, f_after)),
                "top_p_jaccard": float(top_p_jaccard(f_before, f_after, top_p)),
                **extra,
            }
        )
    return rows
