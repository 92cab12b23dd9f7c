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
            str(specimen("qwen3_moe")), hidden_layers=[7], dtype="float32", max_model_len=256
        )
