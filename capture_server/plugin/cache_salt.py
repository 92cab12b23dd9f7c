"""Requests with different interventions never share prefix-cache blocks.

An intervention changes the routing, so the hidden states and the KV of every later
layer: a block computed under one intervention is not the block another request needs,
and its slot rows (`prefix_rows`) hold another routing. vLLM keys its prefix cache by
the tokens and `cache_salt` (the first block's hash includes the salt and later blocks
chain from it: `generate_block_hash_extra_keys`, vllm/v1/core/kv_cache_utils.py). So
the engine core salts each intervened request with its intervention's canonical key
when it builds the `Request` (`Request.from_engine_core_request`, vllm/v1/request.py),
before any block hash is taken: requests with equal interventions still share blocks,
plain requests are left as they are.
"""

from __future__ import annotations

from typing import Any

from capture_server.capture.intervention import Intervention
from capture_server.capture.options import CaptureOptions

SALT_PREFIX = "moetrace-intervention:"


def intervention_salt(sampling_params: Any) -> str:
    """The salt of a request's intervention ("" without one)."""
    options = CaptureOptions.from_extra_args(getattr(sampling_params, "extra_args", None))
    if options is None or not options.intervention:
        return ""
    key = Intervention.from_dict(options.intervention).key()
    return f"{SALT_PREFIX}{key}" if key else ""


def salt_intervened_requests(request_cls: type) -> None:
    """Wrap `request_cls.from_engine_core_request` (vLLM's `Request`) to add the
    intervention's salt to the request's own. Re-entrant."""
    current = request_cls.__dict__["from_engine_core_request"]
    if getattr(current.__func__, "_moetrace", False):
        return
    original = current.__func__

    def from_engine_core_request(cls: type, request: Any, *args: Any, **kwargs: Any) -> Any:
        salt = intervention_salt(request.sampling_params)
        if salt:
            request.cache_salt = f"{request.cache_salt or ''}|{salt}"
        return original(cls, request, *args, **kwargs)

    from_engine_core_request._moetrace = True  # type: ignore[attr-defined]
    from_engine_core_request.__doc__ = original.__doc__
    request_cls.from_engine_core_request = classmethod(from_engine_core_request)
