"""Map step: per-sequence routing profiles read from one block of a store.

A profile keeps per-layer expert visit counts for each token scope, counts at rollout
checkpoints, and the last prompt token's routing (for the committee audit). Profiles
are small (scopes x layers x experts), so the reduce step never touches token rows.
A block's profiles stay arrays over its sequences (`BlockProfiles`) until folded;
`SequenceProfile` objects are made only for sequences kept whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from analyzer.kernels import count_cells
from analyzer.metrics.usage import router_confidence, softmax
from analyzer.reads import read_block
from capture_server import protocol

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


CONFIDENCE_ROWS = 4096  # rows softmaxed at once for router confidence (bounded temporaries)


class BlockProfiles:
    """The profiles of one block's sequences as arrays over the sequences (axis 0).

    Folding needs only these arrays (usage sums, per-sequence statistics, committee
    sums); a whole `SequenceProfile` is made only for the few sequences kept whole
    (`profile`), so the map step does no per-sequence Python work for the others.
    """

    def __init__(
        self,
        sequences: list[dict[str, Any]],
        rows: dict[str, np.ndarray],
        num_experts: int,
        grid: np.ndarray,
        base: np.ndarray,
        curve: np.ndarray,
        first: np.ndarray,
        prompt_rows: np.ndarray,
    ) -> None:
        self.sequences = sequences
        self.num_experts = num_experts
        self._rows, self._grid, self._base, self._curve = rows, grid, base, curve
        self._first = first
        self.prompt = grid[base]  # (S, L, E) counts over prompt rows
        self.cumulative = self.prompt + grid[base + 1]  # (S, L, E) counts over all rows
        for i in np.flatnonzero(curve):
            self.cumulative[i] += grid[base[i] + 2 : base[i] + len(CHECKPOINTS) + 1].sum(0)
        # the last prompt token (the committee audit's input)
        self.has_last = prompt_rows > 0
        last_row = np.maximum(first + prompt_rows - 1, 0)
        ids = rows[protocol.TOPK_IDS]
        self.last_ids = np.where(self.has_last[:, None, None], ids[last_row], 0)  # (S, L, k)
        weights = rows.get(protocol.TOPK_WEIGHTS)
        self.last_weights = None if weights is None else weights[last_row].astype(np.float64)
        self.last_probs: np.ndarray | None = None  # (S, L, E), NaN where not captured
        self.confidence = np.full(self.prompt.shape[:2], np.nan)  # (S, L) mean max-softmax
        logits = rows.get(protocol.ROUTER_LOGITS)
        if logits is not None and len(ids):
            self.last_probs = softmax(logits[last_row].astype(np.float64))
            self.confidence = self._mean_confidence(logits)

    def __len__(self) -> int:
        return len(self.sequences)

    def _mean_confidence(self, logits: np.ndarray) -> np.ndarray:
        """Per sequence and layer, `router_confidence` over its rows (taken in slices of
        CONFIDENCE_ROWS); NaN for sequences without logits."""
        out = np.full(self.prompt.shape[:2], np.nan)
        for i, row in enumerate(self.sequences):
            a = int(self._first[i])
            span = logits[a : a + row["num_rows"]]
            if not len(span) or np.isnan(span[0, 0, 0]):
                continue
            slices = [span[j : j + CONFIDENCE_ROWS] for j in range(0, len(span), CONFIDENCE_ROWS)]
            out[i] = sum(router_confidence(z) * len(z) for z in slices) / len(span)
        return out

    def profile(self, i: int) -> SequenceProfile:
        """The whole profile of sequence `i`: every scope, rollout checkpoints (for
        curve sequences), last-token routing, pooled router inputs."""
        row = self.sequences[i]
        last_counts = np.zeros_like(self.prompt[i])
        if self.has_last[i]:
            last_counts = token_counts(self.last_ids[i][None], self.num_experts)[0]
        base, nb = self._base[i], len(CHECKPOINTS) + 1
        profile = SequenceProfile(
            sequence_id=int(row["sequence_id"]),
            prompt_index=int(row["prompt_index"]),
            sample_index=int(row["sample_index"]),
            prompt_len=int(row["prompt_len"]),
            num_rows=int(row["num_rows"]),
            labels=dict(row["labels"]),
            scope_counts={
                "prompt": self.prompt[i].copy(),
                "generated": self.cumulative[i] - self.prompt[i],
                "cumulative": self.cumulative[i].copy(),
                "last_token": last_counts.astype(np.int32),
            },
            # cumulative windows at each checkpoint, only where the rollout curves need them
            checkpoints=np.cumsum(self._grid[base : base + nb - 1], axis=0)
            if self._curve[i]
            else None,
        )
        if self.has_last[i]:
            profile.last_ids = self.last_ids[i].copy()
            if self.last_weights is not None:
                profile.last_weights = self.last_weights[i].copy()
            if self.last_probs is not None and not np.isnan(self.last_probs[i]).any():
                profile.last_probs = self.last_probs[i].copy()
        if not np.isnan(self.confidence[i]).any():
            profile.confidence = self.confidence[i].copy()
        hidden = {
            layer: v
            for k, v in self._rows.items()
            if (layer := protocol.hidden_layer_of(k)) is not None
        }
        if hidden:
            span = slice(int(self._first[i]), int(self._first[i]) + row["num_rows"])
            profile.pooled_hidden = {
                layer: v[span].astype(np.float64).mean(0) for layer, v in hidden.items()
            }
        return profile


def profile_rows(
    sequences: list[dict[str, Any]], rows: dict[str, np.ndarray], start: int, num_experts: int
) -> BlockProfiles:
    """Profiles of `sequences` from the block's rows (which begin at token `start`).

    One pass over the block's ids (`kernels.count_cells`) counts every scope and every
    rollout checkpoint at once: each row belongs to one (sequence, bucket) cell, bucket 0
    being the prompt and bucket j the rollout rows in ``[CHECKPOINTS[j-1], CHECKPOINTS[j])``.
    Sequences the rollout curves do not use (``curve`` false) get two buckets only
    (prompt, rollout), which keeps the counts grid small enough to stay in cache.
    """
    ids = rows[protocol.TOPK_IDS]  # (R, L, k)
    positions = rows[protocol.POSITIONS]
    nb = len(CHECKPOINTS) + 1
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
    curve = np.array([r.get("curve", True) for r in sequences], dtype=bool)
    width = np.where(curve, nb, 2)  # buckets per sequence
    base = np.cumsum(width) - width  # first cell of each sequence
    row_cell = np.full(len(ids), -1, dtype=np.int64)
    row_cell[block_row] = base[seq] + np.where(curve[seq], bucket, np.minimum(bucket, 1))
    grid = count_cells(ids, row_cell, int(width.sum()), num_experts)  # (cells, L, E)
    return BlockProfiles(sequences, rows, num_experts, grid, base, curve, first, prompt_rows)


def profile_block(
    url: str,
    start: int,
    stop: int,
    sequences: list[dict[str, Any]],
    arrays: tuple[str, ...] | None = None,
    created_at: float | None = None,
) -> BlockProfiles:
    """Read rows ``[start, stop)`` once and profile each sequence in it.

    `sequences` are the block's index rows, sent by the driver so that tasks never read
    the index themselves. `arrays`: the row arrays to read besides ids and positions
    (default: all), by name or prefix (``hidden_states`` reads every
    ``hidden_states_<layer>``); analyses that need no weights, logits or hidden states
    do not pay for reading them. `created_at` (the store's attribute) lets a process
    keep the store open across blocks.
    """
    store, rows, first = read_block(url, start, stop, sequences, arrays, created_at)
    metas = [
        dict(row, labels=json.loads(row["labels"] or "{}"), token_offset=int(at))
        for row, at in zip(sequences, first, strict=True)
    ]
    return profile_rows(metas, rows, 0, store.model.num_experts)
