"""Steps of real MoE models, for the benches that time the collector's per-step work
(`topk_order.py`, `expert_load.py`, `slot_rows.py`)."""

from __future__ import annotations

import argparse
import json

MODEL_SHAPES = {  # MoE layers, routed experts, top-k (from each model's config.json)
    "OLMoE-1B-7B": (16, 64, 8),
    "Qwen3-30B-A3B": (48, 128, 8),
    "DeepSeek-V3": (58, 256, 8),
}
STEP_ROWS = (256, 8192)
"""A decode step of 256 requests, and a prefill chunk of 8192 tokens."""


def out_path(description: str) -> str | None:
    """The bench's ``--out`` argument: where to write its results as JSON, if anywhere."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default=None, help="Write the results as JSON here.")
    return parser.parse_args().out


def write_results(path: str | None, results: list[dict]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=2)
