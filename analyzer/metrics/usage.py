"""Expert usage and its similarities: paper (a) A1-A5, paper (b) B5.

Shapes: ``ids`` is (tokens, layers, k) of expert ids; ``f`` is (layers, experts).
"""

from __future__ import annotations

import numpy as np

TOP_P = 0.8  # paper (a) Fig. 6


def usage_frequency(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """A1: visit counts per (layer, expert) normalised to a probability vector per layer.

    f[l] = (1 / (T k)) * sum_t m_t[l], with m_t the binary top-k mask; rows sum to 1
    (all zeros when there are no tokens).
    """
    tokens, layers, k = ids.shape
    counts = np.zeros((layers, num_experts), dtype=np.float64)
    for layer in range(layers):  # (T, k) -> bincount; layers are few
        counts[layer] = np.bincount(ids[:, layer].ravel(), minlength=num_experts)
    return counts / max(tokens * k, 1)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A2: cosine similarity along the last axis (0 where either vector is zero)."""
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)


def top_p_mask(f: np.ndarray, p: float = TOP_P) -> np.ndarray:
    """A3: smallest set of experts, by decreasing frequency, whose mass reaches `p`.

    Ties are broken by expert id (the lower id first); the comparison is
    ``>= p - 1e-12``. Returns a boolean mask with f's shape.
    """
    sorted_f = -np.sort(-f, axis=-1)  # values only: no (slow, stable) argsort needed
    cum = np.cumsum(sorted_f, axis=-1)
    # set size: experts up to and including the first one where the mass reaches p
    size = np.minimum((cum < p - 1e-12).sum(-1, keepdims=True) + 1, f.shape[-1])
    last = np.take_along_axis(sorted_f, size - 1, -1)  # smallest frequency in the set
    above = f > last
    # experts tied with the last member fill the remaining places by id (ranking them
    # only where more are tied than places remain: rare)
    tied = f == last
    fill = size - above.sum(-1, keepdims=True)
    mask = above | tied
    crowded = tied.sum(-1) > fill[..., 0]
    if crowded.any():
        rank = np.cumsum(tied[crowded], axis=-1)
        mask[crowded] = above[crowded] | (tied[crowded] & (rank <= fill[crowded]))
    return mask & (f > 0)


def jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|A ∩ B| / |A ∪ B| of boolean masks along the last axis (1 when both are empty)."""
    inter = (a & b).sum(-1)
    union = (a | b).sum(-1)
    return np.divide(inter, union, out=np.ones_like(inter, dtype=np.float64), where=union > 0)


def top_p_jaccard(f_a: np.ndarray, f_b: np.ndarray, p: float = TOP_P) -> np.ndarray:
    """A3: Jaccard overlap of the top-p expert sets of two usage profiles, per layer."""
    return jaccard(top_p_mask(f_a, p), top_p_mask(f_b, p))


def topk_overlap(ids_a: np.ndarray, ids_b: np.ndarray, num_experts: int) -> dict[str, np.ndarray]:
    """A4: token-level top-k agreement of two aligned tokens, per layer.

    Returns ``hamming`` = 1 - |m_a - m_b|_1 / E and ``overlap`` = |K_a ∩ K_b| / k,
    each of shape (tokens, layers).
    """
    k = ids_a.shape[-1]
    m_a = np.zeros((*ids_a.shape[:-1], num_experts), dtype=bool)
    m_b = np.zeros_like(m_a)
    np.put_along_axis(m_a, ids_a.astype(np.int64), True, -1)
    np.put_along_axis(m_b, ids_b.astype(np.int64), True, -1)
    inter = (m_a & m_b).sum(-1)
    return {"hamming": 1 - (m_a ^ m_b).sum(-1) / num_experts, "overlap": inter / k}


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def router_confidence(logits: np.ndarray) -> np.ndarray:
    """A5: mean over tokens of the maximum softmax probability, per layer. (T, L, E) -> (L,)."""
    return softmax(logits.astype(np.float64)).max(-1).mean(0)


def load_entropy(f: np.ndarray) -> np.ndarray:
    """Normalised Shannon entropy of a usage profile, per layer: 1 = perfectly balanced."""
    e = f.shape[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(f > 0, f * np.log(f), 0.0).sum(-1)
    return h / np.log(e)


def gini(c: np.ndarray) -> np.ndarray:
    """B5: Gini = sum_i sum_j |c_i - c_j| / (2 E sum_i c_i), along the last axis."""
    e = c.shape[-1]
    diffs = np.abs(c[..., :, None] - c[..., None, :]).sum((-1, -2))
    total = c.sum(-1)
    return np.divide(
        diffs, 2 * e * total, out=np.zeros_like(total, dtype=np.float64), where=total > 0
    )
