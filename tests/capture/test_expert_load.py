"""`ExpertLoad` counts every (layer, expert) selection once, and takes rows back.

Proof against: a plain Python count of every selection. It runs here on CPU tensors:
the same torch calls a GPU runs (`bench/gpu_torch_check.py` checks them on CUDA).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from capture_server.plugin.expert_load import ExpertLoad

LAYERS, EXPERTS, K = 3, 6, 2


def _python_count(ids: np.ndarray) -> np.ndarray:
    seen = Counter((layer, int(e)) for row in ids for layer, kept in enumerate(row) for e in kept)
    return np.array([[seen[(layer, e)] for e in range(EXPERTS)] for layer in range(LAYERS)])


def _ids(rows: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(EXPERTS)[:K] for _ in range(rows * LAYERS)]
    return np.stack(picks).reshape(rows, LAYERS, K).astype(np.int32)


def test_counts_equal_a_plain_count_over_steps():
    steps = [_ids(rows, seed) for seed, rows in enumerate((5, 1, 17))]
    load = ExpertLoad(LAYERS, EXPERTS, torch.device("cpu"))
    for ids in steps:
        load.add(torch.from_numpy(ids))
    np.testing.assert_array_equal(load.total(), _python_count(np.concatenate(steps)))


def test_rows_taken_back_leave_the_count_of_the_rest():
    ids = _ids(9, seed=3)
    dropped = np.zeros(9, dtype=bool)
    dropped[[0, 4, 8]] = True
    load = ExpertLoad(LAYERS, EXPERTS, torch.device("cpu"))
    load.add(torch.from_numpy(ids))
    load.take_back(ids[dropped])
    np.testing.assert_array_equal(load.total(), _python_count(ids[~dropped]))
