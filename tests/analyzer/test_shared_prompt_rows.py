"""The analyzer's map step over a store whose samples share prompt rows (stored once,
`capture_server.store.shared_prompts`): every sample counts its whole prompt.

Proof: each block's profiles equal those of the same rows stored in full (sharing off);
the reads of both stores are checked against the rows written in
`tests/store/test_shared_prompts.py`. Here, not under tests/store: the compiled loops
load llvmlite, and a vLLM engine started later in the same process trips over
llvmlite's objects when it scans every module (vllm/triton_utils/dispatcher.py,
`_rebind_kernels`); the analyzer's tests run before the engines'."""

from __future__ import annotations

import numpy as np

from analyzer.plan import BlockPlan
from analyzer.profiles import profile_block
from capture_server.store import open_store
from tests.store.test_shared_prompts import SAMPLES, write


def test_the_analyzer_counts_shared_prompt_rows_once_per_sample(tmp_path):
    """Each block's profiles from the sharing store equal those of the same rows stored
    in full, prompt counts included."""
    write(tmp_path / "shared", share=True)
    write(tmp_path / "full", share=False)

    def profiles(path) -> dict:
        store = open_store(path)
        plan = BlockPlan(store, 64, keep=None)
        out = {}
        for block in plan.blocks:
            rows = plan.rows(block)
            got = profile_block(str(path), block.start, block.stop, rows)
            for i, row in enumerate(rows):
                key = (row["prompt_index"], row["sample_index"])
                out[key] = (got.prompt[i], got.cumulative[i], got.last_ids[i])
        return out

    shared, full = profiles(tmp_path / "shared"), profiles(tmp_path / "full")
    assert shared.keys() == full.keys() and len(full) == 6 * SAMPLES
    for key, (prompt, cumulative, last) in full.items():
        assert prompt.sum() > 0
        np.testing.assert_array_equal(shared[key][0], prompt)
        np.testing.assert_array_equal(shared[key][1], cumulative)
        np.testing.assert_array_equal(shared[key][2], last)
