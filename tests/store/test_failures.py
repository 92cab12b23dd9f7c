"""A full disk fails the job with a clear error and leaves committed data readable;
bad stores give one-line errors naming the path."""

from __future__ import annotations

import errno
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from zarr.storage import LocalStore, WrapperStore

from capture_server.errors import (
    StoreCorruptError,
    StoreFormatError,
    StoreNotFoundError,
    StoreWriteError,
)
from capture_server.store import open_store
from capture_server.store.sink import StoreSink
from tests.mounts import tmpfs
from tests.store import synthetic
from tests.store.test_roundtrip import EXACT, assert_committed_intact, write_all

ROOT = Path(__file__).resolve().parents[2]


def full_disk_store(store: LocalStore, budget: int) -> WrapperStore:
    """A local store whose device fills up after `budget` bytes (shared by its copies)."""
    left = {"bytes": budget}

    class FullDiskStore(WrapperStore):
        async def set(self, key, value) -> None:
            left["bytes"] -= len(value)
            if left["bytes"] < 0:
                raise OSError(errno.ENOSPC, "No space left on device", key)
            await self._store.set(key, value)

    return FullDiskStore(store)


@pytest.fixture
def tiny_mount(tmp_path):
    """A 384 KiB tmpfs."""
    why = "cannot mount a size-limited tmpfs here; the store-layer test covers it"
    with tmpfs(tmp_path / "tiny", "384k", why) as mount:
        yield mount


def _stream_until_failure(sink: StoreSink, count: int) -> StoreWriteError:
    keys = [f"seq-{i}" for i in range(count)]
    with pytest.raises(StoreWriteError) as failure:
        for start in range(0, count, 8):
            for kind, item in synthetic.interleaved_steps(keys[start : start + 8]):
                sink.write(item) if kind == "rows" else sink.end_sequence(item)
            sink.flush()
        sink.close()
    return failure.value


def test_full_disk_through_the_store_layer(tmp_path):
    path = tmp_path / "s"
    sink = StoreSink(path, EXACT, flush_interval=0.01)
    sink.writer.store = full_disk_store(LocalStore(str(path)), budget=300_000)
    sink.open(synthetic.meta())
    error = _stream_until_failure(sink, 200)
    assert "No space left on device" in str(error) and str(path) in str(error)
    assert assert_committed_intact(path) > 0


def test_full_disk_on_a_size_limited_mount(tiny_mount):
    path = tiny_mount / "s"
    sink = StoreSink(path, EXACT, flush_interval=0.01)
    sink.open(synthetic.meta())
    error = _stream_until_failure(sink, 400)
    assert "No space left on device" in str(error)
    assert assert_committed_intact(path) > 0


def test_missing_store(tmp_path):
    with pytest.raises(StoreNotFoundError, match=str(tmp_path / "nope")):
        open_store(tmp_path / "nope")


def test_wrong_format_version(tmp_path):
    import zarr

    write_all(tmp_path / "s", ["seq-1"])
    root = zarr.open_group(tmp_path / "s", mode="r+")
    attrs = dict(root.attrs["moetrace"], format_version=99)
    root.attrs["moetrace"] = attrs
    with pytest.raises(StoreFormatError, match="format version 99"):
        open_store(tmp_path / "s")


def test_not_a_store(tmp_path):
    import zarr

    zarr.open_group(tmp_path / "plain", mode="w")
    with pytest.raises(StoreFormatError, match="not a moetrace routing store"):
        open_store(tmp_path / "plain")


def test_truncated_chunk(tmp_path):
    write_all(tmp_path / "s", [f"seq-{i}" for i in range(10)])
    array_dir = tmp_path / "s" / "router_logits"
    chunk = next(p for p in sorted(array_dir.rglob("*")) if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(chunk.read_bytes()[:20])
    store = open_store(tmp_path / "s")
    with pytest.raises(StoreCorruptError, match="router_logits"):
        for seq_id in store.index["sequence_id"].to_list():
            store.sequence(seq_id)


@pytest.mark.parametrize("damage", ["missing", "version", "truncated"])
def test_cli_prints_one_line_and_exits_nonzero(tmp_path, damage):
    path = tmp_path / "s"
    if damage != "missing":
        write_all(path, [f"seq-{i}" for i in range(5)])
    if damage == "version":
        shutil.rmtree(path / "index")
        meta = path / "zarr.json"
        meta.write_text(meta.read_text().replace('"format_version": 1', '"format_version": 7'))
    if damage == "truncated":
        for part in (path / "router_logits").rglob("*"):
            if part.is_file() and part.name != "zarr.json":
                part.write_bytes(b"xx")
    done = subprocess.run(
        [sys.executable, "-m", "capture_server.store", "verify", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0], done.stderr
    assert "Traceback" not in done.stderr
