"""Map step: per-sequence routing profiles read from one block of a store.

A profile keeps per-layer expert visit counts for each token scope, counts at rollout
checkpoints, and the last prompt token's routing (for the committee audit). Profiles
are small (scopes x layers x experts), so the reduce step never touches token rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from analyzer.kernels import count_cells
from analyzer.metrics.usage import softmax
from capture_server.store import RoutingStore, open_store

SCOPES = ("prompt", "generated", "cumulative", "last_token")
CHECKPOINTS = (0, 4, 8, 16, 32, 64, 128, 256, 512, 1024)  # rollout tokens after the prompt


def counts(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """(tokens, layers, k) -> (layers, experts) visit counts."""
    layers = ids.shape[1]
    offset = (np.arange(layers) * num_experts)[None, :, None]
    flat = (ids.astype(np.int64) + offset).ravel()
    return np.bincount(flat, minlength=layers * num_experts).reshape(layers, num_experts)


def token_counts(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """(tokens, layers, k) -> (tokens, layers, experts) visit counts of each token."""
    tokens, layers, _ = ids.shape
    offset = (np.arange(tokens * layers) * num_experts).reshape(tokens, layers, 1)
    flat = np.bincount((ids + offset).ravel(), minlength=tokens * layers * num_experts)
    return flat.reshape(tokens, layers, num_experts)


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

    One pass over the block's ids (`kernels.count_cells`) counts every scope and every
    rollout checkpoint at once: each row belongs to one (sequence, bucket) cell, bucket 0
    being the prompt and bucket j the rollout rows in ``[CHECKPOINTS[j-1], CHECKPOINTS[j])``.
    Sequences the rollout curves do not use get two buckets only (prompt, rollout), which
    keeps the counts grid small enough to stay in cache.
    """
    if not sequences:
        return []
    ids = rows["topk_ids"]  # (R, L, k)
    positions = rows["positions"]
    e, nb = num_experts, len(CHECKPOINTS) + 1
    # every sequence's rows, vectorised: sequence number, row in the block, row in the sequence
    first = np.array([r["token_offset"] - start for r in sequences], dtype=np.int64)
    lengths = np.array([r["num_rows"] for r in sequences], dtype=np.int64)
    seq = np.repeat(np.arange(len(sequences)), lengths)
    within = np.arange(len(seq)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    block_row = first[seq] + within
    prompt_len = np.array([r["prompt_len"] for r in sequences], dtype=np.int64)
    in_prompt = positions[block_row] < prompt_len[seq]
    prompt_rows = np.bincount(seq, weights=in_prompt, minlength=len(sequences)).astype(np.int64)
    rollout_index = within - prompt_rows[seq]  # rows after the prompt boundary
    bucket = np.searchsorted(CHECKPOINTS, rollout_index, side="right")
    curve = np.array([r.get("curve", True) for r in sequences])
    width = np.where(curve, nb, 2)  # buckets per sequence
    base = np.cumsum(width) - width  # first cell of each sequence
    row_cell = np.full(len(ids), -1, dtype=np.int64)
    row_cell[block_row] = base[seq] + np.where(curve[seq], bucket, np.minimum(bucket, 1))
    grid = count_cells(ids, row_cell, int(width.sum()), e)  # (cells, L, E)

    prompt = grid[base]
    cumulative = prompt + grid[base + 1]
    for i in np.flatnonzero(curve):
        cumulative[i] += grid[base[i] + 2 : base[i] + nb].sum(0)
    # last prompt token: its routing as counts (the last_token scope) and as it was
    has_last = prompt_rows > 0
    last_ids = ids[(first + prompt_rows - 1)[has_last]]
    last_counts = np.zeros_like(prompt)
    last_counts[has_last] = token_counts(last_ids, e)
    weights = rows.get("topk_weights")
    logits = rows.get("router_logits")
    has_logits = logits is not None and len(ids) and not np.isnan(logits[0, 0, 0])
    hidden = {int(k.rsplit("_", 1)[1]): v for k, v in rows.items() if k.startswith("hidden")}
    profiles = []
    for i, row in enumerate(sequences):
        a = row["token_offset"] - start
        p = int(prompt_rows[i])
        profile = SequenceProfile(
            sequence_id=int(row["sequence_id"]),
            prompt_index=int(row["prompt_index"]),
            sample_index=int(row["sample_index"]),
            prompt_len=int(row["prompt_len"]),
            num_rows=int(row["num_rows"]),
            labels=dict(row["labels"]),
            scope_counts={
                "prompt": prompt[i],
                "generated": cumulative[i] - prompt[i],
                "cumulative": cumulative[i],
                "last_token": last_counts[i],
            },
            # cumulative windows at each checkpoint, only where the rollout curves need them
            checkpoints=np.cumsum(grid[base[i] : base[i] + nb - 1], axis=0) if curve[i] else None,
        )
        if p > 0:
            profile.last_ids = ids[a + p - 1]
            if weights is not None:
                profile.last_weights = weights[a + p - 1].astype(np.float64)
        if has_logits:
            seq_logits = logits[a : a + row["num_rows"]].astype(np.float64)
            probs = softmax(seq_logits)
            profile.confidence = probs.max(-1).mean(0)
            if p > 0:
                profile.last_probs = probs[p - 1]
        if hidden:
            span = slice(a, a + row["num_rows"])
            profile.pooled_hidden = {
                layer: v[span].astype(np.float64).mean(0) for layer, v in hidden.items()
            }
        profiles.append(profile)
    return profiles


def arrays_to_read(store: RoutingStore, arrays: tuple[str, ...] | None) -> tuple[str, ...]:
    """Expert ids and positions, plus the store's arrays named in `arrays` (by name or
    prefix: ``hidden_states`` means every ``hidden_states_<layer>``; None: all)."""
    extra = [n for n in store.array_names if n not in ("topk_ids", "positions", "token_ids")]
    if arrays is not None:
        extra = [n for n in extra if n in arrays or n.rsplit("_", 1)[0] in arrays]
    return ("topk_ids", "positions", *extra)


_opened: dict[str, RoutingStore] = {}


def _open_for_rows(url: str, stop: int) -> RoutingStore:
    """The store at `url`, opened once per process while its arrays cover row `stop`
    (a store being written grows; a handle opened before it grew is opened again)."""
    store = _opened.get(url)
    if store is None or store.array_rows < stop:
        store = _opened[url] = open_store(url, read_index=False)
    return store


def profile_block(
    url: str,
    start: int,
    stop: int,
    sequences: list[dict[str, Any]],
    arrays: tuple[str, ...] | None = None,
) -> list[SequenceProfile]:
    """Read rows ``[start, stop)`` once and profile each sequence in it.

    `sequences` are the block's index rows, sent by the driver so that tasks never read
    the index themselves. `arrays`: the row arrays to read besides ids and positions
    (default: all), by name or prefix (``hidden_states`` reads every
    ``hidden_states_<layer>``); analyses that need no weights, logits or hidden states
    do not pay for reading them.
    """
    store = _open_for_rows(url, stop)
    names = arrays_to_read(store, arrays)
    rows = store.read_rows(start, stop, names)
    metas = [dict(row, labels=json.loads(row["labels"] or "{}")) for row in sequences]
    return profile_rows(metas, rows, start, int(store.model["num_experts"]))
