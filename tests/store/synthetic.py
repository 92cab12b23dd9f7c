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


PROMPT, GENERATED = 50, 20
"""Rows of a request's shared prompt and of each sample's own generation (`sample_rows`)."""


def sample_rows(request: str, sample: int, differ_at: int | None = None) -> RoutingRows:
    """Sample `sample` of `request`: the request's prompt rows (the same for every sample,
    unless `differ_at`: its ids change from that row on), then the sample's own rows."""
    prompt = sequence_rows(request, PROMPT)
    own = sequence_rows(f"{request}/{sample}", GENERATED)
    rows = RoutingRows.concat([prompt, own])
    rows.positions = np.arange(len(rows), dtype=np.int64)
    rows.request_ids = np.array([request] * len(rows), dtype=object)
    rows.sample_index = np.full(len(rows), sample, dtype=np.int32)
    rows.is_prompt = rows.positions < PROMPT
    if differ_at is not None:
        rows.topk_ids = rows.topk_ids.copy()
        rows.topk_ids[differ_at:PROMPT] = (rows.topk_ids[differ_at:PROMPT] + 1) % E
    return rows


def sample_end(request: str, sample: int, awaits_texts: bool = False) -> SequenceEnd:
    return SequenceEnd(
        request_id=request,
        sample_index=sample,
        prompt_len=PROMPT,
        first_position=0,
        num_rows=PROMPT + GENERATED,
        prompt_index=int(request.split("-")[1]),
        awaits_texts=awaits_texts,
    )


def assert_sample_intact(store, row: dict, differ_at: int | None = None) -> None:
    """The committed sequence of index `row` reads back as `sample_rows` wrote it."""
    want = sample_rows(row["request_id"], row["sample_index"], differ_at)
    got = store.sequence(row["sequence_id"])
    for name in ("topk_ids", "topk_weights", "router_logits", "token_ids", "positions"):
        np.testing.assert_array_equal(got[name], getattr(want, name), err_msg=name)
    np.testing.assert_array_equal(got["hidden_states_0"], want.hidden_states[0])
    np.testing.assert_array_equal(got["is_prompt"], want.is_prompt)
