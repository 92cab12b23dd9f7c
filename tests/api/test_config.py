"""Service settings: flags over environment over the TOML file; bad settings exit 2."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from capture_server.api.__main__ import app
from capture_server.api.config import load_settings


def test_precedence_flags_env_file(tmp_path: Path, monkeypatch):
    config = tmp_path / "moetrace.toml"
    config.write_text('models = ["/m/a"]\nport = 9001\nhidden_layers = [1]\ndtype = "bfloat16"\n')
    monkeypatch.setenv("MOETRACE_PORT", "9002")
    settings = load_settings(config, dtype="float32", port=None)
    assert settings.models == ["/m/a"] and settings.hidden_layers == [1]
    assert settings.port == 9002  # environment over file
    assert settings.dtype == "float32"  # flag over file
    assert load_settings(config, port=1234).port == 1234  # flag over environment


def test_bad_settings_exit_with_a_message(tmp_path: Path):
    runner = CliRunner()
    missing = runner.invoke(app, ["serve", "--config", str(tmp_path / "nope.toml")])
    assert missing.exit_code == 2 and "config file not found" in missing.output
    bad = tmp_path / "bad.toml"
    bad.write_text('models = ["/m"]\nport = "eighty"\n')
    wrong_type = runner.invoke(app, ["serve", "--config", str(bad)])
    assert wrong_type.exit_code == 2 and "port" in wrong_type.output
    no_model = runner.invoke(app, ["serve", "--data-dir", str(tmp_path)])
    assert no_model.exit_code == 2 and "no model to serve" in no_model.output


def test_lists_from_the_environment(monkeypatch):
    monkeypatch.setenv("MOETRACE_MODELS", "/m/a, /m/b")
    monkeypatch.setenv("MOETRACE_HIDDEN_LAYERS", "[0, 3]")
    settings = load_settings(None)
    assert settings.models == ["/m/a", "/m/b"] and settings.hidden_layers == [0, 3]
