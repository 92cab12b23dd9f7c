"""Pair overlap by label condition, with chance levels and intervals (paper (a) A3, A7)."""

from __future__ import annotations

import numpy as np
import polars as pl

from analyzer.metrics import bootstrap as bs
from analyzer.metrics import usage as um
from analyzer.metrics.baselines import random_routing
from analyzer.params import Params
from analyzer.profiles import SequenceProfile, counts
from analyzer.tables.common import frequencies, sample_pairs


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


def _with_intervals(
    row: dict, jac: np.ndarray, cos: np.ndarray, weights: np.ndarray, layer: int
) -> dict:
    """`row` with the means of one layer and their 95% intervals, from pair values
    (pairs, layers) and the pairs' bootstrap weights (replicates, pairs)."""
    j_lo, j_hi = bs.interval(bs.weighted_means(jac[:, layer], weights))
    c_lo, c_hi = bs.interval(bs.weighted_means(cos[:, layer], weights))
    return {
        **row,
        "layer": layer,
        "jaccard": float(jac[:, layer].mean()),
        "jaccard_lo": float(j_lo),
        "jaccard_hi": float(j_hi),
        "cosine": float(cos[:, layer].mean()),
        "cosine_lo": float(c_lo),
        "cosine_hi": float(c_hi),
    }


def condition_table(
    store: str, profiles: list[SequenceProfile], params: Params, top_k: int
) -> pl.DataFrame:
    """Mean top-p Jaccard and usage cosine per (condition, layer), with two chance levels
    and 95% intervals from resampling questions (`metrics.bootstrap`).

    ``label shuffle``: the same pairs with the (question, author, seed) keys permuted
    across sequences. ``random routing``: pairs of sequences of the same lengths routed
    uniformly at random.
    """
    rng = np.random.default_rng(params.seed)
    f = np.stack([frequencies(p.scope_counts[params.scope].astype(np.float64)) for p in profiles])
    keys = [_keys(p) for p in profiles]
    shuffled = [keys[i] for i in rng.permutation(len(keys))]
    rows = []
    pairs = sample_pairs(len(profiles), params.max_pairs, rng)
    if not pairs:
        return pl.DataFrame()
    ia, ib = np.array(pairs).T
    jac = um.top_p_jaccard(f[ia], f[ib], params.top_p)  # (pairs, layers)
    cos = um.cosine(f[ia], f[ib])
    # the sampled unit is the question: its sequences' pairs are resampled together
    questions = {q: n for n, q in enumerate(dict.fromkeys(str(k[0]) for k in keys))}
    unit = np.array([questions[str(k[0])] for k in keys])
    drawn = bs.unit_multiplicities(len(questions), bs.REPLICATES, rng)
    weights = bs.pair_weights(drawn, unit[ia], unit[ib])
    for label, key_list in (("observed", keys), ("label shuffle", shuffled)):
        conds = np.array([condition(key_list[i], key_list[j]) for i, j in pairs])
        for cond in np.unique(conds):
            sel = conds == cond
            base = {
                "store": store,
                "baseline": label,
                "condition": str(cond),
                "pairs": int(sel.sum()),
                "units": len(np.unique(np.concatenate([unit[ia[sel]], unit[ib[sel]]]))),
            }
            for layer in range(f.shape[1]):
                rows.append(_with_intervals(base, jac[sel], cos[sel], weights[:, sel], layer))
            rows.append(_layer_mean(base, jac[sel], cos[sel], weights[:, sel]))
    # random routing: same sequence lengths, uniform routing
    layers, experts = f.shape[1], f.shape[2]
    sample = pairs[: min(len(pairs), 500)]
    rj, rc = [], []
    for i, j in sample:
        fa = frequencies(
            counts(
                random_routing(max(profiles[i].num_rows, 1), layers, experts, top_k, rng), experts
            ).astype(np.float64)
        )
        fb = frequencies(
            counts(
                random_routing(max(profiles[j].num_rows, 1), layers, experts, top_k, rng), experts
            ).astype(np.float64)
        )
        rj.append(um.top_p_jaccard(fa, fb, params.top_p))
        rc.append(um.cosine(fa, fb))
    base = {
        "store": store,
        "baseline": "random routing",
        "condition": "any",
        "pairs": len(sample),
        "units": len(questions),
    }
    sa, sb = np.array(sample).T
    random_weights = bs.pair_weights(drawn, unit[sa], unit[sb])
    for layer in range(layers):
        rows.append(_with_intervals(base, np.array(rj), np.array(rc), random_weights, layer))
    rows.append(_layer_mean(base, np.array(rj), np.array(rc), random_weights))
    return pl.DataFrame(rows)


ALL_LAYERS = -1
"""`layer` of the rows that average a pair's values over all layers first."""


def _layer_mean(row: dict, jac: np.ndarray, cos: np.ndarray, weights: np.ndarray) -> dict:
    mean = _with_intervals(row, jac.mean(1, keepdims=True), cos.mean(1, keepdims=True), weights, 0)
    return {**mean, "layer": ALL_LAYERS}
