"""Clients of the moetrace capture service: a Python client (sync and async) and a CLI.

Needs httpx, typer and rich only (no vLLM, no torch).
"""

from clients.client import AsyncClient, Client
from clients.errors import MoetraceClientError, MoetraceHTTPError

__all__ = ["AsyncClient", "Client", "MoetraceClientError", "MoetraceHTTPError"]
