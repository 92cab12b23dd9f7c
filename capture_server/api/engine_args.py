"""vLLM engine arguments for the service's engines, as vLLM itself defines them.

Every engine setting is a ``vllm serve`` flag: the service parses them with vLLM's own
parser (`AsyncEngineArgs.add_cli_args`), so ``--tensor-parallel-size 2`` or
``--moe-backend triton`` mean here what they mean there, and vLLM's defaults apply
(compiled, with CUDA graphs on GPU). Settings from the environment or the TOML file
(``engine = {...}``, ``model_engine.<name> = {...}``) are turned into the same flags.

Capture changes one default, only when the flag is not given: on CPU chunked prefill off
(vLLM rewinds a seeded request's generator when its prompt is split across steps, which
a CPU generator cannot do). Prefix caching stays on, vLLM's default: cached prompt
positions get the rows of the forward that computed their KV blocks
(`capture_server.plugin.prefix_rows`).
"""

from __future__ import annotations

import json
from typing import Any

from capture_server.protocol import engine_config


def engine_parser() -> Any:
    """vLLM's parser of engine flags (``vllm serve``'s, without the server's own)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return AsyncEngineArgs.add_cli_args(FlexibleArgumentParser(prog="vllm engine", add_help=False))


def to_argv(settings: dict[str, Any]) -> list[str]:
    """Engine settings as vLLM flags: ``{"tensor_parallel_size": 2, "enforce_eager": True,
    "compilation_config": {"mode": 3}}`` -> ``--tensor-parallel-size 2 --enforce-eager
    --compilation-config '{"mode": 3}'``; False gives ``--no-<flag>``, None nothing."""
    argv: list[str] = []
    for key, value in settings.items():
        flag = "--" + key.strip("-").replace("_", "-")
        if value is None:
            continue
        if value is True:
            argv.append(flag)
        elif value is False:
            argv.append(f"--no-{flag[2:]}")
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        elif isinstance(value, list | tuple):
            argv += [flag, *(str(v) for v in value)]
        else:
            argv += [flag, str(value)]
    return argv


def flag_given(argv: list[str], name: str) -> bool:
    """Whether `argv` sets the boolean flag `name` (``--name``, ``--no-name``, ``_`` or ``-``)."""
    wanted = {f"--{name}", f"--no-{name}"}
    return any(t.split("=", 1)[0].replace("_", "-") in wanted for t in argv)


def build_engine_args(
    model: str,
    argv: list[str],
    hidden_layers: list[int],
    *,
    cpu: bool,
    interventions: bool = False,
    capture_dtype: str = "float32",
) -> Any:
    """`AsyncEngineArgs` for serving `model` with capture on, from vLLM flags `argv`.

    Raises `SystemExit` (vLLM's parser, after printing which flag is wrong) on a bad flag.
    """
    from vllm.engine.arg_utils import AsyncEngineArgs

    namespace = engine_parser().parse_args(["--model", model, *argv])
    args = AsyncEngineArgs.from_cli_args(namespace)
    if cpu and not flag_given(argv, "enable-chunked-prefill"):
        args.enable_chunked_prefill = False
    args.additional_config = {
        **(args.additional_config or {}),
        **engine_config(hidden_layers, interventions=interventions, capture_dtype=capture_dtype),
    }
    return args
