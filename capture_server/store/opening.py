"""`open_store`: a store of either format version, as one `RoutingStore`."""

from __future__ import annotations

from pathlib import Path

from capture_server.errors import StoreFormatError
from capture_server.store.format import FORMAT_VERSION
from capture_server.store.parts import PARTS_VERSION, open_parted
from capture_server.store.reader import RoutingStore, open_single, read_root


def open_store(path_or_url: str | Path, *, read_index: bool = True) -> RoutingStore:
    """Open a routing store for reading: one writer's (format version 1) or several
    writers' (version 2, `parts`), read the same way.

    `read_index=False` leaves a version-1 store's `index` empty, for workers that are
    told which rows to read (a parted store always reads its index: it maps the rows).

    Raises:
        StoreNotFoundError: nothing at the path.
        StoreFormatError: not a moetrace store, or a format version this reader does not read.
        StoreCorruptError: the index cannot be decoded, or pipeline stages disagree.
    """
    url, _, _, attrs = read_root(path_or_url)
    version = attrs.get("format_version")
    if version == FORMAT_VERSION:
        return open_single(url, read_index=read_index)
    if version == PARTS_VERSION:
        return open_parted(url, attrs)
    raise StoreFormatError(
        f"{url}: format version {version}, this moetrace reads versions "
        f"{FORMAT_VERSION} and {PARTS_VERSION}"
    )
