"""Reduce step: tables from per-sequence profiles (pairs, conditions, curves, committees).

Pure functions of profiles; no Ray, no I/O. Each returns a polars DataFrame.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import polars as pl

from analyzer.metrics import committee as cm
from analyzer.metrics import usage as um
from analyzer.metrics.baselines import random_routing
from analyzer.profiles import (
    CHECKPOINTS,
    SCOPES,
    BlockProfiles,
    SequenceProfile,
    counts,
    token_counts,
)

COMMITTEE_VARIANTS = ("softmax", "frequency", "frequency_weight")  # contribution indices


@dataclass(frozen=True)
class Params:
    top_p: float = um.TOP_P  # top-p set mass, paper (a) Fig. 6
    scope: str = "cumulative"  # pair overlap scope: prompt|generated|cumulative|last_token
    max_pairs: int = 20000  # pairs sampled per store (bounded memory and time)
    committee_variant: str = "frequency_weight"  # softmax | frequency | frequency_weight
    gamma: float = cm.GAMMA  # committee presence threshold
    coverage_denominator: str = "topk_table"  # topk_table | all_experts
    retention_ks: tuple[int, ...] = (1, 2, 4, 6, 8, 12, 16)  # audit k sweep (paper (b) B7)
    seed: int = 0

    def __post_init__(self) -> None:
        """Refuse bad parameters before any work, naming the parameter."""
        choices = {
            "scope": SCOPES,
            "committee_variant": COMMITTEE_VARIANTS,
            "coverage_denominator": cm.DENOMINATORS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name}: expected one of {list(allowed)}, got {getattr(self, name)!r}"
                )
        for name in ("top_p", "gamma"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name}: expected a value in (0, 1], got {getattr(self, name)}")
        if self.max_pairs < 1:
            raise ValueError(f"max_pairs: expected at least 1, got {self.max_pairs}")
        if not self.retention_ks or min(self.retention_ks) < 1:
            raise ValueError(f"retention_ks: expected positive integers, got {self.retention_ks}")


def _freq(c: np.ndarray) -> np.ndarray:
    """Counts (non-negative) normalised along the last axis; zeros stay zeros."""
    return c / np.maximum(c.sum(-1, keepdims=True), 1)


def usage_table(store: str, total: np.ndarray) -> pl.DataFrame:
    """Share of top-k slots taken by each expert, per layer, over all rows (`total`:
    the (layers, experts) counts summed over every sequence)."""
    share = _freq(total.astype(np.float64))
    layers, experts = share.shape
    return pl.DataFrame(
        {
            "store": store,
            "layer": np.repeat(np.arange(layers), experts),
            "expert": np.tile(np.arange(experts), layers),
            "share": share.ravel(),
        }
    ).with_columns(pl.col("layer").cast(pl.Int32), pl.col("expert").cast(pl.Int32))


def sequence_stats(
    block: BlockProfiles, params: Params, compiled: bool = False
) -> dict[str, np.ndarray]:
    """Per sequence and layer of a block, (sequences, layers) each: load entropy, router
    confidence (NaN without logits), prompt-vs-rollout usage cosine and top-p Jaccard.

    `compiled`: the same statistics in one compiled pass (`kernels.usage_stats`), for
    processes that have loaded the compiled loops anyway (map tasks)."""
    if compiled:
        from analyzer.kernels import usage_stats

        usage = usage_stats(block.cumulative, block.prompt, params.top_p)
        return {"entropy": usage.pop("entropy"), "confidence": block.confidence, **usage}
    f_all = _freq(block.cumulative)
    f_prompt = _freq(block.prompt)
    f_gen = _freq(block.cumulative - block.prompt)
    return {
        "entropy": um.load_entropy(f_all),
        "confidence": block.confidence,
        "prompt_vs_rollout_cosine": um.cosine(f_prompt, f_gen),
        "prompt_vs_rollout_jaccard": um.top_p_jaccard(f_prompt, f_gen, params.top_p),
    }


def _detach(p: SequenceProfile) -> SequenceProfile:
    """A copy owning its arrays: arrays that arrive from Ray are views of the whole task
    result, and keeping a view would keep all of it alive."""
    p.scope_counts = {k: v.copy() for k, v in p.scope_counts.items()}
    if p.checkpoints is not None:
        p.checkpoints = p.checkpoints.copy()
    for name in ("last_ids", "last_weights", "confidence"):
        if getattr(p, name) is not None:
            setattr(p, name, getattr(p, name).copy())
    if p.last_probs is not None:
        p.last_probs = p.last_probs.astype(np.float32)
    if p.pooled_hidden:
        p.pooled_hidden = {k: v.copy() for k, v in p.pooled_hidden.items()}
    return p


class StoreFold:
    """One store's profiles folded into what the tables need, so that memory does not
    grow with the store: usage sums and committee sums take every sequence, each
    sequence leaves its rows of the `sequences` table, and whole profiles are kept only
    for the `keep` set (pair statistics, rollout curves).

    Map tasks fold their block's profiles (`add`); the driver takes each task's table
    rows out (`pop_sequence_table`, written to disk as they come) and merges the rest
    (`merge`), so it never handles token rows, table rows or whole profiles it drops.
    """

    def __init__(self, store: str, params: Params, keep: set[int] | None = None) -> None:
        self.store, self.params, self.keep = store, params, keep
        self.compiled = False  # per-sequence statistics by the compiled loop (map tasks)
        self.usage: np.ndarray | None = None
        self.ids: list[np.ndarray] = []  # (sequences, 4): sequence, prompt, sample, rows
        self.stats: list[dict[str, np.ndarray]] = []  # name -> (sequences, layers)
        self.profiles: list[SequenceProfile] = []
        self.committee = CommitteeSums()
        self.num_sequences = 0

    def add(self, block: BlockProfiles) -> None:
        """Fold one block's profiles."""
        if not len(block):
            return
        rows = block.sequences
        self.num_sequences += len(rows)
        self._add_usage(block.cumulative.sum(0, dtype=np.int64))
        self.ids.append(
            np.array(
                [
                    (r["sequence_id"], r["prompt_index"], r["sample_index"], r["num_rows"])
                    for r in rows
                ],
                dtype=np.int64,
            )
        )
        self.stats.append(sequence_stats(block, self.params, self.compiled))
        self.profiles.extend(
            block.profile(i)
            for i, r in enumerate(rows)
            if self.keep is None or r["sequence_id"] in self.keep
        )
        domains = np.array([str(r["labels"].get("domain", "")) for r in rows])
        labelled = np.array(["domain" in r["labels"] for r in rows]) & block.has_last
        for domain in np.unique(domains[labelled]):
            members = labelled & (domains == domain)
            probs = None if block.last_probs is None else block.last_probs[members]
            weights = None if block.last_weights is None else block.last_weights[members]
            self.committee.add(
                str(domain),
                block.last_ids[members],
                weights,
                None if probs is None or np.isnan(probs).any() else probs,
                block.num_experts,
            )

    def merge(self, other: StoreFold) -> None:
        """Fold in another fold of the same store (a map task's result)."""
        if other.usage is not None:
            self._add_usage(other.usage)
        self.num_sequences += other.num_sequences
        self.ids.extend(ids.copy() for ids in other.ids)
        self.stats.extend({k: v.copy() for k, v in s.items()} for s in other.stats)
        self.profiles.extend(_detach(p) for p in other.profiles)
        self.committee.merge(other.committee)

    def _add_usage(self, counts_: np.ndarray) -> None:
        self.usage = counts_.copy() if self.usage is None else self.usage + counts_

    def whole(self) -> list[SequenceProfile]:
        """The profiles kept whole, by sequence id."""
        return sorted(self.profiles, key=lambda p: p.sequence_id)

    def pop_sequence_table(self) -> pl.DataFrame:
        """The `sequences` table rows folded so far (one per sequence and layer, by
        sequence), which the fold then forgets."""
        if not self.ids:
            return pl.DataFrame()
        ids = np.concatenate(self.ids)
        layers = self.stats[0]["entropy"].shape[1]
        table = pl.DataFrame(
            {
                "store": self.store,
                "sequence_id": np.repeat(ids[:, 0], layers),
                "prompt_index": np.repeat(ids[:, 1], layers),
                "sample_index": np.repeat(ids[:, 2], layers),
                "layer": np.tile(np.arange(layers), len(ids)),
                "rows": np.repeat(ids[:, 3], layers),
                **{
                    name: np.concatenate([s[name] for s in self.stats]).ravel().astype(np.float64)
                    for name in self.stats[0]
                },
            }
        )
        self.ids, self.stats = [], []
        return table.with_columns(pl.col("confidence").fill_nan(None)).sort("sequence_id", "layer")


def condition_keys(
    labels: dict, prompt_index: int, sample_index: int
) -> tuple[object, object, object]:
    """(question, author, seed) of a sequence; defaults: prompt index, none, sample index."""
    return (
        labels.get("question", prompt_index),
        labels.get("author"),
        labels.get("seed", sample_index),
    )


def _keys(p: SequenceProfile) -> tuple[object, object, object]:
    return condition_keys(p.labels, p.prompt_index, p.sample_index)


def condition(a: tuple, b: tuple) -> str:
    """Relation of two sequences by their (question, author, seed) keys (paper (a) A7)."""
    (qa, aa, sa), (qb, ab, sb) = a, b
    same_q, same_a = qa == qb, aa == ab
    if same_q and same_a:
        return "same question, same author, other seed" if sa != sb else "identical keys"
    if same_q:
        return "same question, other author"
    if same_a and aa is not None:
        return "same author, other question"
    return "other question, other author" if aa is not None else "other question"


def _pairs(n: int, max_pairs: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    total = n * (n - 1) // 2
    if total <= max_pairs:
        return list(itertools.combinations(range(n), 2))
    chosen = set()
    while len(chosen) < max_pairs:
        i, j = sorted(rng.choice(n, 2, replace=False).tolist())
        chosen.add((i, j))
    return sorted(chosen)


def condition_table(
    store: str, profiles: list[SequenceProfile], params: Params, top_k: int
) -> pl.DataFrame:
    """Mean top-p Jaccard and usage cosine per (condition, layer), with two chance levels.

    ``label shuffle``: the same pairs with the (question, author, seed) keys permuted
    across sequences. ``random routing``: pairs of sequences of the same lengths routed
    uniformly at random.
    """
    rng = np.random.default_rng(params.seed)
    f = np.stack([_freq(p.scope_counts[params.scope].astype(np.float64)) for p in profiles])
    keys = [_keys(p) for p in profiles]
    shuffled = [keys[i] for i in rng.permutation(len(keys))]
    rows = []
    pairs = _pairs(len(profiles), params.max_pairs, rng)
    if not pairs:
        return pl.DataFrame()
    ia, ib = np.array(pairs).T
    jac = um.top_p_jaccard(f[ia], f[ib], params.top_p)  # (pairs, layers)
    cos = um.cosine(f[ia], f[ib])
    for label, key_list in (("observed", keys), ("label shuffle", shuffled)):
        conds = np.array([condition(key_list[i], key_list[j]) for i, j in pairs])
        for cond in np.unique(conds):
            sel = conds == cond
            for layer in range(f.shape[1]):
                rows.append(
                    {
                        "store": store,
                        "baseline": label,
                        "condition": str(cond),
                        "layer": layer,
                        "pairs": int(sel.sum()),
                        "jaccard": float(jac[sel, layer].mean()),
                        "cosine": float(cos[sel, layer].mean()),
                    }
                )
    # random routing: same sequence lengths, uniform routing
    layers, experts = f.shape[1], f.shape[2]
    sample = pairs[: min(len(pairs), 500)]
    rj, rc = [], []
    for i, j in sample:
        fa = _freq(
            counts(
                random_routing(max(profiles[i].num_rows, 1), layers, experts, top_k, rng), experts
            ).astype(np.float64)
        )
        fb = _freq(
            counts(
                random_routing(max(profiles[j].num_rows, 1), layers, experts, top_k, rng), experts
            ).astype(np.float64)
        )
        rj.append(um.top_p_jaccard(fa, fb, params.top_p))
        rc.append(um.cosine(fa, fb))
    for layer in range(layers):
        rows.append(
            {
                "store": store,
                "baseline": "random routing",
                "condition": "any",
                "layer": layer,
                "pairs": len(sample),
                "jaccard": float(np.mean([r[layer] for r in rj])),
                "cosine": float(np.mean([r[layer] for r in rc])),
            }
        )
    return pl.DataFrame(rows)


def _windows(p: SequenceProfile, scope: str) -> np.ndarray:
    """Checkpoint window counts of one sequence: cumulative, or without the prompt."""
    assert p.checkpoints is not None
    return p.checkpoints if scope == "cumulative" else p.checkpoints - p.scope_counts["prompt"]


def rollout_curve_table(
    store: str, profiles: list[SequenceProfile], params: Params
) -> pl.DataFrame:
    """Usage similarity of sample pairs through the rollout (paper (a) A6), both scopes.

    Pairs: samples of the same prompt, and (as contrast) first samples of different
    prompts. Checkpoint 0 of the cumulative scope is the prompt boundary.
    """
    rng = np.random.default_rng(params.seed)
    by_prompt: dict[int, list[int]] = {}
    for i, p in enumerate(profiles):
        if p.checkpoints is not None:
            by_prompt.setdefault(p.prompt_index, []).append(i)
    same = [pair for idx in by_prompt.values() for pair in itertools.combinations(idx, 2)]
    firsts = [idx[0] for idx in by_prompt.values()]
    other = list(itertools.combinations(firsts, 2))
    rows = []
    for relation, pairs in (("same prompt", same), ("other prompt", other)):
        if len(pairs) > params.max_pairs:
            pairs = [pairs[i] for i in rng.choice(len(pairs), params.max_pairs, replace=False)]
        for scope in ("cumulative", "generated"):
            if not pairs:
                continue
            a = np.stack([_windows(profiles[i], scope) for i, _ in pairs])
            b = np.stack([_windows(profiles[j], scope) for _, j in pairs])
            fa, fb = _freq(a.astype(np.float64)), _freq(b.astype(np.float64))
            cos = um.cosine(fa, fb).mean(0)  # (checkpoints, layers)
            jac = um.top_p_jaccard(fa, fb, params.top_p).mean(0)
            longest = max(profiles[i].num_rows - profiles[i].prompt_len for i, _ in pairs)
            for ci, g in enumerate(CHECKPOINTS):
                if (scope == "generated" and g == 0) or (ci > 0 and CHECKPOINTS[ci - 1] >= longest):
                    continue  # windows past the longest rollout repeat the last point
                for layer in range(cos.shape[1]):
                    rows.append(
                        {
                            "store": store,
                            "relation": relation,
                            "scope": scope,
                            "rollout_tokens": g,
                            "layer": layer,
                            "pairs": len(pairs),
                            "cosine": float(cos[ci, layer]),
                            "jaccard": float(jac[ci, layer]),
                        }
                    )
    return pl.DataFrame(rows)


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
            else:  # eci_frequency_weight from sums: sum over selected of (w - lo) / span
                lo = np.where(s["hits"] > 0, s["weight_min"], 0.0)
                span = np.where(s["hits"] > 0, s["weight_max"] - lo, 0.0) + 1e-6
                c.append(s["hits"] / n * (s["weight_sum"] - s["hits"] * lo) / span / n)
        return domains, np.stack(c, axis=1)


def committee_table(
    store: str, sums: CommitteeSums, params: Params, top_k: int, num_experts: int
) -> pl.DataFrame:
    """Standing committee per layer across `domain` labels (paper (b) Stage III, B1-B5)."""
    domains, c = sums.contributions(params.committee_variant, num_experts)
    rows = []
    for layer in range(c.shape[0]):
        com = cm.standing_committee(c[layer], top_k, params.gamma, params.coverage_denominator)
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
    return pl.DataFrame(rows)


def geometry_tables(
    store_url: str,
    store: str,
    profiles: list[SequenceProfile],
    params: Params,
    sample_tokens: int = 1024,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Paper (a) A8-A11 per MoE layer with captured router inputs: (summary, triangle).

    A8 compares pooled router inputs of sequence pairs with their usage similarity
    (the correlation across pairs); A9-A11 use the first `sample_tokens` rows of the
    store. The triangle table holds sampled (hidden distance, logit distance) pairs.
    """
    from analyzer.metrics import geometry as gm
    from capture_server.store import open_store

    routing = open_store(store_url)
    layers = sorted(
        int(n.rsplit("_", 1)[1]) for n in routing.array_names if n.startswith("hidden_states_")
    )
    if not layers:
        return pl.DataFrame(), pl.DataFrame()
    n = min(sample_tokens, routing.num_tokens)
    names = ("topk_ids", "token_ids", "router_logits", *(f"hidden_states_{x}" for x in layers))
    rows_ = routing.read_rows(0, n, names)
    weights = routing.router_weights()["router_weights"]
    same_token = gm.same_token_overlap(rows_["token_ids"], rows_["topk_ids"])
    rng = np.random.default_rng(params.seed)
    pairs = _pairs(len(profiles), min(params.max_pairs, 2000), rng)
    out, triangle_rows = [], []
    for layer in layers:
        h = rows_[f"hidden_states_{layer}"].astype(np.float64)
        if "router_logits" in rows_:
            z = rows_["router_logits"][:, layer].astype(np.float64)
        else:  # the router is linear: its logits follow from its input and weights
            z = h @ weights[layer].T.astype(np.float64)
        lip = gm.lipschitz_ratio(h[:256], z[:256], weights[layer])
        energy = gm.shared_direction(h, weights[layer])
        dh, dz = gm.triangle(h[:256], z[:256])
        slope = float((dz / np.maximum(dh, 1e-12)).max()) if len(dh) else 0.0
        keep = rng.choice(len(dh), min(len(dh), 3000), replace=False)
        triangle_rows.append(
            pl.DataFrame(
                {
                    "store": store,
                    "layer": layer,
                    "hidden_distance": dh[keep],
                    "logit_distance": dz[keep],
                }
            )
        )
        pooled, usage_cos = [], []
        mean = np.mean([p.pooled_hidden[layer] for p in profiles if p.pooled_hidden], axis=0)
        for i, j in pairs:
            a, b = profiles[i], profiles[j]
            if a.pooled_hidden and b.pooled_hidden:
                ha = a.pooled_hidden[layer][None]
                hb = b.pooled_hidden[layer][None]
                pooled.append(gm.pooled_similarity(ha, hb, mean))
                fa = _freq(a.scope_counts[params.scope][layer].astype(np.float64))
                fb = _freq(b.scope_counts[params.scope][layer].astype(np.float64))
                usage_cos.append(float(um.cosine(fa, fb)))
        corr = float(np.corrcoef(pooled, usage_cos)[0, 1]) if len(pooled) > 2 else float("nan")
        out.append(
            {
                "store": store,
                "layer": layer,
                "tokens": n,
                "lipschitz_empirical": lip["empirical"],
                "router_operator_norm": lip["operator_norm"],
                "lipschitz_fraction": lip["fraction"],
                "triangle_max_slope": slope,
                "hidden_energy_v1": energy["hidden_energy"],
                "router_energy_v1": energy["router_energy"],
                "retained_logit_energy": energy["retained_logit_energy"],
                "same_token_overlap": float(same_token[layer]),
                "pooled_vs_usage_corr": corr,
                "pairs": len(pooled),
            }
        )
    return pl.DataFrame(out), pl.concat(triangle_rows)


def alignment_key(
    labels: dict, prompt_index: int, sample_index: int
) -> tuple[object, object, object, int]:
    """What makes two stores' sequences "the same": (question, author, seed) labels (or
    the prompt index) and the sample index. Stores of different models that scored or
    sampled the same prompt list line up on it."""
    return (*condition_keys(labels, prompt_index, sample_index), sample_index)


def matched_layer(layer: int, layers_a: int, layers_b: int) -> int:
    """Layer of model B at the same relative depth as `layer` of model A."""
    if layers_a == layers_b or layers_a == 1:
        return layer if layers_a == layers_b else 0
    return round(layer * (layers_b - 1) / (layers_a - 1))


def alignment_table(profiles: dict[str, list[SequenceProfile]], params: Params) -> pl.DataFrame:
    """Side by side across stores (models): do they find the same sequence pairs alike?

    For each pair of stores, sequences are aligned by `alignment_key` (keys present in
    both only); sampled pairs of aligned sequences get a top-p Jaccard in each store,
    per layer (model B's layer matched by relative depth). A row reports both means and
    their Pearson correlation over the pairs: expert ids are model-specific, but a
    correlation near 1 says both models group the sequences the same way.
    """
    rng = np.random.default_rng(params.seed)
    rows = []
    for (name_a, prof_a), (name_b, prof_b) in itertools.combinations(profiles.items(), 2):
        by_key_a = {alignment_key(p.labels, p.prompt_index, p.sample_index): p for p in prof_a}
        by_key_b = {alignment_key(p.labels, p.prompt_index, p.sample_index): p for p in prof_b}
        keys = [k for k in by_key_a if k in by_key_b]
        pairs = _pairs(len(keys), params.max_pairs, rng)
        if not pairs:
            continue
        fa = np.stack([_freq(by_key_a[k].scope_counts[params.scope].astype(float)) for k in keys])
        fb = np.stack([_freq(by_key_b[k].scope_counts[params.scope].astype(float)) for k in keys])
        ia, ib = np.array(pairs).T
        jac_a = um.top_p_jaccard(fa[ia], fa[ib], params.top_p)  # (pairs, layers_a)
        jac_b = um.top_p_jaccard(fb[ia], fb[ib], params.top_p)
        layers_a, layers_b = fa.shape[1], fb.shape[1]
        for layer in range(layers_a):
            lb = matched_layer(layer, layers_a, layers_b)
            x, y = jac_a[:, layer], jac_b[:, lb]
            r = float(np.corrcoef(x, y)[0, 1]) if x.std() > 0 and y.std() > 0 else None
            rows.append(
                {
                    "store_a": name_a,
                    "store_b": name_b,
                    "layer_a": layer,
                    "layer_b": lb,
                    "aligned_sequences": len(keys),
                    "pairs": len(pairs),
                    "jaccard_a": float(x.mean()),
                    "jaccard_b": float(y.mean()),
                    "pearson": r,
                }
            )
    return pl.DataFrame(rows)
