"""Engine-thread time per step of keeping every row by KV slot (prefix caching), at real
model shapes.

With prefix caching on, the collector keeps each forwarded row at its KV-cache slot
(`capture_server.plugin.prefix_rows.SlotRows.remember`), so cached prompt positions get
their rows. That is a scatter copy of every array of the step. Steps larger than
`BACKGROUND_BYTES` are now copied by a thread of their own (numpy releases the GIL for
it) while the engine thread goes on. This bench times, for a decode step of 256 rows and
a prefill chunk of 8192, with ids, weights and float32 logits: the copy on the calling
thread (before), the calling thread's hand-over (now), and the rate of a Python loop on the
calling thread while copies run beside it, against alone (1.0: not slowed). Slots are spread
over a warm table, as vLLM's free-block queue spreads them.

    .venv/bin/python bench/slot_rows.py [--out F.json]
"""

from __future__ import annotations

import threading
import time

import numpy as np
from step_shapes import MODEL_SHAPES, STEP_ROWS, out_path, write_results

from capture_server.plugin.prefix_rows import BACKGROUND_BYTES, SlotLayout, SlotRows

SLOTS = 32768
REPEATS = 10


def step_rows(layers: int, experts: int, k: int, rows: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "positions": np.arange(rows, dtype=np.int64),
        "token_ids": rng.integers(0, 50000, rows),
        "ids": rng.integers(0, experts, (rows, layers, k)).astype(np.int32),
        "weights": rng.random((rows, layers, k), dtype=np.float32),
        "logits": rng.standard_normal((rows, layers, experts), dtype=np.float32),
    }


def spin(seconds: float) -> int:
    """Python work on the calling thread: loop turns in `seconds`."""
    turns, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        turns += 1
    return turns


def keep_all(table: SlotRows, slots: list[np.ndarray], a: dict[str, np.ndarray]) -> None:
    for s in slots:
        table._keep(s, a)


def main() -> None:
    out = out_path(__doc__.splitlines()[0])
    results = []
    for name, (layers, experts, k) in MODEL_SHAPES.items():
        table = SlotRows(SlotLayout(layers, k, experts, True, {}), SLOTS, 0, 16)
        for rows in STEP_ROWS:
            a = step_rows(layers, experts, k, rows)
            step_bytes = sum(v.nbytes for v in a.values())
            slots = [np.random.default_rng(s).permutation(SLOTS)[:rows] for s in range(REPEATS)]
            for s in slots:  # every slot's pages mapped once: the table warm
                table._keep(s, a)
            start = time.perf_counter()
            for s in slots:
                table._keep(s, a)
            inline = (time.perf_counter() - start) / REPEATS
            handed = []
            for s in slots:
                start = time.perf_counter()
                table.remember(s, a)
                handed.append(time.perf_counter() - start)
                table.settle()
            copier = threading.Thread(target=keep_all, args=(table, slots, a))
            start, turns = time.perf_counter(), 0
            copier.start()
            while copier.is_alive():
                turns += spin(0.001)
            took = time.perf_counter() - start
            beside, alone = turns / took, spin(took) / took
            row = {
                "model": name,
                "rows": rows,
                "step_mb": step_bytes / 1e6,
                "background": step_bytes > BACKGROUND_BYTES,
                "copy_on_engine_thread_ms": inline * 1e3,
                "engine_thread_now_ms": float(np.median(handed)) * 1e3,
                "python_rate_beside_copy": beside / alone,
            }
            results.append(row)
            print(
                f"{name:14s} {rows:5d} rows {row['step_mb']:7.1f} MB  on the engine thread: "
                f"before {row['copy_on_engine_thread_ms']:7.2f} ms, now "
                f"{row['engine_thread_now_ms']:6.3f} ms"
                f"{' (background)' if row['background'] else ' (inline)'}"
            )
    write_results(out, results)


if __name__ == "__main__":
    main()
