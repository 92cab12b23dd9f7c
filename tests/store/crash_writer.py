"""A writer process for crash tests: streams synthetic sequences into a store, slowly.

python -m tests.store.crash_writer STORE NUM_SEQUENCES
python -m tests.store.crash_writer STORE NUM_SEQUENCES DP_RANK DP_SIZE PP_STAGE PP_SIZE
    (one part of a parted store: rank DP_RANK's share of the sequences, stage PP_STAGE's
    layers)
python -m tests.store.crash_writer STORE NUM_REQUESTS --samples
    (four samples per request, sharing their prompt rows: `synthetic.sample_rows`)
python -m tests.store.crash_writer STORE NUM_SEQUENCES --pause-in-commit
    (stops for good inside a commit, once two commits are done: one object of the
    commit (tail segment or chunk) is in place, the rest and its index part are not; prints
    "paused" for the test to kill it there)
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from capture_server.store import chunks
from capture_server.store.parts import PartId
from capture_server.store.sink import StoreSink
from tests.store import parted, synthetic


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


def main_samples(path: str, requests: int, samples: int = 4) -> None:
    sink = StoreSink(path, synthetic.EXACT, flush_interval=0.02)
    sink.open(synthetic.meta())
    for r in range(requests):
        for s in range(samples):
            sink.write(synthetic.sample_rows(f"req-{r}", s))
            sink.end_sequence(synthetic.sample_end(f"req-{r}", s))
            time.sleep(0.01)
    sink.close()
    print("finished", flush=True)


def main_part(path: str, count: int, dp_rank: int, dp_size: int, stage: int, pp: int) -> None:
    keys = [f"seq-{i}" for i in range(count)][dp_rank::dp_size]
    parted.write_part(path, PartId(dp_rank, stage, pp), keys, pause=0.01)
    print("finished", flush=True)


def pause_in_commit(store: Path) -> None:
    """Make the chunk writer stop forever right after writing a chunk object of the third
    commit (the writer's other threads are stopped there too)."""
    real_put = chunks.put_file
    stop = threading.Event()

    def put_file(path: Path, data: bytes, **options: bool) -> None:
        if stop.is_set():
            time.sleep(3600)
        real_put(path, data, **options)
        is_rows = store / "index" not in path.parents
        if is_rows and len(list(store.glob("index/part-*.parquet"))) >= 2 and not stop.is_set():
            stop.set()
            print("paused", flush=True)
            time.sleep(3600)

    chunks.put_file = put_file


if __name__ == "__main__":
    if sys.argv[3:] == ["--samples"]:
        main_samples(sys.argv[1], int(sys.argv[2]))
    elif sys.argv[3:] == ["--pause-in-commit"]:
        pause_in_commit(Path(sys.argv[1]))
        main(sys.argv[1], int(sys.argv[2]))
    elif len(sys.argv) == 3:
        main(sys.argv[1], int(sys.argv[2]))
    else:
        main_part(sys.argv[1], *(int(x) for x in sys.argv[2:7]))
