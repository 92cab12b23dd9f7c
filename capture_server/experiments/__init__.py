"""Causal experiments run with interventions: committee masking and usage pruning, each
against the unchanged model and matched random controls, on the same texts."""

from capture_server.experiments.masking import (
    ChoiceItem,
    committee_from_analysis,
    committee_masking,
    matched_controls,
    pruning_sweep,
    usage_from_analysis,
    usage_of_text,
)

__all__ = [
    "ChoiceItem",
    "committee_from_analysis",
    "committee_masking",
    "matched_controls",
    "pruning_sweep",
    "usage_from_analysis",
    "usage_of_text",
]
