"""Sinks by URL, one per process: the capture opens a request's sink by the URL in its
capture options, and the in-process API reads back what a memory sink received.

``memory://NAME`` is an in-process `MemorySink`; anything else is a routing store path
or URL, written by `capture_server.store.sink.StoreSink`.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from capture_server.capture.sink import MemorySink, RoutingSink
from capture_server.errors import CaptureSettingsError

if TYPE_CHECKING:
    from capture_server.store.parts import PartId

__all__ = ["forget_sink", "memory_sink", "open_sink"]

_registry: dict[str, RoutingSink] = {}
_registry_lock = threading.Lock()


def memory_sink(name: str) -> MemorySink:
    """The process-wide memory sink called `name` (created on first use)."""
    sink = open_sink(f"memory://{name}")
    assert isinstance(sink, MemorySink)
    return sink


def forget_sink(url: str) -> None:
    """Drop a closed sink from the registry: the next `open_sink` for `url` makes a new
    one (a store resumes from what it committed)."""
    with _registry_lock:
        _registry.pop(url, None)


def open_sink(
    url: str, store_options: dict[str, Any] | None = None, part: PartId | None = None
) -> RoutingSink:
    """The sink for `url`, created once per process and then shared; a store is created
    with `store_options` (`StoreOptions` fields) when it does not exist yet. With `part`
    (a data-parallel rank's or pipeline stage's writer) the sink writes that part of a
    parted store."""
    with _registry_lock:
        if url not in _registry:
            if url.startswith("memory://"):
                if part is not None:
                    raise CaptureSettingsError(
                        f"{url}: engines with several writers (data or pipeline parallel) "
                        "capture into stores only, one part each; use generate_to_store"
                    )
                _registry[url] = MemorySink()
            else:
                from capture_server.store.format import StoreOptions
                from capture_server.store.sink import StoreSink

                opts = dict(store_options or {})
                if "hidden_layers" in opts:
                    opts["hidden_layers"] = tuple(opts["hidden_layers"])
                _registry[url] = StoreSink(url, StoreOptions(**opts), part=part)
        return _registry[url]
