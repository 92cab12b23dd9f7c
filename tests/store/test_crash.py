"""Crash safety: a writer killed with SIGKILL at random points loses nothing committed."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
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


def test_sigkill_inside_a_commit_of_chunk_objects(tmp_path):
    """Killed while a commit's objects (tail segments, chunk objects) are being written
    by the chunk writer's threads (one of them in place, the rest and the index part
    not): what
    earlier commits made visible reads whole, the interrupted commit is not visible, and
    a resumed writer completes every sequence exactly once."""
    path = tmp_path / "store"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.store.crash_writer", str(path), str(COUNT)]
        + ["--pause-in-commit"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert line == "paused", proc.stderr.read() if proc.stderr else line
    index_written = max(p.stat().st_mtime_ns for p in path.glob("index/part-*.parquet"))
    objects = [p for p in [*path.glob("*/c.*"), *path.glob("tail/*/*")] if p.is_file()]
    assert any(p.stat().st_mtime_ns > index_written for p in objects), (
        "the kill did not land inside a commit: no chunk or tail object is newer than the index"
    )
    committed = _check_committed(path)
    assert 0 < len(committed) < COUNT
    proc = _start_writer(path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert _check_committed(path) == {f"seq-{i}" for i in range(COUNT)}
    assert len(open_store(path).index) == COUNT


def _start_part_writers(path: Path, count: int) -> list[subprocess.Popen]:
    """Four writers of one parted store: 2 data-parallel ranks x 2 pipeline stages."""
    return [
        subprocess.Popen(
            [sys.executable, "-m", "tests.store.crash_writer", str(path), str(count)]
            + [str(d), "2", str(s), "2"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for d in range(2)
        for s in range(2)
    ]


def _check_parted(path: Path) -> set[str]:
    """Every visible sequence reads whole (every layer from its stage), once."""
    from tests.store import parted

    try:
        store = open_store(path)
    except (StoreNotFoundError, StoreFormatError):
        return set()  # no rank has all its stages yet: nothing is visible
    keys = store.index["request_id"].to_list()
    assert len(keys) == len(set(keys)), "a sequence is visible twice"
    for row in store.index.iter_rows(named=True):
        got = store.sequence(row["sequence_id"])
        want = parted.full_rows(row["request_id"])
        for name in ("topk_ids", "topk_weights", "router_logits", "token_ids", "positions"):
            np.testing.assert_array_equal(got[name], getattr(want, name), err_msg=name)
        np.testing.assert_array_equal(got["hidden_states_2"], want.hidden_states[2])
    return set(keys)


@pytest.mark.slow
def test_sigkill_of_every_writer_of_a_parted_store(tmp_path):
    rng = random.Random(99)
    path, count = tmp_path / "parted", 96
    visible_before: set[str] = set()
    kills = 0
    for _ in range(8):
        procs = _start_part_writers(path, count)
        time.sleep(rng.uniform(0.5, 2.0))
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                kills += 1
            proc.wait(timeout=30)
        visible = _check_parted(path)
        assert visible_before <= visible, "a visible sequence disappeared"
        visible_before = visible
    assert kills >= 16, "most writers must be killed mid-run"
    procs = _start_part_writers(path, count)
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    assert _check_parted(path) == {f"seq-{i}" for i in range(count)}
