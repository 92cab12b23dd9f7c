"""Percentile bootstrap over the unit that was sampled (prompts or questions, not tokens).

Both papers sample questions and report means over tokens or pairs of their sequences;
tokens and pairs of one question are not independent, so an interval from resampling
them would be too narrow. Resampling questions with replacement gives each question a
multiplicity per replicate; a statistic over sequences or pairs is then a weighted mean,
computed from per-sequence or per-pair summaries without re-reading any token
(Efron & Tibshirani 1993, ch. 13, the percentile interval; Davison & Hinkley 1997,
§3.8, resampling clusters).
"""

from __future__ import annotations

import warnings

import numpy as np

REPLICATES = 400
LEVEL = 0.95


def unit_multiplicities(units: int, replicates: int, rng: np.random.Generator) -> np.ndarray:
    """(replicates, units): how often each unit is drawn in each resample of `units`."""
    return rng.multinomial(units, np.full(units, 1.0 / units), size=replicates).astype(np.float64)


def interval(replicated: np.ndarray, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval over the first axis (replicates), NaN-aware: a replicate that
    drew no unit of a group has no value for it."""
    tail = (1 - level) / 2 * 100
    with warnings.catch_warnings():  # a group no replicate has a value for stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanpercentile(replicated, [tail, 100 - tail], axis=0)
    return lo, hi


def weighted_means(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per replicate, the weighted mean of `values` (items, ...) with `weights`
    (replicates, items); NaN where a replicate gives every item weight 0."""
    total = weights.sum(1)
    flat = values.reshape(len(values), -1)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = (weights @ flat) / total[:, None]
    return means.reshape(len(weights), *values.shape[1:])


def pair_weights(multiplicity: np.ndarray, unit_a: np.ndarray, unit_b: np.ndarray) -> np.ndarray:
    """(replicates, pairs) weights of pairs of sequences from units `unit_a`, `unit_b`:
    a pair appears as often as both its sequences' units are drawn together."""
    return multiplicity[:, unit_a] * multiplicity[:, unit_b]


def weighted_correlations(x: np.ndarray, y: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(replicates, ...) Pearson correlation across items of `x` and `y` (items, ...),
    items weighted per replicate by `weights` (replicates, items), from weighted moments
    (memory: replicates x ..., not replicates x items); NaN where either has no spread."""
    mean = lambda v: weighted_means(v, weights)  # noqa: E731
    mx, my = mean(x), mean(y)
    var_x, var_y = mean(x * x) - mx * mx, mean(y * y) - my * my
    # a constant input leaves only rounding error in its variance: no correlation then
    flat_x = var_x <= 1e-12 * np.maximum(mean(x * x), 1e-300)
    flat_y = var_y <= 1e-12 * np.maximum(mean(y * y), 1e-300)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = (mean(x * y) - mx * my) / np.sqrt(var_x * var_y)
    return np.where(flat_x | flat_y, np.nan, corr)
