"""The routing store format: layout, dtypes, codecs and chunking (format version 1).

See docs/store-format.md for the full description.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from capture_server.protocol import CONFIG_KEY

FORMAT_NAME = "moetrace.routing"
FORMAT_VERSION = 1
ATTRS_KEY = CONFIG_KEY
INDEX_PREFIX = "index/"
"""Committed sequence index: one parquet part per commit, each written atomically."""
INFO_PREFIX = "info/"
"""Per-sequence annotations (texts, finish reason) added by the process that knows them."""
MODEL_GROUP = "model"

TARGET_CHUNK_BYTES = 8 * 2**20  # uncompressed bytes of the widest array per chunk
MIN_CHUNK_TOKENS, MAX_CHUNK_TOKENS = 256, 65536
GROW_CHUNKS = 64  # arrays grow by this many chunks at a time (resize is a metadata rewrite)


@dataclass(frozen=True, slots=True)
class StoreOptions:
    """What a store keeps and how; fixed when the store is created."""

    weights_dtype: str = "float32"
    """``float32`` (exact) or ``float16`` (half the bytes, ~1e-3 relative error)."""
    logits: bool = True
    """Keep the full router logits."""
    logits_dtype: str = "float16"
    """``float16`` (default) or ``float32``. bf16 is not a Zarr dtype: logits arrive as
    float32 from the capture and are stored in this dtype."""
    hidden_dtype: str = "float16"
    """dtype of stored router-input hidden states."""
    hidden_layers: tuple[int, ...] = ()
    """MoE-layer indices whose hidden states are kept."""
    chunk_tokens: int = 0
    """Token rows per chunk; 0 picks one from `TARGET_CHUNK_BYTES` and `expected_rows`."""
    expected_rows: int = 0
    """About how many rows the store will hold (0: unknown). With `chunk_tokens` 0,
    chunks are no larger than that: a small job's store is sealed at close by writing
    its last chunk padded, and memory holds up to a chunk of rows per array."""
    compressor: str = "blosc-lz4-shuffle"
    """One of `COMPRESSORS`."""
    share_prompt_rows: bool = True
    """Store the prompt rows a request's samples have in common once: a later sample
    whose leading prompt rows equal the first sample's, byte for byte, refers to them
    (index columns ``shared_offset``, ``shared_rows``) instead of storing them again.
    With prefix caching the samples' prompt rows are one forward's (kept by KV slot),
    so n samples of a long prompt store it once. Readers join them back."""

    def __post_init__(self) -> None:
        for name in ("weights_dtype", "logits_dtype", "hidden_dtype"):
            value = getattr(self, name)
            if value not in ("float16", "float32"):
                raise ValueError(f"{name}: expected float16 or float32, got {value!r}")
        if self.compressor not in COMPRESSORS:
            raise ValueError(
                f"compressor: expected one of {sorted(COMPRESSORS)}, got {self.compressor!r}"
            )


def ids_dtype(num_experts: int) -> np.dtype:
    """uint8 up to 256 experts, uint16 above."""
    return np.dtype(np.uint8 if num_experts <= 256 else np.uint16)


def choose_chunk_tokens(widest_row_bytes: int, expected_rows: int = 0) -> int:
    """Largest power of two of rows whose widest array stays near `TARGET_CHUNK_BYTES`,
    and (with `expected_rows`) no larger than the power of two that holds them."""
    rows = max(1, TARGET_CHUNK_BYTES // max(1, widest_row_bytes))
    power = 1 << (rows.bit_length() - 1)
    if expected_rows > 0:
        power = min(power, 1 << (expected_rows - 1).bit_length())
    return int(min(MAX_CHUNK_TOKENS, max(MIN_CHUNK_TOKENS, power)))


def _blosc(cname: str, shuffle: str):
    from zarr.codecs import BloscCodec

    def make(itemsize: int):
        return [BloscCodec(cname=cname, clevel=3, shuffle=shuffle, typesize=itemsize)]

    return make


def _zstd(itemsize: int):
    from zarr.codecs import ZstdCodec

    return [ZstdCodec(level=3)]


def _none(itemsize: int):
    return None


COMPRESSORS = {
    "blosc-zstd-shuffle": _blosc("zstd", "shuffle"),
    "blosc-zstd-bitshuffle": _blosc("zstd", "bitshuffle"),
    "blosc-lz4-shuffle": _blosc("lz4", "shuffle"),
    "zstd": _zstd,
    "none": _none,
}


def group_document(attrs: dict | None = None) -> bytes:
    """A zarr v3 group's ``zarr.json``, with moetrace's attributes under `ATTRS_KEY`
    when given (written as bytes: one atomic object, no round trip through zarr)."""
    attributes = {} if attrs is None else {ATTRS_KEY: attrs}
    return json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attributes}).encode()
