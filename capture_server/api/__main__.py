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
    model: list[str] = typer.Option(..., help="Checkpoint directory to serve (repeatable)."),
    data_dir: Path = typer.Option(Path("moetrace-data"), help="Where jobs and stores live."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
    hidden_layer: list[int] = typer.Option(
        [], help="MoE layer whose router inputs engines capture (repeatable)."
    ),
    dtype: str = typer.Option("auto", help="Model dtype."),
    max_model_len: int = typer.Option(0, help="Context length (0: the model's)."),
    token: str = typer.Option("", envvar="MOETRACE_TOKEN", help="Bearer token to require."),
) -> None:
    """Serve capture jobs over HTTP."""
    import uvicorn

    from capture_server.api.app import create_app
    from capture_server.api.config import Settings

    logging.basicConfig(level=logging.INFO)
    settings = Settings(
        models=model,
        data_dir=data_dir,
        host=host,
        port=port,
        hidden_layers=hidden_layer,
        dtype=dtype,
        max_model_len=max_model_len or None,
        token=token or None,
    )
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info")


if __name__ == "__main__":
    app()
