"""What goes into a store comes back out: arrays, index, labels, metadata."""

from __future__ import annotations

import numpy as np
import pytest

from capture_server.protocol import Annotation
from capture_server.store import StoreOptions, open_store
from capture_server.store.sink import StoreSink
from tests.store import synthetic
from tests.store.synthetic import EXACT


def write_all(path, keys, options=EXACT, **sink_kwargs):
    sink = StoreSink(path, options, **sink_kwargs)
    sink.open(synthetic.meta())
    for kind, item in synthetic.interleaved_steps(keys):
        sink.write(item) if kind == "rows" else sink.end_sequence(item)
    sink.close()
    return sink


def assert_sequence_intact(store, seq_id: int, key: str) -> None:
    want = synthetic.sequence_rows(key, synthetic.length_of(key))
    got = store.sequence(seq_id)
    np.testing.assert_array_equal(got["topk_ids"], want.topk_ids)
    np.testing.assert_array_equal(got["topk_weights"], want.topk_weights)
    np.testing.assert_array_equal(got["router_logits"], want.router_logits)
    np.testing.assert_array_equal(got["hidden_states_0"], want.hidden_states[0])
    np.testing.assert_array_equal(got["token_ids"], want.token_ids)
    np.testing.assert_array_equal(got["positions"], want.positions)
    np.testing.assert_array_equal(got["is_prompt"], want.is_prompt)


def assert_committed_intact(path) -> int:
    """Every committed sequence of the store at `path` reads back whole; their count."""
    store = open_store(path)
    for row in store.index.iter_rows(named=True):
        assert_sequence_intact(store, row["sequence_id"], row["request_id"])
    return len(store.index)


def test_round_trip_arrays_index_and_metadata(tmp_path):
    keys = [f"seq-{i}" for i in range(40)]
    write_all(tmp_path / "s", keys)
    store = open_store(tmp_path / "s")
    assert len(store.index) == 40 and set(store.index["request_id"]) == set(keys)
    assert store.num_tokens == sum(synthetic.length_of(k) for k in keys)
    for row in store.index.iter_rows(named=True):
        assert row["prompt_index"] == int(row["request_id"].split("-")[1])
        assert row["label_domain"] == ("math" if "3" in row["request_id"] else "code")
        assert_sequence_intact(store, row["sequence_id"], row["request_id"])
    np.testing.assert_array_equal(
        store.router_weights()["router_weights"], synthetic.meta().router_weights
    )
    assert store.model.moe_layers == [1, 2, 3] and store.chunk_tokens == 64
    # Sequences are contiguous and do not overlap.
    idx = store.index.sort("token_offset")
    ends = (idx["token_offset"] + idx["num_rows"]).to_numpy()
    np.testing.assert_array_equal(idx["token_offset"].to_numpy()[1:], ends[:-1])


def test_compact_dtypes(tmp_path):
    write_all(tmp_path / "s", ["seq-1", "seq-2"], StoreOptions(chunk_tokens=256))
    store = open_store(tmp_path / "s")
    arrays = store.sequence(0)
    assert arrays["topk_ids"].dtype == np.uint8
    assert arrays["router_logits"].dtype == np.float16
    assert "hidden_states_0" not in arrays
    key = store.index["request_id"][0]
    want = synthetic.sequence_rows(key, synthetic.length_of(key))
    np.testing.assert_allclose(arrays["router_logits"], want.router_logits, atol=2e-3)


def test_blocks_cover_each_sequence_once(tmp_path):
    keys = [f"seq-{i}" for i in range(60)]
    write_all(tmp_path / "s", keys)
    store = open_store(tmp_path / "s")
    blocks = list(store.blocks(target_tokens=200))
    assert len(blocks) > 3
    seen = [s for b in blocks for s in b.sequence_ids]
    assert sorted(seen) == sorted(store.index["sequence_id"].to_list())
    for b in blocks:
        assert b.start % store.chunk_tokens == 0
        rows = store.index.filter(store.index["sequence_id"].is_in(list(b.sequence_ids)))
        assert rows["token_offset"].min() >= b.start
        assert (rows["token_offset"] + rows["num_rows"]).max() == b.stop


def test_resume_appends_without_duplicates(tmp_path):
    first = [f"seq-{i}" for i in range(10)]
    write_all(tmp_path / "s", first)
    # The resumed job re-sends some sequences it had already sent, then new ones.
    sink = write_all(tmp_path / "s", [f"seq-{i}" for i in range(5, 25)])
    assert sink.stats["duplicates_skipped"] == 5
    store = open_store(tmp_path / "s")
    assert sorted(store.index["request_id"]) == sorted(f"seq-{i}" for i in range(25))
    for row in store.index.iter_rows(named=True):
        assert_sequence_intact(store, row["sequence_id"], row["request_id"])


def test_drop_policy_never_commits_incomplete_sequences(tmp_path):
    sink = StoreSink(tmp_path / "s", EXACT, queue_steps=4, on_full="drop")
    sink.writer.open(synthetic.meta())  # writer thread held back: the queue must overflow
    steps = list(synthetic.interleaved_steps([f"seq-{i}" for i in range(30)]))
    for kind, item in steps[:4]:
        sink.write(item) if kind == "rows" else sink.end_sequence(item)
    sink.start()
    for kind, item in steps[4:]:
        sink.write(item) if kind == "rows" else sink.end_sequence(item)
    sink.close()
    store = open_store(tmp_path / "s")
    assert sink.stats["dropped_steps"] > 0, "a one-step queue must overflow here"
    assert len(store.index) + sink.stats["dropped_sequences"] == 30
    for row in store.index.iter_rows(named=True):
        assert_sequence_intact(store, row["sequence_id"], row["request_id"])


@pytest.mark.parametrize("options", [EXACT, StoreOptions(compressor="zstd")])
def test_annotations_join_the_index(tmp_path, options):
    sink = write_all(tmp_path / "s", ["seq-1", "seq-2"], options)
    sink.writer.annotate(
        [
            Annotation(
                request_id="seq-1",
                sample_index=0,
                finish_reason="stop",
                completion_text="hello",
                generated_len=1,
            )
        ]
    )
    store = open_store(tmp_path / "s")
    row = store.index.filter(store.index["request_id"] == "seq-1").row(0, named=True)
    assert row["finish_reason"] == "stop" and row["completion_text"] == "hello"


def test_any_fsspec_url_round_trips(tmp_path):
    """Stores go through zarr's storage layer: an fsspec URL (here fsspec's in-memory
    filesystem, standing in for s3:// and friends) works like a directory."""
    url = f"memory://moetrace-test/{tmp_path.name}"
    keys = [f"seq-{i}" for i in range(6)]
    write_all(url, keys)
    store = open_store(url)
    assert sorted(store.index["request_id"]) == sorted(keys)
    for row in store.index.iter_rows(named=True):
        assert_sequence_intact(store, row["sequence_id"], row["request_id"])


def test_rows_past_the_returned_output_are_not_read(tmp_path):
    """A stop string (or async scheduling) can end the returned output before the last
    position the engine forwarded: the annotation's `positions` clips the sequence."""
    sink = write_all(tmp_path / "s", ["seq-1", "seq-2"])
    written = synthetic.length_of("seq-1")
    sink.writer.annotate(
        [
            Annotation(
                request_id="seq-1",
                sample_index=0,
                completion_text="x",
                finish_reason="stop",
                generated_len=2,
                positions=written - 3,
            )
        ]
    )
    store = open_store(tmp_path / "s")
    row = store.index.filter(store.index["request_id"] == "seq-1").row(0, named=True)
    assert row["rows_written"] == written and row["num_rows"] == written - 3
    arrays = store.sequence(row["sequence_id"])
    want = synthetic.sequence_rows("seq-1", written).topk_ids[: written - 3]
    np.testing.assert_array_equal(arrays["topk_ids"], want)
    other = store.index.filter(store.index["request_id"] == "seq-2").row(0, named=True)
    assert other["num_rows"] == other["rows_written"] == synthetic.length_of("seq-2")


def test_annotations_written_in_one_clock_tick_are_both_kept(tmp_path, monkeypatch):
    """A coarse clock gives two writes the same time: neither may replace the other."""
    from capture_server.store import index as index_module
    from capture_server.store.index import write_annotations

    sink = write_all(tmp_path / "s", ["seq-1", "seq-2"])
    monkeypatch.setattr(index_module.time, "time_ns", lambda: 1_796_060_061_844_169_218)
    for key in ("seq-1", "seq-2"):
        write_annotations(
            sink.writer.store,
            [
                Annotation(
                    request_id=key,
                    sample_index=0,
                    completion_text=key,
                    finish_reason="stop",
                    generated_len=1,
                )
            ],
        )
    index = open_store(tmp_path / "s").index
    assert sorted(index["completion_text"].to_list()) == ["seq-1", "seq-2"]


def test_texts_written_before_the_writer_creates_the_store_are_kept(tmp_path):
    """The service writes a fast sample's texts as soon as its output returns, which can be
    before the worker's writer thread creates the store: creating must not delete them."""
    from capture_server.store.index import write_annotations

    path = tmp_path / "s"
    early = Annotation(
        request_id="seq-1",
        sample_index=0,
        completion_text="early",
        finish_reason="stop",
        generated_len=1,
    )
    write_annotations(str(path), [early])
    write_all(path, ["seq-1", "seq-2"])
    index = open_store(path).index
    row = index.filter(index["request_id"] == "seq-1").row(0, named=True)
    assert row["completion_text"] == "early"


def test_chunks_fit_the_expected_rows():
    """Hand values: 128-byte rows fill 8 MiB chunks at 65536 rows; a store expected to
    hold 100 rows gets the smallest chunk, 5000 rows the power of two above."""
    from capture_server.store.format import choose_chunk_tokens

    assert choose_chunk_tokens(128) == 65536
    assert choose_chunk_tokens(128, expected_rows=100) == 256
    assert choose_chunk_tokens(128, expected_rows=5000) == 8192
    assert choose_chunk_tokens(128, expected_rows=10**9) == 65536
    assert choose_chunk_tokens(13448, expected_rows=10**9) == 512  # wide rows: bytes rule


def test_router_matrices_are_kept_only_with_hidden_states(tmp_path):
    """They serve only with the router inputs they route, and are large on real models."""
    from capture_server.store.writer import StoreWriter

    writer = StoreWriter(tmp_path / "s", StoreOptions(hidden_layers=()))
    writer.open(synthetic.meta())
    writer.close()
    assert "router_weights" not in open_store(tmp_path / "s").router_weights()


def test_a_creation_that_died_before_its_attributes_is_replaced(tmp_path):
    """A writer killed while creating leaves a group without attributes, arrays of its
    own (here: another chunk size, and a chunk object) and router matrices: the next
    writer replaces all of them, keeps the texts, and its rows read back."""
    from capture_server.store.index import write_annotations
    from capture_server.store.writer import StoreWriter

    path = tmp_path / "s"
    first = StoreWriter(path, StoreOptions(chunk_tokens=16, hidden_layers=(0,)))
    first.open(synthetic.meta())
    first.close()
    (path / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    (path / "topk_ids" / "c.9.0.0").write_bytes(b"left by the dead writer")
    early = Annotation("seq-1", 0, completion_text="early", finish_reason="stop", generated_len=1)
    write_annotations(str(path), [early])

    write_all(path, ["seq-1", "seq-2"], StoreOptions(hidden_layers=()))
    store = open_store(path)
    assert store.chunk_tokens != 16 and not (path / "topk_ids" / "c.9.0.0").exists()
    assert "router_weights" not in store.router_weights()  # no hidden layers this time
    row = store.index.filter(store.index["request_id"] == "seq-1").row(0, named=True)
    assert row["completion_text"] == "early"
    got = store.sequence(row["sequence_id"])
    want = synthetic.sequence_rows("seq-1", synthetic.length_of("seq-1"))
    np.testing.assert_array_equal(got["topk_ids"], want.topk_ids)
    np.testing.assert_array_equal(got["token_ids"], want.token_ids)
