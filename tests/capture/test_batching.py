"""Continuous batching: rows of requests in a busy batch equal the same requests run alone."""

from __future__ import annotations

import numpy as np

from capture_server.protocol import flush_rpc
from tests.capture.reference import TransformersReference


def _random_prompts(n: int, vocab: int, seed: int) -> tuple[list[list[int]], list[int]]:
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, vocab, size=rng.integers(3, 100)).tolist() for _ in range(n)]
    max_tokens = rng.integers(2, 24, size=n).tolist()
    return prompts, max_tokens


def test_batch_of_64_equals_each_request_alone(qwen_engine):
    from vllm import SamplingParams

    vocab = len(qwen_engine.tokenizer)
    prompts, max_tokens = _random_prompts(64, vocab, seed=1)
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in max_tokens]
    batch = qwen_engine.generate(prompts, params)
    assert qwen_engine.stats()["steps"] > 0
    for i, prompt in enumerate(prompts):
        alone = qwen_engine.generate([prompt], params[i]).sequences[0]
        got = batch.sequences[i]
        assert got.output_token_ids == alone.output_token_ids
        np.testing.assert_array_equal(got.rows.positions, alone.rows.positions)
        np.testing.assert_array_equal(got.rows.token_ids, alone.rows.token_ids)
        np.testing.assert_array_equal(got.rows.topk_ids, alone.rows.topk_ids)
        np.testing.assert_allclose(got.rows.topk_weights, alone.rows.topk_weights, atol=1e-5)
        np.testing.assert_allclose(got.rows.router_logits, alone.rows.router_logits, atol=1e-4)
        np.testing.assert_allclose(
            got.rows.hidden_states[1], alone.rows.hidden_states[1], atol=1e-4
        )


MIXED = [
    None,
    {"mask": {0: [0, 1], 3: [6]}},
    {"keep": {1: [2, 3, 4, 5], 2: [0, 7]}},
    {"zero": {0: [3], 1: [3], 2: [3], 3: [3]}},
    {"mask": {2: [1]}, "zero": {2: [4]}},
]


def test_batch_mixing_interventions_equals_each_request_alone(qwen_engine):
    """64 requests in one batch, masked, pruned, zeroed and plain side by side (so rows of
    different interventions share steps, chunked prefill included): each request's rows
    and tokens equal the same request run alone, and each request ran its own change."""
    from vllm import SamplingParams

    vocab = len(qwen_engine.tokenizer)
    prompts, max_tokens = _random_prompts(64, vocab, seed=3)
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in max_tokens]
    interventions = [MIXED[i % len(MIXED)] for i in range(64)]
    batch = qwen_engine.generate(prompts, params, intervention=interventions)
    for i, prompt in enumerate(prompts):
        alone = qwen_engine.generate([prompt], params[i], intervention=interventions[i])
        alone = alone.sequences[0]
        got = batch.sequences[i]
        assert got.output_token_ids == alone.output_token_ids
        np.testing.assert_array_equal(got.rows.positions, alone.rows.positions)
        np.testing.assert_array_equal(got.rows.topk_ids, alone.rows.topk_ids)
        np.testing.assert_allclose(got.rows.topk_weights, alone.rows.topk_weights, atol=1e-5)
        change = interventions[i] or {}
        for layer, masked in change.get("mask", {}).items():
            assert not np.isin(got.rows.topk_ids[:, layer], masked).any()
        for layer, kept in change.get("keep", {}).items():
            assert np.isin(got.rows.topk_ids[:, layer], kept).all()
        for layer, zeroed in change.get("zero", {}).items():
            hit = np.isin(got.rows.topk_ids[:, layer], zeroed)
            assert (got.rows.topk_weights[:, layer][hit] == 0).all()
    plain = [s for s, x in zip(batch.sequences, interventions, strict=True) if x is None]
    assert any(np.isin(s.rows.topk_ids[:, 0], [0, 1]).any() for s in plain), (
        "plain requests must still select the experts others mask"
    )


def test_chunked_prefill_is_attributed_across_steps(qwen_engine, specimen):
    """A 300-token prompt cannot fit one 128-token step; its rows still equal transformers."""
    vocab = len(qwen_engine.tokenizer)
    prompt = np.random.default_rng(2).integers(1, vocab, size=300).tolist()
    seq = qwen_engine.generate([prompt], max_tokens=5, temperature=0.0, ignore_eos=True)
    seq = seq.sequences[0]
    assert len(seq.rows) == 300 + 5 - 1
    want = TransformersReference(specimen("qwen3_moe")).route(seq.token_ids[:-1])
    np.testing.assert_array_equal(seq.rows.topk_ids, want.ids)
    np.testing.assert_allclose(seq.rows.router_logits, want.logits, atol=1e-4)


def test_n_samples_of_one_prompt(qwen_engine):
    result = qwen_engine.generate(
        ["the cell divides and the protein folds"],
        n=3,
        max_tokens=10,
        temperature=1.0,
        ignore_eos=True,
    )
    assert sorted(s.sample_index for s in result.sequences) == [0, 1, 2]
    first = result.sequences[0]
    p = len(first.prompt_token_ids)
    for seq in result.sequences:
        assert len(seq.rows) == p + len(seq.output_token_ids) - 1
        np.testing.assert_array_equal(seq.rows.token_ids, seq.token_ids[:-1])
        # The prompt is routed identically in every sample.
        np.testing.assert_array_equal(seq.rows.topk_ids[:p], first.rows.topk_ids[:p])
    outputs = {tuple(s.output_token_ids) for s in result.sequences}
    assert len(outputs) > 1, "temperature 1.0 samples should differ"


def test_scoring_captures_every_token(qwen_engine):
    prompt, completion = "the bank raised interest", " rates and the market priced bonds"
    scored = qwen_engine.score([prompt], [completion]).sequences[0]
    p, c = len(scored.prompt_token_ids), len(scored.output_token_ids)
    assert len(scored.rows) == p + c, "scoring forwards every token of the text"
    assert scored.rows.is_prompt.sum() == p
    np.testing.assert_array_equal(scored.rows.token_ids, scored.token_ids)
    # Same tokens through the generate path: identical routing on the shared rows.
    generated = qwen_engine.generate([scored.token_ids], max_tokens=1, temperature=0.0)
    np.testing.assert_array_equal(generated.sequences[0].rows.topk_ids, scored.rows.topk_ids)


def test_uncaptured_requests_have_no_rows(qwen_engine):
    from capture_server.capture.registry import memory_sink

    before = qwen_engine.stats()
    qwen_engine.llm.generate(["plain request without capture"], use_tqdm=False)
    after = qwen_engine.stats()
    assert after["rows"] == before["rows"]
    # with prefix caching every row is copied out (kept by KV slot), but only captured
    # rows count towards the expert load
    assert after["expert_load"] == before["expert_load"]
    assert memory_sink(qwen_engine._sink_name).keys() == []


def test_per_request_options_choose_the_optional_arrays(qwen_engine):
    """Two requests in one batch: one keeps logits and layer-1 inputs, one keeps neither."""
    from vllm import SamplingParams

    from capture_server.capture.options import CaptureOptions
    from capture_server.capture.registry import memory_sink

    full = CaptureOptions(sink="memory://per-request", sequence="full", hidden_layers=(1,))
    lean = CaptureOptions(sink="memory://per-request-lean", sequence="lean", logits=False)
    params = [
        SamplingParams(max_tokens=4, temperature=0.0, extra_args=o.to_extra_args())
        for o in (full, lean)
    ]
    outs = qwen_engine.llm.generate(["the cell divides", "the bank raised"], params, use_tqdm=False)
    flush_rpc([o.request_id for o in outs]).run(qwen_engine.llm)
    rich = memory_sink("per-request").sequence("full")
    bare = memory_sink("per-request-lean").sequence("lean")
    assert rich.router_logits is not None and set(rich.hidden_states) == {1}
    assert bare.router_logits is None and bare.hidden_states == {}
    assert bare.topk_ids.shape[1:] == rich.topk_ids.shape[1:]
