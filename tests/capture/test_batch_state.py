"""`RequestProgress` past its first capacity, and slots reused after a request ends
(the engine tests run fewer requests at once than its first capacity)."""

import numpy as np

from capture_server.plugin.batch_state import RequestProgress


def test_progress_grows_and_reuses_slots():
    progress = RequestProgress(capacity=2)
    slots = np.array([progress.open() for _ in range(5)])  # grows twice
    assert sorted(slots.tolist()) == [0, 1, 2, 3, 4]
    # a prefill of positions 0-9 for each, then one decode row for the first two
    progress.advance(slots, np.zeros(5, np.int64), np.full(5, 9), np.full(5, 10))
    progress.advance(slots[:2], np.full(2, 10), np.full(2, 10), np.ones(2, np.int64))
    assert progress.next_position[slots].tolist() == [11, 11, 10, 10, 10]
    assert progress.close(int(slots[0])) == (0, 11)
    assert progress.close(int(slots[4])) == (0, 10)
    reused = progress.open()
    assert reused in (slots[0], slots[4])
    # a reused slot starts fresh: no position captured, no rows
    assert progress.next_position[reused] == -1 and progress.num_rows[reused] == 0
    progress.advance(np.array([reused]), np.array([3]), np.array([5]), np.array([3]))
    assert progress.close(reused) == (3, 3)
    # a recomputed segment (preemption) does not move a request backwards
    progress.advance(slots[1:2], np.array([0]), np.array([4]), np.array([0]))
    assert progress.next_position[slots[1]] == 11
