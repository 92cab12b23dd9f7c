"""Map step: per-sequence routing profiles read from one block of a store.

A profile keeps per-layer expert visit counts for each token scope, counts at rollout
checkpoints, and the last prompt token's routing (for the committee audit). Profiles
are small (scopes x layers x experts), so the reduce step never touches token rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from analyzer.metrics.usage import softmax

SCOPES = ("prompt", "generated", "cumulative", "last_token")
CHECKPOINTS = (0, 4, 8, 16, 32, 64, 128, 256, 512, 1024)  # rollout tokens after the prompt


def counts(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """(tokens, layers, k) -> (layers, experts) visit counts."""
    layers = ids.shape[1]
    offset = (np.arange(layers) * num_experts)[None, :, None]
    flat = (ids.astype(np.int64) + offset).ravel()
    return np.bincount(flat, minlength=layers * num_experts).reshape(layers, num_experts)


@dataclass
class SequenceProfile:
    sequence_id: int
    prompt_index: int
    sample_index: int
    prompt_len: int
    num_rows: int
    labels: dict[str, Any]
    scope_counts: dict[str, np.ndarray]  # scope -> (layers, experts) int
    checkpoint_counts: dict[str, np.ndarray] = field(default_factory=dict)
    """``cumulative``/``generated`` -> (checkpoints, layers, experts) int."""
    last_ids: np.ndarray | None = None  # (layers, k) of the last prompt token
    last_weights: np.ndarray | None = None
    last_probs: np.ndarray | None = None  # (layers, experts) full softmax, when logits exist
    confidence: np.ndarray | None = None  # (layers,) mean max-softmax over all rows


def profile_sequence(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> SequenceProfile:
    """Profile of one sequence from its index row `meta` and its arrays."""
    e = int(meta["num_experts"])
    ids = arrays["topk_ids"]
    positions = arrays["positions"]
    p = int(np.searchsorted(positions, meta["prompt_len"]))  # rows before the boundary
    scope = {
        "prompt": counts(ids[:p], e),
        "generated": counts(ids[p:], e),
        "cumulative": counts(ids, e),
        "last_token": counts(ids[max(p - 1, 0) : p], e),
    }
    cps = {}
    for name, base in (("cumulative", 0), ("generated", p)):
        # windows grow with g; past the end of the sequence they stop growing
        cps[name] = np.stack([counts(ids[base : p + g], e) for g in CHECKPOINTS])
    profile = SequenceProfile(
        sequence_id=int(meta["sequence_id"]),
        prompt_index=int(meta["prompt_index"]),
        sample_index=int(meta["sample_index"]),
        prompt_len=int(meta["prompt_len"]),
        num_rows=len(ids),
        labels=dict(meta["labels"]),
        scope_counts=scope,
        checkpoint_counts=cps,
    )
    if p > 0:
        profile.last_ids = ids[p - 1]
        profile.last_weights = arrays["topk_weights"][p - 1].astype(np.float64)
    logits = arrays.get("router_logits")
    if logits is not None and len(logits) and not np.isnan(logits[0, 0, 0]):
        probs = softmax(logits.astype(np.float64))
        profile.confidence = probs.max(-1).mean(0)
        if p > 0:
            profile.last_probs = probs[p - 1]
    return profile


def profile_block(
    url: str, start: int, stop: int, sequence_ids: list[int]
) -> list[SequenceProfile]:
    """Map task: read rows ``[start, stop)`` once and profile each listed sequence."""
    import json

    from capture_server.store import open_store

    store = open_store(url)
    rows = store.read_rows(start, stop, ("topk_ids", "topk_weights", "positions", "router_logits"))
    index = store.index.filter(store.index["sequence_id"].is_in(sequence_ids))
    out = []
    for row in index.iter_rows(named=True):
        a = row["token_offset"] - start
        b = a + row["num_rows"]
        meta = dict(
            row, num_experts=store.model["num_experts"], labels=json.loads(row["labels"] or "{}")
        )
        out.append(profile_sequence(meta, {k: v[a:b] for k, v in rows.items()}))
    return out
