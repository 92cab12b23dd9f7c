"""Token ids a client sends are checked against the model's vocabulary at submission, so
that nothing valid-looking fails later inside the engine."""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException


def check_token_ids(named: list[tuple[str, list[int]]], engine: Any) -> None:
    """Refuse token ids outside the model's vocabulary with a 4xx naming the field of each
    (field, ids) pair, by vLLM's own rule (vllm/renderers/base.py, `validate_token_ids`).
    The vocabulary is looked up once for all of them."""
    if not named:
        return
    tokenizer = engine.get_tokenizer()
    # vLLM's tokenizers cache `max_token_id`; len() of a Hugging Face one rebuilds its
    # vocabulary, which cost every OpenAI request a few hundred microseconds
    top = getattr(tokenizer, "max_token_id", None)
    top = max(len(tokenizer) - 1 if top is None else top, engine.model_config.get_vocab_size() - 1)
    for field, ids in named:
        bad = [t for t in ids if t < 0 or t > top]
        if bad:
            raise HTTPException(
                400, detail=f"{field}: token id {bad[0]} is not in the vocabulary [0, {top}]"
            )
