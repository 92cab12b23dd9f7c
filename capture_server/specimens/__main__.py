"""Command line: ``python -m capture_server.specimens ARCH OUT_DIR [--planted] [--seed N]``."""

from __future__ import annotations

import typer

from capture_server.specimens.build import ARCHITECTURES, build_specimen

app = typer.Typer(add_completion=False)


@app.command()
def main(
    arch: str = typer.Argument(..., help=f"Architecture, one of: {', '.join(ARCHITECTURES)}."),
    out_dir: str = typer.Argument(..., help="Directory to write the checkpoint into."),
    planted: bool = typer.Option(False, help="Build the planted-routing variant (qwen3_moe)."),
    seed: int = typer.Option(0, help="Seed of the random weights."),
) -> None:
    """Build a tiny MoE checkpoint that vLLM and transformers both load."""
    if arch not in ARCHITECTURES:
        typer.echo(f"ValueError: unknown architecture {arch!r}", err=True)
        raise typer.Exit(1)
    path = build_specimen(arch, out_dir, seed=seed, planted=planted)
    typer.echo(str(path))


if __name__ == "__main__":
    app()
