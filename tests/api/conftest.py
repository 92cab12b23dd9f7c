"""A real capture server (uvicorn on 127.0.0.1, vLLM engine in its own processes)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from capture_server.api.launch import launch

TOKEN = "test-token"
UPLOAD_LIMIT = 2**20


class Server:
    def __init__(self, url: str, data_dir: Path, proc: subprocess.Popen) -> None:
        self.url, self.data_dir, self.proc = url, data_dir, proc
        self.client = httpx.Client(
            base_url=url, timeout=60, headers={"Authorization": f"Bearer {TOKEN}"}
        )

    def wait_job(self, job_id: str, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.client.get(f"/v1/jobs/{job_id}", params={"wait": 30}).json()  # long poll
            if job["state"] in ("done", "failed", "cancelled"):
                return job
        raise TimeoutError(f"job {job_id} did not finish")


def start_server(
    models: list[Path],
    data_dir: Path,
    log: Path,
    env: dict[str, str] | None = None,
    engine: tuple[str, ...] = ("--enforce-eager",),
) -> Server:
    """A server on loopback; `engine`: vLLM engine flags for every model."""
    env = {
        "MOETRACE_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT),
        "MOETRACE_ONLINE_IDLE_SECONDS": "8",
        **(env or {}),
    }
    proc, url = launch(models, data_dir, log, token=TOKEN, env=env, engine_flags=engine)
    return Server(url, data_dir, proc)


def stop_server(server: Server) -> None:
    import signal

    try:
        os.killpg(server.proc.pid, signal.SIGTERM)
        server.proc.wait(timeout=60)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        os.killpg(server.proc.pid, signal.SIGKILL)


@pytest.fixture(scope="package")
def server(specimen, tmp_path_factory):
    """The shared server, with interventions on: every other test's requests run with the
    tables installed and must come out unchanged."""
    root = tmp_path_factory.mktemp("service")
    srv = start_server(
        [specimen("qwen3_moe"), specimen("qwen3_moe", planted=True)],
        root / "data",
        root / "server.log",
        env={"MOETRACE_INTERVENTIONS": "1"},
    )
    yield srv
    stop_server(srv)
