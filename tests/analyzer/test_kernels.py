"""The compiled loops against numpy: counting against an unbuffered scatter-add, the
per-sequence statistics against the metric functions.

The loop runs in a child process, as it does in the analyzer's Ray workers: this test
process also runs in-process vLLM engines, which cannot start once numba is loaded
(see `analyzer.kernels`).
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

CASES = [np.uint8, np.uint16, np.int64]


def _usage_stats_in_child(args):
    from analyzer.kernels import usage_stats

    return usage_stats(*args)


def _count_in_child(args):
    from analyzer.kernels import count_cells

    ids, row_cell, cells, experts = args
    try:
        return count_cells(ids, row_cell, cells, experts)
    except ValueError as exc:
        return str(exc)


@pytest.fixture(scope="module")
def pool():
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool


@pytest.fixture(scope="module")
def child(pool):
    return lambda *args: pool.submit(_count_in_child, args).result(timeout=120)


@pytest.mark.parametrize("dtype", CASES)
def test_count_cells_matches_scatter_add(child, dtype):
    rng = np.random.default_rng(0)
    rows, layers, k, experts, cells = 500, 3, 4, 70, 9
    ids = rng.integers(0, experts, (rows, layers, k)).astype(dtype)  # repeats included
    row_cell = rng.integers(-1, cells, rows)  # -1: a row outside every sequence
    expected = np.zeros((cells, layers, experts), dtype=np.int64)
    kept = row_cell >= 0
    np.add.at(
        expected,
        (row_cell[kept, None, None], np.arange(layers)[None, :, None], ids[kept].astype(np.int64)),
        1,
    )
    got = child(ids, row_cell, cells, experts)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, expected)
    assert got.sum() == kept.sum() * layers * k


def test_count_cells_refuses_ids_outside_the_grid(child):
    ids = np.array([[[0, 5]]], dtype=np.int64)
    assert "expert ids" in child(ids, np.zeros(1, dtype=np.int64), 1, 5)
    assert "expert ids" in child(-ids, np.zeros(1, dtype=np.int64), 1, 8)
    assert "row cell" in child(ids, np.array([1]), 1, 8)


def test_token_counts_are_one_row_per_token():
    from analyzer.profiles import counts, token_counts

    ids = np.array([[[0, 2], [1, 2]], [[0, 1], [2, 1]]], dtype=np.uint8)
    np.testing.assert_array_equal(token_counts(ids, 3)[1], [[1, 1, 0], [0, 1, 1]])
    np.testing.assert_array_equal(counts(ids, 3), [[2, 1, 1], [0, 2, 2]])


def test_usage_stats_equal_the_metric_functions(pool):
    """Counts with many ties and zeros (top-p sets filled by id), empty prompts, empty
    rollouts and empty sequences."""
    from analyzer.fold import sequence_stats
    from analyzer.params import Params
    from analyzer.profiles import BlockProfiles

    rng = np.random.default_rng(3)
    sequences, layers, experts = 300, 3, 16
    prompt = rng.integers(0, 3, (sequences, layers, experts)).astype(np.int32)
    cumulative = prompt + rng.integers(0, 4, prompt.shape).astype(np.int32)
    prompt[:20] = 0  # no prompt rows
    cumulative[20:40] = prompt[20:40]  # no rollout rows
    cumulative[40:50] = prompt[40:50] = 0  # no rows at all
    # masses that reach 0.8 / 0.5 exactly at a member (the comparison's edge)
    for i, head in enumerate(([4, 4, 2], [2, 1, 1], [8, 8, 2, 2], [1] * 10)):
        prompt[50 + i] = 0
        prompt[50 + i, :, : len(head)] = head
    block = BlockProfiles.__new__(BlockProfiles)  # only the arrays the statistics read
    block.cumulative, block.prompt = cumulative, prompt
    block.confidence = np.full((sequences, layers), np.nan)
    for top_p in (0.8, 0.5, 1.0):
        expected = sequence_stats(block, Params(top_p=top_p))
        got = pool.submit(_usage_stats_in_child, (cumulative, prompt, top_p)).result(120)
        np.testing.assert_array_equal(
            got["prompt_vs_rollout_jaccard"], expected["prompt_vs_rollout_jaccard"]
        )
        for name in ("entropy", "prompt_vs_rollout_cosine"):
            np.testing.assert_allclose(got[name], expected[name], rtol=1e-12, atol=1e-12)
        assert len(np.unique(expected["prompt_vs_rollout_jaccard"])) > 5  # not all alike
