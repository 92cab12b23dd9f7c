"""A job's store through the collector's sink life cycle: commit and close without
blocking, and a late row for a closing store waits for the old writer (one writer per
store)."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable

import numpy as np

from capture_server.capture.intervention import RoutingShape
from capture_server.capture.options import CaptureOptions
from capture_server.errors import StoreError
from capture_server.plugin.collector import StepCollector
from capture_server.store import open_store
from tests.store import synthetic
from tests.store.synthetic import EXACT


def _collector(url: str) -> tuple[StepCollector, Callable[[str], None]]:
    """A collector without an engine, and a function that sends it a whole sequence."""
    options = CaptureOptions(sink=url, store=dataclasses.asdict(EXACT))
    meta = synthetic.meta()
    routing = RoutingShape(len(meta.moe_layers), meta.num_experts, meta.top_k, False)
    collector = StepCollector(buffers=None, meta=meta, weight_scale=1.0, routing=routing)

    def send(key: str) -> None:
        rows = synthetic.sequence_rows(key, synthetic.length_of(key))
        collector._deliver(options, lambda sink: sink.write(rows))
        collector._deliver(options, lambda sink: sink.end_sequence(synthetic.end_of(key)))

    return collector, send


def _committed(url: str) -> list[str]:
    try:
        return sorted(open_store(url).index["request_id"])
    except StoreError:  # nothing committed yet
        return []


def test_a_commit_does_not_hold_the_step_loop(tmp_path):
    """`commit_sinks` (the OpenAI endpoint's commit) returns while the store's writer is
    still committing; the store says ``committing`` until the sequence is readable, and
    a commit that fails is reported, not lost."""
    url = str(tmp_path / "job")
    collector, send = _collector(url)
    send("seq-1")
    sink = collector._sinks[url]
    gate, writer_flush = threading.Event(), sink.writer.flush

    def held_flush(**kw: bool) -> None:
        assert gate.wait(60), "the test never let the commit through"
        writer_flush(**kw)

    sink.writer.flush = held_flush
    started = time.monotonic()
    collector.commit_sinks([url])
    assert time.monotonic() - started < 5, "commit_sinks waited for the store"
    assert collector.sink_states([url]) == {url: "committing"}
    assert _committed(url) == []
    gate.set()
    deadline = time.monotonic() + 60
    while collector.sink_states([url])[url] == "committing":
        assert time.monotonic() < deadline, "the commit did not end within 60 s"
        time.sleep(0.01)
    assert collector.sink_states([url]) == {url: "open"}
    assert _committed(url) == ["seq-1"]

    def failing_flush(**kw: bool) -> None:
        raise OSError(28, "No space left on device")

    sink.writer.flush = failing_flush
    send("seq-2")
    collector.commit_sinks([url])
    while collector.sink_states([url])[url] == "committing":
        assert time.monotonic() < deadline, "the failed commit was never reported"
        time.sleep(0.01)
    state = collector.sink_states([url])[url]
    assert state.startswith("failed:") and "No space left" in state
    assert _committed(url) == ["seq-1"], "the failure left the committed sequence readable"


def test_closing_store_is_never_written_by_two_writers(tmp_path):
    url = str(tmp_path / "job")
    collector, send = _collector(url)
    send("seq-1")
    first_writer = collector._sinks[url]
    collector.close_sinks([url])
    assert url in collector._closing and url not in collector._sinks
    send("seq-2")  # arrives while the first writer may still be committing
    assert first_writer.closed, "the old writer finished before a new one opened"
    assert url not in collector._closing and collector._sinks[url] is not first_writer
    collector.close_sinks([url])
    deadline = time.monotonic() + 60
    while collector.sink_states([url])[url] == "closing":
        assert time.monotonic() < deadline, "the writer did not close within 60 s"
        time.sleep(0.01)
    assert collector.sink_states([url]) == {url: "closed"}
    assert collector.stats["closed_sequences_committed"] == 2

    store = open_store(url)
    assert sorted(store.index["request_id"]) == ["seq-1", "seq-2"]
    for row in store.index.iter_rows(named=True):
        got = store.sequence(row["sequence_id"])["topk_ids"]
        want = synthetic.sequence_rows(row["request_id"], row["num_rows"]).topk_ids
        np.testing.assert_array_equal(got, want)


def test_a_closed_sink_leaves_plain_zarr_and_its_threads_serve_the_next(tmp_path):
    """Closing the sink (what a job's end does) seals the store: no tail segments are
    left, plain zarr reads every committed row, its writer loop ends, and the next store
    reuses its writer thread and the process's encoder threads (starts none)."""
    import threading

    import zarr

    from capture_server.store.sink import WRITER_THREADS, StoreSink

    def encoder_threads() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name.startswith("moetrace-chunk")}

    keys = [f"seq-{i}" for i in range(30)]
    first = StoreSink(tmp_path / "first", EXACT)
    first.open(synthetic.meta())
    for kind, item in synthetic.interleaved_steps(keys[:4]):
        first.write(item) if kind == "rows" else first.end_sequence(item)
    first.close()
    before = encoder_threads()  # the process's pools: other tests' thread counts too
    assert before
    assert first.closed
    deadline = time.monotonic() + 5
    while WRITER_THREADS.idle == 0 and time.monotonic() < deadline:
        time.sleep(0.01)  # the closed store's thread returns itself to the idle ones
    assert WRITER_THREADS.idle > 0, "a closed store's writer thread is kept for the next store"
    writers = {t for t in threading.enumerate() if t.name == "moetrace-store-writer"}
    sink = StoreSink(tmp_path / "s", EXACT)
    sink.open(synthetic.meta())
    now = {t for t in threading.enumerate() if t.name == "moetrace-store-writer"}
    assert now <= writers, "the next store started a writer thread instead of reusing one"
    for kind, item in synthetic.interleaved_steps(keys):
        sink.write(item) if kind == "rows" else sink.end_sequence(item)
    sink.flush()  # a commit of a partial chunk: tail segments exist now
    assert list((tmp_path / "s" / "tail").rglob("*.npy"))
    sink.close()
    assert not list((tmp_path / "s" / "tail").rglob("*.npy"))
    store = open_store(tmp_path / "s")
    assert len(store.index) == 30
    plain = zarr.open_group(str(tmp_path / "s"), mode="r")["topk_ids"][: store.num_tokens]
    np.testing.assert_array_equal(
        plain, store.read_rows(0, store.num_tokens, ("topk_ids",))["topk_ids"]
    )
    for row in store.index.iter_rows(named=True):
        want = synthetic.sequence_rows(row["request_id"], synthetic.length_of(row["request_id"]))
        a = row["token_offset"]
        np.testing.assert_array_equal(plain[a : a + row["num_rows"]], want.topk_ids)
    assert encoder_threads() == before, "a second store started encoder threads of its own"
    assert sink.closed  # its writer thread ended
