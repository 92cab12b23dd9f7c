"""Helpers the table families share: frequencies from counts, sampled pairs."""

from __future__ import annotations

import itertools

import numpy as np


def frequencies(c: np.ndarray) -> np.ndarray:
    """Counts (non-negative) normalised along the last axis; zeros stay zeros."""
    return c / np.maximum(c.sum(-1, keepdims=True), 1)


def sample_pairs(n: int, max_pairs: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Every pair of `n` items, or `max_pairs` of them drawn without repetition."""
    total = n * (n - 1) // 2
    if total <= max_pairs:
        return list(itertools.combinations(range(n), 2))
    chosen = set()
    while len(chosen) < max_pairs:
        i, j = sorted(rng.choice(n, 2, replace=False).tolist())
        chosen.add((i, j))
    return sorted(chosen)
