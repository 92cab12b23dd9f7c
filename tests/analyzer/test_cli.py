"""The analyzer's command line refuses bad parameters before any work, naming them."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from analyzer.__main__ import app
from analyzer.params import Params

runner = CliRunner()


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--scope", "everything"], "scope"),
        (["--top-p", "0"], "top_p"),
        (["--top-p", "1.5"], "top_p"),
        (["--committee-variant", "mean"], "committee_variant"),
        (["--max-pairs", "0"], "max_pairs"),
        (["--analyses", "usage,vibes"], "analyses"),
        (["--ablation-directions", "1,two"], "ablation_directions"),
        (["--ablation-directions", "-1"], "ablation_directions"),
    ],
)
def test_bad_parameters_exit_non_zero_naming_the_parameter(tmp_path, args, named):
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(tmp_path / "store"), "--out", str(out), *args])
    assert result.exit_code == 1
    assert f"ValueError: {named}:" in result.output
    assert not out.exists()  # refused before anything was written


def test_no_store_is_a_usage_error():
    result = runner.invoke(app, ["run"])
    assert result.exit_code == 1 and "give at least one store" in result.output


def test_list_describes_every_analysis():
    result = runner.invoke(app, ["run", "--list"])
    assert result.exit_code == 0
    names = [line.split()[0] for line in result.output.splitlines() if line.strip()]
    assert names == ["usage", "rollout", "overlap", "geometry", "committee"]


@pytest.mark.parametrize(
    "bad", [{"retention_ks": ()}, {"gamma": 0.0}, {"coverage_denominator": "rows"}]
)
def test_params_refuse_what_the_cli_does_not_expose(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        Params(**bad)
