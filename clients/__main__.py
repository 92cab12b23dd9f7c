"""``moetrace`` command line: submit, status, wait, list, cancel, sequences.

python -m clients submit --model moe --prompts prompts.jsonl --n 4 --wait
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

from clients.client import Client
from clients.errors import MoetraceClientError

app = typer.Typer(add_completion=False, help="Drive the moetrace capture service.")
URL = typer.Option(
    "http://127.0.0.1:8000", envvar="MOETRACE_URL", help="Base URL of the capture service."
)
TOKEN = typer.Option(None, envvar="MOETRACE_TOKEN", help="Bearer token of the service.")


def _fail(exc: Exception) -> None:
    typer.echo(f"{type(exc).__name__}: {exc}", err=True)
    raise typer.Exit(1)


def _read_prompts(path: Path) -> list[dict[str, Any]]:
    """JSONL: one object per line with `prompt` (or `messages`), optional `labels`."""
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise typer.BadParameter(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(item, dict):
            raise typer.BadParameter(f"{path}:{number}: expected a JSON object")
        prompts.append(item)
    if not prompts:
        raise typer.BadParameter(f"{path}: no prompts")
    return prompts


def _wait_with_progress(client: Client, job: dict[str, Any]) -> dict[str, Any]:
    from rich.console import Console
    from rich.progress import Progress

    # progress on stderr, so stdout stays the job id and record for scripts
    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(f"job {job['id']}", total=job["sequences_total"])

        def update(j: dict[str, Any]) -> None:
            progress.update(
                task,
                completed=j["sequences_done"] + j["sequences_failed"],
                description=f"job {j['id']} {j['state']} {j['tokens_per_s']:.0f} tok/s",
            )

        return client.wait(job["id"], on_progress=update)


@app.command()
def submit(
    model: str = typer.Option(..., help="Served model name."),
    prompts: Path = typer.Option(
        ..., exists=True, dir_okay=False, help="JSONL file of prompts (one JSON object per line)."
    ),
    kind: str = typer.Option("rollout", help="rollout (generate) or score (teacher-force)."),
    n: int = typer.Option(1, help="Samples per prompt."),
    max_tokens: int = typer.Option(64, help="Tokens to generate per sample."),
    temperature: float = typer.Option(1.0, help="Sampling temperature."),
    wait: bool = typer.Option(False, help="Wait for the job with a progress bar."),
    upload: bool = typer.Option(
        False, help="Upload the file (streamed, checked by the server) instead of inlining it."
    ),
    url: str = URL,
    token: str | None = TOKEN,
) -> None:
    """Submit a job from a JSONL file of prompts; print the job id."""
    body: dict[str, Any] = {
        "kind": kind,
        "model": model,
        "sampling": {"n": n, "max_tokens": max_tokens, "temperature": temperature},
    }
    if not upload:
        body["prompts"] = _read_prompts(prompts)
    try:
        with Client(url, token) as client:
            if upload:
                body["prompts_file"] = client.upload(prompts)["id"]
            job = client.submit(body)
            typer.echo(job["id"])
            if wait:
                job = _wait_with_progress(client, job)
                typer.echo(json.dumps(job, indent=2))
                if job["state"] != "done":
                    raise typer.Exit(1)
    except (MoetraceClientError, OSError) as exc:
        _fail(exc)


@app.command()
def status(job_id: str, url: str = URL, token: str | None = TOKEN) -> None:
    """Print a job's record."""
    try:
        with Client(url, token) as client:
            typer.echo(json.dumps(client.status(job_id), indent=2))
    except (MoetraceClientError, OSError) as exc:
        _fail(exc)


@app.command("wait")
def wait_cmd(job_id: str, url: str = URL, token: str | None = TOKEN) -> None:
    """Wait for a job with a progress bar; exit 1 unless it ends done."""
    try:
        with Client(url, token) as client:
            job = _wait_with_progress(client, client.status(job_id))
    except (MoetraceClientError, OSError) as exc:
        _fail(exc)
    typer.echo(json.dumps(job, indent=2))
    if job["state"] != "done":
        raise typer.Exit(1)


@app.command("list")
def list_cmd(
    limit: int = typer.Option(20, help="Jobs to show."), url: str = URL, token: str | None = TOKEN
) -> None:
    """List jobs, newest first."""
    try:
        with Client(url, token) as client:
            for job in client.list(limit=limit)["data"]:
                typer.echo(
                    f"{job['id']}  {job['state']:9s} {job['kind']:7s} {job['model']}  "
                    f"{job['sequences_done']}/{job['sequences_total']}"
                )
    except (MoetraceClientError, OSError) as exc:
        _fail(exc)


@app.command()
def cancel(job_id: str, url: str = URL, token: str | None = TOKEN) -> None:
    """Cancel a job; committed sequences stay in its store."""
    try:
        with Client(url, token) as client:
            typer.echo(client.cancel(job_id)["state"])
    except (MoetraceClientError, OSError) as exc:
        _fail(exc)


@app.command()
def sequences(
    job_id: str,
    offset: int = typer.Option(0, help="First row."),
    limit: int = typer.Option(20, help="Rows to show."),
    url: str = URL,
    token: str | None = TOKEN,
) -> None:
    """Print committed sequences of a job as JSON lines."""
    try:
        with Client(url, token) as client:
            for row in client.sequences(job_id, offset, limit)["data"]:
                typer.echo(json.dumps(row))
    except (MoetraceClientError, OSError) as exc:
        _fail(exc)


if __name__ == "__main__":
    sys.exit(app())
