"""Every read of a store the analyzer makes: the rows of a map task's block, and the
geometry sample. Map tasks keep a store open across blocks."""

from __future__ import annotations

import numpy as np

from capture_server import protocol
from capture_server.store import RoutingStore, open_store

GEOMETRY_SAMPLE_TOKENS = 1024  # first rows of a store the geometry analysis reads


def arrays_to_read(store: RoutingStore, arrays: tuple[str, ...] | None) -> tuple[str, ...]:
    """Expert ids and positions, plus the store's arrays named in `arrays` (by name or
    prefix: ``hidden_states`` means every ``hidden_states_<layer>``; None: all)."""
    fixed = (protocol.TOPK_IDS, protocol.POSITIONS)
    extra = [n for n in store.array_names if n not in (*fixed, protocol.TOKEN_IDS)]
    if arrays is not None:
        extra = [n for n in extra if n in arrays or _family(n) in arrays]
    return (*fixed, *extra)


def _family(name: str) -> str:
    """``hidden_states`` for every hidden-state array, else the name itself."""
    return protocol.HIDDEN_PREFIX if protocol.hidden_layer_of(name) is not None else name


_opened: dict[tuple[str, float], RoutingStore] = {}


def _open_for_rows(url: str, stop: int, created_at: float | None) -> RoutingStore:
    """The store at `url`, opened once per process and store (`created_at`: its creation
    time as the driver read it; a store made anew at the same URL is opened anew) while
    its arrays cover row `stop` (a store being written grows)."""
    if created_at is None:
        return open_store(url, read_index=False)
    store = _opened.get((url, created_at))
    if store is None or store.array_rows < stop:
        store = _opened[url, created_at] = open_store(url, read_index=False)
    return store


def read_block(
    url: str,
    start: int,
    stop: int,
    sequences: list[dict],
    arrays: tuple[str, ...] | None = None,
    created_at: float | None = None,
) -> tuple[RoutingStore, dict[str, np.ndarray], np.ndarray]:
    """The store, the rows of the block's `sequences` (stored in ``[start, stop)``) of
    ids, positions and `arrays` (see `arrays_to_read`), and each sequence's first row in
    them (`RoutingStore.read_sequences`: prompt rows stored once for several samples are
    joined back, so every sample counts its prompt). `created_at` (the store's) lets a
    process keep it open."""
    store = _open_for_rows(url, stop, created_at)
    rows, first = store.read_sequences(sequences, start, stop, arrays_to_read(store, arrays))
    return store, rows, first


def geometry_sample(
    store: RoutingStore, tokens: int = GEOMETRY_SAMPLE_TOKENS
) -> dict[str, np.ndarray]:
    """The first `tokens` rows of the arrays the geometry analysis reads: expert ids,
    token ids, router logits (when stored) and every captured router input."""
    hidden = [n for n in store.array_names if protocol.hidden_layer_of(n) is not None]
    names = (protocol.TOPK_IDS, protocol.TOKEN_IDS, protocol.ROUTER_LOGITS, *hidden)
    return store.read_rows(0, min(tokens, store.num_tokens), names)
