"""Command line: run one intervention experiment on a checkpoint and write its table.

    python -m capture_server.experiments committee MODEL --analysis DIR --texts texts.jsonl
    python -m capture_server.experiments pruning MODEL --usage-text "..." --keep 4 --depths 1,2

``texts.jsonl`` holds ``{"prompt": ..., "completion": ...}`` lines; ``--items`` takes
``{"prompt": ..., "options": [...], "answer": i}`` lines for choice accuracy. The table
goes to ``--out`` (default: ``interventions.parquet`` in the analysis directory, where
``python -m analyzer report`` shows it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, help="Intervention experiments with random controls.")


def _jsonl(path: Path, fields: tuple[str, ...]) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object")
        missing = [f for f in fields if f not in row]
        if missing:
            raise ValueError(f"{path}:{number}: missing field {missing[0]!r}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no lines")
    return rows


def _inputs(texts: Path, items: Path | None) -> tuple[list[tuple[str, str]], list]:
    from capture_server.experiments import ChoiceItem

    pairs = [(r["prompt"], r["completion"]) for r in _jsonl(texts, ("prompt", "completion"))]
    choice = []
    if items is not None:
        for r in _jsonl(items, ("prompt", "options", "answer")):
            if not 0 <= int(r["answer"]) < len(r["options"]):
                raise ValueError(f"{items}: answer {r['answer']} is not an option index")
            choice.append(ChoiceItem(r["prompt"], tuple(r["options"]), int(r["answer"])))
    return pairs, choice


def _engine(model: str, engine_args: str):  # noqa: ANN202 - a CaptureEngine (loads vLLM late)
    try:
        kwargs = json.loads(engine_args)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--engine-args: not JSON ({exc.msg})") from None
    if not isinstance(kwargs, dict):
        raise ValueError("--engine-args: expected a JSON object of vLLM engine arguments")
    from capture_server.capture.api import CaptureEngine

    return CaptureEngine(model, interventions=True, **kwargs)


ENGINE_ARGS = typer.Option(
    "{}",
    help='vLLM engine arguments as JSON, e.g. \'{"dtype": "float32", "enforce_eager": true}\'.',
)


def _run(call) -> None:  # noqa: ANN001 - a closure returning (table, out path)
    from capture_server.errors import MoetraceError

    try:
        table, out = call()
    except (MoetraceError, ValueError, OSError) as exc:
        typer.echo(f"{type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    table.write_parquet(out)
    typer.echo(
        table.select("layer", "depth", "condition", "part", "change", "change_lo", "change_hi")
    )
    typer.echo(f"table: {out}")


@app.command()
def committee(
    model: str = typer.Argument(..., help="Checkpoint directory."),
    analysis: Path = typer.Option(..., help="Analyzer output with committee and usage tables."),
    texts: Path = typer.Option(..., help="JSONL of prompt/completion texts to score."),
    store: str = typer.Option(None, help="Store name in the analysis (needed if several)."),
    kind: str = typer.Option("zero", help="zero (CommitteeAudit) or mask."),
    seeds: int = typer.Option(3, help="Random control draws per layer."),
    items: Path = typer.Option(None, help="JSONL of multiple-choice items."),
    out: Path = typer.Option(
        None, help="Output parquet (default: ANALYSIS/interventions.parquet)."
    ),
    engine_args: str = ENGINE_ARGS,
) -> None:
    """Remove the standing committee at one layer at a time, against matched random controls."""

    def call():  # noqa: ANN202
        from capture_server.experiments import (
            committee_from_analysis,
            committee_masking,
            usage_from_analysis,
        )

        members = committee_from_analysis(analysis, store)
        usage = usage_from_analysis(analysis, store)
        pairs, choice = _inputs(texts, items)
        engine = _engine(model, engine_args)
        try:
            table = committee_masking(
                engine, pairs, members, usage, kind=kind, seeds=seeds, items=choice
            )
        finally:
            engine.close()
        return table, out or analysis / "interventions.parquet"

    _run(call)


@app.command()
def pruning(
    model: str = typer.Argument(..., help="Checkpoint directory."),
    texts: Path = typer.Option(..., help="JSONL of prompt/completion texts to score."),
    usage_text: str = typer.Option(..., help="Text whose expert usage picks the kept experts."),
    keep: int = typer.Option(..., help="Experts kept per pruned layer."),
    depths: str = typer.Option("1,2", help="Comma-separated numbers of last layers pruned."),
    seeds: int = typer.Option(3, help="Random control draws."),
    items: Path = typer.Option(None, help="JSONL of multiple-choice items."),
    out: Path = typer.Option(Path("pruning.parquet"), help="Output parquet."),
    engine_args: str = ENGINE_ARGS,
) -> None:
    """Keep the most-used experts in the last k layers, against random kept sets."""

    def call():  # noqa: ANN202
        from capture_server.experiments import pruning_sweep, usage_of_text

        try:
            sweep = [int(d) for d in depths.split(",") if d.strip()]
        except ValueError:
            raise ValueError(
                f"--depths: expected comma-separated integers, got {depths!r}"
            ) from None
        pairs, choice = _inputs(texts, items)
        engine = _engine(model, engine_args)
        try:
            usage = usage_of_text(engine, usage_text)
            table = pruning_sweep(
                engine, pairs, usage, keep=keep, depths=sweep, seeds=seeds, items=choice
            )
        finally:
            engine.close()
        return table, out

    _run(call)


if __name__ == "__main__":
    sys.exit(app())
