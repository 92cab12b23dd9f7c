"""OpenAI-compatible endpoints driven by the official OpenAI SDK, recording into job stores."""

from __future__ import annotations

import numpy as np
import openai
import pytest

from capture_server.specimens.planted import planted_topk
from capture_server.store import open_store
from tests.api.conftest import TOKEN

PROMPTS = [f"the river bank flooded {i} times and" for i in range(6)]


@pytest.fixture(scope="module")
def sdk(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=TOKEN, max_retries=0)


def test_completions_record_what_a_job_records(server, sdk):
    """The same greedy requests through /v1/completions and through a rollout job."""
    out = sdk.completions.create(
        model="qwen3_moe",
        prompt=PROMPTS,
        max_tokens=6,
        temperature=0,
        extra_body={"moetrace": {"job": "sdk-greedy", "labels": {"step": 3}}},
    )
    capture = out.model_extra["moetrace"]
    assert capture["sequences"] == [f"c{k}" for k in range(len(PROMPTS))]
    assert out.usage.completion_tokens == 6 * len(PROMPTS)

    body = {
        "kind": "rollout",
        "model": "qwen3_moe",
        "prompts": [{"prompt": p} for p in PROMPTS],
        "sampling": {"max_tokens": 6, "temperature": 0},
    }
    job = server.wait_job(server.client.post("/v1/jobs", json=body).json()["id"])
    reference = open_store(job["store"])
    online = open_store(capture["store"])
    assert len(online.index) == len(PROMPTS)
    for k, choice in enumerate(out.choices):
        a = online.index.filter(online.index["request_id"] == f"c{k}").row(0, named=True)
        b = reference.index.filter(reference.index["prompt_index"] == k).row(0, named=True)
        assert a["prompt_index"] == k and a["label_step"] == 3
        assert a["completion_text"] == choice.text == b["completion_text"]
        x, y = online.sequence(a["sequence_id"]), reference.sequence(b["sequence_id"])
        np.testing.assert_array_equal(x["token_ids"], y["token_ids"])
        np.testing.assert_array_equal(x["topk_ids"], y["topk_ids"])
        np.testing.assert_allclose(x["topk_weights"], y["topk_weights"], atol=1e-5)
        np.testing.assert_allclose(x["router_logits"], y["router_logits"], atol=1e-2)


def test_chat_completions_accumulate_in_a_named_job(server, sdk):
    """Two chat requests land in one open job; closing it starts a new one."""

    def ask(content: str, job: str = "sdk-chat"):
        return sdk.chat.completions.create(
            model="qwen3_moe-planted",
            messages=[{"role": "user", "content": content}],
            max_tokens=5,
            temperature=1.0,
            n=2,
            extra_body={"moetrace": {"job": job, "logits": False}},
        )

    first, second = ask("a fish swims"), ask("a bird sings")
    assert len(first.choices) == 2 and first.choices[0].message.role == "assistant"
    job_id = first.model_extra["moetrace"]["job"]
    assert second.model_extra["moetrace"] == {**first.model_extra["moetrace"], "sequences": ["c1"]}
    job = server.client.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "open" and job["kind"] == "online"
    assert job["sequences_total"] == 4 and job["sequences_done"] == 4

    store = open_store(job["store"])
    assert sorted(store.index.select("request_id", "sample_index").iter_rows()) == [
        ("c0", 0),
        ("c0", 1),
        ("c1", 0),
        ("c1", 1),
    ]
    assert "router_logits" not in store.array_names
    for sid in store.index["sequence_id"].to_list():
        arrays = store.sequence(sid, ("token_ids", "topk_ids"))
        for layer in range(4):
            np.testing.assert_array_equal(
                arrays["topk_ids"][:, layer], planted_topk(arrays["token_ids"], layer)
            )

    closed = server.client.delete(f"/v1/jobs/{job_id}").json()
    assert closed["state"] == "done"
    third = ask("a cat sleeps")
    assert third.model_extra["moetrace"]["job"] != job_id
    assert third.model_extra["moetrace"]["sequences"] == ["c0"]


def test_plain_requests_are_not_recorded(server, sdk):
    before = server.client.get("/v1/jobs").json()["count"]
    out = sdk.completions.create(model="qwen3_moe", prompt="hello there", max_tokens=3)
    assert len(out.choices) == 1 and out.model_extra["moetrace"] is None
    assert server.client.get("/v1/jobs").json()["count"] == before


@pytest.mark.parametrize(
    ("extra", "status", "text"),
    [
        ({"moetrace": {"job": "../escape"}}, 422, "job"),
        ({"moetrace": {"job": "x", "hidden_layers": [3]}}, 422, "moetrace.hidden_layers"),
        (
            {"moetrace": {"job": "x", "intervention": {"mask": {"0": [9]}}}},
            422,
            "moetrace.intervention.mask: expert 9 of MoE layer 0 does not exist",
        ),
        ({"moetrace": {"job": "x", "intervention": {"drop": {}}}}, 422, "unknown kind 'drop'"),
        ({"stream": True}, 422, "stream"),
        ({"max_tokens": 10**6}, 422, "max_tokens"),
        ({"model": "nope"}, 404, "Model not found"),
        ({"prompt": ["hi", " ".join(["the bank"] * 400)]}, 400, "prompt[1]"),
    ],
)
def test_bad_openai_requests(server, extra, status, text):
    body = {"model": "qwen3_moe", "prompt": "hi", "max_tokens": 2, **extra}
    response = server.client.post("/v1/completions", json=body)
    assert response.status_code == status, response.text
    assert text in response.text


def test_other_capture_options_need_another_job(server):
    body = {"model": "qwen3_moe", "prompt": "hi", "max_tokens": 2}
    made = server.client.post("/v1/completions", json={**body, "moetrace": {"job": "sdk-own"}})
    assert made.status_code == 200, made.text
    other = {**body, "moetrace": {"job": "sdk-own", "logits": False}}
    refused = server.client.post("/v1/completions", json=other)
    assert refused.status_code == 409 and "moetrace.logits" in refused.text


def test_sdk_without_token_is_refused(server):
    sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        sdk.completions.create(model="qwen3_moe", prompt="hi", max_tokens=2)


def test_metrics_count_expert_load_and_writers(server, sdk):
    """Per-layer expert load adds up to top-k selections of every captured token."""
    from prometheus_client.parser import text_string_to_metric_families

    sdk.completions.create(
        model="qwen3_moe",
        prompt="the bank",
        max_tokens=4,
        extra_body={"moetrace": {"job": "sdk-metrics"}},
    )
    families = {
        f.name: f.samples
        for f in text_string_to_metric_families(server.client.get("/metrics").text)
    }

    def value(family: str, **labels: str) -> float:
        return sum(
            s.value
            for s in families[family]
            if not s.name.endswith("_created")
            and all(s.labels.get(k) == v for k, v in labels.items())
        )

    captured = value("moetrace_tokens_captured", model="qwen3_moe")
    assert captured > 0
    for layer in range(4):
        load = value("moetrace_expert_load", model="qwen3_moe", layer=str(layer))
        assert load == captured * 2  # top-2 routing: two selections per token and layer
    assert value("moetrace_store_bytes_written", model="qwen3_moe") > 0
    assert value("moetrace_store_sequences_committed", model="qwen3_moe") >= 1
    open_jobs = {s.labels["job"] for s in families["moetrace_writer_queue_depth"]}
    assert any(s.labels["job"] in open_jobs for s in families["moetrace_writer_lag_seconds"])
    assert value("moetrace_jobs", state="open") >= 1


def test_idle_online_store_closes_and_reopens(server, sdk):
    """An idle named job's writer closes (the server uses an 8 s idle limit here); the
    job stays open and the next request appends to the same store."""
    import time

    def ask():
        return sdk.completions.create(
            model="qwen3_moe",
            prompt="the bank",
            max_tokens=3,
            extra_body={"moetrace": {"job": "sdk-idle"}},
        ).model_extra["moetrace"]

    first = ask()
    deadline = time.monotonic() + 60
    while f'job="{first["job"]}"' in server.client.get("/metrics").text:
        assert time.monotonic() < deadline, "the idle store writer was not closed"
        time.sleep(1)
    second = ask()
    assert second["job"] == first["job"] and second["sequences"] == ["c1"]
    assert server.client.get(f"/v1/jobs/{first['job']}").json()["state"] == "open"
    index = open_store(first["store"]).index
    assert sorted(index["request_id"]) == ["c0", "c1"]
    assert index["sequence_id"].n_unique() == 2
