"""Planted ground truth: the captured ids equal the routing the weights were built to produce."""

from __future__ import annotations

import numpy as np
import pytest

from capture_server.specimens.planted import planted_topk


@pytest.fixture(scope="module")
def planted_engine(specimen):
    """The planted model, interventions off (the engine's default)."""
    from capture_server.capture.api import CaptureEngine

    engine = CaptureEngine(
        str(specimen("qwen3_moe", planted=True)),
        dtype="float32",
        max_model_len=512,
        seed=0,
        enforce_eager=True,
    )
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def planted_result(planted_engine):
    vocab = len(planted_engine.tokenizer)
    prompts = [np.arange(1, vocab).tolist()[:200], [5, 9, 13, 200, 201], "the king signed"]
    return planted_engine.generate(prompts, max_tokens=20, temperature=0.0, ignore_eos=True)


def test_every_token_and_layer_follows_the_plant(planted_result):
    total = 0
    for seq in planted_result.sequences:
        rows = seq.rows
        for layer in range(rows.topk_ids.shape[1]):
            want = planted_topk(rows.token_ids, layer)
            np.testing.assert_array_equal(rows.topk_ids[:, layer], want, err_msg=f"layer {layer}")
        total += rows.topk_ids.shape[0] * rows.topk_ids.shape[1]
    assert total > 800


def test_planted_weights_follow_the_logit_gap(planted_result):
    """Logits are 4s and 2s with s the RMSNorm scale; weights are their renormalised softmax."""
    seq = planted_result.sequences[1]
    s = np.sqrt(32.0)  # RMSNorm of a vector with two ones in 64 dims: 1 / sqrt(2/64)
    first = 1 / (1 + np.exp(-(4 - 2) * s))
    np.testing.assert_allclose(seq.rows.topk_weights[..., 0], first, atol=1e-4)
    np.testing.assert_allclose(seq.rows.router_logits.max(-1), 4 * s, atol=1e-3)


def test_engine_without_interventions_refuses_them(planted_engine):
    """An engine started without interventions refuses a request that asks for one,
    rather than running it unchanged."""
    from capture_server.capture.intervention import InterventionError

    engine = planted_engine
    with pytest.raises(InterventionError, match="started without interventions"):
        engine.generate(["the king"], max_tokens=2, intervention={"mask": {0: [1]}})
