"""Host time per step of a step's top-k rows, gathered and put in the stored order, at
real model shapes.

The collector stores top-k by descending weight, ties by ascending id. It used to gather
the capture buffers' rows as they lie, (layers, rows, k), transpose them to (rows,
layers, k) on the host, and sort every row (numpy lexsort). It now gathers rows-first on
the device (one index_select of a transposed view: on a GPU the transpose is the gather
kernel's, not the host's), checks the router's order in one flat pass and sorts only
rows out of it (`capture_server.plugin.topk_order`). Both run here side by side, in one
process, on CPU tensors standing for the capture buffers, for a decode step of 256
requests and a prefill chunk of 8192 tokens. Rows come as routers emit them (descending
weights), with one row in 64 reversed (a kernel's order among ties, or an ascending
kernel), so the sorting path runs.

    .venv/bin/python bench/topk_order.py [--out F.json]
"""

from __future__ import annotations

import timeit

import numpy as np
import torch
from step_shapes import MODEL_SHAPES, STEP_ROWS, out_path, write_results

from capture_server.plugin.topk_order import in_stored_order


def capture_buffers(layers: int, experts: int, k: int, rows: int, reversed_every: int = 64):
    """(layers, rows, k) ids and weights, as the router hook leaves them; one row in
    `reversed_every` in ascending order (0: none)."""
    rng = np.random.default_rng(0)
    ids = np.stack([rng.permutation(experts)[:k] for _ in range(layers * rows)])
    ids = ids.reshape(layers, rows, k).astype(np.int32)
    weights = -np.sort(-rng.random((layers, rows, k), dtype=np.float32), axis=-1)
    if reversed_every:
        ids[:, ::reversed_every] = ids[:, ::reversed_every, ::-1].copy()
        weights[:, ::reversed_every] = weights[:, ::reversed_every, ::-1].copy()
    return torch.from_numpy(ids), torch.from_numpy(weights), torch.arange(rows)


def full_sort(ids: torch.Tensor, weights: torch.Tensor, index: torch.Tensor):
    """The previous collector: gather as laid out, transpose on the host, sort every row."""
    keep = np.ones(len(index), dtype=bool)
    ids = ids.index_select(1, index).numpy().transpose(1, 0, 2)[keep]
    weights = weights.index_select(1, index).numpy().transpose(1, 0, 2)[keep]
    order = np.lexsort((ids, -weights), axis=-1)
    return np.take_along_axis(ids, order, axis=-1), np.take_along_axis(weights, order, axis=-1)


def checked(ids: torch.Tensor, weights: torch.Tensor, index: torch.Tensor):
    """The collector now: gather rows-first, sort only the rows out of order."""
    ids = ids.transpose(0, 1).index_select(0, index).numpy()
    weights = weights.transpose(0, 1).index_select(0, index).numpy()
    return in_stored_order(ids, weights)


def seconds(fn, *args) -> float:
    number = 5
    return min(timeit.repeat(lambda: fn(*args), number=number, repeat=5)) / number


def main() -> None:
    out = out_path(__doc__.splitlines()[0])
    results = []
    for name, (layers, experts, k) in MODEL_SHAPES.items():
        for rows in STEP_ROWS:
            buffers = capture_buffers(layers, experts, k, rows)
            in_order = capture_buffers(layers, experts, k, rows, reversed_every=0)
            old, new = full_sort(*buffers), checked(*buffers)
            assert all(np.array_equal(a, b) for a, b in zip(old, new, strict=True))
            row = {
                "model": name,
                "rows": rows,
                "full_sort_ms": seconds(full_sort, *buffers) * 1e3,
                "checked_ms": seconds(checked, *buffers) * 1e3,
                "checked_all_in_order_ms": seconds(checked, *in_order) * 1e3,
            }
            row["speedup"] = row["full_sort_ms"] / row["checked_ms"]
            results.append(row)
            print(
                f"{name:14s} {rows:5d} rows  full sort {row['full_sort_ms']:8.2f} ms  "
                f"checked {row['checked_ms']:7.2f} ms  {row['speedup']:5.1f}x  "
                f"(all in order: {row['checked_all_in_order_ms']:.2f} ms)"
            )
    write_results(out, results)


if __name__ == "__main__":
    main()
