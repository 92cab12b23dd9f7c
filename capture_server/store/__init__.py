"""Routing stores: Zarr v3 arrays of per-token routing plus a parquet sequence index.

Layers, bottom up: `format` (layout, options, codecs) and `_raw` (bytes through zarr's
storage layer); `index` (index and annotation parts); `reader` (one writer's store),
`parts` (several writers' parts joined) and `opening` (either); `writer` (one thread)
and `sink` (the writer as a capture sink). Nothing here imports vLLM or torch, and the
readers import no writer.
"""

from capture_server.store.format import FORMAT_VERSION, StoreOptions
from capture_server.store.opening import open_store
from capture_server.store.reader import Block, RoutingStore

__all__ = ["FORMAT_VERSION", "Block", "RoutingStore", "StoreOptions", "open_store"]
