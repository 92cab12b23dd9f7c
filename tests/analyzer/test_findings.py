"""The findings table restates each claim with the measured value and a verdict by its
stated rule, and says "not testable" where the labels or arrays are missing.
Hand-made tables; the values are chosen on each side of each rule."""

from __future__ import annotations

import polars as pl

from analyzer.tables.conditions import ALL_LAYERS
from analyzer.tables.findings import findings_table


def _cond(store: str, condition: str, mean: float, lo: float, hi: float, baseline="observed"):
    return {
        "store": store,
        "baseline": baseline,
        "condition": condition,
        "layer": ALL_LAYERS,
        "jaccard": mean,
        "jaccard_lo": lo,
        "jaccard_hi": hi,
    }


def test_verdicts_follow_their_rules():
    conditions = pl.DataFrame(
        [
            _cond("a", "same question, other author", 0.58, 0.52, 0.64),
            _cond("a", "same author, other question", 0.55, 0.50, 0.60),
            _cond("a", "same question, same author, other seed", 0.85, 0.80, 0.90),
            _cond("a", "any", 0.2, 0.18, 0.22, baseline="random routing"),
            _cond("b", "other question", 0.30, 0.25, 0.35),  # no author labels, n = 1
        ]
    )
    committee = pl.DataFrame(
        {
            "store": ["a", "a"],
            "layer": [0, ALL_LAYERS],
            "domains": [3, 3],
            "coverage": [0.5, 0.55],
            "coverage_lo": [0.4, 0.45],
            "coverage_hi": [0.6, 0.65],
            "coverage_random_routing": [0.3, 0.3],
            "ratio": [20.0, 30.0],
            "ratio_lo": [2.0, 12.0],
            "ratio_hi": [40.0, 50.0],
            "ratio_random_routing": [5.0, 5.0],
            "retention_k1": [1.0, 0.25],
            "retention_k4": [1.0, 0.5],
        }
    )
    curve = pl.DataFrame(
        {
            "store": "a",
            "relation": "other prompt",
            "scope": "cumulative",
            "rollout_tokens": 0,
            "layer": [0, 1, 2],
            "jaccard": [0.3, 0.5, 0.9],
            "jaccard_lo": [0.25, 0.45, 0.85],
            "jaccard_hi": [0.35, 0.55, 0.95],
        }
    )
    prediction = pl.DataFrame(
        {
            "store": "a",
            "layer": [0, 1],
            "correlation": [0.7, 0.9],
            "correlation_lo": [0.55, 0.75],
            "correlation_hi": [0.85, 0.95],
        }
    )
    table = findings_table(
        {
            "conditions": conditions,
            "committee": committee,
            "rollout_curve": curve,
            "rollout_prediction": prediction,
        }
    )
    rows = table.filter(store="a").iter_rows(named=True)
    author, comparable, seed, deep, predicts, geometry, coverage, ratio, budgets = rows
    assert author["verdict"] == "consistent"  # 0.52-0.64 holds 0.60
    assert author["chance"] == 0.2 and author["published"] == 0.6
    assert comparable["verdict"] == "consistent"  # intervals overlap
    assert seed["verdict"] == "consistent"  # 0.80-0.90 above 0.50-0.60
    assert deep["verdict"] == "consistent" and deep["measured"] == 0.9  # above layer 0
    # pairs alike at the prompt stay alike (0.65-0.9 above 0.5): the prompt predicts
    assert predicts["verdict"] == "not consistent" and predicts["lo"] == 0.65
    assert geometry["verdict"] == "not testable with this store"  # no hidden states
    assert coverage["verdict"] == "consistent" and coverage["measured"] == 0.55
    assert coverage["chance"] == 0.3 and coverage["lo"] == 0.45
    assert ratio["verdict"] == "consistent" and ratio["lo"] == 12.0  # above 5.0
    assert budgets["measured"] == 0.375 and budgets["verdict"] == "not consistent"
    b = table.filter(store="b")
    assert set(b["verdict"]) == {"not testable with this store"}


def test_far_from_the_published_overlap_is_not_consistent():
    conditions = pl.DataFrame(
        [
            _cond("a", "same question, other author", 0.20, 0.15, 0.25),
            _cond("a", "same author, other question", 0.60, 0.55, 0.65),
        ]
    )
    committee = pl.DataFrame(
        {
            "store": "a",
            "layer": [ALL_LAYERS],
            "domains": [4],
            "coverage": [0.5],
            "coverage_lo": [0.1],  # reaches below the published 0.1243
            "coverage_hi": [0.7],
            "coverage_random_routing": [0.45],
            "ratio": [6.0],
            "ratio_lo": [4.0],  # not above chance
            "ratio_hi": [9.0],
            "ratio_random_routing": [5.0],
        }
    )
    table = findings_table({"conditions": conditions, "committee": committee})
    verdicts = table.filter(store="a")["verdict"].to_list()
    assert verdicts[:2] == ["not consistent", "not consistent"]
    assert verdicts[-3:-1] == ["not consistent", "not consistent"]
    assert verdicts[-1] == "not testable with this store"  # no retention columns
