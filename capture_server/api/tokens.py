"""Token ids a client sends are checked against the model's vocabulary at submission, so
that nothing valid-looking fails later inside the engine."""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException


def check_token_ids(token_lists: list[list[int]], engine: Any, field: str) -> None:
    """Refuse token ids outside the model's vocabulary with a 4xx naming `field`, by
    vLLM's own rule (vllm/renderers/base.py, `validate_token_ids`)."""
    tokenizer = engine.get_tokenizer()
    top = max(
        getattr(tokenizer, "max_token_id", len(tokenizer) - 1),
        engine.model_config.get_vocab_size() - 1,
    )
    for k, ids in enumerate(token_lists):
        bad = [t for t in ids if t < 0 or t > top]
        if bad:
            where = field if len(token_lists) == 1 else f"{field}[{k}]"
            raise HTTPException(
                400, detail=f"{where}: token id {bad[0]} is not in the vocabulary [0, {top}]"
            )
