"""Across stores (models): do they find the same sequence pairs alike?"""

from __future__ import annotations

import itertools

import numpy as np
import polars as pl

from analyzer.metrics import bootstrap as bs
from analyzer.metrics import usage as um
from analyzer.params import Params
from analyzer.profiles import SequenceProfile
from analyzer.tables.common import frequencies, sample_pairs
from analyzer.tables.conditions import condition_keys


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
    correlation near 1 says both models group the sequences the same way. The
    correlation has a 95% interval (questions resampled) and a chance level (model B's
    pair values shuffled across pairs).
    """
    rng = np.random.default_rng(params.seed)
    rows = []
    for (name_a, prof_a), (name_b, prof_b) in itertools.combinations(profiles.items(), 2):
        by_key_a = {alignment_key(p.labels, p.prompt_index, p.sample_index): p for p in prof_a}
        by_key_b = {alignment_key(p.labels, p.prompt_index, p.sample_index): p for p in prof_b}
        keys = [k for k in by_key_a if k in by_key_b]
        pairs = sample_pairs(len(keys), params.max_pairs, rng)
        if not pairs:
            continue
        fa = np.stack(
            [frequencies(by_key_a[k].scope_counts[params.scope].astype(float)) for k in keys]
        )
        fb = np.stack(
            [frequencies(by_key_b[k].scope_counts[params.scope].astype(float)) for k in keys]
        )
        ia, ib = np.array(pairs).T
        jac_a = um.top_p_jaccard(fa[ia], fa[ib], params.top_p)  # (pairs, layers_a)
        jac_b = um.top_p_jaccard(fb[ia], fb[ib], params.top_p)
        layers_a, layers_b = fa.shape[1], fb.shape[1]
        questions = {q: n for n, q in enumerate(dict.fromkeys(str(k[0]) for k in keys))}
        unit = np.array([questions[str(k[0])] for k in keys])
        drawn = bs.unit_multiplicities(len(questions), bs.REPLICATES, rng)
        weights = bs.pair_weights(drawn, unit[ia], unit[ib])
        matched = [matched_layer(layer, layers_a, layers_b) for layer in range(layers_a)]
        lo, hi = bs.interval(bs.weighted_correlations(jac_a, jac_b[:, matched], weights))
        shuffled = jac_b[rng.permutation(len(pairs))][:, matched]
        chance = bs.weighted_correlations(jac_a, shuffled, np.ones((1, len(pairs))))[0]
        for layer, lb in enumerate(matched):
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
                    "pearson_lo": None if r is None else float(lo[layer]),
                    "pearson_hi": None if r is None else float(hi[layer]),
                    "pearson_shuffled": None if r is None else float(chance[layer]),
                }
            )
    return pl.DataFrame(rows)
