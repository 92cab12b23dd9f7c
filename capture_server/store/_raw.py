"""Byte-level access to a store location through zarr's storage layer.

The sequence index lives beside the Zarr arrays as parquet parts; going through the
same `zarr.abc.store.Store` keeps local directories and object stores on one path.

A local directory is read and written here directly, on the calling thread: zarr runs
every store call on its event-loop thread, and a local one in a thread pool besides, so
each small file cost a store writer three thread hand-overs, and the engine thread,
which shares the GIL with the writers, waited for them (docs/benchmarks.md, small jobs).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync


def make_store(path_or_url: str | Path, *, read_only: bool = False) -> Store:
    """A zarr store for a local directory or any URL fsspec understands (s3://, gs://, ...)."""
    text = str(path_or_url)
    if "://" in text and not text.startswith("file://"):
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(text, read_only=read_only)
    from zarr.storage import LocalStore

    return LocalStore(text.removeprefix("file://"), read_only=read_only)


def local_root(store: Store) -> Path | None:
    """The directory of a local store; None for any other store."""
    from zarr.storage import LocalStore

    return Path(store.root) if isinstance(store, LocalStore) else None


def _writable_root(store: Store) -> Path | None:
    root = local_root(store)
    if root is not None and store.read_only:
        raise ValueError(f"store {root} is open read-only")
    return root


def put_file(
    path: Path,
    data: bytes | memoryview,
    *,
    durable: bool = False,
    atomic: bool = True,
    defer_sync: bool = False,
) -> bool:
    """Write `path`; `atomic`: through a temporary file beside it, renamed over it (readers
    see the old object or the new one, never part of one; the naming is zarr's).
    `durable`: the data is fdatasynced, and its directory entry too.

    `defer_sync` (with `durable`): the caller syncs at its barrier, before anything names
    the file: the directory always, and the data (`sync_file`) when this returns True.
    The data's writeback is only started here, so the writing thread does not wait for
    the disk. An object replacing an existing one has its data synced now anyway, before
    the rename: otherwise a power cut could leave the old name on a new, empty file."""
    tmp = path.with_suffix(f".{uuid.uuid4().hex}.partial") if atomic else path
    defer = durable and defer_sync and not (atomic and path.exists())
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                if defer:
                    start_writeback(f.fileno())
                else:
                    os.fdatasync(f.fileno())
        if atomic:
            os.replace(tmp, path)
    except BaseException:
        if atomic:
            tmp.unlink(missing_ok=True)
        raise
    if durable and not defer_sync:
        fsync_dir(path.parent)
    return defer


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux's sync_file_range(2) from libc, or None where there is none."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    return call


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int) -> None:
    """Start writing fd's dirty pages to disk without waiting for them (Linux; elsewhere
    the later fdatasync does all of it), so the data is on its way while the next chunk
    is encoded: in the store bench the barriers' fdatasyncs then took 14-18 ms of a
    0.4-0.6 s run (docs/benchmarks.md, durable)."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def sync_file(path: Path) -> None:
    """fdatasync a file written earlier (through a new descriptor: Linux syncs the file,
    not the descriptor it was written through)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_file(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def get_many(store: Store, keys: list[str]) -> list[bytes | None]:
    """Several objects (None where missing); a remote store's fetched concurrently, in
    one round trip to zarr's event loop."""
    import asyncio

    root = local_root(store)
    if root is not None:
        return [_read_file(root / key) for key in keys]

    async def fetch() -> list:
        prototype = default_buffer_prototype()
        return await asyncio.gather(*(store.get(key, prototype=prototype) for key in keys))

    return [None if buf is None else buf.to_bytes() for buf in sync(fetch())]


def set_bytes(store: Store, key: str, data: bytes) -> None:
    """Write one object; local stores write a temporary file and rename it (atomic)."""
    set_many(store, {key: data})


def set_many(store: Store, objects: dict[str, bytes]) -> None:
    """Write several objects (concurrently where the store is remote), each atomically."""
    import asyncio

    root = _writable_root(store)
    if root is not None:
        for key, data in objects.items():
            path = root / key
            path.parent.mkdir(parents=True, exist_ok=True)
            put_file(path, data)
        return
    buffer = default_buffer_prototype().buffer

    async def write() -> None:
        await asyncio.gather(*(store.set(k, buffer.from_bytes(d)) for k, d in objects.items()))

    sync(write())


def list_keys(store: Store, prefix: str) -> list[str]:
    root = local_root(store)
    if root is not None:
        base = root / prefix.rpartition("/")[0]
        keys = []
        for directory, _, files in os.walk(base):
            rel = Path(directory).relative_to(root).as_posix()
            keys += [name if rel == "." else f"{rel}/{name}" for name in files]
        return sorted(k for k in keys if k.startswith(prefix))

    async def collect() -> list[str]:
        return [k async for k in store.list_prefix(prefix)]

    return sorted(sync(collect()))


def exists(store: Store, key: str) -> bool:
    root = local_root(store)
    if root is not None:
        return (root / key).is_file()
    return bool(sync(store.exists(key)))


def delete_dirs(store: Store, prefixes: list[str]) -> None:
    """Delete every object under each of `prefixes` (none there is fine); a remote
    store's concurrently."""
    import asyncio

    root = _writable_root(store)
    if root is not None:
        for prefix in prefixes:
            shutil.rmtree(root / prefix, ignore_errors=True)
        return

    async def delete() -> None:
        await asyncio.gather(*(store.delete_dir(prefix) for prefix in prefixes))

    sync(delete())


def delete_many(store: Store, keys: list[str]) -> None:
    """Delete objects (missing ones are fine); a remote store's concurrently."""
    import asyncio

    if not keys:
        return
    root = _writable_root(store)
    if root is not None:
        for key in keys:
            (root / key).unlink(missing_ok=True)
        return

    async def delete() -> None:
        await asyncio.gather(*(store.delete(key) for key in keys))

    sync(delete())
