"""Routing stores: Zarr v3 arrays of per-token routing plus a parquet sequence index.

The reader side (`open_store`) needs no vLLM and no torch.
"""

from capture_server.store.format import FORMAT_VERSION, StoreOptions
from capture_server.store.reader import Block, RoutingStore, open_store

__all__ = ["FORMAT_VERSION", "Block", "RoutingStore", "StoreOptions", "open_store"]
