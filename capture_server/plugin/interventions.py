"""Apply each request's routing intervention inside the forward, by table lookup.

Every rank of a tensor-parallel engine routes the whole batch, so every rank holds the
tables and applies them (a replica that did not would route differently from rank 0).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from capture_server.capture.intervention import Intervention, InterventionError, RoutingShape
from capture_server.capture.options import CaptureOptions

_TINY = 1e-30  # floor of a renormalising sum: a fully zeroed selection stays all zero


def _upload(dst: torch.Tensor, src: np.ndarray) -> None:
    """Copy a host array into a device tensor without a host sync.

    On CUDA the source is pinned and the copy is queued on the current stream, so it
    runs after the previous step's forward and before this one; PyTorch's pinned-memory
    allocator keeps the pinned block until the copy has run.
    """
    host = torch.from_numpy(np.ascontiguousarray(src))
    if dst.is_cuda:
        dst.copy_(host.pin_memory(), non_blocking=True)
    else:
        dst.copy_(host)


class InterventionTables:
    """Per-slot logit biases and weight factors, and the slot of every row of the step.

    Invariants:
        - Shapes are fixed at start-up: ``bias`` and ``factor`` are (L, S, E), ``row_slot``
          is (T,), with S slots and T the largest token count of a step.
        - Slot 0 is "no intervention" (bias 0, factor 1) and is never written again; a
          slot holds one distinct intervention for as long as a request in the batch
          uses it.
        - Inside the forward only `mask_logits` and `zero_weights` touch them: gathers
          and arithmetic on fixed buffers, no host sync, no branch on tensor values, so
          CUDA graphs and compiled graphs replay them. Rows past the step's tokens (CUDA
          graph padding) read whatever slot they last held, always a valid one.
        - A row of slot 0 gets its logits plus 0 and its weights times 1 and over their
          own sum times that sum, which leaves every value bit for bit as it was.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        num_experts: int,
        max_tokens: int,
        num_slots: int,
        always_apply: bool,
        device: torch.device,
    ) -> None:
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.bias = torch.zeros(num_layers, num_slots, num_experts, device=device)
        self.factor = torch.ones(num_layers, num_slots, num_experts, device=device)
        self.row_slot = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.always_apply = always_apply
        """Apply the tables in every forward. Required when the forward is traced (a
        CUDA graph or a compiled graph), which keeps whatever branch it was traced with
        (`runner_patch._traced`)."""
        self.active = False
        """Some row of this step intervenes (used when not `always_apply`)."""
        self._dirty_rows = 0  # leading rows of row_slot that may hold a slot other than 0
        self._free = list(range(num_slots - 1, 0, -1))
        self._slot_of_key: dict[str, int] = {}
        self._key_of_slot: dict[int, str] = {}
        self._users: dict[int, int] = {}

    def acquire(self, intervention: Intervention) -> int:
        """The slot holding `intervention`, written now if no request uses it yet."""
        key = intervention.key()
        slot = self._slot_of_key.get(key)
        if slot is None:
            if not self._free:
                raise InterventionError(
                    "moetrace: more distinct interventions in one batch than the "
                    f"{self.bias.shape[1] - 1} intervention slots"
                )
            slot = self._free.pop()
            bias, factor = intervention.tables(self.num_layers, self.num_experts)
            _upload(self.bias[:, slot], bias)
            _upload(self.factor[:, slot], factor)
            self._slot_of_key[key] = slot
            self._key_of_slot[slot] = key
        self._users[slot] = self._users.get(slot, 0) + 1
        return slot

    def release(self, slot: int) -> None:
        self._users[slot] -= 1
        if not self._users[slot]:
            del self._users[slot]
            del self._slot_of_key[self._key_of_slot.pop(slot)]
            self._free.append(slot)

    def set_rows(self, slots: np.ndarray, tokens: np.ndarray) -> None:
        """Give each of this step's rows its request's slot (rows are grouped by request
        in batch order, `tokens` rows each)."""
        self.active = bool(slots.any())
        if not self.active and not self._dirty_rows:
            return  # row_slot is all 0 already: nothing to upload
        rows = np.repeat(slots.astype(np.int64), tokens)
        n = max(len(rows), self._dirty_rows)
        padded = np.zeros(n, dtype=np.int64)
        padded[: len(rows)] = rows
        _upload(self.row_slot[:n], padded)
        self._dirty_rows = len(rows) if self.active else 0

    def applies(self) -> bool:
        return self.always_apply or self.active

    def mask_logits(self, layer: int, router_logits: torch.Tensor) -> torch.Tensor:
        """Router logits with each row's masked experts at −inf. Columns past the routed
        experts (a fused shared-expert gate) are left as they are."""
        n = router_logits.shape[0]
        bias = self.bias[layer].index_select(0, self.row_slot[:n]).to(router_logits.dtype)
        if router_logits.shape[1] == self.num_experts:
            return router_logits + bias
        masked = router_logits.clone()
        masked[:, : self.num_experts] += bias
        return masked

    def zero_weights(
        self, layer: int, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        """Top-k weights with each row's zeroed experts at 0, the rest rescaled to the sum
        the whole selection had."""
        n = topk_ids.shape[0]
        factor = self.factor[layer].index_select(0, self.row_slot[:n])
        kept = topk_weights * factor.gather(1, topk_ids.long()).to(topk_weights.dtype)
        total = topk_weights.sum(dim=-1, keepdim=True)
        return kept * (total / kept.sum(dim=-1, keepdim=True).clamp_min(_TINY))


class RequestInterventions:
    """Gives each request of the step its intervention slot, before the forward.

    Called from the runner's `_prepare_inputs`, where the batch order of this step is
    final (vllm/v1/worker/gpu_model_runner.py, `GPUModelRunner.execute_model`); rows
    are grouped by request in that order.
    """

    def __init__(self, tables: InterventionTables, shape: RoutingShape) -> None:
        self.tables = tables
        self.shape = shape
        self._slot_of_request: dict[str, int] = {}  # every request seen, 0: none
        self.seconds = 0.0
        """Host time spent here: what a step pays when nobody intervenes (eager
        engines then skip the tables in the forward; `InterventionTables.applies`)."""

    def before_forward(
        self, runner: Any, scheduler_output: Any, num_scheduled_tokens: np.ndarray
    ) -> None:
        start = time.perf_counter()
        finished = set(scheduler_output.finished_req_ids)
        finished |= set(getattr(scheduler_output, "preempted_req_ids", None) or ())
        for req_id in finished & self._slot_of_request.keys():
            slot = self._slot_of_request.pop(req_id)
            if slot:
                self.tables.release(slot)
        num_reqs = len(num_scheduled_tokens)
        slots = np.zeros(num_reqs, dtype=np.int64)
        for i, req_id in enumerate(runner.input_batch.req_ids[:num_reqs]):
            slot = self._slot_of_request.get(req_id)
            if slot is None:
                slot = self._admit(runner, req_id)
            slots[i] = slot
        self.tables.set_rows(slots, num_scheduled_tokens)
        self.seconds += time.perf_counter() - start

    def _admit(self, runner: Any, req_id: str) -> int:
        params = getattr(runner.requests.get(req_id), "sampling_params", None)
        options = CaptureOptions.from_extra_args(getattr(params, "extra_args", None))
        slot = 0
        if options is not None and options.intervention:
            intervention = Intervention.from_dict(options.intervention)
            self.shape.check(intervention)
            slot = self.tables.acquire(intervention)
        self._slot_of_request[req_id] = slot
        return slot


def refuse_interventions(options: CaptureOptions) -> None:
    """Raise for a request that asks for an intervention on an engine started without
    them: running it unchanged would record routing it did not ask for."""
    if options.intervention:
        raise InterventionError(
            "moetrace: a request asks for an intervention, but this engine was started "
            'without them; start it with additional_config {"moetrace": '
            '{"interventions": true}}'
        )
