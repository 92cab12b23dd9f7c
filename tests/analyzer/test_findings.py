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
        {"store": ["a", "a"], "domains": [3, 3], "coverage": [0.5, 0.6], "ratio": [20.0, 30.0]}
    )
    table = findings_table({"conditions": conditions, "committee": committee})
    author, comparable, seed, geometry, committee_row = table.filter(store="a").iter_rows(
        named=True
    )
    assert author["verdict"] == "consistent"  # 0.52-0.64 holds 0.60
    assert author["chance"] == 0.2 and author["published"] == 0.6
    assert comparable["verdict"] == "consistent"  # intervals overlap
    assert seed["verdict"] == "consistent"  # 0.80-0.90 above 0.50-0.60
    assert geometry["verdict"] == "not testable with this store"  # no hidden states
    assert committee_row["verdict"] == "consistent" and committee_row["measured"] == 0.55
    b = table.filter(store="b")
    assert set(b["verdict"]) == {"not testable with this store"}


def test_far_from_the_published_overlap_is_not_consistent():
    conditions = pl.DataFrame(
        [
            _cond("a", "same question, other author", 0.20, 0.15, 0.25),
            _cond("a", "same author, other question", 0.60, 0.55, 0.65),
        ]
    )
    table = findings_table({"conditions": conditions}).filter(store="a")
    verdicts = table["verdict"].to_list()
    assert verdicts[:2] == ["not consistent", "not consistent"]
