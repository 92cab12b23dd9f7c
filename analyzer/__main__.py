"""Command line: ``python -m analyzer run STORE [STORE ...] --out DIR [--analyses ...]``."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, help="Ray-parallel analyses of moetrace routing stores.")


@app.callback()
def main() -> None:
    """Ray-parallel analyses of moetrace routing stores."""


def _integers(name: str, text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"{name}: expected comma-separated integers, got {text!r}") from None


@app.command()
def run(
    stores: list[str] = typer.Argument(
        None, help="Routing store paths or URLs; NAME=PATH names a store (a model, say)."
    ),
    out: Path = typer.Option(
        Path("analysis"), help="Directory for parquet tables, plots and report.html."
    ),
    analyses: str = typer.Option(
        "usage,rollout,overlap,committee,geometry", help="Comma-separated analyses; see --list."
    ),
    top_p: float = typer.Option(0.8, help="Mass of the top-p expert sets."),
    scope: str = typer.Option(
        "cumulative",
        help="Token scope of pairwise overlaps: prompt, generated, cumulative or last_token.",
    ),
    committee_variant: str = typer.Option(
        "frequency_weight", help="Contribution index: softmax, frequency or frequency_weight."
    ),
    max_pairs: int = typer.Option(20000, help="Sequence pairs sampled per store."),
    ablation_directions: str = typer.Option(
        "0,1,2,4,8",
        help="Geometry: numbers of top singular directions of the router inputs removed "
        "before re-routing (comma-separated).",
    ),
    seed: int = typer.Option(
        0, help="Seed of pair samples, bootstrap resamples and chance levels."
    ),
    block_tokens: int = typer.Option(
        0, help="Token rows per Ray task (0: from the store's chunks, at most 4 per task)."
    ),
    address: str = typer.Option(
        None, help="Ray cluster to join ('auto' on a cluster node); default RAY_ADDRESS or local."
    ),
    list_analyses: bool = typer.Option(False, "--list", help="Describe each analysis and exit."),
) -> None:
    """Analyse stores and write tables, plots and an HTML report."""
    from analyzer.registry import ANALYSES

    if list_analyses:
        for name, analysis in ANALYSES.items():
            typer.echo(f"{name:10s} {analysis.description}")
        return
    if not stores:
        typer.echo("UsageError: give at least one store", err=True)
        raise typer.Exit(1)
    from rich.progress import Progress

    from analyzer import pipeline, registry
    from analyzer.params import Params
    from analyzer.report import write_report
    from capture_server.errors import MoetraceError

    try:
        params = Params(
            top_p=top_p,
            scope=scope,
            max_pairs=max_pairs,
            committee_variant=committee_variant,
            ablation_directions=_integers("ablation_directions", ablation_directions),
            seed=seed,
        )
        chosen = [a.strip() for a in analyses.split(",") if a.strip()]
        with Progress(transient=True) as progress:
            tasks: dict[str, int] = {}

            def on_progress(store: str, done: int, total: int) -> None:
                if store not in tasks:
                    tasks[store] = progress.add_task(f"profiling {store}", total=total)
                progress.update(tasks[store], completed=done)

            tables = pipeline.run(
                stores, chosen, out, params, block_tokens or None, on_progress, address
            )
        plots = registry.plots(registry.chosen(chosen))
        settings = {**asdict(params), "analyses": chosen}
        (out / "params.json").write_text(json.dumps({**settings, "stores": stores}, default=str))
        report = write_report(out, tables, settings, stores, plots)
    except (MoetraceError, ValueError, OSError) as exc:
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        typer.echo(f"{type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from None
    for name, path in tables.items():
        typer.echo(f"{name}: {path}")
    typer.echo(f"report: {report}")


@app.command()
def report(
    out: Path = typer.Argument(..., help="Directory of an analysis (`run --out`)."),
) -> None:
    """Write the report again from the tables in OUT, with tables added since the run
    (an intervention experiment's ``interventions.parquet``)."""
    from analyzer import registry
    from analyzer.report import write_report

    tables = {p.stem: p for p in sorted(out.glob("*.parquet"))}
    if not tables:
        typer.echo(f"FileNotFoundError: {out}: no parquet tables; run the analysis first", err=True)
        raise typer.Exit(1)
    params_path = out / "params.json"
    params = json.loads(params_path.read_text()) if params_path.exists() else {}
    stores = params.pop("stores", [])
    plots = registry.plots(registry.chosen(params.get("analyses", list(registry.ANALYSES))))
    typer.echo(f"report: {write_report(out, tables, params, stores, plots)}")


if __name__ == "__main__":
    sys.exit(app())
