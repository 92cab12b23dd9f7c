"""``python -m capture_server.api serve --model DIR [--model DIR ...] [vLLM engine flags]``
(also ``moetrace serve``).

The service's own flags are parsed here; every other flag is a vLLM engine flag, parsed
by vLLM's own parser (`api.engine_args`), and applies to every model.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _own_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moetrace serve",
        description="Serve capture jobs over HTTP. Unset flags fall back to MOETRACE_* "
        "settings and the --config file; any other flag is a vLLM engine flag (as for "
        "`vllm serve`) applied to every model.",
        add_help=False,
        allow_abbrev=False,  # never take a prefix of a vLLM flag for one of ours
    )
    own = parser.add_argument_group("moetrace service")
    own.add_argument("-h", "--help", action="store_true", help="Show this help and exit.")
    own.add_argument("--model", action="append", help="Checkpoint directory to serve (repeatable).")
    own.add_argument("--config", type=Path, help="TOML file of settings (see Settings).")
    own.add_argument("--data-dir", type=Path, help="Where jobs and stores live.")
    own.add_argument("--host", help="Address to listen on [127.0.0.1].")
    own.add_argument("--port", type=int, help="Port to listen on [8000].")
    own.add_argument(
        "--hidden-layer",
        type=int,
        action="append",
        help="MoE layer whose router inputs engines capture (repeatable).",
    )
    own.add_argument(
        "--interventions",
        action="store_true",
        default=None,
        help="Let jobs mask, keep or zero experts per request (engines hold the tables).",
    )
    own.add_argument(
        "--capture-dtype",
        help="Dtype of captured router logits and hidden states, float32 or float16 "
        "[float32]; float16 is cast on the device, and jobs then keep them in float16.",
    )
    own.add_argument("--token", help="Bearer token to require (or MOETRACE_TOKEN).")
    own.add_argument(
        "--public-metrics",
        action="store_true",
        default=None,
        help="Serve /metrics without the token (the API and its docs keep it).",
    )
    return parser


def help_text() -> str:
    """The service's flags, then vLLM's engine flags."""
    from capture_server.api.engine_args import engine_parser

    engine = engine_parser().format_help().split("\n", 1)[-1]
    return (
        _own_parser().format_help()
        + "\nvLLM engine flags (as for `vllm serve`; vLLM's defaults apply):\n"
        + engine
    )


def serve(argv: list[str]) -> int:
    """Parse `argv`, check every model's engine flags, then serve until stopped."""
    ns, engine_flags = _own_parser().parse_known_args(argv)
    if ns.help:
        print(help_text())
        return 0
    from pydantic import ValidationError

    from capture_server.api.config import load_settings

    try:
        settings = load_settings(
            ns.config,
            models=ns.model,
            data_dir=ns.data_dir,
            host=ns.host,
            port=ns.port,
            hidden_layers=ns.hidden_layer,
            token=ns.token,
            interventions=ns.interventions,
            capture_dtype=ns.capture_dtype,
            public_metrics=ns.public_metrics,
            engine_flags=engine_flags or None,
        )
    except (ValidationError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not settings.models:
        print("error: no model to serve (--model, MOETRACE_MODELS or the config)", file=sys.stderr)
        return 2
    from capture_server.api.runner import Engines

    for path in settings.models:  # a bad engine flag is refused before anything starts
        try:
            Engines(settings).engine_args(path)
        except SystemExit as exc:  # vLLM's parser printed which flag and why
            print(f"error: engine flags of {path} refused by vLLM's parser", file=sys.stderr)
            return int(exc.code or 2)

    import uvicorn

    from capture_server.api.app import create_app
    from capture_server.errors import JobsDatabaseError

    logging.basicConfig(level=logging.INFO)
    try:
        app = create_app(settings)
    except JobsDatabaseError as exc:  # a data dir that takes no writes fails now
        print(f"error: {exc}", file=sys.stderr)
        return 1
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] != "serve":
        print("usage: python -m capture_server.api serve [--help] ...", file=sys.stderr)
        return 2
    return serve(args[1:])


if __name__ == "__main__":
    sys.exit(main())
