"""Intervention experiments: matched controls by hand, and each table entry against the
same quantity computed by hand from separate scoring calls (a check of the experiment's
bookkeeping and arithmetic; the scores themselves are proven against transformers in
test_against_transformers)."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from capture_server.capture.intervention import InterventionError
from capture_server.experiments import (
    ChoiceItem,
    committee_masking,
    matched_controls,
    pruning_sweep,
)

TEXTS = [
    ("the king signed a treaty", " with the northern states"),
    ("the bank raised interest rates", " and the market priced bonds"),
    ("def main", " return value"),
]
ITEMS = [
    ChoiceItem("the king signed a", ("treaty", "protein", "integral"), 0),
    ChoiceItem("the cell divides and the", ("protein", "bank"), 0),
]


def test_matched_controls_by_hand():
    usage = np.array([10.0, 9.0, 1.0, 8.0, 2.0, 7.0])
    draws = matched_controls([0], usage, seeds=20)
    # the two non-members nearest to expert 0's usage (10) are experts 1 (9) and 3 (8)
    assert {d for (d,) in draws} == {1, 3}
    two = matched_controls([0, 1], usage, seeds=20)
    for draw in two:
        assert len(set(draw)) == 2 and not set(draw) & {0, 1}
        assert set(draw) <= {3, 5, 2, 4}
    assert matched_controls([0, 1], usage, seeds=3) == two[:3], "seeded: the same draws again"
    with pytest.raises(InterventionError, match="leave only 2 other experts"):
        matched_controls([0, 1, 2, 3], usage, seeds=1)


def _mean_nll(engine, intervention, part: str) -> float:
    prompts, completions = zip(*TEXTS, strict=True)
    result = engine.score(prompts, completions, intervention=intervention)
    sums, tokens = 0.0, 0
    for seq in result.sequences:
        plen = len(seq.prompt_token_ids)
        values = seq.nll[1:plen] if part == "prompt" else seq.nll[plen:]
        sums, tokens = sums + values.sum(), tokens + len(values)
    return sums / tokens


def _accuracy(engine, intervention) -> float:
    correct = []
    for item in ITEMS:
        scored = engine.score(
            [item.prompt] * len(item.options), list(item.options), intervention=intervention
        )
        loglik = [-s.nll[len(s.prompt_token_ids) :].sum() for s in scored.sequences]
        correct.append(int(np.argmax(loglik)) == item.answer)
    return float(np.mean(correct))


def test_committee_masking_table_equals_hand_computation(qwen_engine):
    committee = {0: [1, 4], 2: [3]}
    usage = np.tile(np.arange(8, dtype=float), (4, 1))
    table = committee_masking(qwen_engine, TEXTS, committee, usage, seeds=2, items=ITEMS)
    base = table.filter(pl.col("condition") == "baseline")
    assert (base["change"] == 0).all()
    for part in ("prompt", "completion"):
        want_base = _mean_nll(qwen_engine, None, part)
        got = base.filter(pl.col("part") == part)["value"].item()
        assert got == pytest.approx(want_base, rel=1e-6)
        row = table.filter(
            (pl.col("condition") == "committee") & (pl.col("layer") == 0) & (pl.col("part") == part)
        )
        want = _mean_nll(qwen_engine, {"zero": {0: [1, 4]}}, part)
        assert row["value"].item() == pytest.approx(want, rel=1e-6)
        assert row["change"].item() == pytest.approx(want / want_base - 1, rel=1e-5, abs=1e-9)
    controls = table.filter(pl.col("condition") == "random")
    assert set(controls["layer"].to_list()) == {0, 2} and (controls["seeds"] == 2).all()
    assert (table["change_lo"] <= table["change"] + 1e-12).all()
    assert (table["change"] <= table["change_hi"] + 1e-12).all()
    accuracy = table.filter((pl.col("part") == "choice_accuracy") & (pl.col("layer") == 2))
    committee_row = accuracy.filter(pl.col("condition") == "committee")
    assert committee_row["value"].item() == _accuracy(qwen_engine, {"zero": {2: [3]}})
    assert committee_row["baseline"].item() == _accuracy(qwen_engine, None)


def test_pruning_sweep_keeps_the_most_used(qwen_engine):
    usage = np.zeros((4, 8))
    usage[:, [6, 2, 5]] = [30, 20, 10]  # the most used: 6, 2, 5
    table = pruning_sweep(qwen_engine, TEXTS, usage, keep=3, depths=[1, 2], seeds=2)
    assert sorted(set(table["depth"].to_list())) == [0, 1, 2]
    row = table.filter(
        (pl.col("condition") == "most_used") & (pl.col("depth") == 2) & (pl.col("part") == "prompt")
    )
    want = _mean_nll(qwen_engine, {"keep": {2: [2, 5, 6], 3: [2, 5, 6]}}, "prompt")
    assert row["value"].item() == pytest.approx(want, rel=1e-6)
    with pytest.raises(InterventionError, match="depths: 5 is not in 1..4"):
        pruning_sweep(qwen_engine, TEXTS, usage, keep=3, depths=[5])


def test_cli_refuses_bad_input_before_starting_an_engine(tmp_path):
    from capture_server.experiments.__main__ import app

    analysis = tmp_path / "analysis"
    analysis.mkdir()
    runner = CliRunner()
    texts = tmp_path / "texts.jsonl"
    texts.write_text(json.dumps({"prompt": "a"}) + "\n")
    args = ["committee", "model", "--analysis", str(analysis), "--texts", str(texts)]
    missing = runner.invoke(app, args)
    assert missing.exit_code == 1 and "no committee table; run the analyzer" in missing.output
    # as the analyzer writes it: per-layer rows and a row of means (layer -1, no members)
    committee = {"store": ["s", "s"], "layer": [0, -1], "members": [[1, 2], None]}
    pl.DataFrame(committee).write_parquet(analysis / "committee.parquet")
    pl.DataFrame(
        {"store": ["s"] * 8, "layer": [0] * 8, "expert": list(range(8)), "share": [0.1] * 8}
    ).write_parquet(analysis / "usage.parquet")
    bad = runner.invoke(app, args)
    assert bad.exit_code == 1
    assert f"{texts}:1: missing field 'completion'" in bad.output
    wrong_store = runner.invoke(app, [*args, "--store", "other"])
    assert wrong_store.exit_code == 1 and "store: expected one of ['s']" in wrong_store.output
