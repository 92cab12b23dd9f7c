"""Map-step plumbing that needs no compiled code: store handles and block planning."""

from __future__ import annotations

import shutil

import numpy as np

from analyzer.plan import BlockPlan
from analyzer.reads import _open_for_rows
from capture_server.capture.records import ModelMeta, RoutingRows, SequenceEnd
from capture_server.store import StoreOptions, open_store
from capture_server.store.writer import StoreWriter


def _write_store(path, layers: int, sequences: int = 3, rows: int = 40) -> None:
    writer = StoreWriter(str(path), StoreOptions(logits=False, chunk_tokens=64))
    writer.open(ModelMeta.synthetic(list(range(layers)), 8, 2, 4))
    for n in range(sequences):
        writer.add_sequence(
            SequenceEnd(f"s{n}", 0, 8, 0, rows, prompt_index=n),
            RoutingRows(
                request_ids=np.array([f"s{n}"] * rows, dtype=object),
                sample_index=np.zeros(rows, np.int32),
                positions=np.arange(rows),
                token_ids=np.arange(rows),
                is_prompt=np.arange(rows) < 8,
                topk_ids=np.tile(np.array([0, 1], np.int32), (rows, layers, 1)),
                topk_weights=np.full((rows, layers, 2), 0.5, np.float32),
            ),
        )
    writer.close()


def test_a_store_made_anew_at_the_same_url_is_opened_anew(tmp_path):
    url = str(tmp_path / "store")
    _write_store(url, layers=2)
    first = open_store(url).created_at
    assert _open_for_rows(url, 10, first) is _open_for_rows(url, 10, first)  # kept open
    shutil.rmtree(url)
    _write_store(url, layers=5)
    second = open_store(url).created_at
    assert second != first
    store = _open_for_rows(url, 10, second)
    assert store.read_rows(0, 10, ("topk_ids",))["topk_ids"].shape == (10, 5, 2)


def test_blocks_hold_whole_sequences_and_respect_the_byte_cap(tmp_path, monkeypatch):
    """The byte cap is lowered to two chunks of the widest array, below what the chunk
    and per-CPU limits alone would give, so it is what bounds the blocks here."""
    from analyzer import plan as plan_module

    url = str(tmp_path / "store")
    _write_store(url, layers=2, sequences=40)  # 1600 rows: 25 chunks of 64
    store = open_store(url)
    widest = store.row_nbytes("topk_weights")
    uncapped = BlockPlan(store, None, keep={3}).blocks
    cap = 2 * store.chunk_tokens * widest
    assert max(b.stop - b.start for b in uncapped) * widest > cap, "the cap must bind"
    monkeypatch.setattr(plan_module, "MAX_BLOCK_BYTES", cap)
    plan = BlockPlan(store, None, keep={3})
    blocks = [(b, plan.rows(b)) for b in plan.blocks]
    seen = [row["sequence_id"] for _, rows in blocks for row in rows]
    assert sorted(seen) == list(range(40))  # every sequence in exactly one block
    for block, rows in blocks:
        assert block.start % store.chunk_tokens == 0
        assert all(block.start <= r["token_offset"] < block.stop for r in rows)
        assert (block.stop - block.start) * widest <= cap
    assert [r["keep"] for _, rows in blocks for r in rows].count(True) == 1


def test_store_arguments_may_name_their_store():
    from analyzer.pipeline import store_name

    assert store_name("qwen3=/runs/a") == ("qwen3", "/runs/a")
    assert store_name("/runs/a/") == ("a", "/runs/a/")
    assert store_name("s3://bucket/x=1") == ("x=1", "s3://bucket/x=1")  # a URL, not a name
