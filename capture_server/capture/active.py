"""The check every engine owner runs after start-up: capture is configured, so every worker
must have a collector. An engine that would record nothing never serves a request."""

from __future__ import annotations

from typing import Any

from capture_server.errors import CaptureError
from capture_server.protocol import workers_without_collector


class CaptureInactiveError(CaptureError):
    """Raised when an engine configured for capture has workers that capture nothing."""


def require_active(stats: list[dict[str, Any]] | BaseException, engine: str) -> None:
    """Raise unless every worker of `engine` reported a collector.

    `stats` is `protocol.stats_rpc`'s per-worker results, or the error it raised (a
    worker without the plugin does not know the method).
    """
    hint = (
        "is the moetrace plugin installed in the engine's environment, and not left out "
        "by VLLM_PLUGINS?"
    )
    if isinstance(stats, BaseException):
        raise CaptureInactiveError(
            f"{engine}: capture is configured but its workers do not answer the capture "
            f"RPCs ({type(stats).__name__}: {stats}); {hint}"
        )
    missing = workers_without_collector(stats)
    if missing or not stats:
        raise CaptureInactiveError(
            f"{engine}: capture is configured but workers {missing} of {len(stats)} have "
            f"no capture collector; {hint}"
        )
