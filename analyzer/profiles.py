"""Map step: per-sequence routing profiles read from one block of a store.

A profile keeps per-layer expert visit counts for each token scope, counts at rollout
checkpoints, and the last prompt token's routing (for the committee audit). Profiles
are small (scopes x layers x experts), so the reduce step never touches token rows.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    scope_counts: dict[str, np.ndarray]  # scope -> (layers, experts) int32
    checkpoints: np.ndarray | None = None
    """(checkpoints, layers, experts) int32 counts of the cumulative windows; only for
    sequences the rollout curves pair up (see `pipeline.curve_sequences`)."""
    last_ids: np.ndarray | None = None  # (layers, k) of the last prompt token
    last_weights: np.ndarray | None = None
    last_probs: np.ndarray | None = None  # (layers, experts) full softmax, when logits exist
    confidence: np.ndarray | None = None  # (layers,) mean max-softmax over all rows
    pooled_hidden: dict[int, np.ndarray] | None = None  # MoE layer -> mean router input


def profile_rows(
    sequences: list[dict[str, Any]], rows: dict[str, np.ndarray], start: int, num_experts: int
) -> list[SequenceProfile]:
    """Profiles of `sequences` from the block's rows (which begin at token `start`).

    Vectorised over the whole block: one bincount over (sequence, window increment,
    layer, expert) gives every scope and every rollout checkpoint at once.
    """
    ids = rows["topk_ids"]  # (R, L, k)
    positions = rows["positions"]
    n_rows, layers, _ = ids.shape
    e, nb = num_experts, len(CHECKPOINTS) + 1
    seq_of_row = np.full(n_rows, -1, dtype=np.int64)
    rollout_index = np.zeros(n_rows, dtype=np.int64)  # rows after the prompt boundary
    prompt_rows = np.zeros(len(sequences), dtype=np.int64)
    for i, row in enumerate(sequences):
        a = row["token_offset"] - start
        b = a + row["num_rows"]
        seq_of_row[a:b] = i
        prompt_rows[i] = np.searchsorted(positions[a:b], row["prompt_len"])
        rollout_index[a:b] = np.arange(b - a) - prompt_rows[i]
    valid = seq_of_row >= 0
    # bucket 0: prompt rows; bucket j: rollout rows in [CHECKPOINTS[j-1], CHECKPOINTS[j])
    bucket = np.searchsorted(np.array(CHECKPOINTS), rollout_index, side="right")
    # one key per (sequence, bucket, layer, expert); int32 while it fits, to halve traffic
    cells = len(sequences) * nb * layers * e
    key_type = np.int32 if cells < 2**31 else np.int64
    segment = (seq_of_row * nb + bucket).astype(key_type) * (layers * e)
    layer_offset = (np.arange(layers) * e).astype(key_type)
    counted = ids
    if not valid.all():
        segment, counted = segment[valid], ids[valid]
    keys = (segment[:, None] + layer_offset[None, :])[:, :, None] + counted
    grid = np.bincount(keys.ravel(), minlength=cells)
    grid = grid.reshape(len(sequences), nb, layers, e).astype(np.int32)  # (S, buckets, L, E)

    logits = rows.get("router_logits")
    has_logits = logits is not None and n_rows and not np.isnan(logits[0, 0, 0])
    profiles = []
    for i, row in enumerate(sequences):
        a = row["token_offset"] - start
        p = int(prompt_rows[i])
        prompt = grid[i, 0]
        everything = grid[i].sum(0)
        last = ids[a + p - 1] if p > 0 else None
        scope = {
            "prompt": prompt,
            "generated": everything - prompt,
            "cumulative": everything,
            "last_token": counts(last[None], e) if last is not None else np.zeros_like(prompt),
        }
        profile = SequenceProfile(
            sequence_id=int(row["sequence_id"]),
            prompt_index=int(row["prompt_index"]),
            sample_index=int(row["sample_index"]),
            prompt_len=int(row["prompt_len"]),
            num_rows=int(row["num_rows"]),
            labels=dict(row["labels"]),
            scope_counts=scope,
            # cumulative windows at each checkpoint, only where the rollout curves need them
            checkpoints=np.cumsum(grid[i, : nb - 1], axis=0) if row.get("curve", True) else None,
        )
        if last is not None:
            profile.last_ids = last
            profile.last_weights = rows["topk_weights"][a + p - 1].astype(np.float64)
        if has_logits:
            seq_logits = logits[a : a + row["num_rows"]].astype(np.float64)
            probs = softmax(seq_logits)
            profile.confidence = probs.max(-1).mean(0)
            if p > 0:
                profile.last_probs = probs[p - 1]
        hidden = {int(k.rsplit("_", 1)[1]): v for k, v in rows.items() if k.startswith("hidden")}
        if hidden:
            span = slice(a, a + row["num_rows"])
            profile.pooled_hidden = {
                layer: v[span].astype(np.float64).mean(0) for layer, v in hidden.items()
            }
        profiles.append(profile)
    return profiles


def profile_block(
    url: str, start: int, stop: int, sequences: list[dict[str, Any]]
) -> list[SequenceProfile]:
    """Map task: read rows ``[start, stop)`` once and profile each sequence in it.

    `sequences` are the block's index rows, sent by the driver so that tasks never read
    the index themselves.
    """
    import json

    from capture_server.store import open_store

    store = open_store(url, read_index=False)
    hidden = tuple(n for n in store.array_names if n.startswith("hidden_states_"))
    names = ("topk_ids", "topk_weights", "positions", "router_logits", *hidden)
    rows = store.read_rows(start, stop, names)
    metas = [dict(row, labels=json.loads(row["labels"] or "{}")) for row in sequences]
    return profile_rows(metas, rows, start, int(store.model["num_experts"]))
