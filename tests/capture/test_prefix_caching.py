"""Prefix caching: cached prompt positions get the rows of the forward that computed
their KV blocks, so caching on equals caching off row for row. Preemption and recompute
add no duplicate.

Proof against: the same engine with the prefix cache skipped per request
(`SamplingParams.skip_reading_prefix_cache`, same batch shapes), and transformers on the
same weights (`TransformersReference`) for every sequence's routing.
"""

from __future__ import annotations

import numpy as np
import pytest

PROMPT_LEN, SHARED, SAMPLES, MAX_TOKENS = 300, 200, 8, 6


@pytest.fixture(scope="module")
def cached_engine(specimen):
    from capture_server.capture.api import CaptureEngine

    engine = CaptureEngine(
        str(specimen("qwen3_moe")),
        hidden_layers=[1],
        dtype="float32",
        max_model_len=1024,
        enable_prefix_caching=True,
        enable_chunked_prefill=False,  # per-request seeds on a CPU
        seed=0,
        enforce_eager=True,
    )
    yield engine
    engine.close()


@pytest.mark.parametrize("background", [False, True], ids=["kept inline", "kept in background"])
def test_prefix_cached_positions_get_the_rows_of_their_first_forward(
    cached_engine, background, monkeypatch
):
    """Steps of this tiny model are kept inline (`prefix_rows.BACKGROUND_BYTES`); a real
    model's large steps on the slot-keeping thread, forced here for every step."""
    from capture_server.plugin import prefix_rows

    if background:  # the engine runs in this process (tests/conftest.py)
        monkeypatch.setattr(prefix_rows, "BACKGROUND_BYTES", 0)
    vocab = len(cached_engine.tokenizer)
    seed = 3 + background  # a prompt of its own: its first forward is this test's
    prompt = np.random.default_rng(seed).integers(1, vocab, size=PROMPT_LEN).tolist()
    reused = cached_engine.stats()["prefix_rows_reused"]
    first = cached_engine.generate([prompt], max_tokens=4, temperature=0.0).sequences[0]
    second = cached_engine.generate([prompt], max_tokens=4, temperature=0.0).sequences[0]
    cached = cached_engine.stats()["prefix_rows_reused"] - reused
    assert 0 < cached < PROMPT_LEN, "the second prompt must be served from the prefix cache"
    for seq in (first, second):
        np.testing.assert_array_equal(seq.rows.positions, np.arange(PROMPT_LEN + 4 - 1))
    np.testing.assert_array_equal(second.rows.topk_ids, first.rows.topk_ids)
    np.testing.assert_array_equal(second.rows.topk_weights, first.rows.topk_weights)
    np.testing.assert_array_equal(second.rows.router_logits, first.rows.router_logits)
    np.testing.assert_array_equal(second.rows.hidden_states[1], first.rows.hidden_states[1])


def test_n8_samples_of_long_shared_prompts_equal_caching_off(cached_engine, specimen):
    """Three prompts sharing a long start, eight seeded samples each: the children of a
    prompt hit the blocks its first child computes in the same step, and later prompts
    hit the shared start."""
    from tests.capture.reference import TransformersReference

    vocab = len(cached_engine.tokenizer)
    rng = np.random.default_rng(5)
    shared = rng.integers(1, vocab, size=SHARED).tolist()
    prompts = [shared + rng.integers(1, vocab, size=PROMPT_LEN - SHARED).tolist() for _ in range(3)]
    sampling = dict(n=SAMPLES, max_tokens=MAX_TOKENS, temperature=1.0, seed=11, ignore_eos=True)

    reused = cached_engine.stats()["prefix_rows_reused"]
    off = cached_engine.generate(prompts, skip_reading_prefix_cache=True, **sampling)
    assert cached_engine.stats()["prefix_rows_reused"] == reused, "caching was not off"
    on = cached_engine.generate(prompts, **sampling)
    cached = cached_engine.stats()["prefix_rows_reused"] - reused
    assert cached >= 3 * SAMPLES * SHARED, f"only {cached} rows came from the prefix cache"

    reference = TransformersReference(specimen("qwen3_moe"))
    assert len(on.sequences) == len(off.sequences) == 3 * SAMPLES
    by_key = {(s.prompt_index, s.sample_index): s for s in off.sequences}
    for seq in on.sequences:
        want = by_key[(seq.prompt_index, seq.sample_index)]
        assert seq.token_ids == want.token_ids, "seeded samples must draw the same tokens"
        rows, want_rows = seq.rows, want.rows
        np.testing.assert_array_equal(rows.positions, np.arange(PROMPT_LEN + MAX_TOKENS - 1))
        np.testing.assert_array_equal(rows.token_ids, want_rows.token_ids)
        np.testing.assert_array_equal(rows.topk_ids, want_rows.topk_ids)
        np.testing.assert_allclose(rows.topk_weights, want_rows.topk_weights, atol=1e-5)
        np.testing.assert_allclose(rows.router_logits, want_rows.router_logits, atol=1e-4)
        np.testing.assert_allclose(rows.hidden_states[1], want_rows.hidden_states[1], atol=1e-4)
        truth = reference.route(seq.token_ids[:-1])
        np.testing.assert_array_equal(rows.topk_ids, truth.ids)
        np.testing.assert_allclose(rows.router_logits, truth.logits, atol=1e-4)


def test_n8_samples_store_their_cached_prompt_once(cached_engine, tmp_path):
    """Into a store, the eight samples' prompt rows are stored once (`store.shared_prompts`)
    and every sample still reads back whole; against the same call stored without sharing,
    row for row, and against the in-memory capture of the same call."""
    vocab = len(cached_engine.tokenizer)
    rng = np.random.default_rng(8)
    prompts = [rng.integers(1, vocab, size=PROMPT_LEN).tolist() for _ in range(2)]
    sampling = dict(n=SAMPLES, max_tokens=MAX_TOKENS, temperature=1.0, seed=4, ignore_eos=True)
    exact = {"weights_dtype": "float32", "logits_dtype": "float32", "hidden_dtype": "float32"}

    memory = cached_engine.generate(prompts, **sampling)
    shared = cached_engine.generate_to_store(
        prompts, str(tmp_path / "shared"), store_options=exact, **sampling
    )
    full = cached_engine.generate_to_store(
        prompts,
        str(tmp_path / "full"),
        store_options={**exact, "share_prompt_rows": False},
        **sampling,
    )
    # each prompt's first sample to end holds its rows; its seven siblings share them
    counts = shared.index["shared_rows"].to_list()
    assert sorted(counts)[:2] == [0, 0] and len(counts) == 2 * SAMPLES
    assert min(sorted(counts)[2:]) >= 256, "the cached prompt blocks must be shared"
    assert (full.index["shared_rows"] == 0).all()
    assert shared.num_tokens < 0.4 * full.num_tokens

    by_key = {(s.prompt_index, s.sample_index): s.rows for s in memory.sequences}
    full_rows = {
        (r["prompt_index"], r["sample_index"]): full.sequence(r["sequence_id"])
        for r in full.index.iter_rows(named=True)
    }
    for row in shared.index.iter_rows(named=True):
        key = (row["prompt_index"], row["sample_index"])
        got, want, stored = shared.sequence(row["sequence_id"]), by_key[key], full_rows[key]
        for name in ("positions", "token_ids", "topk_ids", "topk_weights", "router_logits"):
            np.testing.assert_array_equal(got[name], stored[name], err_msg=name)
        np.testing.assert_array_equal(got["hidden_states_1"], stored["hidden_states_1"])
        np.testing.assert_array_equal(got["topk_ids"], want.topk_ids)
        np.testing.assert_allclose(got["router_logits"], want.router_logits, atol=1e-4)


def test_only_requests_with_more_samples_hold_their_prompt_rows(
    cached_engine, tmp_path, monkeypatch
):
    """Holding a prompt's rows for its later samples copies them; a request of n = 1 has
    no later sample (`SequenceEnd.sole_sample`), so its rows are not held, and it stores
    everything itself. Regression check of the flag's path from the worker to the writer."""
    from capture_server.store import shared_prompts

    held: list[str] = []
    real_hold = shared_prompts.SharedPrompts._hold

    def spying_hold(self, request_id, offset, rows):
        held.append(request_id)
        real_hold(self, request_id, offset, rows)

    monkeypatch.setattr(shared_prompts.SharedPrompts, "_hold", spying_hold)
    vocab = len(cached_engine.tokenizer)
    prompts = np.random.default_rng(9).integers(1, vocab, size=(2, 40)).tolist()
    single = cached_engine.generate_to_store(prompts, str(tmp_path / "n1"), max_tokens=3)
    assert held == [] and (single.index["shared_rows"] == 0).all()
    several = cached_engine.generate_to_store(
        prompts, str(tmp_path / "n2"), n=2, max_tokens=3, temperature=1.0, seed=1
    )
    assert len(held) == 2, "each prompt's first sample to end holds its rows"
    assert min(sorted(several.index["shared_rows"].to_list())[2:]) > 0
