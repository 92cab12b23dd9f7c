"""The stored order of each row's top-k: descending gate weight, ties by ascending expert id.

One order for every kernel, so stores of different backends compare row for row (a
kernel's order among equal weights is its own). Routers already emit their top-k by
descending weight (`torch.topk` sorts; vLLM's fused top-k kernels pick the k largest in
turn), so the order is checked, and only rows out of it are sorted. At Qwen3-30B-A3B's
shape (48 MoE layers, top-8), a decode step of 256 rows took 3.0 ms of the step loop to
gather and sort every row, and takes 0.14 ms to gather and check (0.42 ms with one row in
64 out of order; `bench/topk_order.py`, docs/benchmarks.md).
"""

from __future__ import annotations

import numpy as np


def out_of_order(ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mask over the leading axes: where the last axis is not in the stored order."""
    # One comparison pass over the flat weights (strided per-row views cost 20x more):
    # each weight against the next; a row's last against the next row's first is moot.
    flat = weights.reshape(-1)
    falls = np.empty(flat.size, dtype=bool)
    np.greater(flat[:-1], flat[1:], out=falls[:-1])
    falls[weights.shape[-1] - 1 :: weights.shape[-1]] = True
    if falls.all():  # the usual step: every row strictly descending
        return np.zeros(weights.shape[:-1], dtype=bool)
    suspect = ~falls.reshape(weights.shape).all(axis=-1)  # a tie, a rise or NaN
    where = np.nonzero(suspect)  # the few such rows: in order if their tied ids ascend
    some_ids, some = ids[where], weights[where]
    higher, lower = some[:, :-1], some[:, 1:]
    tie_in_order = (higher == lower) & (some_ids[:, :-1] < some_ids[:, 1:])
    suspect[where] = ~((higher > lower) | tie_in_order).all(axis=-1)
    return suspect


def in_stored_order(ids: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`ids` and `weights` (same shape, top-k on the last axis) in the stored order.
    Sorts in place the rows that need it; returns the same arrays."""
    wrong = np.nonzero(out_of_order(ids, weights))
    if len(wrong[0]):
        some_ids, some_weights = ids[wrong], weights[wrong]
        order = np.lexsort((some_ids, -some_weights), axis=-1)
        ids[wrong] = np.take_along_axis(some_ids, order, axis=-1)
        weights[wrong] = np.take_along_axis(some_weights, order, axis=-1)
    return ids, weights
