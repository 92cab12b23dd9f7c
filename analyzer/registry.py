"""The analyses, one entry each: what it reads, what the fold keeps for it, which tables it
makes (per store and across stores) and what it plots. The pipeline and the report loop
over `ANALYSES`; nothing else names an analysis.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from analyzer import report
from analyzer.fold import StoreFold
from analyzer.params import Params
from analyzer.profiles import SequenceProfile
from analyzer.reads import geometry_sample
from analyzer.tables.alignment import alignment_table
from analyzer.tables.committee import committee_tables
from analyzer.tables.conditions import condition_table
from analyzer.tables.geometry import direction_ablation_table, geometry_tables
from analyzer.tables.rollout import rollout_curve_table, rollout_prediction_table
from analyzer.tables.usage import usage_table
from capture_server import protocol
from capture_server.store import RoutingStore

Table = pl.DataFrame | pl.LazyFrame
Plot = Callable[[pl.DataFrame, Path], list[Path]]


@dataclass(frozen=True)
class StoreTables:
    """What a store's per-store tables are made from, once its map step is done."""

    name: str
    """The store's name in every table (its directory name)."""
    store: RoutingStore
    fold: StoreFold
    whole: list[SequenceProfile]
    """The profiles kept whole, by sequence id."""
    sequences: pl.LazyFrame | None
    """The `sequences` table, from its parts on disk."""

    @property
    def params(self) -> Params:
        return self.fold.params


@dataclass(frozen=True)
class Analysis:
    name: str
    description: str
    reads: tuple[str, ...] = ()
    """Row arrays read besides expert ids and positions (``hidden_states``: every one)."""
    folds: frozenset[str] = frozenset()
    """Fold parts it needs: ``stats`` (the `sequences` table), ``committee`` (sums over
    the last prompt tokens), ``whole`` (whole profiles of a bounded sample)."""
    per_store: Callable[[StoreTables], dict[str, Table]] = lambda ctx: {}
    across: Callable[[dict[str, list[SequenceProfile]], Params], dict[str, Table]] | None = None
    """Tables over several stores, from their whole profiles (None: none)."""
    plots: dict[str, Plot] = field(default_factory=dict)
    """Table name -> plot function (one figure per store or pair)."""


def _sequences(ctx: StoreTables) -> dict[str, Table]:
    return {} if ctx.sequences is None else {"sequences": ctx.sequences}


def _usage(ctx: StoreTables) -> dict[str, Table]:
    assert ctx.fold.usage is not None
    return {**_sequences(ctx), "usage": usage_table(ctx.name, ctx.fold.usage)}


def _rollout(ctx: StoreTables) -> dict[str, Table]:
    return {
        **_sequences(ctx),
        "rollout_curve": rollout_curve_table(ctx.name, ctx.whole, ctx.params),
        "rollout_prediction": rollout_prediction_table(ctx.name, ctx.whole, ctx.params),
    }


def _overlap(ctx: StoreTables) -> dict[str, Table]:
    return {"conditions": condition_table(ctx.name, ctx.whole, ctx.params, ctx.store.model.top_k)}


def _alignment(profiles: dict[str, list[SequenceProfile]], params: Params) -> dict[str, Table]:
    return {"alignment": alignment_table(profiles, params)} if len(profiles) > 1 else {}


def _geometry(ctx: StoreTables) -> dict[str, Table]:
    router = ctx.store.router_weights()
    if "router_weights" not in router:  # no hidden states captured: nothing to relate
        return {}
    sample = geometry_sample(ctx.store)
    weights = router["router_weights"]
    summary, triangle = geometry_tables(sample, weights, ctx.name, ctx.whole, ctx.params)
    ablation = direction_ablation_table(sample, router, ctx.store.model, ctx.name, ctx.params)
    return {"geometry": summary, "triangle": triangle, "direction_ablation": ablation}


def _committee(ctx: StoreTables) -> dict[str, Table]:
    model = ctx.store.model
    return committee_tables(
        ctx.name, ctx.fold.committee, ctx.params, model.top_k, model.num_experts
    )


ANALYSES: dict[str, Analysis] = {
    a.name: a
    for a in (
        Analysis(
            "usage",
            "Expert share of top-k slots per layer (heatmap), load entropy and router "
            "confidence per sequence.",
            reads=(protocol.ROUTER_LOGITS,),
            folds=frozenset({"stats"}),
            per_store=_usage,
            plots={"usage": report.plot_usage_heatmaps},
        ),
        Analysis(
            "rollout",
            "Prompt-vs-rollout usage similarity per sequence; similarity of sample "
            "pairs through growing rollout windows, cumulative and generated-only; "
            "whether pairs alike at the prompt stay alike in the rollout (correlation).",
            folds=frozenset({"stats", "whole"}),
            per_store=_rollout,
            plots={"rollout_curve": report.plot_rollout_curves},
        ),
        Analysis(
            "overlap",
            "Top-p (P=0.8) Jaccard and usage cosine of sequence pairs by label "
            "condition (question / author / seed), with label-shuffle and "
            "random-routing baselines; with several stores, an alignment table pairing "
            "their sequences by labels / prompt index (do the models find the same pairs "
            "alike?).",
            folds=frozenset({"whole"}),
            per_store=_overlap,
            across=_alignment,
            plots={"conditions": report.plot_conditions},
        ),
        Analysis(
            "geometry",
            "Layers with captured router inputs: pooled hidden-state similarity vs usage "
            "similarity, Lipschitz ratio vs the router's operator norm, shared-direction "
            "energy, same-token overlap across contexts; re-routing with the top-K "
            "singular directions of the router inputs removed (E-a3).",
            reads=(protocol.HIDDEN_PREFIX,),
            folds=frozenset({"whole"}),
            per_store=_geometry,
            plots={
                "triangle": report.plot_triangle,
                "direction_ablation": report.plot_direction_ablation,
            },
        ),
        Analysis(
            "committee",
            "Standing committee per layer across `domain` labels: members, coverage, "
            "influence density ratio, Gini, cross-domain Jaccard; experts tied at the "
            "k-th slot per domain, and whether the committee depends on their order.",
            reads=(protocol.TOPK_WEIGHTS, protocol.ROUTER_LOGITS),
            folds=frozenset({"committee"}),
            per_store=_committee,
            plots={"committee": report.plot_committee},
        ),
    )
}


def chosen(names: list[str]) -> list[Analysis]:
    """The analyses named, in registry order; unknown names are refused."""
    unknown = sorted(set(names) - set(ANALYSES))
    if unknown:
        raise ValueError(f"analyses: unknown {unknown}; expected some of {sorted(ANALYSES)}")
    return [a for name, a in ANALYSES.items() if name in names]


def arrays_needed(analyses: list[Analysis]) -> tuple[str, ...]:
    """Row arrays the analyses read besides expert ids and positions; the rest is not
    read at all."""
    return tuple(dict.fromkeys(name for a in analyses for name in a.reads))


def fold_parts(analyses: list[Analysis]) -> frozenset[str]:
    """Fold parts the analyses need together."""
    return frozenset().union(*(a.folds for a in analyses))


def plots(analyses: list[Analysis]) -> dict[str, Plot]:
    """Table name -> plot function of the analyses."""
    return {table: plot for a in analyses for table, plot in a.plots.items()}
