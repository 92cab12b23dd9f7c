"""Device-to-host copies of a step's rows that the next forward never waits for.

The rows are gathered on the compute stream, right after the forward that wrote the
capture buffers and before the next one overwrites them: a device-to-device gather, the
only capture work the compute stream does. A copy stream then waits for the gather and
copies into pinned host memory, the way vLLM issues its own device-to-host copies
(vllm/v1/worker/gpu/async_utils.py); the host waits on a blocking-sync event one step
later, so the wait sleeps instead of spinning a core. On a CPU the gathered tensors are
already host memory.

Checked on a GPU by `bench/gpu_torch_check.py` (equal to a synchronous copy; compute
issued after the copy finishes before it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(slots=True)
class PendingCopy:
    """Host tensors being filled, and the event that says they are."""

    host: dict[str, torch.Tensor]
    done: torch.cuda.Event | None = None

    def wait(self) -> dict[str, np.ndarray]:
        """Block (sleeping, on CUDA) until the copies landed; the arrays, as numpy views."""
        if self.done is not None:
            self.done.synchronize()
        return {name: tensor.numpy() for name, tensor in self.host.items()}


class HostCopy:
    """Starts the copies of each step's gathered rows (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device=device) if self.cuda else None

    def start(self, gathered: dict[str, torch.Tensor]) -> PendingCopy:
        """Copy `gathered` (tensors the compute stream has just produced) to the host.

        The gathered tensors are handed to the copy stream (`record_stream`): the caching
        allocator does not reuse their memory until the copy is done.
        """
        if not self.cuda:
            return PendingCopy({name: t.cpu() for name, t in gathered.items()})
        ready = torch.cuda.Event()
        ready.record()  # on the compute stream, after the gathers
        host = {}
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            for name, tensor in gathered.items():
                tensor.record_stream(self.stream)
                host[name] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                host[name].copy_(tensor, non_blocking=True)
            done = torch.cuda.Event(blocking=True)
            done.record(self.stream)
        return PendingCopy(host, done)
