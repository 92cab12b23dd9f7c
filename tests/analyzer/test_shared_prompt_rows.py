"""The analyzer's map step over a store whose samples share prompt rows (stored once,
`capture_server.store.shared_prompts`): every sample counts its whole prompt.

Proof: each block's profiles equal those of the same rows stored in full (sharing off);
the reads of both stores are checked against the rows written in
`tests/store/test_shared_prompts.py`. Profiling runs in a child process, as in the
analyzer's Ray workers: it loads the compiled loops, and this test process also runs
in-process vLLM engines, which cannot start once numba is loaded (`analyzer.kernels`).
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from tests.store.test_shared_prompts import SAMPLES, write


def profiles_of(path: str) -> dict:
    """(prompt, sample) -> (prompt counts, all counts, last prompt token's ids), block by
    block as the map step profiles them."""
    from analyzer.plan import BlockPlan
    from analyzer.profiles import profile_block
    from capture_server.store import open_store

    plan = BlockPlan(open_store(path), 64, keep=None)
    out = {}
    for block in plan.blocks:
        rows = plan.rows(block)
        got = profile_block(path, block.start, block.stop, rows)
        for i, row in enumerate(rows):
            key = (row["prompt_index"], row["sample_index"])
            out[key] = (got.prompt[i], got.cumulative[i], got.last_ids[i])
    return out


def test_the_analyzer_counts_shared_prompt_rows_once_per_sample(tmp_path):
    """Each block's profiles from the sharing store equal those of the same rows stored
    in full, prompt counts included."""
    write(tmp_path / "shared", share=True)
    write(tmp_path / "full", share=False)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        shared, full = pool.map(profiles_of, [str(tmp_path / "shared"), str(tmp_path / "full")])
    assert shared.keys() == full.keys() and len(full) == 6 * SAMPLES
    for key, (prompt, cumulative, last) in full.items():
        assert prompt.sum() > 0
        np.testing.assert_array_equal(shared[key][0], prompt)
        np.testing.assert_array_equal(shared[key][1], cumulative)
        np.testing.assert_array_equal(shared[key][2], last)
