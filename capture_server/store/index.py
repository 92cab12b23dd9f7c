"""The sequence index and annotations: parquet parts beside the Zarr arrays.

Each commit adds one index part (``index/part-<first sequence id>.parquet``) and each
annotation batch one info part (``info/part-<time>-<random>.parquet``), each written
atomically, so a part is either whole or absent. The reader concatenates the parts; the
newest annotation of a sequence wins.
"""

from __future__ import annotations

import io
import time
import uuid
from pathlib import Path
from typing import Any

import polars as pl

from capture_server.errors import StoreCorruptError
from capture_server.protocol import Annotation
from capture_server.store import _raw
from capture_server.store.format import INDEX_PREFIX, INFO_PREFIX

INDEX_SCHEMA = {
    "sequence_id": pl.Int64,
    "request_id": pl.String,
    "sample_index": pl.Int32,
    "prompt_index": pl.Int64,
    "token_offset": pl.Int64,
    "num_rows": pl.Int64,
    "shared_offset": pl.Int64,
    "shared_rows": pl.Int64,
    "first_position": pl.Int64,
    "prompt_len": pl.Int64,
    "labels": pl.String,
    "intervention": pl.String,
    "committed_at": pl.Float64,
}


def stored_rows(row: dict[str, Any]) -> int:
    """Rows a sequence's index row says it stored itself at ``token_offset``: its rows
    less those it shares with an earlier sample of its request (`store.shared_prompts`)."""
    return max(int(row["num_rows"]) - int(row.get("shared_rows") or 0), 0)


def stored_end() -> pl.Expr:
    """One past each sequence's last stored row, as a polars expression over an index
    with the shared-row columns (`with_shared_columns`)."""
    own = (pl.col("num_rows") - pl.col("shared_rows")).clip(lower_bound=0)
    return pl.col("token_offset") + own


def with_shared_columns(index: pl.DataFrame) -> pl.DataFrame:
    """The index with ``shared_offset`` and ``shared_rows`` filled (-1 and 0) where a
    part was written before stores shared prompt rows."""
    for name, missing in (("shared_offset", -1), ("shared_rows", 0)):
        column = pl.col(name) if name in index.columns else pl.lit(None)
        index = index.with_columns(column.cast(pl.Int64).fill_null(missing).alias(name))
    return index


def parquet_bytes(frame: pl.DataFrame) -> bytes:
    out = io.BytesIO()
    frame.write_parquet(out)
    return out.getvalue()


def read_index_parts(store: Any, prefix: str = INDEX_PREFIX) -> pl.DataFrame | None:
    """All index parts under `prefix`, concatenated (None when there are none)."""
    frames = []
    keys = [k for k in _raw.list_keys(store, prefix) if k.endswith(".parquet")]  # not temp files
    for key, data in zip(keys, _raw.get_many(store, keys), strict=True):
        try:
            frames.append(pl.read_parquet(io.BytesIO(data or b"")))
        except Exception as exc:
            raise StoreCorruptError(f"{store}: index part {key} is unreadable ({exc})") from None
    return pl.concat(frames, how="diagonal_relaxed") if frames else None


def write_annotations(store_or_url: Any, annotations: list[Annotation]) -> None:
    """Add per-sequence annotations (prompt/completion text, finish reason, ...).

    The reader joins annotations onto the index by (request_id, sample_index), the
    newest winning. Written as one atomic part, from any process: the one that knows the
    texts is often not the one writing the routing.
    """
    if not annotations:
        return
    rows = [a.row() for a in annotations]
    store = _raw.make_store(store_or_url) if isinstance(store_or_url, str | Path) else store_or_url
    # time orders the parts (the newest annotation wins); the random suffix keeps two
    # writes in one clock tick apart (a coarse clock gave them one name, and one was lost)
    key = f"{INFO_PREFIX}part-{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.parquet"
    _raw.set_bytes(store, key, parquet_bytes(pl.DataFrame(rows)))
