"""The standing committee across domains (paper (b) Stage III, B1-B5): sums folded in the
map step, and the table reduced from them."""

from __future__ import annotations

import numpy as np
import polars as pl

from analyzer.metrics import committee as cm
from analyzer.metrics import usage as um
from analyzer.params import Params
from analyzer.profiles import token_counts


class CommitteeSums:
    """Per `domain` label, what the committee audit needs of the last prompt tokens, as
    sums: top-k hits, gate-weight sums and extremes, softmax sums (layers, experts) each.
    Contributions are functions of these sums (paper (b) Eq. 2, official code's two
    variants), so folds merge by adding and memory does not grow with the store."""

    def __init__(self) -> None:
        self.sums: dict[str, dict[str, np.ndarray]] = {}

    def add(
        self,
        domain: str,
        ids: np.ndarray,
        weights: np.ndarray | None,
        probs: np.ndarray | None,
        num_experts: int,
    ) -> None:
        """One domain's last tokens: ids and weights (n, layers, k), probs (n, layers, E)."""
        n, layers, _ = ids.shape
        hits = token_counts(ids, num_experts) > 0  # (n, layers, E)
        part = {"n": np.array(n), "hits": hits.sum(0)}
        if weights is not None:
            w = np.zeros(hits.shape)
            np.put_along_axis(w, ids.astype(np.int64), weights.astype(np.float64), -1)
            part["weight_sum"] = w.sum(0)
            part["weight_min"] = np.where(hits, w, np.inf).min(0)
            part["weight_max"] = np.where(hits, w, -np.inf).max(0)
        if probs is not None:
            part["prob_sum"] = probs.astype(np.float64).sum(0)
        self._merge_one(domain, part)

    def merge(self, other: CommitteeSums) -> None:
        for domain, part in other.sums.items():
            self._merge_one(domain, part)

    def _merge_one(self, domain: str, part: dict[str, np.ndarray]) -> None:
        mine = self.sums.get(domain)
        if mine is None:
            self.sums[domain] = {k: np.array(v, copy=True) for k, v in part.items()}
            return
        for key in set(mine) - set(part) | set(part) - set(mine):  # a part without weights
            mine.pop(key, None)
        for key in mine:
            combine = {"weight_min": np.minimum, "weight_max": np.maximum}.get(key, np.add)
            mine[key] = combine(mine[key], part[key])

    def contributions(self, variant: str, num_experts: int) -> tuple[list[str], np.ndarray]:
        """(domains, c) with c of shape (layers, domains, experts)."""
        domains = sorted(self.sums)
        if not domains:
            return [], np.zeros((0, 0, num_experts))
        need = {"frequency": "hits", "frequency_weight": "weight_sum", "softmax": "prob_sum"}
        if variant not in need:
            raise ValueError(
                f"committee_variant: expected softmax, frequency or frequency_weight, "
                f"got {variant!r}"
            )
        if any(need[variant] not in self.sums[d] for d in domains):
            raise ValueError(
                f"committee_variant={variant} needs stored "
                f"{'router logits' if variant == 'softmax' else 'gate weights'}"
            )
        c = []
        for d in domains:
            s = self.sums[d]
            n = float(s["n"])
            if variant == "frequency":
                c.append(s["hits"] / n)
            elif variant == "softmax":
                c.append(s["prob_sum"] / n)
            else:  # `metrics.committee.eci_frequency_weight` from sums: min and max over
                # all samples, an unselected sample counting 0
                hits = s["hits"]
                lo = np.where(hits == n, s["weight_min"], 0.0)
                hi = np.where(hits > 0, s["weight_max"], 0.0)
                c.append(hits / n * (s["weight_sum"] - n * lo) / (hi - lo + 1e-6) / n)
        return domains, np.stack(c, axis=1)


def committee_tables(
    store: str, sums: CommitteeSums, params: Params, top_k: int, num_experts: int
) -> dict[str, pl.DataFrame]:
    """``committee``: the standing committee per layer across `domain` labels (paper (b)
    Stage III, B1-B5), with whether ties at the k-th slot could change it;
    ``committee_ties``: per (layer, domain), the experts tied at the k-th slot."""
    domains, c = sums.contributions(params.committee_variant, num_experts)
    rows, ties = [], []
    for layer in range(c.shape[0]):
        com = cm.standing_committee(c[layer], top_k, params.gamma, params.coverage_denominator)
        alternatives = cm.committee_under_tie_orders(c[layer], top_k, params.gamma)
        tied, inside = cm.ties_at_cutoff(c[layer], top_k)
        ties += [
            {
                "store": store,
                "layer": layer,
                "domain": domain,
                "tied_at_k": int(t),
                "tied_inside": int(i),
                "decides_membership": bool(t > i),
            }
            for domain, t, i in zip(domains, tied, inside, strict=True)
        ]
        jac = cm.cross_domain_jaccard(c[layer], top_k)
        off = jac[~np.eye(len(domains), dtype=bool)] if len(domains) > 1 else np.array([1.0])
        mass = cm.topk_mass(c[layer], top_k)
        sweep = cm.retention(c[layer], top_k, params.retention_ks, params.gamma)
        rows.append(
            {
                "store": store,
                "layer": layer,
                "domains": len(domains),
                "variant": params.committee_variant,
                "members": com.members,
                "size": len(com.members),
                # other orders of experts tied at the k-th slot give other committees
                "stability": "stable" if len(alternatives) == 1 else "tie-dependent",
                "tie_alternatives": len(alternatives),
                "avg_mean_rank": float(np.mean(com.mean_rank)),
                "avg_rank_var": float(np.mean(com.rank_var)),
                "coverage": com.coverage,
                "ratio": com.ratio,
                "gini": float(um.gini(c[layer].mean(0))),
                "topk_mass_mean": float(mass.mean()),
                "topk_mass_std": float(mass.std()),
                **{f"retention_k{k}": v for k, v in sweep.items()},
                "jaccard_min": float(off.min()),
                "jaccard_mean": float(off.mean()),
            }
        )
    return {"committee": pl.DataFrame(rows), "committee_ties": pl.DataFrame(ties)}
