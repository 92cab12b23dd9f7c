"""Chance levels for similarity statistics: random routing and label shuffles."""

from __future__ import annotations

import numpy as np


def random_routing(
    tokens: int, layers: int, num_experts: int, k: int, rng: np.random.Generator
) -> np.ndarray:
    """Top-k ids drawn uniformly without replacement per (token, layer): (tokens, layers, k)."""
    keys = rng.random((tokens, layers, num_experts))
    return np.argsort(keys, axis=-1)[..., :k]


def shuffled(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A permutation of `labels`: condition statistics recomputed on it give chance."""
    return labels[rng.permutation(len(labels))]
