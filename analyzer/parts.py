"""Tables that grow with the store, written part by part and joined on disk."""

from __future__ import annotations

from pathlib import Path

import polars as pl


class TableParts:
    """One table written as numbered parquet parts as its rows arrive, read back as one
    lazy frame in part order: the driver holds one part at a time, whatever the store's
    size, and the final file is written by a streaming query."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def add(self, number: int, frame: pl.DataFrame) -> None:
        if len(frame):
            self.directory.mkdir(parents=True, exist_ok=True)
            frame.write_parquet(self.directory / f"part-{number:08d}.parquet")

    def scan(self) -> pl.LazyFrame | None:
        """Every part, in part order; None before the first part."""
        paths = sorted(self.directory.glob("part-*.parquet"))
        return pl.scan_parquet(paths) if paths else None
