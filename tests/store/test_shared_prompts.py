"""Prompt rows stored once for a request's samples: readers get back exactly what was
written, the store is smaller, and a crash never leaves a sequence without its prompt.

Proof here is against the rows handed to the writer (synthetic, deterministic by key) and
against the same rows written with sharing off: every read equals the rows given."""

from __future__ import annotations

import dataclasses
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

from capture_server.errors import StoreFormatError, StoreNotFoundError
from capture_server.store import open_store
from capture_server.store.shared_prompts import SharedPrompts, leading_equal_rows
from capture_server.store.writer import StoreWriter
from tests.store import synthetic
from tests.store.synthetic import EXACT, GENERATED, PROMPT, sample_end, sample_rows

SAMPLES = 4
ROOT = Path(__file__).resolve().parents[2]


def write(path, share: bool, requests: int = 6, differ: dict | None = None) -> None:
    options = dataclasses.replace(EXACT, share_prompt_rows=share)
    writer = StoreWriter(str(path), options)
    writer.open(synthetic.meta())
    for r in range(requests):
        for s in range(SAMPLES):
            at = (differ or {}).get((r, s))
            writer.add_sequence(sample_end(f"req-{r}", s), sample_rows(f"req-{r}", s, at))
        writer.flush(partial=r % 2 == 1)  # commits land between samples too
    writer.close()


def assert_reads_as_written(store, differ: dict | None = None) -> None:
    for row in store.index.iter_rows(named=True):
        r = int(row["request_id"].split("-")[1])
        synthetic.assert_sample_intact(store, row, (differ or {}).get((r, row["sample_index"])))


def disk_bytes(path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_samples_store_their_prompt_once_and_read_whole(tmp_path):
    write(tmp_path / "shared", share=True)
    write(tmp_path / "full", share=False)
    shared, full = open_store(tmp_path / "shared"), open_store(tmp_path / "full")
    assert_reads_as_written(shared)
    assert_reads_as_written(full)
    later = shared.index.filter(pl.col("sample_index") > 0)
    assert (later["shared_rows"] == PROMPT).all(), "every later sample shares its prompt"
    assert (shared.index.filter(pl.col("sample_index") == 0)["shared_rows"] == 0).all()
    assert (full.index["shared_rows"] == 0).all()
    stored = shared.num_tokens
    assert stored == 6 * (PROMPT + SAMPLES * GENERATED)
    assert full.num_tokens == 6 * SAMPLES * (PROMPT + GENERATED)
    assert disk_bytes(tmp_path / "shared") < 0.6 * disk_bytes(tmp_path / "full")
    # every stored row is read by exactly one block
    covered = sorted(i for b in shared.blocks(64) for i in b.sequence_ids)
    assert covered == sorted(shared.index["sequence_id"].to_list())


def test_only_the_rows_equal_byte_for_byte_are_shared(tmp_path):
    differ = {(1, 2): 7, (2, 1): 0, (3, 3): 49}
    write(tmp_path / "s", share=True, differ=differ)
    store = open_store(tmp_path / "s")
    assert_reads_as_written(store, differ)
    shared = {
        (int(r["request_id"].split("-")[1]), r["sample_index"]): r["shared_rows"]
        for r in store.index.iter_rows(named=True)
    }
    assert shared[1, 2] == 7 and shared[2, 1] == 0 and shared[3, 3] == 49
    assert shared[1, 1] == PROMPT and shared[1, 3] == PROMPT


def test_nan_rows_match_byte_for_byte():
    a = np.full((4, 3), np.nan, np.float32)
    assert leading_equal_rows(a, a.copy()) == 4
    b = a.copy()
    b[2, 1] = 0.0
    assert leading_equal_rows(a, b) == 2
    assert leading_equal_rows(a, a.astype(np.float64)) == 0  # other dtype: nothing shared


def test_the_held_prompts_stay_within_their_byte_budget():
    columns = {"positions": np.arange(100), "topk_ids": np.zeros((100, 8), np.int32)}
    size = sum(v.nbytes for v in columns.values())
    held = SharedPrompts(max_bytes=int(2.5 * size))
    for r in range(4):
        assert held.match(f"r{r}", 100, r * 100, columns) == (0, -1)  # holders
    assert held.match("r0", 100, 0, columns) == (0, -1), "the oldest holder was dropped"
    assert held.match("r3", 100, 500, columns) == (100, 300)


def test_a_sharer_reads_whole_when_its_holder_never_commits(tmp_path):
    """The first sample awaits texts that never come (an aborted caller): it is not
    committed, but the later samples that share its prompt rows are, and read whole,
    also after the store is resumed and written further."""
    path = tmp_path / "s"
    writer = StoreWriter(str(path), EXACT)
    writer.open(synthetic.meta())
    writer.add_sequence(sample_end("req-0", 0, awaits_texts=True), sample_rows("req-0", 0))
    for s in range(1, SAMPLES):
        writer.add_sequence(sample_end("req-0", s), sample_rows("req-0", s))
    writer.flush(partial=True)
    writer.close()
    store = open_store(path)
    assert sorted(store.index["sample_index"].to_list()) == [1, 2, 3]
    assert_reads_as_written(store)

    writer = StoreWriter(str(path), EXACT)  # resumed
    writer.open(synthetic.meta())
    writer.add_sequence(sample_end("req-1", 0), sample_rows("req-1", 0))
    writer.add_sequence(sample_end("req-1", 1), sample_rows("req-1", 1))
    writer.close()
    store = open_store(path)
    assert len(store.index) == 5
    assert_reads_as_written(store)


def test_sigkill_while_samples_share_prompt_rows_then_resume(tmp_path):
    """Killed at random moments while writing samples that share prompt rows: every
    committed sample reads whole (its shared prompt included) and once; a resumed writer
    completes them all."""
    rng = random.Random(7)
    path, requests = tmp_path / "store", 40
    command = [sys.executable, "-m", "tests.store.crash_writer", str(path), str(requests)]
    before: set = set()
    for _ in range(4):
        proc = subprocess.Popen([*command, "--samples"], cwd=ROOT, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(0.8, 2.0))
        killed = proc.poll() is None
        proc.kill()
        proc.wait(timeout=30)
        assert killed, "the writer must still be running when it is killed"
        committed = committed_keys_read_whole(path)
        assert before <= committed
        before = committed
    proc = subprocess.run([*command, "--samples"], cwd=ROOT, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    every = {(f"req-{r}", s) for r in range(requests) for s in range(SAMPLES)}
    assert committed_keys_read_whole(path) == every
    assert (open_store(path).index["shared_rows"] > 0).sum() > 0


def committed_keys_read_whole(path) -> set:
    """(request, sample) of every committed sequence, each checked to read whole, once."""
    try:
        store = open_store(path)
    except (StoreNotFoundError, StoreFormatError):
        return set()  # killed before the store existed
    keys = list(zip(store.index["request_id"], store.index["sample_index"], strict=True))
    assert len(keys) == len(set(keys)), "a sequence is committed twice"
    assert_reads_as_written(store)
    return set(keys)


def test_a_sole_sample_is_not_held():
    """`hold=False` (a request of n = 1): no copy is kept, and nothing can match it."""
    columns = {"positions": np.arange(10), "topk_ids": np.zeros((10, 8), np.int32)}
    held = SharedPrompts()
    assert held.match("r0", 10, 0, columns, hold=False) == (0, -1)
    assert held._bytes == 0
    assert held.match("r0", 10, 10, columns) == (0, -1)  # becomes the holder now
    assert held.match("r0", 10, 20, columns) == (10, 10)
