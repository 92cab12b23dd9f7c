"""Crash safety: a writer killed with SIGKILL at random points loses nothing committed."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from capture_server.errors import StoreFormatError, StoreNotFoundError
from capture_server.store import open_store
from tests.store.test_roundtrip import assert_sequence_intact

ROOT = Path(__file__).resolve().parents[2]
COUNT = 160
TRIALS = 20


def _start_writer(path: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.store.crash_writer", str(path), str(COUNT)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _check_committed(path: Path) -> set[str]:
    """Every committed sequence reads back intact, once; return the committed keys."""
    try:
        store = open_store(path)
    except (StoreNotFoundError, StoreFormatError):
        return set()  # killed before the store existed: nothing was committed
    keys = store.index["request_id"].to_list()
    assert len(keys) == len(set(keys)), "a sequence is committed twice"
    for row in store.index.iter_rows(named=True):
        assert_sequence_intact(store, row["sequence_id"], row["request_id"])
    return set(keys)


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume(tmp_path):
    rng = random.Random(1234)
    path = tmp_path / "store"
    committed_before: set[str] = set()
    kills = 0
    for _ in range(TRIALS):
        proc = _start_writer(path)
        time.sleep(rng.uniform(0.5, 2.5))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait(timeout=30)
        committed = _check_committed(path)
        assert committed_before <= committed, "a committed sequence disappeared"
        committed_before = committed
    assert kills >= TRIALS // 2, "most trials must kill the writer mid-run"
    proc = _start_writer(path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    final = _check_committed(path)
    assert final == {f"seq-{i}" for i in range(COUNT)}
    assert len(open_store(path).index) == COUNT
