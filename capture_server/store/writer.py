"""Streaming, crash-safe writer of routing stores (single-threaded; see `store.sink` for
the capture sink that runs it in a background thread).

Invariants:
    - One writer per store, one thread per writer: every chunk has exactly one writer.
    - Chunk objects are written whole and only when complete (or padded, at close);
      each write replaces the object atomically. A commit writes the rows new since the
      last one as tail segments (`store.tails`), so its cost does not depend on how full
      the last chunk is; a chunk's tail segments are deleted once its object exists.
      Chunks are cast, encoded and written in a thread pool (`store.chunks`), bypassing
      zarr's write path but producing the bytes zarr would.
    - Sequences are contiguous on the token axis, in staging order; a sequence's prompt
      rows equal to an earlier sample's of its request are not stored again
      (`store.shared_prompts`): it refers to them, and they lie before its own rows.
    - A sequence is visible (in the index) only after all its rows are written: its
      index part is written after its chunks, and an index part appears atomically.
    - A sequence awaiting texts (`SequenceEnd.awaits_texts`) is committed only once its
      texts came, and its texts' part is written before its index part: a committed
      sequence always has its texts. One whose texts never come is not committed; its
      rows stay as unreferenced space.
    - Reopening resumes after the last committed row: the committed rows of its chunk
      become one tail segment, then every object past them is deleted.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import zarr

from capture_server import protocol
from capture_server.capture.records import ModelMeta, RoutingRows, SequenceEnd
from capture_server.errors import StoreFormatError, StoreWriteError
from capture_server.protocol import Annotation
from capture_server.store import _raw, tails, templates
from capture_server.store.chunks import (
    ENCODER_THREADS,
    ChunkWriter,
    Encoder,
    chunk_key,
    encoder_for,
)
from capture_server.store.format import (
    ATTRS_KEY,
    FORMAT_NAME,
    FORMAT_VERSION,
    GROW_CHUNKS,
    INDEX_PREFIX,
    MODEL_GROUP,
    StoreOptions,
    choose_chunk_tokens,
    group_document,
    ids_dtype,
)
from capture_server.store.index import (
    INDEX_SCHEMA,
    parquet_bytes,
    read_index_parts,
    stored_end,
    stored_rows,
    with_shared_columns,
    write_annotations,
)
from capture_server.store.parts import PartId, ensure_root
from capture_server.store.shared_prompts import SharedPrompts

logger = logging.getLogger("moetrace.store")


def _rows(pieces: list[np.ndarray], start: int, stop: int) -> list[np.ndarray]:
    """Rows [start, stop) of pieces laid end to end, as views."""
    out, offset = [], 0
    for piece in pieces:
        lo, hi = max(start - offset, 0), min(stop - offset, len(piece))
        if lo < hi:
            out.append(piece[lo:hi])
        offset += len(piece)
    return out


class StoreWriter:
    """Appends complete sequences to a store and commits them (single-threaded)."""

    def __init__(
        self,
        url: str | Path,
        options: StoreOptions | None = None,
        job: dict[str, Any] | None = None,
        part: PartId | None = None,
        *,
        encoder_threads: int = ENCODER_THREADS,
        durable: bool = False,
    ) -> None:
        self.root_url = str(url)
        self.part = part
        """With a part, this writer writes that part of a parted store (`store.parts`)."""
        self.url = str(url) if part is None else part.url(str(url))
        self.requested = options or StoreOptions()
        self.job = dict(job or {})
        self.store = _raw.make_store(self.url)
        self.options = self.requested
        self.chunk = 0
        self.arrays: dict[str, zarr.Array] = {}
        self._encoders: dict[str, Encoder | None] = {}
        self.encoder_threads = encoder_threads
        self.durable = durable
        """fdatasync every object before it is renamed into place (see `store.chunks`)."""
        self._chunks = ChunkWriter(self.store, threads=encoder_threads, durable=durable)
        # rows from _buf_start, as the capture gave them (cast when their chunk is encoded)
        self._buf: dict[str, list[np.ndarray]] = defaultdict(list)
        self._buf_start = 0  # chunk-aligned token offset of the in-memory buffer
        self._submitted_end = 0  # rows below this are in chunk objects or tail segments
        self._tails: list[tuple[int, int]] = []  # row ranges of this store's tail segments
        self._written_end = 0  # rows below this are on disk
        self._buf_end = 0  # rows below this are staged
        self._staged: list[dict[str, Any]] = []  # index rows of staged, uncommitted sequences
        self._committed: set[tuple[str, int]] = set()
        self._shared: SharedPrompts | None = None  # set at opening, when the store shares
        self._committed_before: set[tuple[str, int]] = set()  # by an earlier writer
        self._awaiting: set[tuple[str, int]] = set()  # staged, committed with their texts
        self._texts: dict[tuple[str, int], Annotation] = {}  # not written yet
        self.dropped_without_texts = 0
        self._next_id = 0
        self.bytes_written = 0  # uncompressed bytes of rows written
        self.sequences_committed = 0
        self.is_open = False

    # -- opening -----------------------------------------------------------------------

    def open(self, meta: ModelMeta) -> None:
        """Create the store (or this writer's part), or resume it for the same model."""
        self._chunks = ChunkWriter(self.store, threads=self.encoder_threads, durable=self.durable)
        if self.part is not None:
            ensure_root(self.root_url)
        try:
            existing = zarr.open_group(store=self.store, mode="r")
            attrs, fresh = existing.attrs.get(ATTRS_KEY), False
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
            attrs, fresh = None, True
        except Exception as exc:
            raise StoreFormatError(f"{self.url}: not a readable zarr group ({exc})") from None
        if attrs is None:
            self._create(meta, replace=not fresh)
        else:
            self._resume(meta, attrs)
        # parts never share: the stages of a pipeline would each decide alone
        if self.options.share_prompt_rows and self.part is None:
            self._shared = SharedPrompts()
        self.is_open = True

    def _create(self, meta: ModelMeta, *, replace: bool) -> None:
        """Create the arrays, the model group, then the root group with the attributes.
        `replace`: a crashed creation left a group without attributes; its arrays go."""
        opts = self.requested
        L, k, E, d = len(meta.moe_layers), meta.top_k, meta.num_experts, meta.hidden_size
        specs: dict[str, tuple[tuple[int, ...], np.dtype]] = {
            protocol.TOPK_IDS: ((L, k), ids_dtype(E)),
            protocol.TOPK_WEIGHTS: ((L, k), np.dtype(opts.weights_dtype)),
            protocol.TOKEN_IDS: ((), np.dtype(np.int32)),
            protocol.POSITIONS: ((), np.dtype(np.int32)),
        }
        if opts.logits:
            specs[protocol.ROUTER_LOGITS] = ((L, E), np.dtype(opts.logits_dtype))
        for layer in opts.hidden_layers:
            specs[protocol.hidden_array(layer)] = ((d,), np.dtype(opts.hidden_dtype))
        widest = max(int(np.prod(shape)) * dt.itemsize for shape, dt in specs.values())
        chunk = opts.chunk_tokens or choose_chunk_tokens(widest, opts.expected_rows)
        self.options = StoreOptions(**{**asdict(opts), "chunk_tokens": chunk})
        self.chunk = chunk

        # never the whole directory: it may hold texts (info/) another process wrote
        # (`index.write_annotations` takes any store). No index part exists before the
        # attributes, so a crashed creation left no rows, only its arrays and model group.
        if replace:
            _raw.delete_dirs(self.store, [*specs, MODEL_GROUP])
        # room for the first GROW_CHUNKS chunks at once: growing rewrites every array's
        # metadata, which was most of a small job's close
        self.arrays = templates.create_arrays(
            self.store,
            {
                name: ((chunk * GROW_CHUNKS, *shape), (chunk, *shape), dtype.str)
                for name, (shape, dtype) in specs.items()
            },
            opts.compressor,
        )
        self._encoders = {name: encoder_for(arr) for name, arr in self.arrays.items()}
        _raw.set_bytes(self.store, f"{MODEL_GROUP}/zarr.json", group_document())
        # the router matrices serve only with the router inputs they route (geometry,
        # re-routing); without hidden states they would be written for nothing, and
        # they are large (48 x 128 x 2048 floats, 50 MB, for Qwen3-30B-A3B): a store
        # of a small job would spend most of its creation on them. A part keeps its
        # stage's slice whatever its own hidden layers: the logical store's matrices
        # are the stages' slices joined (`parts.PartedStore.router_weights`), and a
        # pipeline stage without hidden layers of its own must not leave a hole
        keep_router = bool(opts.hidden_layers) or self.part is not None
        weights = {
            "router_weights": meta.router_weights if keep_router else None,
            "router_bias": meta.router_bias,
            "correction_bias": meta.correction_bias,
        }
        for name, values in weights.items():
            if values is not None:
                zarr.create_array(
                    self.store,
                    name=f"{MODEL_GROUP}/{name}",
                    data=values.astype(np.float32),
                    overwrite=True,
                )
        attrs = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "created_at": time.time(),
            "model": meta.summary(),
            "options": {**asdict(self.options), "hidden_layers": list(opts.hidden_layers)},
            "arrays": sorted(specs),
            "job": self.job,
            **({"part": asdict(self.part)} if self.part is not None else {}),
        }
        # written last: a store without its attributes is not a store yet
        _raw.set_bytes(self.store, "zarr.json", group_document(attrs))

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
        root = zarr.open_group(store=self.store, mode="r+")
        self.arrays = {name: root[name] for name in attrs["arrays"]}
        self._encoders = {name: encoder_for(arr) for name, arr in self.arrays.items()}
        index = read_index_parts(self.store)
        committed_end = 0
        if index is not None and len(index):
            committed_end = int(with_shared_columns(index).select(stored_end()).max().item())
            self._next_id = int(index["sequence_id"].max()) + 1
            self._committed = set(
                zip(index["request_id"].to_list(), index["sample_index"].to_list(), strict=True)
            )
            self._committed_before = set(self._committed)
        self._buf_start = committed_end // self.chunk * self.chunk
        self._written_end = self._submitted_end = self._buf_end = committed_end
        self._reset_tail_chunk(committed_end)
        logger.info(
            "resuming %s after %d committed sequences (%d rows)",
            self.url,
            len(self._committed),
            committed_end,
        )

    def _reset_tail_chunk(self, committed_end: int) -> None:
        """Make the committed rows of the last chunk one tail segment (kept in memory
        too), then delete every chunk object and tail segment past them: what a crashed
        writer left there is not committed, and its rows are about to be rewritten."""
        from capture_server.store.reader import open_single

        start = self._buf_start
        if committed_end > start:
            rows = open_single(self.url).read_rows(start, committed_end, tuple(self.arrays))
            for name, values in rows.items():
                self._buf[name] = [values]
                self._chunks.put(
                    tails.tail_key(name, start, committed_end), tails.encode_npy(values)
                )
            self._tails = [(start, committed_end)]
        keep = {tails.tail_key(name, start, committed_end) for name in self.arrays}
        stale = [s.key for s in tails.list_segments(self.store) if s.key not in keep]
        for name in self.arrays:
            for key in _raw.list_keys(self.store, f"{name}/"):
                rest = key[len(name) + 1 :]
                if not rest.startswith("c") or rest == "zarr.json":
                    continue
                if rest.endswith(".partial") or tails.chunk_index(rest) * self.chunk >= start:
                    stale.append(key)  # a crashed write's temporary file, or past the end
        _raw.delete_many(self.store, stale)

    # -- writing -----------------------------------------------------------------------

    def committed_keys(self) -> set[tuple[str, int]]:
        """(request id, sample index) of every committed sequence."""
        return set(self._committed)

    @property
    def chunk_seconds(self) -> dict[str, float]:
        """Seconds the chunk writer's threads spent casting and encoding, and writing
        (summed over threads; a breakdown for benchmarks)."""
        return {"encode": self._chunks.encode_seconds, "io": self._chunks.io_seconds}

    @property
    def staged_sequences(self) -> int:
        return len(self._staged)

    @property
    def staged_rows(self) -> int:
        """Rows staged and not yet handed to the chunk writer."""
        return self._buf_end - self._submitted_end

    def add_sequence(self, end: SequenceEnd, rows: RoutingRows | None) -> bool:
        """Stage one complete sequence; False when it is committed already (a resumed job)."""
        key = (end.request_id, end.sample_index)
        if key in self._committed or any(
            (s["request_id"], s["sample_index"]) == key for s in self._staged
        ):
            return False
        n = 0 if rows is None else len(rows)
        shared, shared_offset = 0, -1
        if n:
            assert rows is not None
            columns = self._columns(rows)
            if self._shared is not None:
                shared, shared_offset = self._shared.match(
                    end.request_id,
                    end.prompt_len,
                    self._buf_end,
                    columns,
                    hold=not end.sole_sample,
                )
            for name, values in columns.items():
                self._buf[name].append(values[shared:])
        self._staged.append(
            {
                "request_id": end.request_id,
                "sample_index": end.sample_index,
                "prompt_index": end.prompt_index,
                "token_offset": self._buf_end,
                "num_rows": n,
                "shared_offset": shared_offset,
                "shared_rows": shared,
                "first_position": end.first_position,
                "prompt_len": end.prompt_len,
                "labels": json.dumps(end.labels, sort_keys=True),
                "intervention": end.intervention,
            }
        )
        self._buf_end += n - shared
        if end.awaits_texts:
            self._awaiting.add(key)
        return True

    def add_texts(self, annotations: list[Annotation]) -> None:
        """Texts of sequences, written with the commit of their sequence (or at the next
        commit, for one committed already). Texts for a sequence an earlier writer
        committed belong to another generation and are ignored."""
        for a in annotations:
            key = (a.request_id, a.sample_index)
            if key not in self._committed_before:
                self._texts[key] = a

    def _columns(self, rows: RoutingRows) -> dict[str, np.ndarray]:
        n = len(rows)
        cols: dict[str, np.ndarray] = {}
        fixed = {
            protocol.TOPK_IDS: rows.topk_ids,
            protocol.TOPK_WEIGHTS: rows.topk_weights,
            protocol.TOKEN_IDS: rows.token_ids,
            protocol.POSITIONS: rows.positions,
            protocol.ROUTER_LOGITS: rows.router_logits,
        }
        for name, arr in self.arrays.items():
            layer = protocol.hidden_layer_of(name)
            values = fixed[name] if layer is None else rows.hidden_states.get(layer)
            if values is None:  # not captured for this sequence: missing, never invented
                values = np.full((n, *arr.shape[1:]), np.nan, dtype=arr.dtype)
            values = np.asarray(values)
            if values.shape != (n, *arr.shape[1:]):
                raise ValueError(
                    f"{name}: rows of shape {values.shape[1:]}, the store holds {arr.shape[1:]}"
                )
            cols[name] = values  # cast to the stored dtype in the chunk writer's threads
        return cols

    def flush(self, *, partial: bool) -> int:
        """Write staged rows and commit the sequences now fully on disk.

        With `partial` false only complete chunks are written, and without waiting for
        them: sequences commit at a later flush, once their chunks are on disk. With it
        true the rows of the last, partial chunk new since the last flush are written
        as tail segments, the writes are waited for, and every staged sequence commits.
        Returns the number of sequences committed.
        """
        if not self._staged and self._buf_end == self._written_end and not self._texts:
            return 0
        try:
            self._write(partial)
            if partial:
                self._chunks.wait()
                self._confirm()
            elif self._chunks.settled():
                self._confirm()
        except OSError as exc:
            raise StoreWriteError(f"{self.url}: writing routing rows failed: {exc}") from exc
        return self._commit()

    def _confirm(self) -> None:
        """Everything submitted is on disk: its rows count as written, and the tail
        segments of chunks whose objects now exist go."""
        self._written_end = self._submitted_end
        sealed = self._buf_start  # every chunk below it was submitted whole
        done = [t for t in self._tails if t[1] <= sealed]
        if done:
            self._tails = [t for t in self._tails if t[1] > sealed]
            _raw.delete_many(
                self.store, [tails.tail_key(n, a, b) for a, b in done for n in self.arrays]
            )

    def _write(self, partial: bool, *, pad: bool = False) -> None:
        """Hand the complete chunks in the buffer to the chunk writer, then (`partial`)
        the buffer's rows not written yet as tail segments, or (`pad`) the partial chunk
        as a padded chunk object; the partial chunk's rows stay in memory."""
        chunk = self.chunk
        total = self._buf_end - self._buf_start
        whole = total // chunk
        written = whole * chunk
        rest = total - written
        if pad and rest:
            whole, written, rest = whole + 1, total, 0
        first = self._buf_start // chunk
        tail_start = max(self._submitted_end, self._buf_start + written)
        tail = partial and rest and tail_start < self._buf_end
        new_end = self._buf_end if tail else tail_start
        # the arrays' shape covers tail rows too: readers slice them through zarr first
        end = self._buf_start + (math.ceil(total / chunk) if tail else whole) * chunk
        for name, arr in self.arrays.items():
            if arr.shape[0] < end:
                grow = chunk * GROW_CHUNKS
                arr.resize((math.ceil(end / grow) * grow, *arr.shape[1:]))
            pieces = self._buf[name]
            row_shape = tuple(arr.shape[1:])
            for c in range(whole):
                taken = _rows(pieces, c * chunk, min((c + 1) * chunk, total))
                self._submit_chunk(name, arr, first + c, taken)
            if tail:
                rows = _rows(pieces, tail_start - self._buf_start, total)
                shape = (self._buf_end - tail_start, *row_shape)
                key = tails.tail_key(name, tail_start, self._buf_end)
                # in place: a tail segment is written once and committed after it is whole
                self._chunks.submit(key, rows, shape, arr.dtype, tails.encode_npy, atomic=False)
            keep_from = total if pad else written
            self._buf[name] = _rows(pieces, keep_from, total)
            new_rows = new_end - self._submitted_end
            self.bytes_written += new_rows * arr.dtype.itemsize * math.prod(row_shape)
        if tail:
            self._tails.append((tail_start, self._buf_end))
        self._submitted_end = new_end
        self._buf_start += total if pad else written

    def _submit_chunk(self, name: str, arr: zarr.Array, index: int, taken: list) -> None:
        shape = (self.chunk, *arr.shape[1:])
        encode = self._encoders.get(name)
        if encode is None:  # a codec chain `store.chunks` does not reproduce
            self._chunks.wait()
            block = np.zeros(shape, dtype=arr.dtype)
            if taken:
                block[: sum(map(len, taken))] = np.concatenate(taken)
            arr[index * self.chunk : (index + 1) * self.chunk] = block
            return
        self._chunks.submit(chunk_key(name, arr, index), taken, shape, arr.dtype, encode)

    def _commit(self) -> int:
        """Commit the staged sequences whose rows are on disk and whose texts, when they
        await texts, came: their texts' part first, then their index part."""
        ready = [s for s in self._staged if self._committable(s)]
        ready_keys = {(s["request_id"], s["sample_index"]) for s in ready}
        texts = [a for k, a in self._texts.items() if k in ready_keys or k in self._committed]
        if texts:
            try:
                write_annotations(self.store, texts)
            except OSError as exc:
                raise StoreWriteError(f"{self.url}: writing texts failed: {exc}") from exc
            for a in texts:
                del self._texts[(a.request_id, a.sample_index)]
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
            self._chunks.put(key, parquet_bytes(frame))
        except OSError as exc:
            raise StoreWriteError(f"{self.url}: writing index part {key} failed: {exc}") from exc
        self._staged = [
            s for s in self._staged if (s["request_id"], s["sample_index"]) not in ready_keys
        ]
        self._committed.update(ready_keys)
        self._awaiting -= ready_keys
        self.sequences_committed += len(ready)
        return len(ready)

    def _committable(self, staged: dict[str, Any]) -> bool:
        key = (staged["request_id"], staged["sample_index"])
        on_disk = staged["token_offset"] + stored_rows(staged) <= self._written_end
        return on_disk and (key not in self._awaiting or key in self._texts)

    def _seal(self) -> None:
        """Write the partial last chunk as a padded chunk object and delete the tail
        segments: a closed store is plain zarr to the end."""
        if self._buf_end > self._buf_start:
            try:
                self._write(False, pad=True)
                self._chunks.wait()
                self._confirm()
            except OSError as exc:
                raise StoreWriteError(f"{self.url}: sealing the last chunk failed: {exc}") from exc

    def annotate(self, annotations: list[Annotation]) -> None:
        """Add per-sequence annotations; see `index.write_annotations`."""
        write_annotations(self.store, annotations)

    def close(self) -> None:
        """Commit everything staged; sequences whose texts never came are dropped (their
        requests were aborted, or their caller died)."""
        if not self.is_open:
            return
        try:
            self._seal()  # the last rows go straight into chunk objects, not tail segments
            self.flush(partial=True)
        finally:
            self._chunks.close()
        if self._staged:
            self.dropped_without_texts += len(self._staged)
            logger.warning(
                "%s: %d sequences closed without the texts they awaited; not committed",
                self.url,
                len(self._staged),
            )
            self._staged = []
            self._awaiting.clear()
        self._texts.clear()
