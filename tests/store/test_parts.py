"""Format version 2: real writers write one store concurrently, one part each, and the
reader's merge equals a single-writer store of the same rows (a regression check against
version 1, whose writer is itself checked against its inputs in test_roundtrip)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from capture_server.errors import StoreFormatError
from capture_server.store import open_store
from capture_server.store.parts import PartId
from capture_server.store.sink import StoreSink
from tests.store import parted, synthetic

KEYS = [f"seq-{i}" for i in range(40)]
ARRAYS = (
    "topk_ids",
    "topk_weights",
    "router_logits",
    "token_ids",
    "positions",
    "hidden_states_0",
    "hidden_states_2",
    "is_prompt",
)


def single_writer_store(path) -> object:
    sink = StoreSink(path, parted.FULL_OPTIONS, flush_interval=0.02)
    sink.open(synthetic.meta())
    for key in KEYS:
        sink.write(parted.full_rows(key))
        sink.end_sequence(synthetic.end_of(key))
    sink.close()
    return open_store(path)


def write_concurrently(url: str, dp: int, pp: int) -> None:
    """dp x pp writer threads at once; rank d takes every dp-th key."""
    threads = [
        threading.Thread(
            target=parted.write_part,
            args=(url, PartId(d, s, pp), KEYS[d::dp], 0.001),
        )
        for d in range(dp)
        for s in range(pp)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)


def assert_same_as_single(store, single) -> None:
    assert sorted(store.index["request_id"].to_list()) == sorted(KEYS)
    assert store.model.moe_layers == single.model.moe_layers
    assert store.options.hidden_layers == single.options.hidden_layers
    assert sorted(store.array_names) == sorted(single.array_names)
    for name, value in single.router_weights().items():
        np.testing.assert_array_equal(store.router_weights()[name], value)
    columns = ["prompt_len", "num_rows", "first_position", "prompt_index", "labels"]
    for key in KEYS:
        row = store.index.filter(store.index["request_id"] == key).row(0, named=True)
        want = single.index.filter(single.index["request_id"] == key).row(0, named=True)
        assert {c: row[c] for c in columns} == {c: want[c] for c in columns}
        got, ref = store.sequence(row["sequence_id"]), single.sequence(want["sequence_id"])
        for name in ARRAYS:
            np.testing.assert_array_equal(got[name], ref[name], err_msg=f"{key} {name}")


@pytest.mark.parametrize(("dp", "pp"), [(2, 1), (1, 2), (2, 2)])
def test_concurrent_writers_merge_to_the_single_writer_store(tmp_path, dp, pp):
    url = str(tmp_path / "parted")
    write_concurrently(url, dp, pp)
    store = open_store(url)
    assert store.attrs["format_version"] == 2
    assert_same_as_single(store, single_writer_store(tmp_path / "single"))
    # blocks of whole sequences read back whole: the analyzer's access path
    seen = set()
    for block in store.blocks(target_tokens=256):
        rows = store.read_rows(block.start, block.stop, ("topk_ids", "token_ids"))
        for sid in block.sequence_ids:
            row = store.index.filter(store.index["sequence_id"] == sid).row(0, named=True)
            a = row["token_offset"] - block.start
            want = parted.full_rows(row["request_id"])
            np.testing.assert_array_equal(rows["topk_ids"][a : a + row["num_rows"]], want.topk_ids)
            seen.add(sid)
    assert seen == set(store.index["sequence_id"].to_list())


def test_a_sequence_is_visible_only_when_every_stage_committed_it(tmp_path):
    url = str(tmp_path / "parted")
    parted.write_part(url, PartId(0, 0, 2), KEYS[:10])
    with pytest.raises(StoreFormatError, match="all its pipeline stages"):
        open_store(url)  # stage 1 has not written at all
    parted.write_part(url, PartId(0, 1, 2), KEYS[:6])
    parted.write_part(url, PartId(1, 0, 2), KEYS[20:24])  # rank 1: stage 1 missing
    store = open_store(url)
    assert sorted(store.index["request_id"].to_list()) == sorted(KEYS[:6])
    for row in store.index.iter_rows(named=True):
        got = store.sequence(row["sequence_id"])["topk_ids"]
        np.testing.assert_array_equal(got, parted.full_rows(row["request_id"]).topk_ids)


def test_stages_that_disagree_on_tokens_are_refused(tmp_path):
    from capture_server.errors import StoreCorruptError

    url = str(tmp_path / "parted")
    parted.write_part(url, PartId(0, 0, 2), KEYS[:4])
    parted.write_part(url, PartId(0, 1, 2), KEYS[1:5])  # other order: offsets differ
    store = open_store(url)
    assert sorted(store.index["request_id"].to_list()) == sorted(KEYS[1:4])
    for row in store.index.iter_rows(named=True):  # matched by sequence, not by row
        got = store.sequence(row["sequence_id"])
        np.testing.assert_array_equal(got["topk_ids"], parted.full_rows(row["request_id"]).topk_ids)
    # a stage whose rows carry other tokens than stage 0's is corrupt, and said so
    sink = StoreSink(url, parted.stage_options(PartId(1, 1, 2)), part=PartId(1, 1, 2))
    sink.open(parted.stage_meta(PartId(1, 1, 2)))
    parted.write_part(url, PartId(1, 0, 2), ["seq-30"])
    wrong = parted.stage_rows(parted.full_rows("seq-30"), PartId(1, 1, 2))
    wrong.token_ids = wrong.token_ids + 1
    sink.write(wrong)
    sink.end_sequence(synthetic.end_of("seq-30"))
    sink.close()
    store = open_store(url)
    sid = store.index.filter(store.index["request_id"] == "seq-30")["sequence_id"][0]
    with pytest.raises(StoreCorruptError, match="other token_ids"):
        store.sequence(sid)
