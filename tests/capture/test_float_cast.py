"""The plugin's float16 conversion gives numpy's bits, so stores do not depend on which
conversion the writing process had (checked against numpy, an independent
implementation, over a sweep of float32 bit patterns and the edge cases of float16)."""

from __future__ import annotations

import numpy as np
import pytest

from capture_server.plugin.float_cast import SLICE, torch_float16_cast
from capture_server.store import StoreOptions, chunks
from tests.store.test_chunks import _chunk_objects, _write


def _same_bits(got: np.ndarray, want: np.ndarray) -> None:
    both_nan = np.isnan(got) & np.isnan(want)
    differ = (got.view(np.uint16) != want.view(np.uint16)) & ~both_nan
    assert not differ.any(), f"{differ.sum()} values differ, e.g. at {np.flatnonzero(differ)[:5]}"


def test_equals_numpy_over_float32_bit_patterns():
    bits = np.arange(0, 2**32, 509, dtype=np.uint64).astype(np.uint32)  # every exponent
    edges = np.array(
        [65504, 65519.99, 65520, 1e30, 2**-14, 2**-24, 2**-25, 1.5 * 2**-25, 2**-26, 1e-45, 0.0],
        dtype=np.float32,
    )
    special = np.array([np.inf, -np.inf, np.nan], dtype=np.float32)
    values = np.concatenate([bits.view(np.float32), edges, -edges, special])
    got = np.empty(values.shape, np.float16)
    torch_float16_cast(got, values)
    with np.errstate(over="ignore"):
        _same_bits(got, values.astype(np.float16))
    assert len(values) > 4 * SLICE  # several slices, and a partial last one


@pytest.fixture
def torch_cast():
    chunks.use_float16_cast(torch_float16_cast)
    yield
    chunks.use_float16_cast(None)


def test_store_written_with_it_equals_numpy_store(tmp_path, torch_cast):
    """Regression check: the same rows give the same chunk objects with either
    conversion (numpy's path is proven against zarr in tests/store/test_chunks.py)."""
    options = StoreOptions(weights_dtype="float16", hidden_layers=(0,), chunk_tokens=64)
    _write(tmp_path / "torch", options, threads=2)
    chunks.use_float16_cast(None)
    _write(tmp_path / "numpy", options, threads=2)
    for name in ("topk_weights", "router_logits", "hidden_states_0"):
        ours = _chunk_objects(tmp_path / "torch" / name)
        assert ours and ours == _chunk_objects(tmp_path / "numpy" / name), name
