"""Streaming, crash-safe writer of routing stores.

`StoreWriter` does the storage work in the calling thread; `StoreSink` wraps it as a
capture sink with a bounded queue and one background thread, so the model loop only
enqueues.

Invariants:
    - One writer per store, one thread per writer: every chunk has exactly one writer.
    - Only whole chunks are written: the last, partial chunk is written padded and
      rewritten whole when it grows (each write replaces the chunk object atomically).
    - Sequences are contiguous on the token axis, in commit order.
    - A sequence is visible (in the index) only after all its rows are written: its
      index part is written after its chunks, and an index part appears atomically.
    - Reopening resumes after the last committed row; rows past it are overwritten.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import zarr

from capture_server.capture.records import ModelMeta, RoutingRows, SequenceEnd
from capture_server.capture.sink import RoutingSink
from capture_server.errors import StoreFormatError, StoreWriteError
from capture_server.store import _raw
from capture_server.store.format import (
    ATTRS_KEY,
    COMPRESSORS,
    FORMAT_NAME,
    FORMAT_VERSION,
    GROW_CHUNKS,
    INDEX_PREFIX,
    INFO_PREFIX,
    MODEL_GROUP,
    StoreOptions,
    choose_chunk_tokens,
    ids_dtype,
)

logger = logging.getLogger("moetrace.store")

INDEX_SCHEMA = {
    "sequence_id": pl.Int64,
    "request_id": pl.String,
    "sample_index": pl.Int32,
    "prompt_index": pl.Int64,
    "token_offset": pl.Int64,
    "num_rows": pl.Int64,
    "first_position": pl.Int64,
    "prompt_len": pl.Int64,
    "labels": pl.String,
    "committed_at": pl.Float64,
}


def _parquet_bytes(frame: pl.DataFrame) -> bytes:
    import io

    out = io.BytesIO()
    frame.write_parquet(out)
    return out.getvalue()


def read_index_parts(store: Any, prefix: str = INDEX_PREFIX) -> pl.DataFrame | None:
    """All index parts under `prefix`, concatenated (None when there are none)."""
    import io

    from capture_server.errors import StoreCorruptError

    frames = []
    keys = [k for k in _raw.list_keys(store, prefix) if k.endswith(".parquet")]  # not temp files
    for key, data in zip(keys, _raw.get_many(store, keys), strict=True):
        try:
            frames.append(pl.read_parquet(io.BytesIO(data or b"")))
        except Exception as exc:
            raise StoreCorruptError(f"{store}: index part {key} is unreadable ({exc})") from None
    return pl.concat(frames, how="diagonal_relaxed") if frames else None


def write_annotations(store_or_url: Any, rows: list[dict[str, Any]]) -> None:
    """Add per-sequence annotations (prompt/completion text, finish reason, ...).

    Each row names its sequence by ``request_id`` and ``sample_index``; the reader joins
    annotations onto the index (the newest wins). Written as one atomic part, from any
    process: the one that knows the texts is often not the one writing the routing.
    """
    if not rows:
        return
    store = _raw.make_store(store_or_url) if isinstance(store_or_url, str | Path) else store_or_url
    key = f"{INFO_PREFIX}part-{time.time_ns():020d}.parquet"
    _raw.set_bytes(store, key, _parquet_bytes(pl.DataFrame(rows)))


class StoreWriter:
    """Appends complete sequences to a store and commits them (single-threaded)."""

    def __init__(
        self,
        url: str | Path,
        options: StoreOptions | None = None,
        job: dict[str, Any] | None = None,
    ) -> None:
        self.url = str(url)
        self.requested = options or StoreOptions()
        self.job = dict(job or {})
        self.store = _raw.make_store(self.url)
        self.root: zarr.Group | None = None
        self.options = self.requested
        self.chunk = 0
        self.arrays: dict[str, zarr.Array] = {}
        self._buf: dict[str, list[np.ndarray]] = defaultdict(list)  # rows from _buf_start
        self._buf_start = 0  # chunk-aligned token offset of the in-memory buffer
        self._written_end = 0  # rows below this are on disk
        self._buf_end = 0  # rows below this are staged
        self._staged: list[dict[str, Any]] = []  # index rows of staged, uncommitted sequences
        self._committed: set[tuple[str, int]] = set()
        self._next_id = 0
        self.bytes_written = 0  # uncompressed bytes of rows written
        self.sequences_committed = 0
        self.is_open = False

    # -- opening -----------------------------------------------------------------------

    def open(self, meta: ModelMeta) -> None:
        """Create the store, or resume an existing one for the same model."""
        try:
            existing = zarr.open_group(store=self.store, mode="r")
            attrs = existing.attrs.get(ATTRS_KEY)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
            attrs = None
        except Exception as exc:
            raise StoreFormatError(f"{self.url}: not a readable zarr group ({exc})") from None
        if attrs is None:
            self._create(meta)
        else:
            self._resume(meta, attrs)
        self.is_open = True

    def _create(self, meta: ModelMeta) -> None:
        opts = self.requested
        L, k, E, d = len(meta.moe_layers), meta.top_k, meta.num_experts, meta.hidden_size
        specs: dict[str, tuple[tuple[int, ...], np.dtype]] = {
            "topk_ids": ((L, k), ids_dtype(E)),
            "topk_weights": ((L, k), np.dtype(opts.weights_dtype)),
            "token_ids": ((), np.dtype(np.int32)),
            "positions": ((), np.dtype(np.int32)),
        }
        if opts.logits:
            specs["router_logits"] = ((L, E), np.dtype(opts.logits_dtype))
        for layer in opts.hidden_layers:
            specs[f"hidden_states_{layer}"] = ((d,), np.dtype(opts.hidden_dtype))
        widest = max(int(np.prod(shape)) * dt.itemsize for shape, dt in specs.values())
        chunk = opts.chunk_tokens or choose_chunk_tokens(widest)
        self.options = StoreOptions(**{**asdict(opts), "chunk_tokens": chunk})
        self.chunk = chunk

        root = zarr.open_group(store=self.store, mode="w")
        for name, (shape, dtype) in specs.items():
            self.arrays[name] = root.create_array(
                name,
                shape=(0, *shape),
                chunks=(chunk, *shape),
                dtype=dtype,
                compressors=COMPRESSORS[opts.compressor](dtype.itemsize),
                fill_value=0,
            )
        model = root.create_group(MODEL_GROUP)
        model.create_array("router_weights", data=meta.router_weights.astype(np.float32))
        if meta.router_bias is not None:
            model.create_array("router_bias", data=meta.router_bias.astype(np.float32))
        if meta.correction_bias is not None:
            model.create_array("correction_bias", data=meta.correction_bias.astype(np.float32))
        attrs = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "created_at": time.time(),
            "model": meta.summary(),
            "options": {**asdict(self.options), "hidden_layers": list(opts.hidden_layers)},
            "arrays": sorted(specs),
            "job": self.job,
        }
        root.attrs[ATTRS_KEY] = attrs  # written last: a store without it is not a store yet
        self.root = root

    def _resume(self, meta: ModelMeta, attrs: dict[str, Any]) -> None:
        if attrs.get("format") != FORMAT_NAME or attrs.get("format_version") != FORMAT_VERSION:
            raise StoreFormatError(
                f"{self.url}: expected {FORMAT_NAME} version {FORMAT_VERSION}, got "
                f"{attrs.get('format')} version {attrs.get('format_version')}"
            )
        stored = attrs["model"]
        for key in ("moe_layers", "num_experts", "top_k"):
            if stored[key] != getattr(meta, key):
                raise StoreFormatError(
                    f"{self.url}: store was written for {key}={stored[key]}, "
                    f"this model has {getattr(meta, key)}"
                )
        raw = dict(attrs["options"])
        raw["hidden_layers"] = tuple(raw["hidden_layers"])
        self.options = StoreOptions(**raw)
        self.chunk = self.options.chunk_tokens
        self.root = zarr.open_group(store=self.store, mode="r+")
        self.arrays = {name: self.root[name] for name in attrs["arrays"]}
        index = read_index_parts(self.store)
        committed_end = 0
        if index is not None and len(index):
            committed_end = int((index["token_offset"] + index["num_rows"]).max())
            self._next_id = int(index["sequence_id"].max()) + 1
            self._committed = set(
                zip(index["request_id"].to_list(), index["sample_index"].to_list(), strict=True)
            )
        self._buf_start = committed_end // self.chunk * self.chunk
        self._written_end = self._buf_end = committed_end
        if committed_end > self._buf_start:  # reload the committed part of the tail chunk
            for name, arr in self.arrays.items():
                self._buf[name].append(arr[self._buf_start : committed_end])
        logger.info(
            "resuming %s after %d committed sequences (%d rows)",
            self.url,
            len(self._committed),
            committed_end,
        )

    # -- writing -----------------------------------------------------------------------

    def committed_keys(self) -> set[tuple[str, int]]:
        """(request id, sample index) of every committed sequence."""
        return set(self._committed)

    @property
    def staged_sequences(self) -> int:
        return len(self._staged)

    @property
    def staged_rows(self) -> int:
        return self._buf_end - self._written_end

    def add_sequence(self, end: SequenceEnd, rows: RoutingRows | None) -> bool:
        """Stage one complete sequence; False when it is committed already (a resumed job)."""
        key = (end.request_id, end.sample_index)
        if key in self._committed or any(
            (s["request_id"], s["sample_index"]) == key for s in self._staged
        ):
            return False
        n = 0 if rows is None else len(rows)
        if n:
            assert rows is not None
            for name, values in self._columns(rows).items():
                self._buf[name].append(values)
        self._staged.append(
            {
                "request_id": end.request_id,
                "sample_index": end.sample_index,
                "prompt_index": end.prompt_index,
                "token_offset": self._buf_end,
                "num_rows": n,
                "first_position": end.first_position,
                "prompt_len": end.prompt_len,
                "labels": json.dumps(end.labels, sort_keys=True),
            }
        )
        self._buf_end += n
        return True

    def _columns(self, rows: RoutingRows) -> dict[str, np.ndarray]:
        n = len(rows)
        cols: dict[str, np.ndarray] = {}
        for name, arr in self.arrays.items():
            if name == "topk_ids":
                values = rows.topk_ids
            elif name == "topk_weights":
                values = rows.topk_weights
            elif name == "token_ids":
                values = rows.token_ids
            elif name == "positions":
                values = rows.positions
            elif name == "router_logits":
                values = rows.router_logits
            else:
                values = rows.hidden_states.get(int(name.rsplit("_", 1)[1]))
            if values is None:  # not captured for this sequence: missing, never invented
                values = np.full((n, *arr.shape[1:]), np.nan, dtype=arr.dtype)
            cols[name] = np.ascontiguousarray(values, dtype=arr.dtype)
        return cols

    def flush(self, *, partial: bool) -> int:
        """Write staged rows and commit the sequences now fully on disk.

        With `partial` false only whole chunks are written; with it true the last,
        partial chunk is written too (padded) so every staged sequence commits.
        Returns the number of sequences committed.
        """
        total = self._buf_end - self._buf_start
        unwritten = self._buf_end - self._written_end
        if not self._staged and unwritten == 0:
            return 0
        upto = total if partial else total // self.chunk * self.chunk
        if self._buf_start + upto > self._written_end:
            try:
                self._write(upto)
            except OSError as exc:
                raise StoreWriteError(f"{self.url}: writing routing rows failed: {exc}") from exc
        return self._commit()

    def _write(self, upto: int) -> None:
        padded = math.ceil(upto / self.chunk) * self.chunk
        end = self._buf_start + padded
        for name, arr in self.arrays.items():
            data = np.concatenate(self._buf[name]) if self._buf[name] else None
            if data is None:
                data = np.zeros((0, *arr.shape[1:]), dtype=arr.dtype)
            if arr.shape[0] < end:
                grow = self.chunk * GROW_CHUNKS
                arr.resize((math.ceil(end / grow) * grow, *arr.shape[1:]))
            block = np.zeros((padded, *arr.shape[1:]), dtype=arr.dtype)
            block[: min(upto, len(data))] = data[:upto]
            arr[self._buf_start : end] = block
            self.bytes_written += int(data[:upto].nbytes)
            keep_from = upto // self.chunk * self.chunk  # the partial chunk stays in memory
            self._buf[name] = [data[keep_from:]] if len(data) > keep_from else []
        self._written_end = self._buf_start + upto
        self._buf_start += upto // self.chunk * self.chunk

    def _commit(self) -> int:
        ready = [s for s in self._staged if s["token_offset"] + s["num_rows"] <= self._written_end]
        if not ready:
            return 0
        now = time.time()
        for s in ready:
            s["sequence_id"] = self._next_id
            s["committed_at"] = now
            self._next_id += 1
        frame = pl.DataFrame(ready, schema=INDEX_SCHEMA)
        key = f"{INDEX_PREFIX}part-{ready[0]['sequence_id']:012d}.parquet"
        try:
            _raw.set_bytes(self.store, key, _parquet_bytes(frame))
        except OSError as exc:
            raise StoreWriteError(f"{self.url}: writing index part {key} failed: {exc}") from exc
        self._staged = self._staged[len(ready) :]
        self._committed.update((s["request_id"], s["sample_index"]) for s in ready)
        self.sequences_committed += len(ready)
        return len(ready)

    def annotate(self, rows: list[dict[str, Any]]) -> None:
        """Add per-sequence annotations; see `write_annotations`."""
        write_annotations(self.store, rows)

    def close(self) -> None:
        """Commit everything staged."""
        if self.root is not None:
            self.flush(partial=True)


class StoreSink(RoutingSink):
    """A capture sink that streams into a routing store from a background thread.

    Args:
        url: store directory or URL.
        options: what to keep and how (used when the store is created).
        queue_steps: bound of the queue between capture and writer, in steps.
        on_full: ``wait`` (default: capture blocks, nothing is lost) or ``drop`` (the
            step's rows are dropped, the sequences they belong to are never committed,
            and `stats["dropped_steps"]` counts them).
        flush_interval: seconds after which staged sequences are committed even when
            they do not fill a chunk.
    """

    def __init__(
        self,
        url: str | Path,
        options: StoreOptions | None = None,
        *,
        job: dict[str, Any] | None = None,
        queue_steps: int = 256,
        on_full: str = "wait",
        flush_interval: float = 2.0,
    ) -> None:
        if on_full not in ("wait", "drop"):
            raise ValueError(f"on_full: expected 'wait' or 'drop', got {on_full!r}")
        self.writer = StoreWriter(url, options, job)
        self.on_full = on_full
        self.flush_interval = flush_interval
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=queue_steps)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._dropped_keys: set[tuple[str, int]] = set()
        self._lock = threading.Lock()
        self._uncommitted_since: float | None = None  # oldest ended, uncommitted sequence
        self._meta: ModelMeta | None = None
        self.stats = {"dropped_steps": 0, "dropped_sequences": 0, "duplicates_skipped": 0}

    # -- RoutingSink -------------------------------------------------------------------

    def open(self, meta: ModelMeta) -> None:
        """Start the writer thread, which creates or resumes the store first: creating
        arrays takes milliseconds the engine's step loop should not wait for. An error
        doing so surfaces on the next call, like any writer error."""
        self._meta = meta
        self.start()

    def start(self) -> None:
        """Start the writer thread (`open` does; separate so tests can hold it back)."""
        self._thread = threading.Thread(target=self._run, name="moetrace-store-writer", daemon=True)
        self._thread.start()

    def write(self, rows: RoutingRows) -> None:
        self._raise_if_failed()
        if self.on_full == "wait":
            self._queue.put(("rows", rows))
            return
        try:
            self._queue.put_nowait(("rows", rows))
        except queue.Full:
            keys, _ = rows.segments()
            with self._lock:
                self._dropped_keys.update(keys)
                self.stats["dropped_steps"] += 1

    def end_sequence(self, end: SequenceEnd) -> None:
        self._raise_if_failed()
        if self._uncommitted_since is None:
            self._uncommitted_since = time.monotonic()
        self._queue.put(("end", end))

    def flush(self) -> None:
        """Block until everything enqueued so far is committed."""
        done = threading.Event()
        self._queue.put(("flush", done))
        while not done.wait(0.05):
            self._raise_if_failed()
        self._raise_if_failed()

    def close(self) -> None:
        self.request_close()
        if self._thread is not None:
            self._thread.join()
        self._raise_if_failed()

    def request_close(self) -> None:
        """Ask the writer thread to commit everything and stop, without waiting."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(("close", None))

    @property
    def closed(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    def committed_keys(self) -> set[tuple[str, int]]:
        return self.writer.committed_keys()

    def metrics(self) -> dict[str, float]:
        """Gauges and counters for monitoring; safe to call from any thread."""
        since = self._uncommitted_since
        return {
            "queue_depth": self._queue.qsize(),
            # how long the oldest finished sequence has waited to be committed
            "lag_seconds": 0.0 if since is None else time.monotonic() - since,
            "bytes_written": self.writer.bytes_written,
            "sequences_committed": self.writer.sequences_committed,
            **self.stats,
        }

    # -- writer thread -----------------------------------------------------------------

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            err = self._error
            if isinstance(err, StoreWriteError):
                raise StoreWriteError(str(err))
            raise StoreWriteError(f"{self.writer.url}: store writer failed: {err}")

    def _run(self) -> None:
        parts: dict[tuple[str, int], list[RoutingRows]] = defaultdict(list)
        last_commit = time.monotonic()
        try:
            if not self.writer.is_open:
                assert self._meta is not None, "open() the sink, or the writer, first"
                self.writer.open(self._meta)
            while True:
                timeout = max(0.0, self.flush_interval - (time.monotonic() - last_commit))
                try:
                    kind, item = self._queue.get(timeout=timeout)
                except queue.Empty:
                    kind, item = "tick", None
                if kind == "rows":
                    keys, bounds = item.segments()
                    for key, a, b in zip(keys, bounds[:-1], bounds[1:], strict=True):
                        parts[key].append(item.slice(int(a), int(b)))
                elif kind == "end":
                    self._end(item, parts)
                    if self.writer.staged_rows >= self.writer.chunk:
                        self.writer.flush(partial=False)
                elif kind in ("tick", "flush", "close"):
                    pending_before = self._queue.qsize()
                    self.writer.flush(partial=True)
                    last_commit = time.monotonic()
                    if pending_before == 0 and not self.writer.staged_sequences:
                        self._uncommitted_since = None
                    if kind == "flush":
                        item.set()
                    if kind == "close":
                        return
        except BaseException as exc:  # surfaced to the capture side by _raise_if_failed
            logger.error("store writer for %s failed: %s", self.writer.url, exc)
            self._error = exc

    def _end(self, end: SequenceEnd, parts: dict[tuple[str, int], list[RoutingRows]]) -> None:
        key = (end.request_id, end.sample_index)
        pieces = parts.pop(key, [])
        with self._lock:
            dropped = key in self._dropped_keys
            self._dropped_keys.discard(key)
        if dropped:
            self.stats["dropped_sequences"] += 1
            return
        rows = RoutingRows.concat(pieces) if pieces else None
        if not self.writer.add_sequence(end, rows):
            self.stats["duplicates_skipped"] += 1
