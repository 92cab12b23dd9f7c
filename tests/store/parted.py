"""Synthetic writers of parted stores: a data-parallel rank writes its own sequences, a
pipeline stage its own layers of every sequence (`synthetic`'s rows, split)."""

from __future__ import annotations

import dataclasses

from capture_server.capture.records import ModelMeta, RoutingRows
from capture_server.store import StoreOptions
from capture_server.store.parts import PartId
from capture_server.store.sink import StoreSink
from tests.store import synthetic

HIDDEN = (0, 2)  # MoE layers whose router inputs are kept: one in each stage of a 2-way split
STAGES = {1: [range(0, 3)], 2: [range(0, 2), range(2, 3)]}  # pp_size -> MoE layers per stage
FULL_OPTIONS = dataclasses.replace(synthetic.EXACT, hidden_layers=HIDDEN)


def stage_layers(part: PartId) -> range:
    return STAGES[part.pp_size][part.pp_stage]


def stage_options(part: PartId) -> StoreOptions:
    layers = stage_layers(part)
    local = tuple(h - layers.start for h in HIDDEN if h in layers)
    return dataclasses.replace(synthetic.EXACT, hidden_layers=local)


def stage_meta(part: PartId) -> ModelMeta:
    full, layers = synthetic.meta(), stage_layers(part)
    return dataclasses.replace(
        full,
        moe_layers=full.moe_layers[layers.start : layers.stop],
        router_weights=full.router_weights[layers.start : layers.stop],
    )


def stage_rows(rows: RoutingRows, part: PartId) -> RoutingRows:
    """The rows as the stage's worker captures them: its layers, its hidden states."""
    layers = stage_layers(part)
    cut = slice(layers.start, layers.stop)
    assert rows.router_logits is not None
    return dataclasses.replace(
        rows,
        topk_ids=rows.topk_ids[:, cut],
        topk_weights=rows.topk_weights[:, cut],
        router_logits=rows.router_logits[:, cut],
        hidden_states={h - layers.start: v for h, v in rows.hidden_states.items() if h in layers},
    )


def full_rows(key: str) -> RoutingRows:
    return synthetic.sequence_rows(key, synthetic.length_of(key), HIDDEN)


def write_part(url: str, part: PartId, keys: list[str], pause: float = 0.0) -> StoreSink:
    """Stream `keys` into `part` of the store at `url` like a continuous batch would."""
    import time

    sink = StoreSink(url, stage_options(part), flush_interval=0.02, part=part)
    sink.open(stage_meta(part))
    for start in range(0, len(keys), 8):
        batch = keys[start : start + 8]
        steps = synthetic.interleaved_steps(batch)
        for kind, item in steps:
            if kind == "rows":
                rows = RoutingRows.concat([full_rows(k).slice(a, b) for k, a, b in _segments(item)])
                sink.write(stage_rows(rows, part))
                time.sleep(pause)
            else:
                sink.end_sequence(item)
    sink.close()
    return sink


def _segments(rows: RoutingRows) -> list[tuple[str, int, int]]:
    """(key, first position, stop) of each sequence's run in a step of synthetic rows."""
    keys, bounds = rows.segments()
    return [
        (key, int(rows.positions[a]), int(rows.positions[b - 1]) + 1)
        for (key, _), a, b in zip(keys, bounds[:-1], bounds[1:], strict=True)
    ]
