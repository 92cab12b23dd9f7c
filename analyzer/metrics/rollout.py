"""Prompt vs rollout routing, paper (a) A6: usage similarity through growing windows.

Shapes: ``ids`` is (tokens, layers, k) of one sequence, rows in position order.
"""

from __future__ import annotations

import numpy as np

from analyzer.metrics.usage import TOP_P, cosine, top_p_jaccard, usage_frequency


def window(ids: np.ndarray, prompt_len: int, generated: int, scope: str) -> np.ndarray:
    """Rows of the window after `generated` rollout tokens.

    ``cumulative``: prompt plus the first `generated` rollout rows (paper (a));
    ``generated``: the first `generated` rollout rows only.
    """
    if scope == "cumulative":
        return ids[: prompt_len + generated]
    if scope == "generated":
        return ids[prompt_len : prompt_len + generated]
    raise ValueError(f"scope: expected cumulative or generated, got {scope!r}")


def similarity_through_rollout(
    ids_a: np.ndarray,
    prompt_a: int,
    ids_b: np.ndarray,
    prompt_b: int,
    num_experts: int,
    checkpoints: list[int],
    scope: str = "cumulative",
    p: float = TOP_P,
) -> dict[str, np.ndarray]:
    """Cosine and top-p Jaccard of two sequences' usage at each rollout checkpoint.

    Returns ``cosine`` and ``jaccard`` of shape (checkpoints, layers); checkpoint g = 0 in
    ``cumulative`` scope is the prompt alone (the prompt boundary of the figures).
    """
    cos, jac = [], []
    for g in checkpoints:
        f_a = usage_frequency(window(ids_a, prompt_a, g, scope), num_experts)
        f_b = usage_frequency(window(ids_b, prompt_b, g, scope), num_experts)
        cos.append(cosine(f_a, f_b))
        jac.append(top_p_jaccard(f_a, f_b, p))
    return {"cosine": np.array(cos), "jaccard": np.array(jac)}


def prompt_vs_rollout(
    ids: np.ndarray, prompt_len: int, num_experts: int, p: float = TOP_P
) -> dict[str, np.ndarray]:
    """Usage similarity between a sequence's prompt and its generated part, per layer."""
    f_prompt = usage_frequency(ids[:prompt_len], num_experts)
    f_rollout = usage_frequency(ids[prompt_len:], num_experts)
    return {"cosine": cosine(f_prompt, f_rollout), "jaccard": top_p_jaccard(f_prompt, f_rollout, p)}
