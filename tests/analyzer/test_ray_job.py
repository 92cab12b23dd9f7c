"""The analyzer as a Ray job: a real Ray head on loopback, `ray job submit`, real outputs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from capture_server.api.launch import answers
from tests.store.test_roundtrip import write_all

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head` bound to 127.0.0.1; yields the dashboard address."""
    import ray

    ray.shutdown()  # a local Ray of an earlier test must not be mistaken for this head
    port, dash = _free_port(), _free_port()
    # As after `source .venv/bin/activate`: the job's `python` is the project's.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PATH=path)
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path_factory.mktemp("ray") / "head.log", "w")  # noqa: SIM115
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--dashboard-host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dashboard-port",
            str(dash),
            "--num-cpus",
            "2",
            "--include-dashboard",
            "true",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    if not answers(f"{address}/api/version", head, timeout=120, every=1):
        os.killpg(head.pid, signal.SIGKILL)
        pytest.fail("the Ray head did not come up on 127.0.0.1")
    yield address, env
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
    log.close()


@pytest.mark.slow
def test_ray_job_submit_runs_the_analyzer(ray_head, tmp_path):
    address, env = ray_head
    store = tmp_path / "store"
    write_all(store, [f"seq-{i}" for i in range(30)])
    out = tmp_path / "out"
    done = subprocess.run(
        [
            RAY,
            "job",
            "submit",
            "--address",
            address,
            "--working-dir",
            str(ROOT),
            "--",
            "python",
            "-m",
            "analyzer",
            "run",
            str(store),
            "--out",
            str(out),
            "--analyses",
            "usage,overlap,committee",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout
    usage = pl.read_parquet(out / "usage.parquet")
    shares = usage.group_by("layer").agg(pl.col("share").sum()).sort("layer")
    np.testing.assert_allclose(shares["share"].to_numpy(), 1.0)
    assert len(usage) == 3 * 16
    assert len(pl.read_parquet(out / "committee.parquet")) == 3 + 1  # layers, all layers
    assert (out / "report.html").read_text().count("<img") >= 2
