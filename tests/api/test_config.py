"""Service settings: flags over environment over the TOML file; vLLM engine flags parsed by
vLLM's own parser, per model; bad settings exit 2 with a message."""

from __future__ import annotations

from pathlib import Path

import pytest

from capture_server.api.__main__ import main
from capture_server.api.config import load_settings
from capture_server.api.engine_args import build_engine_args


def test_precedence_flags_env_file(tmp_path: Path, monkeypatch):
    config = tmp_path / "moetrace.toml"
    config.write_text(
        'models = ["/m/a"]\nport = 9001\nhidden_layers = [1]\n[engine]\ndtype = "bfloat16"\n'
    )
    monkeypatch.setenv("MOETRACE_PORT", "9002")
    settings = load_settings(config, engine_flags=["--dtype", "float32"], port=None)
    assert settings.models == ["/m/a"] and settings.hidden_layers == [1]
    assert settings.port == 9002  # environment over file
    args = build_engine_args("/m/a", settings.engine_argv("/m/a"), [1], cpu=False)
    assert args.dtype == "float32"  # flag over file
    assert load_settings(config, port=1234).port == 1234  # flag over environment


def test_engine_settings_are_vllm_flags_per_model(tmp_path: Path, monkeypatch):
    config = tmp_path / "moetrace.toml"
    config.write_text(
        'models = ["/m/a", "/m/b"]\n'
        "[engine]\ngpu_memory_utilization = 0.5\nmax_model_len = 512\n"
        '[model_engine.a]\ntensor_parallel_size = 2\nmoe_backend = "triton"\n'
        "compilation_config = {mode = 0}\n"
    )
    monkeypatch.setenv("MOETRACE_ENGINE", '{"max_model_len": 1024}')
    settings = load_settings(config)
    # the environment's keys over the file's
    assert settings.engine == {"max_model_len": 1024, "gpu_memory_utilization": 0.5}
    settings = load_settings(config, engine_flags=["--max-num-batched-tokens", "4096"])
    a = build_engine_args("/m/a", settings.engine_argv("/m/a"), [0, 3], cpu=False)
    b = build_engine_args("/m/b", settings.engine_argv("/m/b"), [0, 3], cpu=False)
    assert (a.tensor_parallel_size, b.tensor_parallel_size) == (2, 1)
    assert a.moe_backend == "triton" and a.compilation_config.mode == 0
    assert a.max_model_len == b.max_model_len == 1024
    assert a.max_num_batched_tokens == b.max_num_batched_tokens == 4096
    # vLLM's defaults apply: compiled (not eager); capture's own defaults where not given
    assert not a.enforce_eager
    assert a.enable_prefix_caching is None and a.enable_chunked_prefill is None  # vLLM's
    assert a.additional_config == {"moetrace": {"hidden_layers": [0, 3], "logits": True}}
    on_cpu = build_engine_args("/m/b", ["--enable-prefix-caching"], [], cpu=True)
    assert on_cpu.enable_prefix_caching and on_cpu.enable_chunked_prefill is False


def test_serve_help_lists_vllm_engine_flags(capsys):
    assert main(["serve", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in (
        "--model",
        "--data-dir",
        "--tensor-parallel-size",
        "--data-parallel-size",
        "--pipeline-parallel-size",
        "--quantization",
        "--gpu-memory-utilization",
        "--max-num-batched-tokens",
        "--enable-prefix-caching",
        "--trust-remote-code",
        "--moe-backend",
        "--enforce-eager",
    ):
        assert flag in text, flag


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--config", "{tmp}/nope.toml"], "config file not found"),
        (["--config", "{tmp}/bad.toml"], "port"),
        (["--data-dir", "{tmp}"], "no model to serve"),
        (["--model", "/m", "--tensor-parallel-size", "two"], "tensor-parallel-size"),
        (["--model", "/m", "--no-such-engine-flag"], "--no-such-engine-flag"),
    ],
)
def test_bad_settings_exit_with_a_message(tmp_path: Path, capsys, args, message):
    (tmp_path / "bad.toml").write_text('models = ["/m"]\nport = "eighty"\n')
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main(["serve", *argv]) == 2
    assert message in capsys.readouterr().err


def test_lists_from_the_environment(monkeypatch):
    monkeypatch.setenv("MOETRACE_MODELS", "/m/a, /m/b")
    monkeypatch.setenv("MOETRACE_HIDDEN_LAYERS", "[0, 3]")
    settings = load_settings(None)
    assert settings.models == ["/m/a", "/m/b"] and settings.hidden_layers == [0, 3]


def test_capture_dtype_reaches_the_engines_and_bounds_what_jobs_keep(capsys):
    """``--capture-dtype float16`` goes into every engine's moetrace settings, and a job
    asking to keep float32 logits from such a server is refused, naming the field."""
    from fastapi import HTTPException

    from capture_server.api.routes import check_capture_dtype
    from capture_server.api.schemas import Capture
    from capture_server.protocol import capture_settings

    settings = load_settings(None, models=["/m/a"], capture_dtype="float16")
    args = build_engine_args("/m/a", [], [], cpu=True, capture_dtype=settings.capture_dtype)
    assert capture_settings(args.additional_config)["capture_dtype"] == "float16"
    check_capture_dtype("capture", Capture(), settings)  # float16 logits: kept as captured
    with pytest.raises(HTTPException) as refused:
        check_capture_dtype("capture", Capture(logits_dtype="float32"), settings)
    assert refused.value.status_code == 422
    assert refused.value.detail.startswith("capture.logits_dtype")
    exact = load_settings(None, models=["/m/a"])
    assert exact.capture_dtype == "float32"
    check_capture_dtype("capture", Capture(logits_dtype="float32"), exact)
    assert main(["serve", "--model", "/m", "--capture-dtype", "bfloat16"]) == 2
    assert "capture_dtype" in capsys.readouterr().err
