"""The stored top-k order, checked against a full sort of every row (`reference.canonical`,
numpy's lexsort): the collector sorts only the rows a router left out of that order."""

from __future__ import annotations

import numpy as np
import pytest

from capture_server.plugin.topk_order import in_stored_order, out_of_order
from tests.capture.reference import canonical


def _routed(rng: np.random.Generator, rows: int, layers: int, k: int, experts: int):
    """Top-k as a router emits it: k distinct experts by descending weight."""
    ids = np.argsort(rng.random((rows, layers, experts)), axis=-1)[..., :k].astype(np.int32)
    weights = -np.sort(-rng.random((rows, layers, k)).astype(np.float32), axis=-1)
    return ids, weights


@pytest.mark.parametrize("k", [1, 2, 8])
def test_rows_out_of_order_are_sorted_like_a_full_sort(k):
    rng = np.random.default_rng(k)
    ids, weights = _routed(rng, 300, 6, k, 64)
    if k > 1:
        weights[::7, :, 1] = weights[::7, :, 0]  # ties, ids in either order
        ids[::5] = ids[::5, :, ::-1].copy()  # a kernel's ascending rows
        weights[::5] = weights[::5, :, ::-1].copy()
        weights[3, 2] = 0.5  # all k equal
    expected = canonical(ids, weights)
    assert k == 1 or out_of_order(ids, weights).any()
    got = in_stored_order(ids.copy(), weights.copy())
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert not out_of_order(*got).any()


def test_rows_already_in_order_are_returned_as_they_are():
    ids, weights = _routed(np.random.default_rng(0), 50, 4, 8, 32)
    before = ids.copy(), weights.copy()
    got = in_stored_order(ids, weights)
    assert got[0] is ids and got[1] is weights
    np.testing.assert_array_equal(ids, before[0])
    np.testing.assert_array_equal(weights, before[1])


@pytest.mark.parametrize("where", [(0, 0), (49, 3), (20, 1)])
def test_one_row_out_of_order_is_found_wherever_it_is(where):
    """The check compares flat neighbours: a row's edges must neither hide nor fake a fault."""
    ids, weights = _routed(np.random.default_rng(1), 50, 4, 8, 32)
    weights[where] = weights[where][::-1].copy()
    expected = np.zeros((50, 4), dtype=bool)
    expected[where] = True
    np.testing.assert_array_equal(out_of_order(ids, weights), expected)


def test_no_rows():
    ids, weights = _routed(np.random.default_rng(2), 0, 4, 8, 32)
    assert out_of_order(ids, weights).shape == (0, 4)
    assert in_stored_order(ids, weights)[0].shape == (0, 4, 8)
