"""Command line for routing stores.

python -m capture_server.store info PATH     summary of a store
python -m capture_server.store verify PATH   read every committed sequence back
"""

from __future__ import annotations

import logging
import sys

import typer

from capture_server.errors import MoetraceError

app = typer.Typer(add_completion=False, help="Inspect and verify moetrace routing stores.")


def _fail(exc: Exception) -> None:
    # zarr's event loop may still hold reads of the failed request; their teardown at
    # exit is noise on top of the one-line error.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    typer.echo(f"{type(exc).__name__}: {exc}", err=True)
    raise typer.Exit(1)


@app.command()
def info(path: str = typer.Argument(..., help="Store directory or URL.")) -> None:
    """Print the model, options and size of a store."""
    from capture_server.store import open_store

    try:
        store = open_store(path)
    except (MoetraceError, OSError) as exc:
        _fail(exc)
    typer.echo(repr(store))
    typer.echo(f"arrays: {', '.join(store.array_names)}")
    typer.echo(f"chunk tokens: {store.chunk_tokens}; options: {store.options}")


@app.command()
def verify(path: str = typer.Argument(..., help="Store directory or URL.")) -> None:
    """Read every committed sequence back; exit 1 on the first unreadable one."""
    from capture_server.store import open_store

    try:
        store = open_store(path)
        for block in store.blocks():
            store.read_rows(block.start, block.stop)
    except (MoetraceError, OSError) as exc:
        _fail(exc)
    typer.echo(f"ok: {len(store.index)} sequences, {store.num_tokens} tokens")


if __name__ == "__main__":
    sys.exit(app())
