"""Usage similarity of sample pairs through growing rollout windows (paper (a) A6)."""

from __future__ import annotations

import itertools

import numpy as np
import polars as pl

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
            fa, fb = frequencies(a.astype(np.float64)), frequencies(b.astype(np.float64))
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
