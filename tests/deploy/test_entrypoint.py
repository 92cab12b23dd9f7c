"""The containers' entrypoint run directly with the CPU image's settings: the capture
server comes up on a built-in model, finishes a job into a store under a URL root, and
the analyze role reads that store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from capture_server.api.launch import free_port
from capture_server.store import open_store

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOETRACE_")}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    return {
        **env,
        "PATH": f"{Path(sys.executable).parent}:{env['PATH']}",
        "PYTHON": sys.executable,
        "MOETRACE_DEVICE": "cpu",
        "MOETRACE_DATA_DIR": str(tmp_path / "data"),
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "RAY_AUTH_MODE": "disabled",
        **extra,
    }


def test_serve_without_a_model_is_refused(tmp_path):
    result = subprocess.run(
        ["bash", str(ENTRYPOINT), "serve"], env=_env(tmp_path), capture_output=True, text=True
    )
    assert result.returncode == 2 and "MOETRACE_MODELS" in result.stderr


def test_entrypoint_serves_a_job_and_analyzes_it(tmp_path):
    port = free_port()
    store_root = f"file://{tmp_path / 'bucket' / 'stores'}"
    env = _env(
        tmp_path,
        MOETRACE_SPECIMEN="qwen3_moe",
        MOETRACE_HOST="127.0.0.1",
        MOETRACE_PORT=str(port),
        MOETRACE_ENGINE='{"dtype": "float32", "max_model_len": 512, "enforce_eager": true}',
        MOETRACE_TOKEN="entry-token",
        MOETRACE_STORE_ROOT=store_root,
    )
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(
        ["bash", str(ENTRYPOINT), "serve"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": "Bearer entry-token"}
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            raise TimeoutError((tmp_path / "server.log").read_text()[-3000:])
        body = {
            "kind": "rollout",
            "model": "qwen3_moe",
            "prompts": [{"prompt": f"the bank {i}"} for i in range(8)],
            "sampling": {"max_tokens": 4, "temperature": 0},
        }
        job = httpx.post(f"{url}/v1/jobs", json=body, headers=headers, timeout=30).json()
        deadline = time.monotonic() + 300
        while job["state"] in ("queued", "running"):
            assert time.monotonic() < deadline, f"job still {job['state']} after 300 s"
            time.sleep(0.5)
            job = httpx.get(f"{url}/v1/jobs/{job['id']}", headers=headers, timeout=30).json()
        assert job["state"] == "done" and job["sequences_done"] == 8, job
        assert job["store"] == f"{store_root}/{job['id']}"
        assert (tmp_path / "data" / "models" / "qwen3_moe" / "config.json").is_file()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    assert len(open_store(job["store"]).index) == 8

    report = tmp_path / "report"
    analyzed = subprocess.run(
        [
            "bash",
            str(ENTRYPOINT),
            "analyze",
            job["store"],
            "--out",
            str(report),
            "--analyses",
            "usage",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert analyzed.returncode == 0, analyzed.stderr[-3000:]
    assert (report / "report.html").is_file()
