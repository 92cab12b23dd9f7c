"""Durable mode's ordering: nothing is committed before the objects it names are synced.

A power cut cannot be made on this machine, so these tests check the order of the
system calls that durability rests on instead: every fdatasync is recorded by the inode
it synced (the real call still runs), and at the moment each index part (a commit) is
written, every chunk object and tail segment then on disk must have been synced. The
writer defers the chunks' syncs to a barrier (`ChunkWriter._barrier`); skipping that
barrier's syncs fails the first test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from capture_server.store import StoreOptions, _raw
from capture_server.store.format import INDEX_PREFIX
from capture_server.store.writer import StoreWriter
from tests.store import synthetic

KEYS = [f"seq-{i}" for i in range(12)]
ARRAYS = ("topk_ids", "topk_weights", "router_logits", "token_ids", "positions")


@pytest.fixture
def synced(monkeypatch) -> set[int]:
    """Inodes fdatasynced so far in this test."""
    inodes: set[int] = set()
    real = os.fdatasync

    def recording(fd: int) -> None:
        real(fd)
        inodes.add(os.fstat(fd).st_ino)

    monkeypatch.setattr(os, "fdatasync", recording)
    return inodes


def _array_objects(root: Path) -> list[Path]:
    """Chunk objects and tail segments on disk now (no metadata, no temporary files)."""
    return [
        p
        for name in ARRAYS
        for p in (root / name).rglob("*")
        if p.is_file() and p.name != "zarr.json" and not p.name.endswith(".partial")
    ]


def test_every_object_is_synced_before_the_commit_that_names_it(tmp_path, monkeypatch, synced):
    root = tmp_path / "durable"
    commits: list[int] = []
    real_put = _raw.put_file

    def checking_put(path: Path, data, **kwargs):
        if INDEX_PREFIX in path.as_posix():
            unsynced = [p for p in _array_objects(root) if p.stat().st_ino not in synced]
            assert not unsynced, f"committed before these were synced: {unsynced}"
            commits.append(len(_array_objects(root)))
        return real_put(path, data, **kwargs)

    monkeypatch.setattr("capture_server.store.chunks.put_file", checking_put)
    writer = StoreWriter(root, StoreOptions(chunk_tokens=64), durable=True)
    writer.open(synthetic.meta())
    for i, key in enumerate(KEYS):
        rows = synthetic.sequence_rows(key, synthetic.length_of(key))
        writer.add_sequence(synthetic.end_of(key), rows)
        writer.flush(partial=i % 3 == 2)  # commits after whole chunks and after tails
    writer.close()
    assert len(commits) >= 4 and max(commits) > 0  # several commits, each over objects
    assert writer.sequences_committed == len(KEYS)


def test_an_object_replacing_another_is_synced_before_the_rename(tmp_path, synced):
    """A rename over an existing key must not wait for the barrier: after a power cut the
    old name could point at the new file before its data was written."""
    path = tmp_path / "c" / "0"
    path.parent.mkdir()
    assert _raw.put_file(path, b"first", durable=True, defer_sync=True)
    assert path.stat().st_ino not in synced  # a new key: synced later, at the barrier
    later = _raw.put_file(path, b"second", durable=True, defer_sync=True)
    assert not later and path.stat().st_ino in synced
    assert path.read_bytes() == b"second"
