"""CommitteeAudit, paper (b) Stage I and III: contribution index, ranks, Pareto committee.

Shapes: ``c`` is (domains, experts) contribution of each expert in each domain, for one
layer. Implements the official code's choices (spec §3.6) with the paper's alternatives
as options.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from analyzer.metrics.usage import softmax

GAMMA = 0.8  # presence threshold: present in >= ceil(0.8 |T|) domains (official code)
DENOMINATORS = ("topk_table", "all_experts")  # coverage: mass of the top-k table, or all


def eci_softmax(logits: np.ndarray) -> np.ndarray:
    """Eq. 2 as in the paper: mean full-softmax probability per expert. (N, E) -> (E,)."""
    return softmax(logits.astype(np.float64)).mean(0)


def eci_frequency(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """Code variant 1: fraction of samples whose top-k contains the expert. (N, k) -> (E,)."""
    hits = np.zeros((len(ids), num_experts), dtype=bool)
    np.put_along_axis(hits, ids.astype(np.int64), True, -1)
    return hits.mean(0)


def eci_frequency_weight(ids: np.ndarray, weights: np.ndarray, num_experts: int) -> np.ndarray:
    """Code variant 2 (official `get_frequency_and_weight_data.py`): frequency x mean
    min-max-normalised gate weight.

    Each expert's per-sample weight is 0 where it was not selected, and min and max are
    taken over all the domain's samples, zeros included (spec §3.6 item 1): an expert
    selected in 1 of N samples gets a mean normalised weight of about 1/N.
    """
    n = len(ids)
    w = np.zeros((n, num_experts))
    np.put_along_axis(w, ids.astype(np.int64), weights.astype(np.float64), -1)
    sel = np.zeros((n, num_experts), dtype=bool)
    np.put_along_axis(sel, ids.astype(np.int64), True, -1)
    lo, hi = w.min(0), w.max(0)
    norm = (w - lo) / (hi - lo + 1e-6)
    return sel.mean(0) * norm.mean(0)


def ranks_with_penalty(c: np.ndarray, k: int) -> np.ndarray:
    """Eq. 8: rank 1..k of each expert inside each domain's top-k by c; others get k + 1."""
    domains, experts = c.shape
    order = np.argsort(-c, axis=-1, kind="stable")
    ranks = np.full((domains, experts), k + 1, dtype=np.int64)
    for d in range(domains):
        ranks[d, order[d, :k]] = np.arange(1, k + 1)
    return ranks


@dataclass(frozen=True)
class Committee:
    members: list[int]  # sorted by mean rank
    mean_rank: list[float]
    rank_var: list[float]
    presence: np.ndarray  # (experts,)
    coverage: float
    ratio: float


def pareto_front(mu: np.ndarray, var: np.ndarray, candidates: np.ndarray) -> list[int]:
    """Eq. 12: candidates not dominated in (mean rank, rank variance), both minimised."""
    front = []
    for i in candidates:
        dominated = any(
            (mu[j] <= mu[i] and var[j] <= var[i]) and (mu[j] < mu[i] or var[j] < var[i])
            for j in candidates
            if j != i
        )
        if not dominated:
            front.append(int(i))
    return sorted(front, key=lambda i: (mu[i], i))


def influence_ratio(coverage: float, size: int, num_experts: int) -> float:
    """B2: (Cov / |C|) / ((1 - Cov) / (E - |C|))."""
    if size == 0 or coverage >= 1:
        return math.inf
    return (coverage / size) / ((1 - coverage) / (num_experts - size))


def coverage_of(
    c: np.ndarray, members: list[int], k: int, denominator: str = "topk_table"
) -> float:
    """B1: committee share of the layer's contribution.

    ``topk_table`` (official code): numerator sum over members of
    c̄_i = sum_{τ: i in top-k(τ)} c_{i,τ} / |T|; denominator the mean over domains of the
    sum of that domain's top-k values. ``all_experts``: c̄ over all domains divided by
    the total contribution of all experts.
    """
    domains, _ = c.shape
    ranks = ranks_with_penalty(c, k)
    in_top = ranks <= k
    if denominator == "topk_table":
        cbar = np.where(in_top, c, 0.0).sum(0) / domains
        denom = np.where(in_top, c, 0.0).sum(1).mean()
    elif denominator == "all_experts":
        cbar = c.mean(0)
        denom = cbar.sum()
    else:
        raise ValueError(f"denominator: expected one of {list(DENOMINATORS)}, got {denominator!r}")
    return float(cbar[members].sum() / denom) if denom > 0 else 0.0


def standing_committee(
    c: np.ndarray, k: int, gamma: float = GAMMA, denominator: str = "topk_table"
) -> Committee:
    """Stage III on one layer: presence, candidates, Pareto committee, coverage, ratio."""
    domains, experts = c.shape
    ranks = ranks_with_penalty(c, k)
    presence = (ranks <= k).mean(0)
    need = math.ceil(domains * gamma)
    candidates = np.flatnonzero((ranks <= k).sum(0) >= need)
    if not len(candidates):  # official code's fallback: the most present experts
        candidates = np.flatnonzero(presence == presence.max())
    mu = ranks.mean(0)
    var = ranks.var(0)  # population variance, as np.var in the official code
    members = pareto_front(mu, var, candidates)
    cov = coverage_of(c, members, k, denominator)
    return Committee(
        members=members,
        mean_rank=[float(mu[i]) for i in members],
        rank_var=[float(var[i]) for i in members],
        presence=presence,
        coverage=cov,
        ratio=influence_ratio(cov, len(members), experts),
    )


TIE_ORDERS = 16  # tie orders tried, besides lowest id first and highest id first


def ties_at_cutoff(c: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per domain: experts whose contribution equals the k-th largest (tied at the k-th
    slot), and how many of them the lowest-id-first order puts inside the top-k. A tie
    decides membership only when some tied experts are left out.

    Neither the paper nor the official code says how ties at the cutoff break (the code
    uses `torch.topk`, whose order for equal values is unspecified)."""
    domains, experts = c.shape
    kth = -np.sort(-c, axis=-1)[:, min(k, experts) - 1]
    tied = np.isclose(c, kth[:, None], rtol=1e-12, atol=0.0)
    inside = (ranks_with_penalty(c, k) <= k) & tied
    return tied.sum(-1), inside.sum(-1)


def committee_under_tie_orders(
    c: np.ndarray, k: int, gamma: float = GAMMA, seed: int = 0
) -> list[list[int]]:
    """The distinct committees that tie orders give: lowest id first (the default),
    highest id first and `TIE_ORDERS` seeded random orders. One committee: stable."""
    experts = c.shape[1]
    rng = np.random.default_rng(seed)
    orders = [np.arange(experts), np.arange(experts)[::-1]]
    orders += [rng.permutation(experts) for _ in range(TIE_ORDERS)]
    found: list[list[int]] = []
    for order in orders:  # relabel experts so that the stable sort breaks ties by `order`
        members = sorted(int(order[i]) for i in standing_committee(c[:, order], k, gamma).members)
        if members not in found:
            found.append(members)
    return found


def cross_domain_jaccard(c: np.ndarray, k: int) -> np.ndarray:
    """B4: Jaccard of the top-k expert sets of every pair of domains (domains, domains)."""
    in_top = ranks_with_penalty(c, k) <= k
    inter = (in_top[:, None] & in_top[None]).sum(-1)
    union = (in_top[:, None] | in_top[None]).sum(-1)
    return inter / np.maximum(union, 1)


def topk_mass(c: np.ndarray, k: int) -> np.ndarray:
    """B6: share of each domain's contribution held by its top-k experts, (domains,)."""
    top = -np.sort(-c, axis=-1)[:, :k].sum(-1)
    total = c.sum(-1)
    return np.divide(top, total, out=np.zeros_like(total), where=total > 0)


def retention(c: np.ndarray, k_ref: int, ks: list[int], gamma: float = GAMMA) -> dict[int, float]:
    """B7: |C_k ∩ C_ref| / |C_ref| when the audit's k changes (the routing does not).

    Values of k above the number of experts are skipped.
    """
    ref = set(standing_committee(c, k_ref, gamma).members)
    out = {}
    for k in (k for k in ks if k < c.shape[1]):
        members = set(standing_committee(c, k, gamma).members)
        out[k] = len(members & ref) / len(ref) if ref else 0.0
    return out
