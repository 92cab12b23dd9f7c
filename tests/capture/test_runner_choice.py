"""Capture is never silently off: engines configured for capture run vLLM's V1 model runner
(which the plugin hooks) even where vLLM would pick V2, or refuse to start; every MoE
layer is proven to record in the first step; an engine whose workers have no collector
does not serve.

On a GPU vLLM picks V2 because Triton is importable. Here vLLM is made to believe
Triton is present (`vllm.config.vllm.HAS_TRITON`, the only name the choice reads), as
on a GPU machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from capture_server.capture.active import CaptureInactiveError, require_active
from capture_server.capture.intervention import RoutingShape
from capture_server.errors import CaptureError
from capture_server.plugin.buffers import CaptureBuffers
from capture_server.plugin.router_hook import verify_hooked
from capture_server.plugin.runner_choice import CaptureRunnerError
from capture_server.protocol import engine_config
from capture_server.specimens.planted import planted_topk


@pytest.fixture
def triton_present(monkeypatch):
    import vllm.config.vllm as config_module

    monkeypatch.setattr(config_module, "HAS_TRITON", True)
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)


def _config(model, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=str(model), dtype="float32", max_model_len=256, **kwargs)
    return args.create_engine_config()


def test_capture_engines_get_v1_where_vllm_would_choose_v2(specimen, triton_present):
    model = specimen("qwen3_moe", planted=True)
    assert _config(model).use_v2_model_runner, "premise: with Triton, vLLM picks V2"
    assert not _config(model, additional_config=engine_config()).use_v2_model_runner


def test_capture_refuses_a_forced_v2_runner_naming_it(specimen, triton_present, monkeypatch):
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    model = specimen("qwen3_moe", planted=True)
    assert _config(model).use_v2_model_runner  # engines without capture are left alone
    # vLLM's config is a pydantic dataclass: it reports our error as a validation error
    with pytest.raises(ValueError, match="V1 model runner, but VLLM_USE_V2_MODEL_RUNNER=1 req"):
        _config(model, additional_config=engine_config())


def test_v2_runner_refuses_to_load_a_capture_engine():
    """The second guard, should V2 be built anyway: its load_model refuses."""
    import vllm.plugins
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2ModelRunner

    vllm.plugins.load_general_plugins()
    runner = SimpleNamespace(vllm_config=SimpleNamespace(additional_config=engine_config()))
    with pytest.raises(CaptureRunnerError, match="does not hook vLLM's V2 model runner"):
        V2ModelRunner.load_model(runner)


def test_capture_runs_and_is_right_where_vllm_would_choose_v2(specimen, triton_present):
    from capture_server.capture.api import CaptureEngine

    engine = CaptureEngine(
        str(specimen("qwen3_moe", planted=True)),
        dtype="float32",
        max_model_len=256,
        enforce_eager=True,
    )
    try:
        assert not engine.llm.llm_engine.vllm_config.use_v2_model_runner
        result = engine.generate([[5, 9, 13, 200], [7, 8]], max_tokens=6, temperature=0.0)
    finally:
        engine.close()
    for seq in result.sequences:
        rows = seq.rows
        assert len(rows) == len(seq.prompt_token_ids) + len(seq.output_token_ids) - 1
        for layer in range(rows.topk_ids.shape[1]):
            np.testing.assert_array_equal(
                rows.topk_ids[:, layer], planted_topk(rows.token_ids, layer)
            )


def _buffers(layers: int = 3) -> CaptureBuffers:
    return CaptureBuffers(
        num_layers=layers,
        max_tokens=8,
        top_k=2,
        num_experts=4,
        hidden_size=5,
        hidden_layers=(1,),
        logits=True,
        device=torch.device("cpu"),
    )


def test_a_layer_that_records_nothing_in_a_step_is_found():
    buffers = _buffers()
    buffers.arm_proof()
    for layer in (0, 2):  # layer 1's kernel routes without select_experts
        buffers.record(
            layer, torch.zeros(4, 5), torch.zeros(4, 4), torch.ones(4, 2), torch.ones(4, 2)
        )
    assert buffers.unrecorded() == [1]
    buffers.record(1, torch.zeros(4, 5), torch.zeros(4, 4), torch.ones(4, 2), torch.ones(4, 2))
    assert buffers.unrecorded() == []


def test_the_first_step_proof_raises_naming_the_silent_blocks():
    from capture_server.capture.records import ModelMeta
    from capture_server.plugin.collector import StepCollector

    routing = RoutingShape(num_layers=3, num_experts=4, top_k=2, correction_bias=False)
    meta = ModelMeta.synthetic([1, 3, 5], 4, 2, 5)
    collector = StepCollector(_buffers(), meta, 1.0, routing=routing)
    collector.before_step(SimpleNamespace(total_num_scheduled_tokens=4))
    collector.buffers.record(
        0, torch.zeros(4, 5), torch.zeros(4, 4), torch.ones(4, 2), torch.ones(4, 2)
    )
    with pytest.raises(CaptureError, match=r"MoE blocks \[3, 5\] recorded no routing"):
        collector._check_proof()


def test_padded_router_inputs_keep_the_model_columns():
    """MXFP4 backends pad the router input (gpt-oss 2880 -> 3072): the model's columns
    are stored, the padding is not."""
    buffers = _buffers()
    padded = torch.arange(4 * 8, dtype=torch.float32).reshape(4, 8)  # hidden 5, padded to 8
    buffers.record(1, padded, torch.zeros(4, 4), torch.ones(4, 2), torch.ones(4, 2))
    np.testing.assert_array_equal(buffers.hidden[1][:4].numpy(), padded[:, :5].numpy())


def test_an_unhooked_router_is_refused():
    def plain_select_experts(*args, **kwargs):
        raise AssertionError("not called")

    runner = SimpleNamespace(router=SimpleNamespace(select_experts=plain_select_experts))
    with pytest.raises(CaptureError, match=r"MoE blocks \[4\]"):
        verify_hooked([(4, runner)])


def test_workers_without_a_collector_are_refused():
    require_active([{"steps": 0}, {"steps": 0}], "moe")
    with pytest.raises(CaptureInactiveError, match=r"workers \[1\] of 2"):
        require_active([{"steps": 0}, {}], "moe")
    with pytest.raises(CaptureInactiveError, match="AttributeError"):
        require_active(AttributeError("no moetrace_stats"), "moe")


def test_an_engine_without_the_plugin_refuses_to_start(specimen, tmp_path):
    """The plugin left out by VLLM_PLUGINS: the engine's workers capture nothing, so the
    capture engine refuses to start instead of recording nothing."""
    code = (
        "from capture_server.capture.api import CaptureEngine\n"
        f"CaptureEngine({str(specimen('qwen3_moe', planted=True))!r}, dtype='float32', "
        "max_model_len=256, enforce_eager=True)\n"
    )
    env = {**os.environ, "VLLM_PLUGINS": "some_other_plugin"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode != 0
    assert "CaptureInactiveError" in result.stderr and "VLLM_PLUGINS" in result.stderr, (
        result.stderr[-3000:]
    )
