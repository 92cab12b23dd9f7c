"""Start the capture service as a subprocess on loopback and wait until it is ready.

Used by the demo and the tests; the tiny-model settings (fp32, short context, hidden
states of MoE layer 1, a 1 GiB CPU KV cache, eager mode: compiling costs a CPU about a
minute per engine) suit the specimen models.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str, proc: subprocess.Popen, timeout: float, every: float = 0.2) -> bool:
    """True once GET `url` answers 200; False when `proc` exits or `timeout` passes first."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(every)
    return False


def launch(
    models: list[Path],
    data_dir: Path,
    log: Path,
    *,
    port: int | None = None,
    token: str | None = None,
    env: dict[str, str] | None = None,
    hidden_layers: tuple[int, ...] = (1,),
    engine_flags: tuple[str, ...] = ("--enforce-eager",),
    timeout: float = 180,
) -> tuple[subprocess.Popen, str]:
    """Start ``python -m capture_server.api serve`` in its own process group.

    `env` adds environment settings (``MOETRACE_*``); `engine_flags` are vLLM engine
    flags for every model. Returns the process and its base
    URL once ``/readyz`` answers 200. Raises `RuntimeError` with the end of the log when
    the server dies or times out. Without a `port`, a free one is picked, and picked
    again (up to 3 tries) if another process took it during the server's ~20 s start.
    """
    args = (models, data_dir, log, token, env, hidden_layers, engine_flags, timeout)
    for _ in range(2):
        try:
            return _launch_once(port or free_port(), *args)
        except RuntimeError:
            if port is not None or "address already in use" not in log.read_text(errors="replace"):
                raise
    return _launch_once(free_port(), *args)


def _launch_once(
    port: int,
    models: list[Path],
    data_dir: Path,
    log: Path,
    token: str | None,
    env: dict[str, str] | None,
    hidden_layers: tuple[int, ...],
    engine_flags: tuple[str, ...],
    timeout: float,
) -> tuple[subprocess.Popen, str]:
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
        *engine_flags,
    ]
    for layer in hidden_layers:
        cmd += ["--hidden-layer", str(layer)]
    for model in models:
        cmd += ["--model", str(model)]
    if token:
        cmd += ["--token", token]
    settings = env or {}
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the service runs its engine apart
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind", **settings)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    # polled often: callers (the kill trials) act on jobs the server resumes at start
    if answers(f"{url}/readyz", proc, timeout):
        return proc, url
    proc.kill()
    raise RuntimeError(f"the capture server did not become ready; log: {log.read_text()[-3000:]}")
