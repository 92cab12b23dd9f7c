"""Deterministic synthetic routing: sequence contents are a function of the sequence key."""

from __future__ import annotations

import zlib

import numpy as np

from capture_server.capture.records import ModelMeta, RoutingRows, SequenceEnd
from capture_server.store import StoreOptions

L, E, K, D = 3, 16, 2, 8
EXACT = StoreOptions(
    weights_dtype="float32",
    logits_dtype="float32",
    hidden_dtype="float32",
    hidden_layers=(0,),
    chunk_tokens=64,
)
"""Lossless dtypes and small chunks: stored values compare exactly, over many chunks."""


def meta() -> ModelMeta:
    rng = np.random.default_rng(0)
    return ModelMeta.synthetic([1, 2, 3], E, K, D, rng.normal(size=(L, E, D)).astype(np.float32))


def sequence_rows(key: str, n: int, hidden_layers: tuple[int, ...] = (0,)) -> RoutingRows:
    """`n` rows of sequence `key`, identical every time they are asked for."""
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    logits = rng.normal(size=(n, L, E)).astype(np.float32)
    ids = np.argsort(-logits, axis=-1)[..., :K].astype(np.int32)
    weights = np.take_along_axis(logits, ids, -1)
    weights = np.exp(weights) / np.exp(weights).sum(-1, keepdims=True)
    return RoutingRows(
        request_ids=np.array([key] * n, dtype=object),
        sample_index=np.zeros(n, dtype=np.int32),
        positions=np.arange(n, dtype=np.int64),
        token_ids=rng.integers(0, 500, n).astype(np.int64),
        is_prompt=np.arange(n) < n // 2,
        topk_ids=ids,
        topk_weights=weights.astype(np.float32),
        router_logits=logits,
        hidden_states={h: rng.normal(size=(n, D)).astype(np.float32) for h in hidden_layers},
    )


def length_of(key: str) -> int:
    return 5 + zlib.crc32(key.encode()) % 60


def end_of(key: str) -> SequenceEnd:
    n = length_of(key)
    return SequenceEnd(
        request_id=key,
        sample_index=0,
        prompt_len=n // 2,
        first_position=0,
        num_rows=n,
        prompt_index=int(key.split("-")[1]),
        labels={"domain": "math" if "3" in key else "code"},
    )


def interleaved_steps(keys: list[str], step_rows: int = 3):
    """Yield ("rows", RoutingRows) / ("end", SequenceEnd) like a continuous batch would."""
    full = {k: sequence_rows(k, length_of(k)) for k in keys}
    cursor = dict.fromkeys(keys, 0)
    active = list(keys)
    while active:
        parts = []
        for k in list(active):
            a = cursor[k]
            b = min(a + step_rows, length_of(k))
            parts.append(full[k].slice(a, b))
            cursor[k] = b
        yield "rows", RoutingRows.concat(parts)
        for k in list(active):
            if cursor[k] == length_of(k):
                active.remove(k)
                yield "end", end_of(k)
