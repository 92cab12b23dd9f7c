"""A job database that stops taking writes (here: its disk full) ends the running
job cleanly: it stops generating, reads `failed` with the database's error, new jobs get
a 503 naming the file, and the record is written once the database takes writes again.
The job's store (on another disk) keeps what it committed, with texts."""

from __future__ import annotations

import errno
import os
import sqlite3
import time

import pytest

from capture_server.store import open_store
from tests.api.conftest import start_server, stop_server
from tests.mounts import tmpfs


@pytest.fixture
def data_mount(tmp_path):
    """A 64 MiB tmpfs for the data dir."""
    with tmpfs(tmp_path / "data", "64m", "cannot mount a tmpfs here") as mount:
        yield mount


def _fill(mount) -> None:
    """Take every free byte of the mount."""
    fd = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        block = 2**20
        while block:
            try:
                os.write(fd, b"\0" * block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                block //= 2
    finally:
        os.close(fd)


PROMPTS = 256


@pytest.mark.slow
def test_a_database_that_takes_no_writes_ends_the_job_cleanly(specimen, data_mount, tmp_path):
    # requests in waves of 4: sequences commit while the job is still running
    env = {"MOETRACE_STORE_ROOT": str(tmp_path / "stores"), "MOETRACE_CONCURRENCY": "4"}
    server = start_server([specimen("qwen3_moe")], data_mount, tmp_path / "s.log", env)
    try:
        body = {
            "kind": "rollout",
            "model": "qwen3_moe",
            # long enough that the stop, whose moment depends on when SQLite first fails
            # to grow its files (about 36 of these prompts in, once), is well before the end
            "prompts": [{"prompt": f"a long story {i}"} for i in range(PROMPTS)],
            "sampling": {"max_tokens": 64, "ignore_eos": True, "n": 2},
        }
        job_id = server.client.post("/v1/jobs", json=body).json()["id"]
        deadline = time.monotonic() + 120
        while server.client.get(f"/v1/jobs/{job_id}").json()["tokens_done"] == 0:
            assert time.monotonic() < deadline, "the job never made progress"
            time.sleep(0.2)

        _fill(data_mount)
        job = server.wait_job(job_id, timeout=120)
        assert job["state"] == "failed", job
        assert any("jobs.sqlite" in e for e in job["errors"]), job["errors"]
        total = PROMPTS * 2 * 64
        assert job["tokens_done"] < total // 2, "generation stopped well before the end"

        refused = server.client.post("/v1/jobs", json=body)
        assert refused.status_code == 503 and "jobs.sqlite" in refused.json()["detail"]
        assert server.client.get("/readyz").status_code == 503

        (data_mount / "filler").unlink()
        deadline = time.monotonic() + 30
        while True:  # the record reaches the database once it takes writes again
            with sqlite3.connect(data_mount / "jobs.sqlite") as db:
                (state,) = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if state == "failed":
                break
            assert time.monotonic() < deadline, f"the database still says {state}"
            time.sleep(0.5)
        assert server.client.post("/v1/jobs", json=body).status_code == 201
    finally:
        stop_server(server)
    store = open_store(job["store"])
    assert len(store.index) > 0, "sequences committed before the failure stay"
    assert store.index["completion_text"].null_count() == 0
