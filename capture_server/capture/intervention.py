"""Per-request routing interventions: which experts a request's tokens may use, per MoE layer.

Three kinds, each a map from MoE-layer index (0-based among MoE layers) to expert ids:

- ``mask``: the experts cannot be selected. The router's logits for them are set to −inf
  before the model's own selection runs, so top-k is re-run over the rest and the
  model's own normalisation (softmax over all experts, renormalised top-k, or sigmoid)
  applies to what is left.
- ``keep``: only these experts can be selected (pruning); every other expert is masked.
- ``zero``: the model selects as usual, then the listed experts' gate weights are set to
  zero and the remaining selected weights are rescaled to the sum the model gave the
  whole selection (CommitteeAudit's "zero the committee's routing weights, renormalise
  the rest"). A token whose whole selection is zeroed gets no routed-expert output.

Pure Python and numpy: the service validates interventions without loading torch, and the
worker turns them into table rows (`tables`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from capture_server.errors import CaptureSettingsError

KINDS = ("mask", "keep", "zero")


class InterventionError(CaptureSettingsError):
    """Raised when an intervention names layers or experts the model does not have, or
    would leave a token fewer experts than it selects."""

    def at(self, field: str) -> str:
        """The message with the intervention named as the caller's request names it
        (messages start with ``intervention``)."""
        return str(self).replace("intervention", field, 1)


def _layer_map(kind: str, value: Any) -> dict[int, tuple[int, ...]]:
    if not isinstance(value, dict):
        raise InterventionError(f"intervention.{kind}: expected a map of MoE layer -> experts")
    out: dict[int, tuple[int, ...]] = {}
    for layer, experts in value.items():
        try:
            index = int(layer)
            ids = tuple(sorted({int(e) for e in experts}))
        except (TypeError, ValueError):
            raise InterventionError(
                f"intervention.{kind}: layer {layer!r}: expected an integer layer and a list "
                "of integer expert ids"
            ) from None
        if ids or kind == "keep":
            out[index] = ids
    return dict(sorted(out.items()))


@dataclass(frozen=True, slots=True)
class Intervention:
    """One request's intervention. Empty (`bool(x)` false) means the routing runs as is."""

    mask: dict[int, tuple[int, ...]] = field(default_factory=dict)
    keep: dict[int, tuple[int, ...]] = field(default_factory=dict)
    zero: dict[int, tuple[int, ...]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.mask or self.keep or self.zero)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Intervention:
        """Parse ``{"mask": {layer: [experts]}, "keep": {...}, "zero": {...}}`` (JSON keys
        may be strings)."""
        if not d:
            return cls()
        if not isinstance(d, dict):
            raise InterventionError("intervention: expected an object with mask, keep or zero")
        unknown = sorted(set(d) - set(KINDS))
        if unknown:
            raise InterventionError(
                f"intervention: unknown kind {unknown[0]!r}; expected one of {list(KINDS)}"
            )
        return cls(**{k: _layer_map(k, d[k]) for k in KINDS if k in d})

    def to_dict(self) -> dict[str, dict[str, list[int]]]:
        """JSON form with string layer keys; kinds that are empty are left out."""
        return {
            kind: {str(layer): list(ids) for layer, ids in getattr(self, kind).items()}
            for kind in KINDS
            if getattr(self, kind)
        }

    def key(self) -> str:
        """Canonical JSON: equal interventions have equal keys ("" when empty)."""
        return json.dumps(self.to_dict(), sort_keys=True) if self else ""

    def validate(
        self,
        *,
        num_layers: int,
        num_experts: int,
        top_k: int,
        correction_bias: bool = False,
    ) -> None:
        """Raise `InterventionError` naming the first layer or expert the model lacks.

        Masking is refused on routers with a selection-only correction bias
        (DeepSeek-V3's ``e_score_correction_bias``): the bias is added to the gate score
        after the logit, so a masked expert could still be selected, at weight zero.
        """
        for kind in KINDS:
            for layer, ids in getattr(self, kind).items():
                if not 0 <= layer < num_layers:
                    raise InterventionError(
                        f"intervention.{kind}: MoE layer {layer} does not exist; the model "
                        f"has MoE layers 0..{num_layers - 1}"
                    )
                bad = [e for e in ids if not 0 <= e < num_experts]
                if bad:
                    raise InterventionError(
                        f"intervention.{kind}: expert {bad[0]} of MoE layer {layer} does not "
                        f"exist; the model has experts 0..{num_experts - 1}"
                    )
        selectable = self.selectable(num_layers, num_experts)
        short = np.flatnonzero(selectable.sum(axis=1) < top_k)
        if len(short):
            layer = int(short[0])
            raise InterventionError(
                f"intervention: MoE layer {layer} leaves {int(selectable[layer].sum())} "
                f"experts selectable, fewer than the {top_k} each token selects"
            )
        if correction_bias and (self.mask or self.keep):
            raise InterventionError(
                "intervention.mask/keep: not supported on this model's router, whose "
                "score-correction bias can still select a masked expert; use zero"
            )

    def selectable(self, num_layers: int, num_experts: int) -> np.ndarray:
        """(layers, experts) bool: which experts each layer may select."""
        allowed = np.ones((num_layers, num_experts), dtype=bool)
        for layer, ids in self.keep.items():
            kept = np.zeros(num_experts, dtype=bool)
            kept[list(ids)] = True
            allowed[layer] &= kept
        for layer, ids in self.mask.items():
            allowed[layer, list(ids)] = False
        return allowed

    def tables(self, num_layers: int, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
        """(logit bias, weight factor), each (layers, experts) float32.

        The bias is 0 for selectable experts and −inf for masked ones; the factor is 1,
        or 0 for zeroed experts. A request without intervention has all-0 and all-1
        tables, which leave the router's values bit for bit as they are.
        """
        bias = np.where(self.selectable(num_layers, num_experts), 0.0, -np.inf)
        factor = np.ones((num_layers, num_experts), dtype=np.float32)
        for layer, ids in self.zero.items():
            factor[layer, list(ids)] = 0.0
        return bias.astype(np.float32), factor


@dataclass(frozen=True, slots=True)
class RoutingShape:
    """What an intervention is checked against: the served model's routing, as every
    rank derives it from its routers and the writer reports it (`protocol.stats_rpc`,
    entry ``routing``, with ``interventions``: whether the engine runs them)."""

    num_layers: int
    num_experts: int
    top_k: int
    correction_bias: bool

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RoutingShape:
        return cls(**{f.name: d[f.name] for f in fields(cls)})

    def check(self, intervention: Intervention) -> None:
        intervention.validate(
            num_layers=self.num_layers,
            num_experts=self.num_experts,
            top_k=self.top_k,
            correction_bias=self.correction_bias,
        )


def check_for_engine(intervention: Intervention, routing: dict[str, Any]) -> None:
    """Raise `InterventionError` unless the engine whose writer reported `routing` (the
    ``routing`` entry of `protocol.stats_rpc`) can run `intervention`."""
    if not intervention:
        return
    if not routing.get("interventions"):
        raise InterventionError(
            "intervention: this engine was started without interventions; start it with "
            "interventions on (additional_config moetrace.interventions = true)"
        )
    RoutingShape.from_dict(routing).check(intervention)
