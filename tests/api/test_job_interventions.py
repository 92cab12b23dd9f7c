"""Jobs over HTTP with interventions and scoring: per-token NLL of score jobs against
transformers on the same weights (an independent reference), and refusals that name the
field. The shared server runs without interventions; the compiled server of
`test_engine_layouts` runs them and checks the routing against the plant."""

from __future__ import annotations

import numpy as np
import pytest

from tests.capture.reference import TransformersReference


def _sequences(server, job_id: str) -> list[dict]:
    return server.client.get(f"/v1/jobs/{job_id}/sequences").json()["data"]


def test_score_job_nll_equals_transformers(server, specimen):
    """Per-token NLL of prompt and completion parts, as the index returns them, equals
    transformers' log-softmax on the same weights (fp32)."""
    rng = np.random.default_rng(4)
    texts = [(rng.integers(1, 200, 9).tolist(), rng.integers(1, 200, 5).tolist()) for _ in range(3)]
    body = {
        "kind": "score",
        "model": "qwen3_moe",
        "prompts": [
            {"prompt_token_ids": p, "completion_token_ids": c, "labels": {"text": i}}
            for i, (p, c) in enumerate(texts)
        ],
    }
    job = server.wait_job(server.client.post("/v1/jobs", json=body).json()["id"])
    assert job["state"] == "done", job
    reference = TransformersReference(specimen("qwen3_moe"))
    rows = sorted(_sequences(server, job["id"]), key=lambda r: r["prompt_index"])
    assert len(rows) == 3
    for row, (prompt, completion) in zip(rows, texts, strict=True):
        want = reference.route(prompt + completion).nll
        assert row["prompt_nll"][0] is None and len(row["prompt_nll"]) == len(prompt)
        assert len(row["completion_nll"]) == len(completion)
        np.testing.assert_allclose(row["prompt_nll"][1:], want[1 : len(prompt)], atol=1e-4)
        np.testing.assert_allclose(row["completion_nll"], want[len(prompt) :], atol=1e-4)
        assert row["intervention"] == ""


def test_score_job_without_nll_keeps_none(server):
    body = {
        "kind": "score",
        "model": "qwen3_moe",
        "nll": False,
        "prompts": [{"prompt": "the bank", "completion": " of the river"}],
    }
    job = server.wait_job(server.client.post("/v1/jobs", json=body).json()["id"])
    assert job["state"] == "done", job
    (row,) = _sequences(server, job["id"])
    assert row.get("prompt_nll") is None and row.get("completion_nll") is None


@pytest.mark.parametrize(
    ("where", "intervention", "text"),
    [
        ("job", {"mask": {"0": [1]}}, "intervention: this engine was started without"),
        ("prompt", {"zero": {"1": [2]}}, "prompts[1].intervention: this engine was started"),
        ("job", {"drop": {"0": [1]}}, "unknown kind 'drop'"),
        ("prompt", {"mask": {"x": [1]}}, "intervention.mask: layer 'x'"),
        ("job", {"mask": [1, 2]}, "expected a map of MoE layer -> experts"),
    ],
)
def test_interventions_are_refused_with_the_field(server, where, intervention, text):
    prompts = [{"prompt": "hello"}, {"prompt": "world"}]
    body = {"kind": "rollout", "model": "qwen3_moe", "prompts": prompts}
    if where == "job":
        body["intervention"] = intervention
    else:
        prompts[1]["intervention"] = intervention
    before = server.client.get("/v1/jobs").json()["count"]
    response = server.client.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    assert text in response.text
    assert server.client.get("/v1/jobs").json()["count"] == before, "no job was made"
