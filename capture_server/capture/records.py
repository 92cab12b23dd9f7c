"""Host-side records handed to sinks: routing rows of one step, and model metadata."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True)
class ModelSummary:
    """Static facts about the served model's routing, recorded once per store (its
    ``model`` attribute); `ModelMeta` adds the router matrices."""

    architecture: str
    """The checkpoint's `architectures[0]`, e.g. ``Qwen3MoeForCausalLM``."""
    moe_layers: list[int]
    """Decoder block index of each MoE layer, in order (dense blocks are absent)."""
    num_experts: int
    """Routed experts per MoE layer (shared experts excluded)."""
    top_k: int
    """Experts selected per token."""
    scoring_func: str
    """``softmax`` or ``sigmoid``: how logits become gate scores."""
    renormalize: bool
    """Whether the selected top-k weights are renormalised to sum to one."""
    routed_scaling_factor: float
    """Factor on the routed experts' output. The captured top-k weights include it, so
    they are the effective gates the expert outputs are multiplied by."""
    num_shared_experts: int
    """Always-on shared experts per MoE layer (not part of the routing)."""
    hidden_size: int
    """Width of the router input."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSummary:
        """The summary as a store's attributes hold it (`summary`)."""
        return ModelSummary(**{f.name: d[f.name] for f in fields(ModelSummary)})

    def summary(self) -> dict[str, Any]:
        """JSON-able facts without the weight matrices."""
        return {f.name: getattr(self, f.name) for f in fields(ModelSummary)}


@dataclass(frozen=True, slots=True)
class ModelMeta(ModelSummary):
    """The model's routing facts and its router matrices, handed to sinks at open."""

    router_weights: np.ndarray = field(repr=False)
    """(moe_layers, experts, hidden) router matrices, float32."""
    router_bias: np.ndarray | None = field(default=None, repr=False)
    """(moe_layers, experts) logit bias (gpt-oss), or None."""
    correction_bias: np.ndarray | None = field(default=None, repr=False)
    """(moe_layers, experts) selection-only score bias (DeepSeek-V3 noaux_tc), or None."""

    @classmethod
    def synthetic(
        cls,
        moe_layers: list[int],
        num_experts: int,
        top_k: int,
        hidden_size: int,
        router_weights: np.ndarray | None = None,
    ) -> ModelMeta:
        """A softmax top-k model description for synthetic data (benchmarks, tests)."""
        if router_weights is None:
            router_weights = np.zeros((len(moe_layers), num_experts, hidden_size), np.float32)
        return cls(
            architecture="Synthetic",
            moe_layers=list(moe_layers),
            num_experts=num_experts,
            top_k=top_k,
            scoring_func="softmax",
            renormalize=True,
            routed_scaling_factor=1.0,
            num_shared_experts=0,
            hidden_size=hidden_size,
            router_weights=router_weights,
        )


@dataclass(slots=True)
class RoutingRows:
    """Captured rows of one model step for the captured requests in it.

    Rows are token rows; arrays share the first axis. ``L`` is the number of MoE layers.
    """

    request_ids: np.ndarray
    """(rows,) object: the sequence key of each row."""
    sample_index: np.ndarray
    """(rows,) int32: index among the `n` samples of one prompt."""
    positions: np.ndarray
    """(rows,) int64: absolute position in the sequence."""
    token_ids: np.ndarray
    """(rows,) int64: the input token of the row."""
    is_prompt: np.ndarray
    """(rows,) bool: position < prompt length."""
    topk_ids: np.ndarray
    """(rows, L, k) int32, ordered by descending weight then id."""
    topk_weights: np.ndarray
    """(rows, L, k) float32, aligned with `topk_ids`."""
    router_logits: np.ndarray | None = None
    """(rows, L, experts) float32 (float16 from an engine capturing float16), or None
    when no captured request asked for them."""
    hidden_states: dict[int, np.ndarray] = field(default_factory=dict)
    """MoE-layer index -> (rows, hidden) router input, dtype as `router_logits`."""

    def __len__(self) -> int:
        return len(self.positions)

    def segments(self) -> tuple[list[tuple[str, int]], np.ndarray]:
        """Runs of consecutive rows of one sequence: ((key, sample) per run, run boundaries).

        Boundaries have one more entry than runs; run i is rows ``bounds[i]:bounds[i+1]``.
        """
        n = len(self.positions)
        if n == 0:
            return [], np.zeros(1, dtype=np.int64)
        change = (self.request_ids[1:] != self.request_ids[:-1]) | (
            self.sample_index[1:] != self.sample_index[:-1]
        )
        starts = np.concatenate([[0], np.flatnonzero(change) + 1])
        keys = list(
            zip(self.request_ids[starts].tolist(), self.sample_index[starts].tolist(), strict=True)
        )
        return keys, np.append(starts, n)

    def slice(self, start: int, stop: int) -> RoutingRows:
        """Rows ``start:stop`` as views (no copy)."""
        return self.select(slice(start, stop))  # type: ignore[arg-type]

    def select(self, mask: np.ndarray) -> RoutingRows:
        """The rows where `mask` is true (a boolean or index array, or a slice)."""
        return RoutingRows(
            request_ids=self.request_ids[mask],
            sample_index=self.sample_index[mask],
            positions=self.positions[mask],
            token_ids=self.token_ids[mask],
            is_prompt=self.is_prompt[mask],
            topk_ids=self.topk_ids[mask],
            topk_weights=self.topk_weights[mask],
            router_logits=None if self.router_logits is None else self.router_logits[mask],
            hidden_states={k: v[mask] for k, v in self.hidden_states.items()},
        )

    @staticmethod
    def gather(pieces: list[tuple[RoutingRows, int, int]]) -> RoutingRows:
        """Rows ``start:stop`` of each of several steps' rows, in order: `concat` of
        their slices, without a `RoutingRows` per slice (a sequence has one per step)."""

        def joined(field: str) -> np.ndarray:
            return np.concatenate([getattr(r, field)[a:b] for r, a, b in pieces])

        first = pieces[0][0]
        return RoutingRows(
            request_ids=joined("request_ids"),
            sample_index=joined("sample_index"),
            positions=joined("positions"),
            token_ids=joined("token_ids"),
            is_prompt=joined("is_prompt"),
            topk_ids=joined("topk_ids"),
            topk_weights=joined("topk_weights"),
            router_logits=None if first.router_logits is None else joined("router_logits"),
            hidden_states={
                k: np.concatenate([r.hidden_states[k][a:b] for r, a, b in pieces])
                for k in first.hidden_states
            },
        )

    @staticmethod
    def concat(parts: list[RoutingRows]) -> RoutingRows:
        """Rows of several steps in order."""
        return RoutingRows.gather([(p, 0, len(p)) for p in parts])


@dataclass(frozen=True, slots=True)
class SequenceEnd:
    """A captured request has finished: no more rows will come for it."""

    request_id: str
    """Sequence key (as in `RoutingRows.request_ids`)."""
    sample_index: int
    """Sample index among the prompt's `n` samples."""
    prompt_len: int
    """Prompt tokens."""
    first_position: int
    """First captured position (> 0 when a cached prefix was never forwarded)."""
    num_rows: int
    """Rows captured for the sequence."""
    prompt_index: int = -1
    """Caller's index of the prompt (-1 when not given)."""
    labels: dict[str, Any] = field(default_factory=dict)
    """Free labels of the sequence (domain, question id, author model, seed, ...)."""
    intervention: str = ""
    """`Intervention.key` of the routing change the sequence ran with ("" for none)."""
    sole_sample: bool = False
    """No other sample of this sequence key will come (a request of n = 1 that stands for
    no sample of a larger one): the writer does not hold its prompt rows for later
    samples to share. Holding copies every prompt's rows, float32 logits included."""
    awaits_texts: bool = False
    """Commit the sequence only together with its texts (`RoutingSink.annotate`): the
    caller that knows them promised to send them (`CaptureOptions.texts`)."""
