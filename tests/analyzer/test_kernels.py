"""The compiled counting loop against numpy's unbuffered scatter-add.

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


def _count_in_child(args):
    from analyzer.kernels import count_cells

    ids, row_cell, cells, experts = args
    try:
        return count_cells(ids, row_cell, cells, experts)
    except ValueError as exc:
        return str(exc)


@pytest.fixture(scope="module")
def child():
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield lambda *args: pool.submit(_count_in_child, args).result(timeout=120)


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
