"""Bootstrap intervals cover the planted value at their stated rate.

Planted population: each question has its own expert preferences (a Dirichlet draw);
each of its sequences routes 2 x 100 top-k slots by them. The population means of the
pair overlaps ("same question, other seed" and "other question") are computed once from
a large draw. Over a bounded number of seeds, a study of 24 questions x 3 seeds gets an
interval from `conditions.condition_table`, the production table; about 95% of them
must hold the planted value. Resampling pairs instead of questions would cover far less
often (pairs of one question are not independent): checked too, so the test can fail.
"""

from __future__ import annotations

import numpy as np

from analyzer.metrics import bootstrap as bs
from analyzer.metrics import usage as um
from analyzer.params import Params
from analyzer.profiles import SequenceProfile
from analyzer.tables.conditions import condition_table

EXPERTS, SLOTS, CONCENTRATION = 16, 200, 0.3
QUESTIONS, SEEDS, STUDIES = 24, 3, 40
SAME, OTHER = "same question, same author, other seed", "other question"


def _usage(preference: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return rng.multinomial(SLOTS, preference)[None].astype(np.float64)  # (layers=1, experts)


def _population(rng: np.random.Generator, questions: int = 20000) -> dict[str, float]:
    prefs = rng.dirichlet(np.full(EXPERTS, CONCENTRATION), size=questions)
    a = np.stack([_usage(p, rng) for p in prefs])
    b = np.stack([_usage(p, rng) for p in prefs])
    f = lambda c: c / c.sum(-1, keepdims=True)  # noqa: E731
    same = um.top_p_jaccard(f(a), f(b), um.TOP_P)[:, 0].mean()
    other = um.top_p_jaccard(f(a), f(np.roll(b, 1, axis=0)), um.TOP_P)[:, 0].mean()
    return {SAME: float(same), OTHER: float(other)}


def _study(rng: np.random.Generator) -> list[SequenceProfile]:
    prefs = rng.dirichlet(np.full(EXPERTS, CONCENTRATION), size=QUESTIONS)
    return [
        SequenceProfile(
            sequence_id=q * SEEDS + s,
            prompt_index=q,
            sample_index=s,
            prompt_len=1,
            num_rows=SLOTS // 2,
            labels={"question": q, "seed": s},
            scope_counts={"cumulative": _usage(prefs[q], rng).astype(np.int32)},
        )
        for q in range(QUESTIONS)
        for s in range(SEEDS)
    ]


def test_intervals_cover_the_planted_value_at_their_rate():
    truth = _population(np.random.default_rng(1234))
    covered = {SAME: 0, OTHER: 0}
    naive_covered = 0
    for seed in range(STUDIES):
        table = condition_table("s", _study(np.random.default_rng(seed)), Params(seed=seed), 2)
        observed = table.filter(baseline="observed")
        for cond in covered:
            row = observed.filter(condition=cond).row(0, named=True)
            assert row["jaccard_lo"] <= row["jaccard"] <= row["jaccard_hi"]
            covered[cond] += row["jaccard_lo"] <= truth[cond] <= row["jaccard_hi"]
        # the same statistic with pairs resampled as if independent
        rng = np.random.default_rng(seed)
        profiles = _study(np.random.default_rng(seed))
        pairs = [(i, j) for i in range(len(profiles)) for j in range(i) if i // SEEDS == j // SEEDS]
        f = np.stack([p.scope_counts["cumulative"] / SLOTS for p in profiles])
        ia, ib = np.array(pairs).T
        jac = um.top_p_jaccard(f[ia], f[ib], um.TOP_P)[:, 0]
        drawn = bs.unit_multiplicities(len(pairs), bs.REPLICATES, rng)
        lo, hi = bs.interval(bs.weighted_means(jac, drawn))
        naive_covered += lo <= truth[SAME] <= hi
    # 95% intervals over 40 studies: 38 expected; 33 is three binomial s.d. below
    assert covered[SAME] >= 33 and covered[OTHER] >= 33, covered
    assert naive_covered < covered[SAME], (naive_covered, covered)
