"""Capture runs on vLLM's V1 model runner: an engine configured for capture gets it, or
refuses to start. Never an engine with capture configured and no hook installed.

vLLM 0.32 picks the runner in the property `VllmConfig.use_v2_model_runner`
(vllm/config/vllm.py): an explicit ``VLLM_USE_V2_MODEL_RUNNER`` wins, HiSparse attention
and watermarking require V2, and otherwise V2 is chosen whenever Triton is importable,
which is every CUDA machine. The GPU worker (vllm/v1/worker/gpu_worker.py) then builds
`vllm.v1.worker.gpu.model_runner.GPUModelRunner` (V2) instead of
`vllm.v1.worker.gpu_model_runner.GPUModelRunner` (V1), which is where the capture hooks.

The property is read on every access, in every process (engine core, workers,
scheduler), after vLLM has loaded its general plugins (`EngineArgs.create_engine_config`,
`EngineCore.__init__`, `WorkerWrapperBase`): so wrapping it in `register` decides the
runner for capture engines everywhere, and leaves engines without capture alone.
"""

from __future__ import annotations

from typing import Any

from capture_server.errors import CaptureError
from capture_server.protocol import capture_settings


class CaptureRunnerError(CaptureError, ValueError):
    """Raised at start-up when an engine configured for capture would run vLLM's V2 model
    runner, which the capture does not hook."""


def v2_requirement(vllm_config: Any) -> str | None:
    """What forces vLLM's V2 model runner on this engine, or None."""
    import vllm.envs as envs

    if getattr(vllm_config.attention_config, "hisparse_config", None) is not None:
        return "HiSparse attention (attention_config.hisparse_config)"
    if getattr(vllm_config, "watermark_config", None) is not None:
        return "watermarking (watermark_config)"
    if envs.VLLM_USE_V2_MODEL_RUNNER:
        return "VLLM_USE_V2_MODEL_RUNNER=1"
    return None


def choose_v1_for_capture(config_cls: type) -> None:
    """Wrap `config_cls.use_v2_model_runner` (vLLM's `VllmConfig`) so that an engine with
    ``additional_config["moetrace"]`` runs the V1 runner, or fails to start saying what
    requires V2. Re-entrant."""
    current = config_cls.__dict__["use_v2_model_runner"]
    if getattr(current.fget, "_moetrace", False):
        return
    original = current.fget

    def use_v2_model_runner(self: Any) -> bool:
        if capture_settings(getattr(self, "additional_config", None)) is None:
            return original(self)
        reason = v2_requirement(self)
        if reason is not None:
            raise CaptureRunnerError(
                f"moetrace capture runs on vLLM's V1 model runner, but {reason} requires "
                "the V2 runner: turn it off, or start this engine without "
                "additional_config['moetrace']"
            )
        return False

    use_v2_model_runner._moetrace = True  # type: ignore[attr-defined]
    use_v2_model_runner.__doc__ = original.__doc__
    config_cls.use_v2_model_runner = property(use_v2_model_runner)


def refuse_capture_on(runner_cls: type) -> None:
    """Make `runner_cls` (vLLM's V2 runner) refuse to load a model for an engine
    configured for capture: a second guard, should V2 be chosen by a path that does not
    read `use_v2_model_runner`. Re-entrant."""
    original = runner_cls.__dict__.get("load_model")
    if original is None or getattr(original, "_moetrace", False):
        return

    def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        if capture_settings(getattr(self.vllm_config, "additional_config", None)) is not None:
            raise CaptureRunnerError(
                f"moetrace capture does not hook vLLM's V2 model runner "
                f"({runner_cls.__module__}.{runner_cls.__qualname__}); unset "
                "VLLM_USE_V2_MODEL_RUNNER and any feature that requires V2"
            )
        return original(self, *args, **kwargs)

    load_model._moetrace = True  # type: ignore[attr-defined]
    runner_cls.load_model = load_model
