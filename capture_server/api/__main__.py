"""``python -m capture_server.api serve --model DIR [--model DIR ...] --data-dir DIR``."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, help="The moetrace capture service.")


@app.callback()
def main() -> None:
    """The moetrace capture service."""


@app.command()
def serve(
    model: list[str] = typer.Option(None, help="Checkpoint directory to serve (repeatable)."),
    config: Path = typer.Option(None, help="TOML file of settings (see Settings)."),
    data_dir: Path = typer.Option(None, help="Where jobs and stores live."),
    host: str = typer.Option(None, help="Address to listen on [127.0.0.1]."),
    port: int = typer.Option(None, help="Port to listen on [8000]."),
    hidden_layer: list[int] = typer.Option(
        None, help="MoE layer whose router inputs engines capture (repeatable)."
    ),
    dtype: str = typer.Option(None, help="Model dtype [auto]."),
    max_model_len: int = typer.Option(None, help="Context length [the model's]."),
    token: str = typer.Option(None, help="Bearer token to require (or MOETRACE_TOKEN)."),
) -> None:
    """Serve capture jobs over HTTP. Unset flags fall back to MOETRACE_* settings."""
    import uvicorn
    from pydantic import ValidationError

    from capture_server.api.app import create_app
    from capture_server.api.config import load_settings

    logging.basicConfig(level=logging.INFO)
    try:
        settings = load_settings(
            config,
            models=model or None,
            data_dir=data_dir,
            host=host,
            port=port,
            hidden_layers=hidden_layer or None,
            dtype=dtype,
            max_model_len=max_model_len,
            token=token,
        )
    except (ValidationError, FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if not settings.models:
        typer.echo("error: no model to serve (--model, MOETRACE_MODELS or the config)", err=True)
        raise typer.Exit(2)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")


if __name__ == "__main__":
    app()
