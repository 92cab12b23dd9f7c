"""A writer process for crash tests: streams synthetic sequences into a store, slowly.

python -m tests.store.crash_writer STORE NUM_SEQUENCES
"""

from __future__ import annotations

import sys
import time

from capture_server.store.sink import StoreSink
from tests.store import synthetic


def main(path: str, count: int) -> None:
    sink = StoreSink(path, synthetic.EXACT, flush_interval=0.02)
    sink.open(synthetic.meta())
    keys = [f"seq-{i}" for i in range(count)]
    for start in range(0, count, 16):
        for kind, item in synthetic.interleaved_steps(keys[start : start + 16]):
            if kind == "rows":
                sink.write(item)
                time.sleep(0.01)
            else:
                sink.end_sequence(item)
    sink.close()
    print("finished", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
