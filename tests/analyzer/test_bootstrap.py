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
import pytest

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


COMMITTEE_EXPERTS, DOMAINS, PROMPTS, CONCENTRATION_ROWS = 8, 4, 40, 20.0
COMMITTEE_STUDIES = 30


def _domain_means() -> np.ndarray:
    """(domains, experts) mean router probabilities: expert 0 shared by every domain's
    top-2 (the planted committee), expert 2 + d second in domain d, the rest below."""
    means = np.full((DOMAINS, COMMITTEE_EXPERTS), 0.0)
    for d in range(DOMAINS):
        means[d, 0], means[d, 2 + d] = 0.30, 0.25
        rest = [e for e in range(COMMITTEE_EXPERTS) if e not in (0, 2 + d)]
        means[d, rest] = 0.45 / len(rest)
    return means


def test_committee_intervals_cover_the_planted_coverage_at_their_rate():
    """Softmax contribution index: each prompt's probabilities are a Dirichlet draw around
    its domain's means, so the population contribution is the means themselves and the
    planted coverage is the audit of them. Over 30 studies of 4 domains x 40 prompts,
    about 95% of the intervals from `committee_tables` must hold it."""
    from analyzer.metrics import committee as cm
    from analyzer.tables.committee import CommitteeRows, committee_tables

    means = _domain_means()
    truth = cm.standing_committee(means, 2)
    assert truth.members == [0] and 0.5 < truth.coverage < 0.6
    covered = 0
    for seed in range(COMMITTEE_STUDIES):
        rng = np.random.default_rng(seed)
        rows = CommitteeRows()
        for d in range(DOMAINS):
            probs = rng.dirichlet(means[d] * CONCENTRATION_ROWS, size=PROMPTS)[:, None]
            ids = np.argsort(-probs, -1)[..., :2]
            rows.add(f"d{d}", ids, np.take_along_axis(probs, ids, -1), probs)
        params = Params(committee_variant="softmax", seed=seed)
        row = committee_tables("s", rows, params, 2, COMMITTEE_EXPERTS)["committee"].row(
            0, named=True
        )
        assert row["coverage_lo"] <= row["coverage"] <= row["coverage_hi"]
        assert row["coverage_hi"] > row["coverage_lo"], "a resample that never varies"
        # random routing still yields a committee (the audit always finds one) but not
        # one as dense: the planted committee's ratio lies above its chance level
        assert row["ratio_random_routing"] < row["ratio_lo"], row
        covered += row["coverage_lo"] <= truth.coverage <= row["coverage_hi"]
    # 28.5 expected; 25 is three binomial s.d. below
    assert covered >= 25, covered
    print(f"committee coverage intervals held the planted value in {covered}/{COMMITTEE_STUDIES}")


def test_weighted_correlations_equal_numpy_on_repeated_items():
    rng = np.random.default_rng(2)
    x, y = rng.random((9, 2)), rng.random((9, 2))
    y[:, 1] = 0.5 * x[:, 1] + 0.1 * y[:, 1]
    times = np.array([[1, 0, 2, 1, 1, 0, 3, 1, 1], [1] * 9], np.float64)
    got = bs.weighted_correlations(x, y, times)
    for r, t in enumerate(times):
        rep = np.repeat(np.arange(9), t.astype(int))
        for layer in range(2):
            want = np.corrcoef(x[rep, layer], y[rep, layer])[0, 1]
            assert got[r, layer] == pytest.approx(want, rel=1e-9)
    constant = np.full((9, 2), 0.3)  # rounding leaves its variance near 1e-17, not 0
    assert np.isnan(bs.weighted_correlations(x, constant, times)).all()
