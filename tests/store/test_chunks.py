"""The writer's own chunk path writes the bytes zarr itself writes, for every codec.

This is a proof against an independent implementation: the reference store is written
by zarr's `Array.__setitem__` (its own codec pipeline and store), and every chunk
object the writer produced must equal zarr's byte for byte; plain zarr then reads the
writer's store.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from capture_server.store import StoreOptions
from capture_server.store.chunks import encoder_for
from capture_server.store.format import COMPRESSORS
from capture_server.store.writer import StoreWriter
from tests.store import synthetic

KEYS = [f"seq-{i}" for i in range(12)]


def _write(path: Path, options: StoreOptions, threads: int) -> int:
    writer = StoreWriter(path, options, encoder_threads=threads)
    writer.open(synthetic.meta())
    for key in KEYS:
        writer.add_sequence(
            synthetic.end_of(key), synthetic.sequence_rows(key, synthetic.length_of(key))
        )
        writer.flush(partial=False)
    writer.close()
    return writer._buf_end


def _chunk_objects(array_dir: Path) -> dict[str, bytes]:
    """Chunk objects by key: every file of the array but its metadata."""
    return {
        str(p.relative_to(array_dir)): p.read_bytes()
        for p in array_dir.rglob("*")
        if p.is_file() and p.name != "zarr.json"
    }


@pytest.mark.parametrize("compressor", sorted(COMPRESSORS))
def test_chunks_equal_zarr_byte_for_byte(tmp_path, compressor):
    options = StoreOptions(
        compressor=compressor,
        weights_dtype="float16",
        hidden_layers=(0,),
        chunk_tokens=64,
    )
    rows = _write(tmp_path / "ours", options, threads=2)
    expected = {
        name: []
        for name in (
            "topk_ids",
            "topk_weights",
            "router_logits",
            "hidden_states_0",
            "token_ids",
            "positions",
        )
    }
    for key in KEYS:
        r = synthetic.sequence_rows(key, synthetic.length_of(key))
        for name, values in (
            ("topk_ids", r.topk_ids),
            ("topk_weights", r.topk_weights),
            ("router_logits", r.router_logits),
            ("hidden_states_0", r.hidden_states[0]),
            ("token_ids", r.token_ids),
            ("positions", r.positions),
        ):
            expected[name].append(values)

    ours = zarr.open_group(tmp_path / "ours", mode="r")
    reference = zarr.open_group(tmp_path / "zarr", mode="w")
    for name, parts in expected.items():
        arr = ours[name]
        assert encoder_for(arr) is not None, f"{name}: written through zarr, not the chunk path"
        values = np.concatenate(parts).astype(arr.dtype)
        padded = np.zeros((arr.shape[0], *arr.shape[1:]), arr.dtype)
        padded[:rows] = values
        ref = reference.create_array(
            name,
            shape=arr.shape,
            chunks=arr.chunks,
            dtype=arr.dtype,
            compressors=COMPRESSORS[compressor](arr.dtype.itemsize),
            fill_value=0,
            chunk_key_encoding=arr.metadata.chunk_key_encoding,
            config={"write_empty_chunks": True},
        )
        ref[:] = padded
        # plain zarr reads what the writer wrote
        np.testing.assert_array_equal(arr[:rows], values)
        mine = _chunk_objects(tmp_path / "ours" / name)
        theirs = _chunk_objects(tmp_path / "zarr" / name)
        written = -(-rows // 64)
        assert len(mine) == written, f"{name}: {sorted(mine)}"
        for key, data in mine.items():
            assert data == theirs[key], f"{name}/{key}: bytes differ from zarr's"


def test_one_and_four_encoder_threads_write_the_same_objects(tmp_path):
    """Regression check (moetrace against itself): the pool's size and order of
    completion do not change what lands on disk."""
    options = StoreOptions(chunk_tokens=64)
    _write(tmp_path / "one", options, threads=1)
    _write(tmp_path / "four", options, threads=4)
    for name in ("topk_ids", "topk_weights", "router_logits", "token_ids", "positions"):
        assert _chunk_objects(tmp_path / "one" / name) == _chunk_objects(tmp_path / "four" / name)


def test_durable_writes_the_same_objects(tmp_path):
    """Regression check: durable mode (fdatasync per object, directories once per
    commit) changes when bytes reach the disk, not which bytes."""
    options = StoreOptions(chunk_tokens=64)
    _write(tmp_path / "buffered", options, threads=2)
    writer = StoreWriter(tmp_path / "durable", options, durable=True)
    writer.open(synthetic.meta())
    for key in KEYS:
        rows = synthetic.sequence_rows(key, synthetic.length_of(key))
        writer.add_sequence(synthetic.end_of(key), rows)
        writer.flush(partial=False)
    writer.close()
    for name in ("topk_ids", "router_logits", "positions"):
        durable = _chunk_objects(tmp_path / "durable" / name)
        assert durable and durable == _chunk_objects(tmp_path / "buffered" / name)
