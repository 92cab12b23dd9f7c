"""Usage similarity of sample pairs through growing rollout windows (paper (a) A6)."""

from __future__ import annotations

import itertools

import numpy as np
import polars as pl

from analyzer.metrics import bootstrap as bs
from analyzer.metrics import usage as um
from analyzer.params import Params
from analyzer.profiles import CHECKPOINTS, SequenceProfile
from analyzer.tables.common import frequencies


def _windows(p: SequenceProfile, scope: str) -> np.ndarray:
    """Checkpoint window counts of one sequence: cumulative, or without the prompt."""
    assert p.checkpoints is not None
    return p.checkpoints if scope == "cumulative" else p.checkpoints - p.scope_counts["prompt"]


def rollout_curve_table(
    store: str, profiles: list[SequenceProfile], params: Params
) -> pl.DataFrame:
    """Usage similarity of sample pairs through the rollout (paper (a) A6), both scopes,
    with 95% intervals from resampling prompts.

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
    prompts = {p: n for n, p in enumerate(by_prompt)}
    drawn = bs.unit_multiplicities(len(prompts), bs.REPLICATES, rng)
    rows = []
    for relation, pairs in (("same prompt", same), ("other prompt", other)):
        if len(pairs) > params.max_pairs:
            pairs = [pairs[i] for i in rng.choice(len(pairs), params.max_pairs, replace=False)]
        for scope in ("cumulative", "generated"):
            if not pairs:
                continue
            a = np.stack([_windows(profiles[i], scope) for i, _ in pairs])
            b = np.stack([_windows(profiles[j], scope) for _, j in pairs])
            fa, fb = frequencies(a.astype(np.float64)), frequencies(b.astype(np.float64))
            cos = um.cosine(fa, fb)  # (pairs, checkpoints, layers)
            jac = um.top_p_jaccard(fa, fb, params.top_p)
            ua = np.array([prompts[profiles[i].prompt_index] for i, _ in pairs])
            ub = np.array([prompts[profiles[j].prompt_index] for _, j in pairs])
            weights = bs.pair_weights(drawn, ua, ub)
            cos_lo, cos_hi = bs.interval(bs.weighted_means(cos, weights))
            jac_lo, jac_hi = bs.interval(bs.weighted_means(jac, weights))
            cos, jac = cos.mean(0), jac.mean(0)
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
                            "cosine_lo": float(cos_lo[ci, layer]),
                            "cosine_hi": float(cos_hi[ci, layer]),
                            "jaccard": float(jac[ci, layer]),
                            "jaccard_lo": float(jac_lo[ci, layer]),
                            "jaccard_hi": float(jac_hi[ci, layer]),
                        }
                    )
    return pl.DataFrame(rows)


def rollout_prediction_table(
    store: str, profiles: list[SequenceProfile], params: Params
) -> pl.DataFrame:
    """Does the prompt's routing predict the rollout's (paper (a) §5.2: "prefill-phase
    expert usage is not a reliable proxy for full generation usage pattern")?

    Per layer, across pairs of sequences of different prompts: the correlation of their
    usage cosine over the prompts with their usage cosine over the generated tokens,
    with a 95% interval from resampling prompts. Near 1: pairs alike at the prompt stay
    alike through the rollout; near 0: the prompt says nothing of it."""
    rng = np.random.default_rng(params.seed)
    firsts: dict[int, int] = {}
    for i, p in enumerate(profiles):
        if p.num_rows > p.prompt_len and p.prompt_len > 0:
            firsts.setdefault(p.prompt_index, i)
    pairs = list(itertools.combinations(firsts.values(), 2))
    if len(pairs) < 3:
        return pl.DataFrame()
    if len(pairs) > params.max_pairs:
        pairs = [pairs[i] for i in rng.choice(len(pairs), params.max_pairs, replace=False)]
    ia, ib = np.array(pairs).T

    def usage(scope: str, side: np.ndarray) -> np.ndarray:
        return frequencies(np.stack([profiles[i].scope_counts[scope] for i in side]).astype(float))

    prompt_cos = um.cosine(usage("prompt", ia), usage("prompt", ib))  # (pairs, layers)
    rollout_cos = um.cosine(usage("generated", ia), usage("generated", ib))
    prompts = {p: n for n, p in enumerate(firsts)}
    drawn = bs.unit_multiplicities(len(prompts), bs.REPLICATES, rng)
    unit = lambda side: np.array([prompts[profiles[i].prompt_index] for i in side])  # noqa: E731
    weights = bs.pair_weights(drawn, unit(ia), unit(ib))
    corr = bs.weighted_correlations(prompt_cos, rollout_cos, np.ones((1, len(pairs))))[0]
    lo, hi = bs.interval(bs.weighted_correlations(prompt_cos, rollout_cos, weights))
    return pl.DataFrame(
        {
            "store": store,
            "layer": np.arange(prompt_cos.shape[1]),
            "pairs": len(pairs),
            "prompts": len(prompts),
            "correlation": corr,
            "correlation_lo": lo,
            "correlation_hi": hi,
        }
    )
