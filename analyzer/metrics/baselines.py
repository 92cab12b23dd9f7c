"""Chance levels for similarity statistics: random routing (label shuffles are a
permutation of the keys, done where the pairs are, in `tables.conditions`)."""

from __future__ import annotations

import numpy as np


def random_routing(
    tokens: int, layers: int, num_experts: int, k: int, rng: np.random.Generator
) -> np.ndarray:
    """Top-k ids drawn uniformly without replacement per (token, layer): (tokens, layers, k)."""
    keys = rng.random((tokens, layers, num_experts))
    return np.argsort(keys, axis=-1)[..., :k]
