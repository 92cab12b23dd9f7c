"""Tables that grow with the store, written part by part and joined on disk."""

from __future__ import annotations

import io
from pathlib import Path

import polars as pl


def encode(frame: pl.DataFrame) -> bytes:
    """`frame` as parquet bytes (empty for an empty frame): map tasks encode their part of
    a table, so the driver only writes bytes."""
    if not len(frame):
        return b""
    out = io.BytesIO()
    frame.write_parquet(out)
    return out.getvalue()


class TableParts:
    """One table written as numbered parquet parts as its rows arrive, read back as one
    lazy frame in part order: the driver holds one part at a time, whatever the store's
    size, and the final file is written by a streaming query."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def add(self, number: int, parquet: bytes) -> None:
        """Part `number`, as `encode` made it."""
        if parquet:
            self.directory.mkdir(parents=True, exist_ok=True)
            (self.directory / f"part-{number:08d}.parquet").write_bytes(parquet)

    def scan(self) -> pl.LazyFrame | None:
        """Every part, in part order; None before the first part."""
        paths = sorted(self.directory.glob("part-*.parquet"))
        return pl.scan_parquet(paths) if paths else None
