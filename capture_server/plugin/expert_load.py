"""Expert load: top-k selections per (MoE layer, expert) over every captured token.

Counted where the step's ids are, by one scatter-add queued after the rows' gather. On a
GPU that is a kernel on the compute stream: no host work and no sync (`torch.bincount`
would sync, to size its output). Counted on the host instead, it cost the engine thread
0.2-0.3 ms a step at 256 decode rows and 10-16 ms at an 8192-row prefill of Qwen3-30B-A3B
or DeepSeek-V3 shapes, as much again as gathering and ordering the rows. On the CPU the
scatter-add is the same work as numpy's bincount of the host copy (`bench/expert_load.py`:
equal at 256 rows, 0.7-2.3x at 8192 across runs, beside CPU steps of seconds there).

Rows the collector drops after the copy (recomputed after preemption) were counted
already; their counts are taken back on the host, which is rare and small.
"""

from __future__ import annotations

import numpy as np
import torch


class ExpertLoad:
    """Counts of a capture's top-k ids, kept on the capture buffers' device."""

    def __init__(self, num_layers: int, num_experts: int, device: torch.device) -> None:
        self.num_layers, self.num_experts = num_layers, num_experts
        self._counts = torch.zeros(num_layers * num_experts, dtype=torch.int64, device=device)
        offsets = torch.arange(num_layers, dtype=torch.int32, device=device) * num_experts
        self._offsets = offsets.view(1, -1, 1)
        self._one = torch.ones(1, dtype=torch.int64, device=device)
        self._taken_back = np.zeros((num_layers, num_experts), dtype=np.int64)

    def add(self, ids: torch.Tensor) -> None:
        """Count (rows, layers, k) ids where they are, without waiting for them."""
        cells = (ids + self._offsets).view(-1)  # int32 ids: index_add_ takes int32 indices
        self._counts.index_add_(0, cells, self._one.expand(cells.numel()))

    def take_back(self, ids: np.ndarray) -> None:
        """Uncount (rows, layers, k) host ids of rows counted before."""
        cells = ids.astype(np.int64) + (np.arange(self.num_layers) * self.num_experts)[:, None]
        counts = np.bincount(cells.ravel(), minlength=self.num_layers * self.num_experts)
        self._taken_back += counts.reshape(self.num_layers, self.num_experts)

    def total(self) -> np.ndarray:
        """(layers, experts) int64; waits for the counts queued on the device."""
        counts = self._counts.view(self.num_layers, self.num_experts).cpu().numpy()
        return counts - self._taken_back
