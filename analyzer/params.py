"""Analysis parameters, checked when made so that bad ones fail before any work."""

from __future__ import annotations

from dataclasses import dataclass

from analyzer.metrics import committee as cm
from analyzer.metrics import usage as um
from analyzer.profiles import SCOPES

COMMITTEE_VARIANTS = ("softmax", "frequency", "frequency_weight")  # contribution indices


@dataclass(frozen=True)
class Params:
    top_p: float = um.TOP_P  # top-p set mass, paper (a) Fig. 6
    scope: str = "cumulative"  # pair overlap scope: prompt|generated|cumulative|last_token
    max_pairs: int = 20000  # pairs sampled per store (bounded memory and time)
    committee_variant: str = "frequency_weight"  # softmax | frequency | frequency_weight
    gamma: float = cm.GAMMA  # committee presence threshold
    coverage_denominator: str = "topk_table"  # topk_table | all_experts
    retention_ks: tuple[int, ...] = (1, 2, 4, 6, 8, 12, 16)  # audit k sweep (paper (b) B7)
    ablation_directions: tuple[int, ...] = (0, 1, 2, 4, 8)  # top-K directions removed (E-a3)
    seed: int = 0

    def __post_init__(self) -> None:
        """Refuse bad parameters before any work, naming the parameter."""
        choices = {
            "scope": SCOPES,
            "committee_variant": COMMITTEE_VARIANTS,
            "coverage_denominator": cm.DENOMINATORS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name}: expected one of {list(allowed)}, got {getattr(self, name)!r}"
                )
        for name in ("top_p", "gamma"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name}: expected a value in (0, 1], got {getattr(self, name)}")
        if self.max_pairs < 1:
            raise ValueError(f"max_pairs: expected at least 1, got {self.max_pairs}")
        if not self.retention_ks or min(self.retention_ks) < 1:
            raise ValueError(f"retention_ks: expected positive integers, got {self.retention_ks}")
        if not self.ablation_directions or min(self.ablation_directions) < 0:
            raise ValueError(
                f"ablation_directions: expected integers >= 0, got {self.ablation_directions}"
            )
