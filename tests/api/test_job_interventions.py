"""Jobs over HTTP with interventions and scoring: per-token NLL of score jobs against
transformers on the same weights (an independent reference), and refusals that name the
field, and experiment jobs against separate score jobs computed by hand. The compiled
server of `test_engine_layouts` checks intervened routing against the plant."""

from __future__ import annotations

import numpy as np
import pytest

from clients.client import Client
from tests.api.conftest import TOKEN
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
        ("job", {"mask": {"0": [8]}}, "intervention.mask: expert 8 of MoE layer 0 does not"),
        ("prompt", {"zero": {"4": [2]}}, "prompts[1].intervention.zero: MoE layer 4 does not"),
        ("job", {"keep": {"2": [5]}}, "MoE layer 2 leaves 1 experts selectable"),
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


TEXTS = [
    ("the bank of the river", " was flooded again"),
    ("a treaty was signed", " by the king and queen"),
    ("numbers add up", " to seventeen in total"),
]
ITEMS = [
    {"prompt": "the sky is", "options": [" blue", " loud", " seven"], "answer": 0},
    {"prompt": "two and two make", "options": [" four", " green"], "answer": 0},
]


def _score(server, intervention: dict | None) -> tuple[float, float]:
    """Mean prompt and completion NLL over TEXTS from one plain score job: the hand
    computation an experiment's rows must equal."""
    body = {
        "kind": "score",
        "model": "qwen3_moe",
        "prompts": [{"prompt": p, "completion": c} for p, c in TEXTS],
        **({"intervention": intervention} if intervention else {}),
    }
    job = server.wait_job(server.client.post("/v1/jobs", json=body).json()["id"])
    assert job["state"] == "done", job
    rows = _sequences(server, job["id"])
    prompt = [x for r in rows for x in r["prompt_nll"][1:]]
    completion = [x for r in rows for x in r["completion_nll"]]
    return float(np.mean(prompt)), float(np.mean(completion))


def test_committee_experiment_job_equals_separate_score_jobs(server):
    """An experiment job (committee zeroed at MoE layer 1, two matched controls) gives the
    baseline and committee rows that separate score jobs give by hand; its store holds
    every (condition, text) with the intervention that ran."""
    usage = np.arange(32, dtype=float).reshape(4, 8).tolist()
    spec = {
        "name": "committee_masking",
        "committee": {"1": [6, 7]},
        "usage": usage,
        "seeds": 2,
        "items": ITEMS,
    }
    body = {
        "kind": "experiment",
        "model": "qwen3_moe",
        "prompts": [{"prompt": p, "completion": c} for p, c in TEXTS],
        "experiment": spec,
    }
    created = server.client.post("/v1/jobs", json=body)
    assert created.status_code == 201, created.text
    conditions, options = 4, 5  # baseline, committee, two controls; 3 + 2 options
    assert created.json()["sequences_total"] == conditions * (len(TEXTS) + options)
    job = server.wait_job(created.json()["id"])
    assert job["state"] == "done", job
    with Client(server.url, token=TOKEN) as client:
        result = client.experiment_result(job["id"])["data"]
    rows = {(r["condition"], r["part"]): r for r in result}
    assert {c for c, _ in rows} == {"baseline", "committee", "random"}
    assert rows[("random", "prompt")]["seeds"] == 2
    base, committee = _score(server, None), _score(server, {"zero": {"1": [6, 7]}})
    for p, part in enumerate(("prompt", "completion")):
        assert rows[("baseline", part)]["value"] == pytest.approx(base[p], rel=1e-5)
        assert rows[("committee", part)]["value"] == pytest.approx(committee[p], rel=1e-5)
        want = committee[p] / base[p] - 1
        assert rows[("committee", part)]["change"] == pytest.approx(want, rel=1e-3, abs=1e-7)
    accuracy = rows[("baseline", "choice_accuracy")]
    assert accuracy["units"] == 2 and 0 <= accuracy["value"] <= 1
    stored = _sequences(server, job["id"])
    assert len(stored) == conditions * (len(TEXTS) + options)
    changes = {r["intervention"] for r in stored}
    assert '{"zero": {"1": [6, 7]}}' in changes and "" in changes and len(changes) == 4


def test_pruning_experiment_takes_usage_from_a_job(server):
    usage_job = server.client.post(
        "/v1/jobs",
        json={
            "kind": "score",
            "model": "qwen3_moe",
            "prompts": [{"prompt": "one hand-written paragraph", "completion": " about rivers"}],
        },
    ).json()
    assert server.wait_job(usage_job["id"])["state"] == "done"
    body = {
        "kind": "experiment",
        "model": "qwen3_moe",
        "prompts": [{"prompt": p, "completion": c} for p, c in TEXTS],
        "experiment": {
            "name": "pruning",
            "usage_job": usage_job["id"],
            "keep": 4,
            "depths": [1, 2],
            "seeds": 1,
        },
    }
    job = server.wait_job(server.client.post("/v1/jobs", json=body).json()["id"])
    assert job["state"] == "done", job
    result = server.client.get(f"/v1/jobs/{job['id']}/result").json()["data"]
    depths = {(r["condition"], r["depth"]) for r in result}
    assert depths == {
        ("baseline", 0),
        ("most_used", 1),
        ("most_used", 2),
        ("random", 1),
        ("random", 2),
    }


@pytest.mark.parametrize(
    ("experiment", "text"),
    [
        ({"name": "committee_masking", "usage": [[1.0] * 8] * 4}, "needs a committee"),
        ({"name": "pruning", "usage": [[1.0] * 8] * 4, "keep": 4}, "needs keep and depths"),
        ({"name": "pruning", "keep": 4, "depths": [1]}, "exactly one of usage or usage_job"),
        (
            {"name": "committee_masking", "committee": {"9": [1]}, "usage": [[1.0] * 8] * 4},
            "committee: MoE layer 9 is not in the usage",
        ),
        (
            {"name": "pruning", "usage": [[1.0] * 8] * 3, "keep": 4, "depths": [1]},
            "experiment.usage: expected (4, 8)",
        ),
        (
            {"name": "pruning", "usage_job": "0" * 16, "keep": 4, "depths": [1]},
            "experiment.usage_job: no job with this id",
        ),
        (
            {"name": "pruning", "usage": [[1.0] * 8] * 4, "keep": 1, "depths": [1]},
            "leaves 1 experts selectable",
        ),
    ],
)
def test_bad_experiments_are_refused(server, experiment, text):
    body = {
        "kind": "experiment",
        "model": "qwen3_moe",
        "prompts": [{"prompt": "a", "completion": " b"}],
        "experiment": experiment,
    }
    response = server.client.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    assert text in response.text


def test_result_of_a_job_without_one_is_a_conflict(server):
    body = {"kind": "score", "model": "qwen3_moe", "prompts": [{"prompt": "a", "completion": " b"}]}
    job = server.client.post("/v1/jobs", json=body).json()
    response = server.client.get(f"/v1/jobs/{job['id']}/result")
    assert response.status_code == 409 and "no result" in response.text
    assert server.client.get("/v1/jobs/" + "0" * 16 + "/result").status_code == 404
