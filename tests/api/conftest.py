"""A real capture server (uvicorn on 127.0.0.1, vLLM engine in its own processes)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

TOKEN = "test-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, data_dir: Path, proc: subprocess.Popen) -> None:
        self.url, self.data_dir, self.proc = url, data_dir, proc
        self.client = httpx.Client(
            base_url=url, timeout=60, headers={"Authorization": f"Bearer {TOKEN}"}
        )

    def wait_job(self, job_id: str, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.client.get(f"/v1/jobs/{job_id}").json()
            if job["state"] in ("done", "failed", "cancelled"):
                return job
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} did not finish")


def start_server(models: list[Path], data_dir: Path, log: Path) -> Server:
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "capture_server.api",
        "serve",
        "--data-dir",
        str(data_dir),
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        "512",
        "--hidden-layer",
        "1",
        "--token",
        TOKEN,
    ]
    for m in models:
        cmd += ["--model", str(m)]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the service runs its engine apart
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,  # noqa: SIM115
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return Server(url, data_dir, proc)
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(1)
    proc.kill()
    raise RuntimeError(f"server did not become ready; log: {log.read_text()[-3000:]}")


def stop_server(server: Server) -> None:
    import signal

    try:
        os.killpg(server.proc.pid, signal.SIGTERM)
        server.proc.wait(timeout=60)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        os.killpg(server.proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def server(specimen, tmp_path_factory):
    root = tmp_path_factory.mktemp("service")
    srv = start_server(
        [specimen("qwen3_moe"), specimen("qwen3_moe", planted=True)],
        root / "data",
        root / "server.log",
    )
    yield srv
    stop_server(srv)
