"""Preemption and recompute add no duplicate: each position is recorded once, and the
expert load counts it once (rows counted on the device, recomputed ones taken back).

Proof against: transformers on the same weights (`TransformersReference`); the expert
load against a count of those proven rows.
"""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture
def tight_engine(specimen):
    """Few KV blocks, so long generations preempt each other and recompute."""
    from capture_server.capture.api import CaptureEngine

    engine = CaptureEngine(
        str(specimen("qwen3_moe")),
        dtype="float32",
        max_model_len=200,
        num_gpu_blocks_override=8,
        block_size=32,
        seed=0,
        enforce_eager=True,
    )
    yield engine
    engine.close()


def test_preemption_recompute_adds_no_duplicates(tight_engine, specimen):
    from tests.capture.reference import TransformersReference

    reference = TransformersReference(specimen("qwen3_moe"))
    vocab = len(tight_engine.tokenizer)
    rng = np.random.default_rng(4)
    prompts = [rng.integers(1, vocab, size=40).tolist() for _ in range(6)]
    result = tight_engine.generate(prompts, max_tokens=60, temperature=0.0, ignore_eos=True)
    stats = tight_engine.stats()
    assert stats["preempted"] > 0, "the test needs preemption to happen"
    assert stats["recomputed_rows_dropped"] > 0, "and recomputed rows to drop"
    for seq in result.sequences:
        np.testing.assert_array_equal(seq.rows.positions, np.arange(40 + 60 - 1))
        want = reference.route(seq.token_ids[:-1])
        np.testing.assert_array_equal(seq.rows.topk_ids, want.ids)
        np.testing.assert_allclose(seq.rows.router_logits, want.logits, atol=1e-4)
    layers, experts = np.asarray(stats["expert_load"]).shape
    counted = np.zeros((layers, experts), dtype=np.int64)
    for seq in result.sequences:
        for layer in range(layers):
            counted[layer] += np.bincount(seq.rows.topk_ids[:, layer].ravel(), minlength=experts)
    np.testing.assert_array_equal(stats["expert_load"], counted)
