"""The installed ``moetrace`` console script: every verb reaches the command of the part
that owns it, with its exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from capture_server.store.sink import StoreSink
from tests.store import synthetic

MOETRACE = Path(sys.executable).parent / "moetrace"


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(MOETRACE), *args], capture_output=True, text=True, timeout=timeout)


def test_the_command_is_installed_and_lists_every_verb():
    result = run("--help")
    assert result.returncode == 0
    for verb in ("serve", "submit", "status", "wait", "list", "cancel", "sequences"):
        assert verb in result.stdout
    for verb in ("analyze", "store", "specimen"):
        assert verb in result.stdout


def test_serve_help_lists_vllm_engine_flags():
    result = run("serve", "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    for flag in ("--hidden-layer", "--tensor-parallel-size", "--moe-backend", "--enforce-eager"):
        assert flag in result.stdout


def test_store_info_and_verify(tmp_path):
    sink = StoreSink(tmp_path / "s", synthetic.EXACT, flush_interval=0.01)
    sink.open(synthetic.meta())
    for key in ("seq-1", "seq-2"):
        sink.write(synthetic.sequence_rows(key, synthetic.length_of(key)))
        sink.end_sequence(synthetic.end_of(key))
    sink.close()
    info = run("store", "info", str(tmp_path / "s"))
    assert info.returncode == 0 and "sequences=2" in info.stdout
    verify = run("store", "verify", str(tmp_path / "s"))
    assert verify.returncode == 0 and verify.stdout.startswith("ok: 2 sequences")
    missing = run("store", "info", str(tmp_path / "nope"))
    assert missing.returncode == 1 and "StoreNotFoundError" in missing.stderr


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("specimen", "no_such_arch", "/tmp/x"), 1, "unknown architecture"),
        (("analyze", "/nope", "--analyses", "bogus"), 1, "analyses: unknown"),
        (("status",), 2, "Missing argument"),
        (("serve", "--config", "/nope.toml"), 2, "config file not found"),
    ],
)
def test_bad_input_exits_non_zero_with_a_message(args, code, message):
    result = run(*args)
    assert result.returncode == code, result.stdout + result.stderr
    assert message in result.stdout + result.stderr


def test_specimen_builds_a_checkpoint(tmp_path):
    result = run("specimen", "mixtral", str(tmp_path / "m"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "m" / "config.json").is_file()
