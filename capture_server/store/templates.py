"""A new store's arrays, created from metadata documents made once per array shape.

Creating an array through zarr's group API costs milliseconds per array (several round
trips through zarr's event loop, and a listing of the array's prefix to overwrite it):
most of the time a small job spends creating its store. A store's arrays differ from
job to job only in their shapes, dtypes and codecs, so the document zarr writes for each
is made once (`array_document`, on an in-memory store, by zarr itself) and written
as bytes, all of a store's at once; the `zarr.Array` handles are built on those same
documents without reading them back.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.core.array import AsyncArray
from zarr.core.buffer import default_buffer_prototype
from zarr.core.metadata import ArrayV3Metadata
from zarr.core.sync import sync
from zarr.storage import MemoryStore, StorePath

from capture_server.store import _raw
from capture_server.store.format import COMPRESSORS

ArraySpec = tuple[tuple[int, ...], tuple[int, ...], str]
"""(shape, chunk shape, dtype name) of one array."""


@functools.lru_cache(maxsize=256)
def array_document(spec: ArraySpec, compressor: str) -> bytes:
    """The ``zarr.json`` zarr writes for an array of `spec` and `compressor` (zero fill,
    chunk objects named ``c.<i>.<j>``, side by side: one new file per chunk)."""
    shape, chunks, dtype_name = spec
    dtype = np.dtype(dtype_name)
    scratch = MemoryStore()
    zarr.create_array(
        scratch,
        name="a",
        shape=shape,
        chunks=chunks,
        dtype=dtype,
        compressors=COMPRESSORS[compressor](dtype.itemsize),
        fill_value=0,
        chunk_key_encoding={"name": "default", "separator": "."},
    )
    document = sync(scratch.get("a/zarr.json", prototype=default_buffer_prototype()))
    assert document is not None
    return document.to_bytes()


def create_arrays(
    store: Store, specs: dict[str, ArraySpec], compressor: str
) -> dict[str, zarr.Array]:
    """Write the arrays' documents (`_raw.set_many`) and return handles on them."""
    _raw.set_many(
        store,
        {f"{name}/zarr.json": array_document(spec, compressor) for name, spec in specs.items()},
    )
    return {
        name: zarr.Array(AsyncArray(array_metadata(spec, compressor), StorePath(store, name)))
        for name, spec in specs.items()
    }


@functools.lru_cache(maxsize=256)
def array_metadata(spec: ArraySpec, compressor: str) -> ArrayV3Metadata:
    """`array_document` parsed (immutable: one object serves every store's handle)."""
    return ArrayV3Metadata.from_dict(json.loads(array_document(spec, compressor)))
