"""Sequences that await their texts commit only together with them (`SequenceEnd.awaits_texts`).

The service hands texts to the worker's writer after the engine returned the output; the
writer must never commit such a sequence's routing without them, nor with texts of
another generation.
"""

from __future__ import annotations

from dataclasses import replace

from capture_server.protocol import Annotation
from capture_server.store import open_store
from capture_server.store.writer import StoreWriter
from tests.store import synthetic
from tests.store.test_roundtrip import assert_sequence_intact


def text_of(key: str, body: str = "") -> Annotation:
    return Annotation(
        request_id=key,
        sample_index=0,
        completion_text=body or f"text of {key}",
        finish_reason="stop",
        generated_len=3,
    )


def stage(writer: StoreWriter, key: str, awaits: bool = True) -> None:
    n = synthetic.length_of(key)
    writer.add_sequence(
        replace(synthetic.end_of(key), awaits_texts=awaits), synthetic.sequence_rows(key, n)
    )


def committed(path) -> dict[str, str | None]:
    index = open_store(path).index
    texts = index["completion_text"] if "completion_text" in index.columns else [None] * len(index)
    return dict(zip(index["request_id"].to_list(), list(texts), strict=True))


def test_awaiting_sequence_commits_only_with_its_texts(tmp_path):
    writer = StoreWriter(tmp_path / "s", synthetic.EXACT)
    writer.open(synthetic.meta())
    stage(writer, "seq-1")
    stage(writer, "seq-2", awaits=False)
    writer.flush(partial=True)
    assert committed(tmp_path / "s") == {"seq-2": None}, "seq-1 has no texts yet"
    writer.add_texts([text_of("seq-1")])
    writer.flush(partial=True)
    assert committed(tmp_path / "s") == {"seq-2": None, "seq-1": "text of seq-1"}
    store = open_store(tmp_path / "s")
    for row in store.index.iter_rows(named=True):
        assert_sequence_intact(store, row["sequence_id"], row["request_id"])


def test_texts_that_come_before_the_sequence_ends_are_kept_for_it(tmp_path):
    """The service sees the output before the worker ends the request."""
    writer = StoreWriter(tmp_path / "s", synthetic.EXACT)
    writer.open(synthetic.meta())
    writer.add_texts([text_of("seq-1")])
    writer.flush(partial=True)
    stage(writer, "seq-1")
    writer.flush(partial=True)
    assert committed(tmp_path / "s") == {"seq-1": "text of seq-1"}


def test_sequences_whose_texts_never_come_are_not_committed(tmp_path):
    """An aborted request's texts never come: closing drops it, and the sequences staged
    after it (rows after its rows) still commit and read back intact."""
    writer = StoreWriter(tmp_path / "s", synthetic.EXACT)
    writer.open(synthetic.meta())
    for key in ("seq-1", "seq-2", "seq-3"):
        stage(writer, key)
    writer.add_texts([text_of("seq-1"), text_of("seq-3")])
    writer.close()
    assert writer.dropped_without_texts == 1
    assert committed(tmp_path / "s") == {"seq-1": "text of seq-1", "seq-3": "text of seq-3"}
    store = open_store(tmp_path / "s")
    for row in store.index.iter_rows(named=True):
        assert_sequence_intact(store, row["sequence_id"], row["request_id"])


def test_resume_ignores_texts_of_another_generation(tmp_path):
    """Texts for a sequence an earlier writer committed would replace its texts with
    another generation's: the resumed writer ignores them, and reruns of the missing
    sequence commit with their own."""
    first = StoreWriter(tmp_path / "s", synthetic.EXACT)
    first.open(synthetic.meta())
    stage(first, "seq-1")
    stage(first, "seq-2")  # its texts are lost with the process
    first.add_texts([text_of("seq-1")])
    first.flush(partial=True)  # no close: the process dies here

    resumed = StoreWriter(tmp_path / "s", synthetic.EXACT)
    resumed.open(synthetic.meta())
    resumed.add_texts([text_of("seq-1", "another generation"), text_of("seq-2", "rerun")])
    stage(resumed, "seq-2")
    resumed.close()
    assert committed(tmp_path / "s") == {"seq-1": "text of seq-1", "seq-2": "rerun"}
    store = open_store(tmp_path / "s")
    for row in store.index.iter_rows(named=True):
        assert_sequence_intact(store, row["sequence_id"], row["request_id"])
