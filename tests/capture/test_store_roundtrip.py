"""Capture straight into a routing store: the store holds exactly what the capture produced."""

from __future__ import annotations

import numpy as np

EXACT = {
    "weights_dtype": "float32",
    "logits_dtype": "float32",
    "hidden_dtype": "float32",
    "hidden_layers": [1],
    "chunk_tokens": 256,
}


def test_store_equals_in_memory_capture(qwen_engine, tmp_path):
    rng = np.random.default_rng(7)
    vocab = len(qwen_engine.tokenizer)
    prompts = [rng.integers(1, vocab, size=rng.integers(4, 60)).tolist() for _ in range(24)]
    labels = [{"domain": "math" if i % 2 else "code", "question": i // 3} for i in range(24)]
    kwargs = dict(max_tokens=12, temperature=0.0, ignore_eos=True, n=2)
    kwargs_greedy = dict(kwargs, n=1)
    in_memory = qwen_engine.generate(prompts, labels=labels, **kwargs_greedy)
    store = qwen_engine.generate_to_store(
        prompts, str(tmp_path / "store"), labels=labels, store_options=EXACT, **kwargs_greedy
    )
    assert len(store.index) == len(prompts)
    for seq in in_memory.sequences:
        row = store.index.filter(store.index["prompt_index"] == seq.prompt_index).row(0, named=True)
        got = store.sequence(row["sequence_id"])
        np.testing.assert_array_equal(got["topk_ids"], seq.rows.topk_ids)
        np.testing.assert_array_equal(got["topk_weights"], seq.rows.topk_weights)
        np.testing.assert_array_equal(got["router_logits"], seq.rows.router_logits)
        np.testing.assert_array_equal(got["hidden_states_1"], seq.rows.hidden_states[1])
        np.testing.assert_array_equal(got["token_ids"], seq.rows.token_ids)
        np.testing.assert_array_equal(got["positions"], seq.rows.positions)
        np.testing.assert_array_equal(got["is_prompt"], seq.rows.is_prompt)
        assert row["prompt_len"] == len(seq.prompt_token_ids)
        assert row["generated_len"] == len(seq.output_token_ids)
        assert row["completion_text"] == seq.text
        assert row["finish_reason"] == seq.finish_reason
        assert row["label_domain"] == labels[seq.prompt_index]["domain"]
    # n > 1 lands as separate sequences of one prompt.
    sampled = qwen_engine.generate_to_store(
        prompts[:4], str(tmp_path / "sampled"), store_options=EXACT, **dict(kwargs, temperature=1.0)
    )
    assert sorted(sampled.index["sample_index"].to_list()) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert sampled.model.architecture == "Qwen3MoeForCausalLM"
