"""Expert usage per layer over a whole store (paper (a) A1)."""

from __future__ import annotations

import numpy as np
import polars as pl

from analyzer.tables.common import frequencies


def usage_table(store: str, total: np.ndarray) -> pl.DataFrame:
    """Share of top-k slots taken by each expert, per layer, over all rows (`total`:
    the (layers, experts) counts summed over every sequence)."""
    share = frequencies(total.astype(np.float64))
    layers, experts = share.shape
    return pl.DataFrame(
        {
            "store": store,
            "layer": np.repeat(np.arange(layers), experts),
            "expert": np.tile(np.arange(experts), layers),
            "share": share.ravel(),
        }
    ).with_columns(pl.col("layer").cast(pl.Int32), pl.col("expert").cast(pl.Int32))
