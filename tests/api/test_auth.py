"""Which routes need the token, checked on the app itself (no engine is started: the
routes below do not use one)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from capture_server.api.app import create_app
from capture_server.api.config import Settings


def _client(tmp_path, **settings) -> TestClient:
    app = create_app(Settings(data_dir=tmp_path, token="secret", models=["/m/x"], **settings))
    return TestClient(app)  # not entered: the lifespan (engines) does not run


def test_metrics_are_public_only_when_asked(tmp_path):
    closed = _client(tmp_path)
    assert closed.get("/metrics").status_code == 401
    assert closed.get("/metrics", headers={"Authorization": "Bearer secret"}).status_code == 200
    opened = _client(tmp_path, public_metrics=True)
    answer = opened.get("/metrics")
    assert answer.status_code == 200 and "moetrace_jobs" in answer.text
    assert opened.get("/openapi.json").status_code == 401  # the docs keep the token
    assert opened.get("/v1/jobs").status_code == 401


def test_a_wrong_scheme_or_token_is_refused(tmp_path):
    client = _client(tmp_path)
    for header in ("Basic secret", "Bearer nope", "Bearer", "secret"):
        answer = client.get("/v1/jobs", headers={"Authorization": header})
        assert answer.status_code == 401, header
        assert answer.headers["www-authenticate"] == "Bearer"


def test_bodies_that_are_not_json_get_422_like_malformed_json(tmp_path):
    client = _client(tmp_path)
    headers = {"Authorization": "Bearer secret", "content-type": "application/json"}
    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"kind": "\xff\xfe"}', b"{not json"):
        answer = client.post("/v1/jobs", content=body, headers=headers)
        assert answer.status_code == 422, (body[:20], answer.text)
        assert answer.json()["detail"][0]["loc"][0] == "body"


def test_readyz_reports_an_unusable_data_dir(tmp_path):
    import shutil

    data = tmp_path / "data"
    data.mkdir()
    client = _client(data)
    assert client.get("/readyz").json()["detail"] == "Engines not ready"  # writable
    shutil.rmtree(data)
    data.write_text("not a directory")  # the data dir is gone: nothing can be written
    answer = client.get("/readyz")
    assert answer.status_code == 503 and "is not writable" in answer.json()["detail"]
