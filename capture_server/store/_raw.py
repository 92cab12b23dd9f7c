"""Byte-level access to a store location through zarr's storage layer.

The sequence index lives beside the Zarr arrays as parquet parts; going through the
same `zarr.abc.store.Store` keeps local directories and object stores on one path.
"""

from __future__ import annotations

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


def get_many(store: Store, keys: list[str]) -> list[bytes | None]:
    """Several objects fetched concurrently (one round trip to zarr's event loop)."""
    import asyncio

    async def fetch() -> list:
        prototype = default_buffer_prototype()
        return await asyncio.gather(*(store.get(key, prototype=prototype) for key in keys))

    return [None if buf is None else buf.to_bytes() for buf in sync(fetch())]


def set_bytes(store: Store, key: str, data: bytes) -> None:
    """Write one object; local stores write a temporary file and rename it (atomic)."""
    sync(store.set(key, default_buffer_prototype().buffer.from_bytes(data)))


def list_keys(store: Store, prefix: str) -> list[str]:
    async def collect() -> list[str]:
        return [k async for k in store.list_prefix(prefix)]

    return sorted(sync(collect()))


def exists(store: Store, key: str) -> bool:
    return bool(sync(store.exists(key)))


def delete_dirs(store: Store, prefixes: list[str]) -> None:
    """Delete every object under each of `prefixes` (none there is fine), concurrently."""
    import asyncio

    async def delete() -> None:
        await asyncio.gather(*(store.delete_dir(prefix) for prefix in prefixes))

    sync(delete())


def delete_many(store: Store, keys: list[str]) -> None:
    """Delete objects (missing ones are fine), concurrently."""
    import asyncio

    if not keys:
        return

    async def delete() -> None:
        await asyncio.gather(*(store.delete(key) for key in keys))

    sync(delete())
