"""Shared fixtures: specimen checkpoints built once per session, vLLM in one-process mode."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def specimen(tmp_path_factory: pytest.TempPathFactory):
    """`specimen(arch, planted=False)` -> path of a tiny checkpoint, built once per session."""
    from capture_server.specimens import build_specimen

    root = tmp_path_factory.mktemp("specimens")
    built: dict[tuple[str, bool], Path] = {}

    def get(arch: str, planted: bool = False) -> Path:
        key = (arch, planted)
        if key not in built:
            name = f"{arch}-planted" if planted else arch
            built[key] = build_specimen(arch, root / name, planted=planted)
        return built[key]

    return get


@pytest.fixture(scope="module")
def qwen_engine(specimen):
    """A Qwen3-MoE capture engine with interventions shared by a module's tests; small
    step budget so long prompts are chunked. Module-scoped: only one in-process engine
    can be open at a time."""
    from capture_server.capture.api import CaptureEngine

    engine = CaptureEngine(
        str(specimen("qwen3_moe")),
        hidden_layers=[1],
        dtype="float32",
        max_model_len=1024,
        max_num_batched_tokens=128,
        max_num_seqs=128,
        seed=0,
        enforce_eager=True,
        interventions=True,  # on, and unused by most tests: plain requests run as they are
    )
    yield engine
    engine.close()
