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
        "prefill_context_parallel_size": 1,
    }
    return SimpleNamespace(
        parallel_config=SimpleNamespace(**{**base, **parallel}), speculative_config=None
    )


def test_tensor_parallel_rank_zero_writes_and_the_others_are_replicas():
    from capture_server.plugin.layout import REPLICA, WRITER, capture_role, writer_part

    assert capture_role(_vllm_config(), 0) == WRITER
    assert capture_role(_vllm_config(), 1) == REPLICA
    assert writer_part(_vllm_config()) is None  # one writer: a version-1 store


def test_each_data_parallel_rank_writes_its_own_part():
    from capture_server.plugin.layout import WRITER, capture_role, writer_part

    config = _vllm_config(data_parallel_size=2, data_parallel_rank=1)
    assert capture_role(config, 0) == WRITER
    part = writer_part(config)
    assert part is not None and (part.dp_rank, part.pp_stage, part.pp_size) == (1, 0, 1)


def test_each_pipeline_stage_writes_its_own_part():
    from capture_server.plugin.layout import writer_part

    config = _vllm_config(pipeline_parallel_size=2, data_parallel_rank=0)
    part = writer_part(config, pp_stage=1)
    assert part is not None and (part.dp_rank, part.pp_stage, part.pp_size) == (0, 1, 2)


@pytest.mark.parametrize(
    ("config", "named"),
    [
        (_vllm_config(prefill_context_parallel_size=2), "prefill context parallelism"),
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
    ("parallel", "roles", "parts"),
    [
        ({"tensor_parallel_size": 2, "enable_expert_parallel": True}, ["writer", "replica"], 0),
        (
            {"tensor_parallel_size": 2, "data_parallel_size": 2, "enable_expert_parallel": True},
            None,
            0,
        ),
        ({"data_parallel_size": 2, "enable_expert_parallel": True}, ["writer"], 2),
    ],
)
def test_expert_parallel_layouts_as_vllm_configures_them(parallel, roles, parts):
    """vLLM's own `ParallelConfig`: TP + EP without DP routes the whole batch on every TP
    rank before dispatch (ids are global: the expert map is applied after
    `select_experts`), so rank 0 writes; DP + EP with TP = 1 writes one part per rank;
    DP x TP with EP runs sequence-parallel MoE and is refused. `bench/gpu_check.sh
    --layouts` checks them running on a node with GPUs."""
    from vllm.config import ParallelConfig

    from capture_server.plugin.layout import capture_role, writer_part

    config = SimpleNamespace(parallel_config=ParallelConfig(**parallel), speculative_config=None)
    if roles is None:
        with pytest.raises(CaptureUnsupportedError, match="does not support"):
            capture_role(config, 0)
        return
    assert [capture_role(config, rank) for rank in range(len(roles))] == roles
    part = writer_part(config)
    assert (part is not None) == (parts > 0)
