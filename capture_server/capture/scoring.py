"""Per-token negative log-likelihood of teacher-forced texts, from vLLM's prompt logprobs.

A request asks for them with ``SamplingParams(prompt_logprobs=0)``: vLLM then returns,
for every prompt position after the first, the logprob of the token that is there.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def token_nll(output: Any) -> np.ndarray | None:
    """NLL of each token of a `RequestOutput`'s prompt given those before it; NaN at
    position 0 (nothing predicts it). None when the request did not ask for them."""
    logprobs = getattr(output, "prompt_logprobs", None)
    if not logprobs:
        return None
    ids = output.prompt_token_ids
    nll = np.full(len(ids), np.nan)
    for i in range(1, len(ids)):
        nll[i] = -logprobs[i][ids[i]].logprob
    return nll


def split_nll(nll: np.ndarray, prompt_len: int) -> tuple[list[float | None], list[float]]:
    """(prompt part, completion part) as JSON-able lists; the prompt's first token has
    no NLL (None)."""
    prompt = [None if np.isnan(x) else float(x) for x in nll[:prompt_len]]
    return prompt, [float(x) for x in nll[prompt_len:]]
