"""Schema fuzzing with a real fuzzer (schemathesis) against the running server's own
OpenAPI document, bounded in examples and time: no 5xx, and every response conforms to
the document (status, body schema, content type). The document lists the served model
names, so generated jobs and completions pass validation and run: the job path is
fuzzed too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.api.conftest import TOKEN

CHECKS = ",".join(
    (
        "not_a_server_error",
        "response_schema_conformance",
        "status_code_conformance",
        "content_type_conformance",
    )
)


@pytest.mark.slow
def test_schema_fuzzing_finds_no_server_error(server, tmp_path):
    spec = tmp_path / "openapi.json"
    spec.write_bytes(server.client.get("/openapi.json").content)
    jobs_before = server.client.get("/v1/jobs").json()["count"]
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "schemathesis"),
            "run",
            str(spec),
            "--url",
            server.url,
            "-H",
            f"Authorization: Bearer {TOKEN}",
            "--max-examples",
            "15",
            "--seed",
            "1",
            "--checks",
            CHECKS,
            "--request-timeout",
            "60",
            "--phases",
            "coverage,fuzzing",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-6000:]
    assert " passed" in result.stdout and "failure" not in result.stdout
    jobs_after = server.client.get("/v1/jobs").json()["count"]
    assert jobs_after > jobs_before, "generated jobs passed validation and ran"
