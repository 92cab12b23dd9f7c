"""``moetrace``: serve, the client verbs, analyze, store info|verify, specimen.

Each verb is the command of the part that owns it, mounted here without a wrapper, so
the ``python -m`` forms (``capture_server.api``, ``clients``, ``analyzer``,
``capture_server.store``, ``capture_server.specimens``) keep working and mean the same.
Parts are imported when their verb runs: ``moetrace submit`` loads no vLLM.
"""

from __future__ import annotations

import sys

import typer

from clients.__main__ import app as client_app

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Record MoE routing in vLLM rollouts, store it, and analyse it.",
)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def serve(ctx: typer.Context) -> None:
    """Serve capture jobs over HTTP; any flag beyond the service's is a vLLM engine flag
    (`moetrace serve --help` lists them all)."""
    from capture_server.api.__main__ import serve as run_serve

    raise typer.Exit(run_serve(list(ctx.args)))


for command in client_app.registered_commands:  # submit, status, wait, list, cancel, sequences
    app.registered_commands.append(command)


def _analyzer_app() -> typer.Typer:
    from analyzer.__main__ import app as analyzer_app

    return analyzer_app


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def analyze(ctx: typer.Context) -> None:
    """Analyse routing stores with Ray and write tables, plots and a report (the
    analyzer's `run`; `moetrace analyze --help`)."""
    _run(_analyzer_app(), ["run", *ctx.args], "moetrace analyze")


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def store(ctx: typer.Context) -> None:
    """Inspect routing stores: `moetrace store info PATH`, `moetrace store verify PATH`."""
    from capture_server.store.__main__ import app as store_app

    _run(store_app, list(ctx.args), "moetrace store")


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def specimen(ctx: typer.Context) -> None:
    """Build a tiny MoE checkpoint: `moetrace specimen ARCH OUT_DIR [--planted]`."""
    from capture_server.specimens.__main__ import app as specimen_app

    _run(specimen_app, list(ctx.args), "moetrace specimen")


def _run(part: typer.Typer, args: list[str], prog: str) -> None:
    """Run a part's own command line with `args`, under the name `prog`."""
    command = typer.main.get_command(part)
    try:
        # without standalone mode, click returns the code of a typer.Exit instead
        code = command.main(args=args, prog_name=prog, standalone_mode=False)
    except SystemExit as exc:
        raise typer.Exit(int(exc.code or 0)) from None
    except typer.Exit:
        raise
    except Exception as exc:  # click's usage errors print themselves in standalone mode
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            raise typer.Exit(exc.exit_code) from None
        raise
    if isinstance(code, int) and code:
        raise typer.Exit(code)


def main() -> None:
    sys.exit(app())
