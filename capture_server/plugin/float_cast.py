"""torch's float32 -> float16 conversion for the store writer's threads.

The store converts captured float32 logits (and gates, hidden states) to float16 when a
store keeps them so; numpy does that one value at a time, torch with vector instructions
(about 10x faster here: docs/benchmarks.md). The conversion runs in the chunk writer's
threads, so it goes in slices of at most torch's grain size: each slice runs on the
calling thread alone, never in torch's intra-op pool, which the engine's own kernels use
(on vLLM's CPU backend those threads are bound to the cores that run the model).
"""

from __future__ import annotations

import numpy as np
import torch

SLICE = 32768
"""Elements per call: below `at::internal::GRAIN_SIZE`, so a copy runs serially."""


def torch_float16_cast(dst: np.ndarray, src: np.ndarray) -> None:
    """Write `src` (float32, C-contiguous) into `dst` (float16, same shape), rounding to
    nearest even as numpy does."""
    out = torch.from_numpy(dst.reshape(-1))
    values = torch.from_numpy(src.reshape(-1))
    for start in range(0, out.numel(), SLICE):
        out[start : start + SLICE].copy_(values[start : start + SLICE])


def register() -> None:
    from capture_server.store import chunks

    chunks.use_float16_cast(torch_float16_cast)
