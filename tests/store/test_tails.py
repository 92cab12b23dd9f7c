"""Commits write tail segments: a live store reads right from them, each commit writes
only its new rows, a closed store is plain zarr, and a writer resumes from them.

Proofs against the synthetic sequences' known contents (planted values), and against
plain zarr reading the closed store.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import zarr

from capture_server.store import open_store
from capture_server.store.tails import list_segments
from capture_server.store.writer import StoreWriter
from tests.store import synthetic
from tests.store.test_roundtrip import assert_committed_intact

KEYS = [f"seq-{i}" for i in range(30)]


def _add(writer: StoreWriter, key: str) -> None:
    writer.add_sequence(
        synthetic.end_of(key), synthetic.sequence_rows(key, synthetic.length_of(key))
    )


def test_live_store_reads_from_tails_and_each_commit_writes_its_new_rows(tmp_path):
    path = tmp_path / "s"
    writer = StoreWriter(path, synthetic.EXACT)
    writer.open(synthetic.meta())
    end = 0
    for i, key in enumerate(KEYS):
        _add(writer, key)
        writer.flush(partial=True)
        start, end = end, end + synthetic.length_of(key)
        chunk_start = end // 64 * 64
        newest = max(list_segments(writer.store), key=lambda s: s.stop, default=None)
        if end > chunk_start:  # the last chunk is partial: its new rows are a tail
            assert newest is not None and newest.stop == end
            assert newest.start == max(start, chunk_start), "a commit rewrote older rows"
        assert assert_committed_intact(path) == i + 1
    assert list_segments(writer.store), "the live store has no tail segment"
    writer.close()
    assert not list_segments(writer.store), "a closed store keeps tail segments"
    rows = np.concatenate(
        [synthetic.sequence_rows(k, synthetic.length_of(k)).router_logits for k in KEYS]
    )
    plain = zarr.open_array(str(path / "router_logits"), mode="r")
    np.testing.assert_array_equal(plain[: len(rows)], rows)


def test_resume_from_tails_left_by_a_crash(tmp_path):
    path = tmp_path / "s"
    first = StoreWriter(path, synthetic.EXACT)
    first.open(synthetic.meta())
    for key in KEYS[:7]:
        _add(first, key)
        first.flush(partial=True)
    # rows in a tail segment, never committed (their texts never come): stale after a crash
    end = dataclasses.replace(synthetic.end_of(KEYS[7]), awaits_texts=True)
    stale_rows = synthetic.length_of(KEYS[7]) + 3  # a tail no later one coincides with
    first.add_sequence(end, synthetic.sequence_rows("stale", stale_rows))
    first.flush(partial=True)
    assert max(s.stop for s in list_segments(first.store)) > open_store(path).num_tokens
    first._chunks.close()  # the process dies here: no close, no seal
    assert list_segments(first.store)
    assert assert_committed_intact(path) == 7

    second = StoreWriter(path, synthetic.EXACT)
    second.open(synthetic.meta())
    for key in KEYS[7:]:
        _add(second, key)
        second.flush(partial=True)
    second.close()
    assert assert_committed_intact(path) == len(KEYS)
    assert set(open_store(path).index["request_id"]) == set(KEYS)
    assert not list_segments(second.store)
