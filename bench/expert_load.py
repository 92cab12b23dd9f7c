"""Time per step of counting the expert load, at real model shapes.

The collector counts top-k selections per (MoE layer, expert) of every captured row
(`capture_server.plugin.expert_load`). It used to count the host copy with numpy's
bincount on the engine thread; it now queues one scatter-add where the ids are. On a GPU
that leaves the host nothing to do; on the CPU the scatter-add is the host's work. This
bench times both on this machine's CPU, one thread, for a decode step of 256 requests
and a prefill chunk of 8192 tokens: the first column is what a GPU's engine thread no
longer pays, the second what the CPU pays now. Both counts are checked equal.

    .venv/bin/python bench/expert_load.py [--out F.json]
"""

from __future__ import annotations

import timeit

import numpy as np
import torch
from step_shapes import MODEL_SHAPES, STEP_ROWS, out_path, write_results

from capture_server.plugin.expert_load import ExpertLoad


def seconds(fn, *args) -> float:
    number = 3
    return min(timeit.repeat(lambda: fn(*args), number=number, repeat=5)) / number


def host_count(ids: np.ndarray, load: np.ndarray) -> None:
    """The previous collector: numpy's bincount of the host copy."""
    layers, experts = load.shape
    cells = ids.astype(np.int64) + (np.arange(layers) * experts)[:, None]
    load += np.bincount(cells.ravel(), minlength=layers * experts).reshape(layers, experts)


def main() -> None:
    out = out_path(__doc__.splitlines()[0])
    torch.set_num_threads(1)  # the engine thread's share; numpy's bincount is one thread
    results = []
    for name, (layers, experts, k) in MODEL_SHAPES.items():
        for rows in STEP_ROWS:
            ids = torch.randint(0, experts, (rows, layers, k), dtype=torch.int32)
            before = np.zeros((layers, experts), dtype=np.int64)
            load = ExpertLoad(layers, experts, torch.device("cpu"))
            host_count(ids.numpy(), before)
            load.add(ids)
            assert np.array_equal(before, load.total())
            row = {
                "model": name,
                "rows": rows,
                "host_bincount_ms": seconds(host_count, ids.numpy(), before) * 1e3,
                "scatter_add_cpu_ms": seconds(load.add, ids) * 1e3,
            }
            results.append(row)
            print(
                f"{name:14s} {rows:5d} rows  host bincount {row['host_bincount_ms']:7.2f} ms"
                f"  scatter-add on CPU {row['scatter_add_cpu_ms']:7.2f} ms"
            )
    write_results(out, results)


if __name__ == "__main__":
    main()
