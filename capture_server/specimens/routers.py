"""Finding the routers of a transformers MoE model: what specimens are built and checked by."""

from __future__ import annotations

from typing import Any


def router_modules(model: Any) -> list[tuple[int, Any]]:
    """(decoder block index, router module) for every MoE layer of a transformers model."""
    found = []
    for name, module in model.named_modules():
        if type(module).__name__.endswith(("TopKRouter", "TopkRouter")):
            found.append((int(name.split("layers.")[1].split(".")[0]), module))
    return found
