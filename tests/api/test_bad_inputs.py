"""Bad requests get a clear 4xx naming the problem, and change nothing stored.

Each case is one row of docs/api-bad-inputs.md.
"""

from __future__ import annotations

import httpx
import pytest

from tests.api.conftest import UPLOAD_LIMIT

GOOD = {
    "kind": "rollout",
    "model": "qwen3_moe",
    "prompts": [{"prompt": "the king"}],
    "sampling": {"max_tokens": 4},
}


def with_(**changes):
    body = {**GOOD, **changes}
    return body


def chunked(total: int, chunk: int = 2**16):
    """A body sent with chunked transfer encoding (no Content-Length)."""
    for start in range(0, total, chunk):
        yield b"x" * min(chunk, total - start)


def without_prompts(**changes):
    return {k: v for k, v in with_(**changes).items() if k != "prompts"}


CASES = [
    # (name, method, path, kwargs, status, text expected in the response)
    (
        "malformed JSON",
        "post",
        "/v1/jobs",
        {"content": b"{not json", "headers": {"content-type": "application/json"}},
        422,
        "JSON decode error",
    ),
    (
        "wrong type for n",
        "post",
        "/v1/jobs",
        {"json": with_(sampling={"n": "two"})},
        422,
        "sampling",
    ),
    ("negative n", "post", "/v1/jobs", {"json": with_(sampling={"n": -1})}, 422, "n"),
    (
        "huge max_tokens",
        "post",
        "/v1/jobs",
        {"json": with_(sampling={"max_tokens": 10**9})},
        422,
        "sampling.max_tokens",
    ),
    ("empty prompt list", "post", "/v1/jobs", {"json": with_(prompts=[])}, 422, "prompts"),
    (
        "empty prompt text",
        "post",
        "/v1/jobs",
        {"json": with_(prompts=[{"prompt": "  "}])},
        422,
        "prompt must not be empty",
    ),
    (
        "prompt and messages both",
        "post",
        "/v1/jobs",
        {"json": with_(prompts=[{"prompt": "a", "messages": [{"role": "user", "content": "b"}]}])},
        422,
        "exactly one of",
    ),
    ("unknown field", "post", "/v1/jobs", {"json": with_(temperature=0.5)}, 422, "temperature"),
    ("unknown kind", "post", "/v1/jobs", {"json": with_(kind="train")}, 422, "kind"),
    (
        "greedy with n > 1",
        "post",
        "/v1/jobs",
        {"json": with_(sampling={"n": 2, "temperature": 0})},
        422,
        "needs temperature > 0",
    ),
    (
        "score without completion",
        "post",
        "/v1/jobs",
        {"json": with_(kind="score")},
        422,
        "completion",
    ),
    (
        "hidden layer the server does not capture",
        "post",
        "/v1/jobs",
        {"json": with_(capture={"hidden_layers": [3]})},
        422,
        "capture.hidden_layers",
    ),
    (
        "path traversal in the job name",
        "post",
        "/v1/jobs",
        {"json": with_(name="../../etc/passwd")},
        422,
        "name",
    ),
    (
        "bad label key",
        "post",
        "/v1/jobs",
        {"json": with_(prompts=[{"prompt": "a", "labels": {"../x": 1}}])},
        422,
        "label key",
    ),
    ("unknown model", "post", "/v1/jobs", {"json": with_(model="gpt-17")}, 404, "Model not found"),
    (
        "oversize body",
        "post",
        "/v1/jobs",
        {"content": b"x" * (9 * 2**20), "headers": {"content-type": "application/json"}},
        413,
        "request body too large",
    ),
    ("unknown job", "get", "/v1/jobs/doesnotexist", {}, 404, "Job not found"),
    ("cancel unknown job", "delete", "/v1/jobs/doesnotexist", {}, 404, "Job not found"),
    ("negative page offset", "get", "/v1/jobs", {"params": {"offset": -1}}, 422, "offset"),
    (
        "missing token",
        "post",
        "/v1/jobs",
        {"json": GOOD, "headers": {"Authorization": ""}},
        401,
        "bearer token",
    ),
    (
        "wrong token",
        "get",
        "/v1/jobs",
        {"headers": {"Authorization": "Bearer nope"}},
        401,
        "bearer token",
    ),
    (
        "upload with a bad line",
        "post",
        "/v1/files",
        {"content": b'{"prompt": "a"}\n{"prompt": 3}\n'},
        422,
        "line 2: prompt",
    ),
    ("upload that is not JSONL", "post", "/v1/files", {"content": b"hello"}, 422, "line 1"),
    ("empty upload", "post", "/v1/files", {"content": b"\n"}, 422, "no prompts"),
    (
        "oversize upload",
        "post",
        "/v1/files",
        {"content": b"x" * (UPLOAD_LIMIT + 1)},
        413,
        "request body too large",
    ),
    (
        "unknown prompts file",
        "post",
        "/v1/jobs",
        {"json": without_prompts(prompts_file="file-0123456789abcdef")},
        422,
        "prompts_file",
    ),
    (
        "chunked oversize upload",
        "post",
        "/v1/files",
        {"content": chunked(UPLOAD_LIMIT + 2**16)},
        413,
        "request body too large",
    ),
    (
        "chunked oversize job body",
        "post",
        "/v1/jobs",
        {"content": chunked(9 * 2**20), "headers": {"content-type": "application/json"}},
        413,
        "request body too large",
    ),
    (
        "page offset past 64 bits",
        "get",
        "/v1/jobs",
        {"params": {"offset": 2**63}},
        422,
        "offset",
    ),
    (
        "sequences offset past 64 bits",
        "get",
        "/v1/jobs/doesnotexist/sequences",
        {"params": {"offset": 2**63}},
        422,
        "offset",
    ),
    ("seed of 2**64", "post", "/v1/jobs", {"json": with_(sampling={"seed": 2**64})}, 422, "seed"),
    (
        "temperature NaN",
        "post",
        "/v1/jobs",
        {
            "content": b'{"kind": "rollout", "model": "qwen3_moe", "prompts": [{"prompt": "a"}],'
            b' "sampling": {"temperature": NaN}}',
            "headers": {"content-type": "application/json"},
        },
        422,
        "finite number",
    ),
    (
        "top_p Infinity (OpenAI route)",
        "post",
        "/v1/completions",
        {
            "content": b'{"model": "qwen3_moe", "prompt": "a", "top_p": Infinity}',
            "headers": {"content-type": "application/json"},
        },
        422,
        "finite number",
    ),
    (
        "token id past the vocabulary (OpenAI route)",
        "post",
        "/v1/completions",
        {"json": {"model": "qwen3_moe", "prompt": [5, 10**6], "max_tokens": 2}},
        400,
        "prompt: token id 1000000 is not in the vocabulary",
    ),
    (
        "negative token id (OpenAI route)",
        "post",
        "/v1/completions",
        {"json": {"model": "qwen3_moe", "prompt": [5, -3], "max_tokens": 2}},
        400,
        "token id -3",
    ),
    (
        "token id past the vocabulary (job)",
        "post",
        "/v1/jobs",
        {"json": with_(prompts=[{"prompt_token_ids": [1, 2]}, {"prompt_token_ids": [10**6]}])},
        400,
        "prompts[1].prompt_token_ids: token id 1000000",
    ),
    (
        "lone surrogate in a prompt",
        "post",
        "/v1/jobs",
        {
            "content": b'{"kind": "rollout", "model": "qwen3_moe", "prompts": '
            b'[{"prompt": "a \\ud800 b"}]}',
            "headers": {"content-type": "application/json"},
        },
        422,
        "not valid Unicode",
    ),
    (
        "lone surrogate in chat content",
        "post",
        "/v1/chat/completions",
        {
            "content": b'{"model": "qwen3_moe", "messages": [{"role": "user", '
            b'"content": "x \\udc00"}]}',
            "headers": {"content-type": "application/json"},
        },
        422,
        "not valid Unicode",
    ),
    (
        "label integer past 64 bits",
        "post",
        "/v1/jobs",
        {"json": with_(prompts=[{"prompt": "a", "labels": {"big": 2**70}}])},
        422,
        "labels.big",
    ),
    (
        "upload nested 100k deep",
        "post",
        "/v1/files",
        {"content": b"[" * 100_000 + b"]" * 100_000 + b"\n"},
        422,
        "nested too deeply",
    ),
    (
        "prompts and prompts_file both",
        "post",
        "/v1/jobs",
        {"json": with_(prompts_file="file-0123456789abcdef")},
        422,
        "exactly one of prompts or prompts_file",
    ),
]


@pytest.mark.parametrize(
    ("name", "method", "path", "kwargs", "status", "text"), CASES, ids=[c[0] for c in CASES]
)
def test_bad_input(server, name, method, path, kwargs, status, text):
    files = server.data_dir / "files"
    before = server.client.get("/v1/jobs").json()["count"], sorted(files.glob("*"))
    response = getattr(server.client, method)(path, **kwargs)
    assert response.status_code == status, response.text
    assert text in response.text
    after = server.client.get("/v1/jobs").json()["count"], sorted(files.glob("*"))
    assert after == before, "nothing was created"


def test_validation_errors_do_not_echo_the_input(server):
    big = with_(prompts=[{"prompt": "x" * 1000}] * 2000, sampling={"n": "two"})
    response = server.client.post("/v1/jobs", json=big)
    assert response.status_code == 422
    assert len(response.content) < 2000 and "sampling" in response.text


def test_too_long_prompt_fails_that_sequence_only(server):
    long_prompt = " ".join(["the bank raised interest rates"] * 200)
    body = with_(prompts=[{"prompt": "the king"}, {"prompt": long_prompt}])
    job = server.wait_job(server.client.post("/v1/jobs", json=body).json()["id"])
    assert job["state"] == "done"
    assert job["sequences_done"] == 1 and job["sequences_failed"] == 1
    assert any(e.startswith("prompt 1:") for e in job["errors"])


def test_openapi_documents_the_jobs_api(server):
    spec = server.client.get("/openapi.json").json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/sequences"} <= set(spec["paths"])
    schemes = spec["components"]["securitySchemes"]
    assert [s["scheme"] for s in schemes.values()] == ["bearer"]
    create = spec["paths"]["/v1/jobs"]["post"]
    assert {"400", "401", "404", "413", "422", "500"} <= set(create["responses"])
    assert create["security"]
    metrics = spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain; version=0.0.4"]


def test_metrics_and_api_docs_need_the_token(server):
    for path in ("/metrics", "/openapi.json", "/docs"):
        assert httpx.get(f"{server.url}{path}").status_code == 401, path
        assert server.client.get(path).status_code == 200, path
    assert httpx.get(f"{server.url}/healthz").status_code == 200  # probes stay open
