"""Writing whole chunks of a Zarr v3 array without zarr's write path.

zarr's `Array.__setitem__` runs every chunk through its event loop and codec pipeline:
at routing rates (8 MiB chunks, hundreds of MB/s) that machinery, not the codec or the
disk, bounds the writer (profiled in docs/benchmarks.md). The writer only ever writes
whole chunks, so it can do what zarr would do, directly:

    cast to the stored dtype -> encode with the array's own codecs -> write the object
    under the array's own chunk key (local directories: a temporary file renamed into
    place, as zarr's `LocalStore` does)

Each chunk is one task in a small thread pool. numpy casts, blosc/zstd encoding and
file writes release the GIL, so tasks run in parallel with each other and with the
thread that stages rows. The bytes are the ones zarr writes (`encoder_for` builds the
same numcodecs codecs from the array's metadata; tested byte for byte against zarr), so
plain zarr reads the store. Arrays whose codecs are not understood here are written
through zarr.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numcodecs
import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.codecs import BloscCodec, BytesCodec, ZstdCodec

from capture_server.store import _raw
from capture_server.store._raw import fsync_dir, put_file, sync_file

Encoder = Callable[[np.ndarray], bytes | memoryview]
"""A chunk's stored bytes; a memoryview may share the chunk's memory (codec "none"), so
it is written before the chunk's buffer is used again."""
Cast = Callable[[np.ndarray, np.ndarray], None]
"""`cast(dst, src)`: src's values into dst (same shape), converted to dst's dtype."""


_float16_cast: Cast | None = None


def use_float16_cast(cast: Cast | None) -> None:
    """Use `cast` for float32 -> float16 conversions in this process (None: numpy's).

    numpy converts float32 to float16 one value at a time (about 1 GB/s of input per core
    on the development machine), which bounds a writer of float16 logits; the capture
    plugin registers torch's vectorized conversion (`plugin.float_cast`), which gives the
    same bits (tested). The store itself imports no torch.
    """
    global _float16_cast
    _float16_cast = cast


def cast_into(dst: np.ndarray, src: np.ndarray) -> None:
    """src into dst, through the registered float16 cast where it applies."""
    fast = _float16_cast
    if (
        fast is not None
        and dst.dtype == np.float16
        and src.dtype == np.float32
        and dst.flags.c_contiguous
        and src.flags.c_contiguous
    ):
        fast(dst, src)
    else:
        dst[...] = src


ENCODER_THREADS = 2
"""Default encoder threads, shared by a process's writers: two scale 1.8x on this
project's 2-core development machine (docs/benchmarks.md) and leave the engine its own
cores on a GPU node, where a node runs one engine process per rank."""

MAX_IN_FLIGHT_PER_THREAD = 2
"""Chunks queued per encoder thread before the staging thread waits (bounds memory)."""


def chunk_key(name: str, array: zarr.Array, index: int) -> str:
    """Store key of chunk `index` on the row axis of array `name` (zarr's own encoding)."""
    return f"{name}/{array.metadata.encode_chunk_key((index, *(0 for _ in array.shape[1:])))}"


def encoder_for(array: zarr.Array) -> Encoder | None:
    """The array's codec chain as one function of a C-ordered chunk, or None when the
    chain holds a codec this module does not reproduce exactly."""
    codecs = list(array.metadata.codecs)
    if not codecs or not isinstance(codecs[0], BytesCodec):
        return None
    endian = codecs[0].endian
    little = endian is None or endian.value == "little"
    steps: list[numcodecs.abc.Codec] = []
    for codec in codecs[1:]:
        if isinstance(codec, BloscCodec):
            # the configuration zarr's BloscCodec passes to numcodecs (`_blosc_codec`)
            shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[codec.shuffle.value]
            steps.append(
                numcodecs.Blosc(
                    cname=codec.cname.value,
                    clevel=codec.clevel,
                    shuffle=shuffle,
                    blocksize=codec.blocksize,
                    typesize=codec.typesize,
                )
            )
        elif isinstance(codec, ZstdCodec):
            steps.append(numcodecs.Zstd(level=codec.level, checksum=codec.checksum))
        else:
            return None
    dtype = np.dtype(array.dtype).newbyteorder("<" if little else ">")

    def encode(chunk: np.ndarray) -> bytes:
        data: bytes | memoryview = memoryview(np.ascontiguousarray(chunk, dtype=dtype)).cast("B")
        for step in steps:
            data = step.encode(data)
        return data

    return encode


_scratch = threading.local()


def scratch_chunk(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array of `shape` in this thread's own buffer, reused chunk after
    chunk (the previous one's contents are gone). A new array per chunk was new memory
    each time, pages the kernel had to map and zero before the cast could fill them. The
    buffer, as large as the largest chunk, lives as long as the (shared, lasting) thread."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.nbytes < nbytes:
        buffer = _scratch.buffer = np.empty(nbytes, dtype=np.uint8)
    return buffer[:nbytes].view(dtype).reshape(shape)


_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def encoder_pool(threads: int) -> ThreadPoolExecutor:
    """The process's encoder threads for writers of `threads` threads, shared by its
    store writers: a store per small job started and joined threads of its own, and each
    start and join preempted the engine's threads (docs/benchmarks.md, small jobs).

    Room for up to four such writers at once where the cores allow (half the cores):
    concurrent large jobs keep their own encoding rate on a GPU node; on this project's
    2-core machine the pool has `threads` threads. Threads start only when work waits.
    Keyed by process: a forked child has the pool's objects but not its threads."""
    key = (os.getpid(), threads)
    with _pools_lock:
        if key not in _pools:
            size = max(threads, min(4 * threads, (os.cpu_count() or 1) // 2))
            _pools[key] = ThreadPoolExecutor(size, thread_name_prefix="moetrace-chunk")
        return _pools[key]


class ChunkWriter:
    """Casts, encodes and writes whole chunks of a store's arrays in a thread pool.

    `submit` queues one object (a chunk, or a tail segment with its own encoder);
    `wait` returns when every queued one is on disk (or raises the first failure). A key
    written again (a padded last chunk, later written whole by a resumed writer) waits
    for its previous write first, so the newest bytes always land last.
    """

    def __init__(
        self, store: Store, *, threads: int = ENCODER_THREADS, durable: bool = False
    ) -> None:
        self.store = store
        self.durable = durable
        """Every object on disk before it counts as written: commits then survive power
        loss, not only the death of the process. Chunk objects and tail segments are
        fdatasynced at the barrier (`wait`, or `settled` once all are written), with their
        directories, by the thread that reaches it; the encoder threads only start their
        writeback. An fdatasync per object in the encoder threads held each thread for
        the disk's time instead of encoding (docs/benchmarks.md, durable writes)."""
        self.threads = max(1, threads)
        self._local_root = _raw.local_root(store)
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._made_dirs: set[Path] = set()
        self._unsynced_dirs: set[Path] = set()
        self._unsynced_files: list[Path] = []
        self.encode_seconds = 0.0  # summed over threads: cast + encode
        self.io_seconds = 0.0  # summed over threads: writing and renaming

    def submit(
        self,
        key: str,
        pieces: Sequence[np.ndarray],
        shape: tuple[int, ...],
        dtype: np.dtype,
        encode: Encoder,
        *,
        atomic: bool = True,
    ) -> None:
        """Queue chunk `key`: `pieces` (any dtype) joined on the row axis, cast to `dtype`,
        zero-padded to `shape`, encoded and written. `atomic` false writes the object in
        place, for one no reader reads before it is whole (a tail segment: no index part
        names its rows until it is written, and a resumed writer deletes what a crash
        left): one new file instead of two."""
        if self._pool is None:
            self._pool = encoder_pool(self.threads)
        previous = self._pending.pop(key, None)
        if previous is not None:
            previous.result()
        while len(self._pending) >= self.threads * MAX_IN_FLIGHT_PER_THREAD:
            # any finished one makes room: waiting for the oldest left threads idle
            # behind one large chunk while the small ones queued after it were done
            futures.wait(self._pending.values(), return_when=futures.FIRST_COMPLETED)
            self._reap()
        self._pending[key] = self._pool.submit(
            self._run, key, list(pieces), shape, dtype, encode, atomic
        )

    def settled(self) -> bool:
        """True when every submitted chunk is written (without waiting); raises the
        first failure among those that finished."""
        self._reap()
        if self._pending:
            return False
        self._barrier()
        return True

    def _reap(self) -> None:
        """Forget the submitted objects already written; raises the first failure."""
        for key in [k for k, future in self._pending.items() if future.done()]:
            self._pending.pop(key).result()

    def put(self, key: str, data: bytes) -> None:
        """Write one object now, on the calling thread, the way chunks are written."""
        self._put(key, data)

    def wait(self) -> None:
        """Every submitted chunk is written; raises the first failure (the rest are
        waited for first, so no write is still running when the caller handles it)."""
        pending, self._pending = list(self._pending.values()), {}
        failure: BaseException | None = None
        for future in pending:
            try:
                future.result()
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                failure = failure or exc
        if failure is not None:
            raise failure
        self._barrier()

    def _barrier(self) -> None:
        """Durable mode: the objects written since the last barrier, then their
        directories, are synced here, before the caller commits anything that names them.
        Their writeback started when each was written, so most of it is done by now."""
        with self._lock:
            files, self._unsynced_files = self._unsynced_files, []
            dirs, self._unsynced_dirs = self._unsynced_dirs, set()
        for path in files:
            sync_file(path)
        for directory in dirs:
            fsync_dir(directory)

    def close(self) -> None:
        """Every submitted chunk written (the shared encoder threads stay)."""
        self.wait()

    # -- one task ----------------------------------------------------------------------

    def _run(
        self,
        key: str,
        pieces: list[np.ndarray],
        shape: tuple[int, ...],
        dtype: np.dtype,
        encode: Encoder,
        atomic: bool,
    ) -> None:
        t0 = time.perf_counter()
        chunk = scratch_chunk(shape, dtype)
        filled = 0
        for piece in pieces:
            cast_into(chunk[filled : filled + len(piece)], piece)
            filled += len(piece)
        chunk[filled:] = 0
        data = encode(chunk)
        t1 = time.perf_counter()
        self._put(key, data, atomic=atomic, chunk=True)
        t2 = time.perf_counter()
        with self._lock:
            self.encode_seconds += t1 - t0
            self.io_seconds += t2 - t1

    def _put(
        self, key: str, data: bytes | memoryview, *, atomic: bool = True, chunk: bool = False
    ) -> None:
        if self._local_root is None:  # object stores replace objects whole anyway
            _raw.set_bytes(self.store, key, bytes(data))
            return
        path = self._local_root / key
        if path.parent not in self._made_dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._made_dirs.add(path.parent)
        later = put_file(path, data, durable=self.durable, atomic=atomic, defer_sync=chunk)
        if chunk and self.durable:
            with self._lock:
                self._unsynced_dirs.add(path.parent)
                if later:
                    self._unsynced_files.append(path)
