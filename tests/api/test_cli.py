"""The command line against a real server."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from clients.__main__ import app
from tests.api.conftest import TOKEN

runner = CliRunner()


def _args(server, *args: str) -> list[str]:
    return [*args, "--url", server.url, "--token", TOKEN]


def test_submit_wait_status_list_sequences(server, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "\n".join(
            json.dumps({"prompt": f"the king {i}", "labels": {"question": i}}) for i in range(6)
        )
    )
    done = runner.invoke(
        app,
        _args(
            server,
            "submit",
            "--model",
            "qwen3_moe",
            "--prompts",
            str(prompts),
            "--n",
            "2",
            "--max-tokens",
            "5",
            "--wait",
        ),
    )
    assert done.exit_code == 0, done.output
    job_id = done.output.splitlines()[0]
    record = json.loads(done.output[done.output.index("{") :])
    assert record["state"] == "done" and record["sequences_done"] == 12
    status = runner.invoke(app, _args(server, "status", job_id))
    assert json.loads(status.output)["id"] == job_id
    listed = runner.invoke(app, _args(server, "list"))
    assert job_id in listed.output
    rows = runner.invoke(app, _args(server, "sequences", job_id, "--limit", "3"))
    assert rows.exit_code == 0 and len(rows.output.splitlines()) == 3


def test_bad_jsonl_is_a_usage_error(server, tmp_path):
    prompts = tmp_path / "bad.jsonl"
    prompts.write_text('{"prompt": "ok"}\n{not json\n')
    result = runner.invoke(
        app,
        _args(server, "submit", "--model", "qwen3_moe", "--prompts", str(prompts)),
        env={"COLUMNS": "2000"},  # the usage-error panel must not wrap the message
    )
    assert result.exit_code == 2 and "bad.jsonl:2: not valid JSON" in result.output


def test_service_errors_print_one_line_and_exit_1(server, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "ok"}\n')
    result = runner.invoke(
        app, _args(server, "submit", "--model", "nope", "--prompts", str(prompts))
    )
    assert result.exit_code == 1
    assert (
        "MoetraceHTTPError: 404 Not Found" in result.output and "Model not found" in result.output
    )
    wrong = runner.invoke(app, ["status", "x", "--url", server.url, "--token", "bad"])
    assert wrong.exit_code == 1 and "401" in wrong.output


def test_submit_an_uploaded_file(server, tmp_path):
    from capture_server.store import open_store

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "\n".join(json.dumps({"prompt": f"a fish {i}", "labels": {"q": i}}) for i in range(5))
    )
    args = ["submit", "--model", "qwen3_moe", "--prompts", str(prompts), "--upload"]
    done = runner.invoke(app, _args(server, *args, "--max-tokens", "3", "--wait"))
    assert done.exit_code == 0, done.output
    record = json.loads(done.output[done.output.index("{") :])
    index = open_store(record["store"]).index.sort("prompt_index")
    assert index["label_q"].to_list() == list(range(5))
    assert index["generated_len"].to_list() == [3] * 5

    prompts.write_text('{"prompt": "ok"}\n{"prompt": ""}\n')
    refused = runner.invoke(app, _args(server, *args))
    assert refused.exit_code == 1 and "line 2" in refused.output
