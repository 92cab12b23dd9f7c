"""The standing committee across domains (paper (b) Stage III, B1-B5): each prompt's last
token folded in the map step, and the table, with intervals and chance levels, reduced
from them."""

from __future__ import annotations

import numpy as np
import polars as pl

from analyzer.metrics import bootstrap as bs
from analyzer.metrics import committee as cm
from analyzer.metrics import usage as um
from analyzer.params import Params
from analyzer.profiles import token_counts
from analyzer.tables.conditions import ALL_LAYERS

COMMITTEE_REPLICATES = 200  # bootstrap replicates: each re-runs the audit on every layer


class CommitteeRows:
    """Per `domain` label, the last prompt token of each prompt: top-k ids and gate
    weights (layers, k) and full-softmax probabilities (layers, experts) when captured.

    Rows, not sums, so that the audit can be re-run on prompts drawn with replacement
    (the bootstrap) and with labels or experts permuted (the chance levels). Memory grows
    with prompts, not tokens: layers x (k x 6 + experts x 4) bytes per prompt."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, np.ndarray]] = {}
        self._dense: dict[str, dict[str, np.ndarray]] = {}  # per domain: hits, weights

    def __getstate__(self) -> dict:  # folds travel between Ray tasks without the cache
        return {"rows": self.rows, "_dense": {}}

    def add(
        self,
        domain: str,
        ids: np.ndarray,
        weights: np.ndarray | None,
        probs: np.ndarray | None,
    ) -> None:
        """One domain's last tokens: ids and weights (n, layers, k), probs (n, layers, E)."""
        part = {"ids": np.asarray(ids)}
        if weights is not None:
            part["weights"] = np.asarray(weights, np.float32)
        if probs is not None:
            part["probs"] = np.asarray(probs, np.float32)
        self._merge_one(domain, part)

    def merge(self, other: CommitteeRows) -> None:
        for domain, part in other.rows.items():
            self._merge_one(domain, part)

    def _merge_one(self, domain: str, part: dict[str, np.ndarray]) -> None:
        self._dense.pop(domain, None)
        mine = self.rows.get(domain)
        if mine is None:
            self.rows[domain] = {k: np.array(v, copy=True) for k, v in part.items()}
            return
        for key in set(mine) ^ set(part):  # an array one part lacks is lacking
            mine.pop(key, None)
        for key in mine:
            mine[key] = np.concatenate([mine[key], part[key]])

    def count(self, domain: str) -> int:
        """Prompts of `domain`."""
        return len(self.rows[domain]["ids"])

    def contributions(
        self,
        variant: str,
        num_experts: int,
        draws: dict[str, np.ndarray] | None = None,
    ) -> tuple[list[str], np.ndarray]:
        """(domains, c) with c of shape (layers, domains, experts).

        `draws`: per domain, how often each prompt is drawn (a bootstrap resample);
        without it each prompt counts once."""
        domains = sorted(self.rows)
        if not domains:
            return [], np.zeros((0, 0, num_experts))
        need = {"frequency": "ids", "frequency_weight": "weights", "softmax": "probs"}
        if variant not in need:
            raise ValueError(
                f"committee_variant: expected softmax, frequency or frequency_weight, "
                f"got {variant!r}"
            )
        if any(need[variant] not in self.rows[d] for d in domains):
            raise ValueError(
                f"committee_variant={variant} needs stored "
                f"{'router logits' if variant == 'softmax' else 'gate weights'}"
            )
        c = []
        for d in domains:
            times = np.ones(self.count(d)) if draws is None else draws[d]
            c.append(self._contribution(d, variant, num_experts, times))
        return domains, np.stack(c, axis=1)

    def _contribution(
        self, domain: str, variant: str, num_experts: int, times: np.ndarray
    ) -> np.ndarray:
        """(layers, experts) contribution index of one domain's prompts, prompt i counted
        `times[i]` times: `metrics.committee.eci_*` with multiplicities (equal to them
        when every prompt counts once, `test_committee_rows_give_the_contribution_indices`;
        and on repeated rows, `test_resampled_contributions_equal_...`)."""
        n = times.sum()
        if variant == "softmax":
            return np.tensordot(times, self.rows[domain]["probs"].astype(np.float64), 1) / n
        dense = self._dense_rows(domain, num_experts)
        frequency = np.tensordot(times, dense["hits"], 1) / n
        if variant == "frequency":
            return frequency
        # the official code's min-max normalisation over all drawn samples, an unselected
        # sample counting 0 (`metrics.committee.eci_frequency_weight`)
        w = dense["weights"]
        drawn = times > 0
        lo, hi = w[drawn].min(0), w[drawn].max(0)
        # sum_i t_i (w_i - lo) / (hi - lo): one weighted sum, then the normalisation
        norm = (np.tensordot(times, w, 1) - n * lo) / (hi - lo + 1e-6)
        return frequency * norm / n

    def _dense_rows(self, domain: str, num_experts: int) -> dict[str, np.ndarray]:
        """(prompts, layers, experts) top-k hits and gate weights (0 where unselected),
        built once per domain: every bootstrap replicate reuses them."""
        if domain not in self._dense:
            rows = self.rows[domain]
            hits = token_counts(rows["ids"], num_experts) > 0
            dense = {"hits": hits.astype(np.float64)}
            if "weights" in rows:
                w = np.zeros(hits.shape)
                ids = rows["ids"].astype(np.int64)
                np.put_along_axis(w, ids, rows["weights"].astype(np.float64), -1)
                dense["weights"] = w
            self._dense[domain] = dense
        return self._dense[domain]


AUDITED = ("coverage", "ratio", "size", "gini", "jaccard_mean")
"""Statistics of the audit that get intervals and chance levels, in `_audit`'s order."""


def _audit(c: np.ndarray, top_k: int, params: Params) -> np.ndarray:
    """(layers, len(AUDITED)): committee coverage, influence ratio and size (B1-B3),
    Gini of the mean contribution (B5) and mean cross-domain Jaccard (B4) per layer."""
    out = np.empty((c.shape[0], len(AUDITED)))
    for layer in range(c.shape[0]):
        com = cm.standing_committee(c[layer], top_k, params.gamma, params.coverage_denominator)
        jac = cm.cross_domain_jaccard(c[layer], top_k)
        off = jac[~np.eye(len(jac), dtype=bool)] if len(jac) > 1 else np.array([1.0])
        gini = um.gini(c[layer].mean(0))
        out[layer] = com.coverage, com.ratio, len(com.members), gini, off.mean()
    return out


def replicated_audits(
    rows: CommitteeRows, params: Params, top_k: int, num_experts: int
) -> np.ndarray:
    """(replicates, layers, len(AUDITED)): the audit re-run on each domain's prompts
    resampled with replacement (the audit's sampled unit; domains are the design and
    stay fixed)."""
    rng = np.random.default_rng(params.seed)
    domains = sorted(rows.rows)
    drawn = {d: bs.unit_multiplicities(rows.count(d), COMMITTEE_REPLICATES, rng) for d in domains}
    replicated = []
    for r in range(COMMITTEE_REPLICATES):
        draws = {d: drawn[d][r] for d in domains}
        _, c = rows.contributions(params.committee_variant, num_experts, draws)
        replicated.append(_audit(c, top_k, params))
    return np.stack(replicated)


def _over_layers(audit: np.ndarray) -> np.ndarray:
    """(..., layers, len(AUDITED)) -> (..., len(AUDITED)): means over layers, but the
    ratio's median (a layer whose committee takes everything has an infinite one)."""
    means = audit.mean(-2)
    means[..., AUDITED.index("ratio")] = np.median(audit[..., AUDITED.index("ratio")], -1)
    return means


def _with_intervals(
    point: np.ndarray, lo: np.ndarray, hi: np.ndarray, random: np.ndarray, shuffled: np.ndarray
) -> dict[str, float]:
    """Columns of one row: each audited statistic, its interval and chance levels."""
    row = {}
    for i, name in enumerate(AUDITED):
        row |= {name: float(point[i]), f"{name}_lo": float(lo[i]), f"{name}_hi": float(hi[i])}
        row[f"{name}_random_routing"] = float(random[i])
        row[f"{name}_label_shuffle"] = float(shuffled[i])
    return row


def random_routing_rows(
    rows: CommitteeRows, num_experts: int, rng: np.random.Generator
) -> CommitteeRows:
    """The chance level: each prompt's expert labels permuted at random in every layer,
    its gate weights and probabilities kept. No expert is then preferred by any domain."""
    chance = CommitteeRows()
    for domain, part in rows.rows.items():
        n, layers, _ = part["ids"].shape
        perm = np.argsort(rng.random((n, layers, num_experts)), axis=-1)  # old -> new label
        moved = {"ids": np.take_along_axis(perm, part["ids"].astype(np.int64), -1)}
        if "weights" in part:
            moved["weights"] = part["weights"]
        if "probs" in part:
            probs = np.empty_like(part["probs"])
            np.put_along_axis(probs, perm, part["probs"], -1)
            moved["probs"] = probs
        chance.rows[domain] = moved
    return chance


def label_shuffled_rows(rows: CommitteeRows, rng: np.random.Generator) -> CommitteeRows:
    """The other chance level: `domain` labels permuted across prompts (domain sizes
    kept), so that every domain draws from the same routing."""
    domains = sorted(rows.rows)
    arrays = set.intersection(*(set(rows.rows[d]) for d in domains))
    pooled = {k: np.concatenate([rows.rows[d][k] for d in domains]) for k in arrays}
    order = rng.permutation(len(pooled["ids"]))
    shuffled, start = CommitteeRows(), 0
    for d in domains:
        take = order[start : start + rows.count(d)]
        shuffled.rows[d] = {k: v[take] for k, v in pooled.items()}
        start += len(take)
    return shuffled


CHANCE_DRAWS = 8  # random draws of each chance level; the table gives their median


def _chance(
    rows: CommitteeRows,
    make: str,
    params: Params,
    top_k: int,
    num_experts: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """(layers, len(AUDITED)): median of each audited statistic over `CHANCE_DRAWS`
    draws of a chance level (``random routing`` or ``label shuffle``); the median, as a
    draw whose committee takes everything has an infinite ratio."""
    audits = []
    for _ in range(CHANCE_DRAWS):
        if make == "random routing":
            drawn = random_routing_rows(rows, num_experts, rng)
        else:
            drawn = label_shuffled_rows(rows, rng)
        _, c = drawn.contributions(params.committee_variant, num_experts)
        audits.append(_audit(c, top_k, params))
    return np.median(audits, axis=0)


def committee_tables(
    store: str, rows: CommitteeRows, params: Params, top_k: int, num_experts: int
) -> dict[str, pl.DataFrame]:
    """``committee``: the standing committee per layer across `domain` labels (paper (b)
    Stage III, B1-B5), with 95% intervals of coverage, ratio, size, Gini and mean
    cross-domain Jaccard (prompts resampled within domains), their chance levels, and
    whether ties at the k-th slot could change it; a row with `layer` = `ALL_LAYERS`
    holds means over layers (the ratio's median). ``committee_ties``: per (layer,
    domain), the experts tied at the k-th slot."""
    domains, c = rows.contributions(params.committee_variant, num_experts)
    if not domains:
        return {"committee": pl.DataFrame(), "committee_ties": pl.DataFrame()}
    replicated = replicated_audits(rows, params, top_k, num_experts)
    rng = np.random.default_rng(params.seed + 1)
    random = _chance(rows, "random routing", params, top_k, num_experts, rng)
    shuffled = _chance(rows, "label shuffle", params, top_k, num_experts, rng)
    with np.errstate(invalid="ignore"):  # an infinite ratio (coverage 1) has no spread
        lo, hi = bs.interval(replicated)
        all_lo, all_hi = bs.interval(_over_layers(replicated))
    out, ties = [], []
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
        point = _audit(c[layer : layer + 1], top_k, params)[0]
        out.append(
            {
                "store": store,
                "layer": layer,
                "domains": len(domains),
                "prompts": sum(rows.count(d) for d in domains),
                "variant": params.committee_variant,
                "members": com.members,
                # other orders of experts tied at the k-th slot give other committees
                "stability": "stable" if len(alternatives) == 1 else "tie-dependent",
                "tie_alternatives": len(alternatives),
                "avg_mean_rank": float(np.mean(com.mean_rank)),
                "avg_rank_var": float(np.mean(com.rank_var)),
                **_with_intervals(point, lo[layer], hi[layer], random[layer], shuffled[layer]),
                "topk_mass_mean": float(mass.mean()),
                "topk_mass_std": float(mass.std()),
                **{f"retention_k{k}": v for k, v in sweep.items()},
                "jaccard_min": float(off.min()),
            }
        )
    point = _over_layers(_audit(c, top_k, params))
    out.append(
        {
            "store": store,
            "layer": ALL_LAYERS,
            "domains": len(domains),
            "prompts": out[0]["prompts"],
            "variant": params.committee_variant,
            **_with_intervals(point, all_lo, all_hi, _over_layers(random), _over_layers(shuffled)),
            **{
                f"retention_k{k}": float(np.mean([r[f"retention_k{k}"] for r in out]))
                for k in params.retention_ks
                if f"retention_k{k}" in out[0]
            },
        }
    )
    return {
        "committee": pl.DataFrame(out, infer_schema_length=None),
        "committee_ties": pl.DataFrame(ties),
    }
