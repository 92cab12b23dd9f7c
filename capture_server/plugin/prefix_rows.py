"""Rows for prompt positions served from vLLM's prefix cache, which are never forwarded.

With prefix caching on, a request whose prompt starts with blocks already in the KV
cache is scheduled from the first uncached position (`NewRequestData.num_computed_tokens`,
vllm/v1/core/sched/output.py): its cached positions go through no router. Their routing
is the routing of whichever request computed those KV blocks, at the same positions of the
same tokens (attention is causal, so a position's router input depends only on the tokens
up to it).

`SlotRows` keeps a host copy of every forwarded row at its KV-cache slot, the index the
attention kernels write that token's keys and values to (`BlockTable.slot_mapping`,
vllm/v1/worker/block_table.py; slot = block id x block size + offset). A cached block's
slots hold the rows of the forward that wrote its KV, for as long as vLLM can hit that
block: a slot is rewritten only when its block is reallocated, and a reallocated block
is no longer in the prefix cache. So a hit's rows are read back from the slots of the
request's first blocks (`CachedRequestState.block_ids`), in the step its forward starts.

Every read is checked: the slot must hold the same position and token as the prompt
asks for. A slot never written by a forward (KV loaded by a connector, or a path this
module does not know) fails the request's store loudly instead of storing a gap.

Keeping a large step's rows is a scatter copy of every array into the slots (numpy
releases the GIL for it), so it runs on a thread of its own while the engine thread goes
on; the next `remember` or `recall` waits for it. At Qwen3-30B-A3B's shape with float32
logits an 8192-row prefill step is 227 MB, 26 ms of one core here, and 256 decode rows
7 MB, 1 ms (`bench/slot_rows.py`).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from capture_server.errors import CaptureError

logger = logging.getLogger("moetrace.capture")

MAX_BYTES_ENV = "MOETRACE_PREFIX_ROWS_MAX_GIB"
"""Largest host memory the slot rows may take once the KV cache is full, in GiB;
default a quarter of the machine's memory."""


BACKGROUND_BYTES = 1 << 20
"""Steps with more bytes of rows than this are kept by the background thread, smaller
ones on the calling thread: handing a step over costs about what copying this much does."""


class PrefixRowsError(CaptureError):
    """A cached prompt position whose rows the slots do not hold."""


@dataclass(frozen=True, slots=True)
class SlotLayout:
    """What one KV-cache slot keeps: the arrays of a step's rows, without the row axis."""

    num_layers: int
    top_k: int
    num_experts: int
    logits: bool
    hidden: dict[int, int]  # MoE-layer index -> router input width
    values_dtype: str = "float32"  # of logits and hidden states: the engine's capture dtype

    def bytes_per_slot(self) -> int:
        routing = self.num_layers * self.top_k * 8  # int32 ids + float32 weights
        size = np.dtype(self.values_dtype).itemsize
        logits = self.num_layers * self.num_experts * size if self.logits else 0
        return 8 + routing + logits + size * sum(self.hidden.values())  # + position, token


def max_bytes() -> int:
    value = os.environ.get(MAX_BYTES_ENV)
    if value:
        return int(float(value) * 2**30)
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4


def full_attention_group(kv_cache_config: Any) -> int | None:
    """The first KV-cache group of full attention (its block table keeps every position
    of a request), or None. MLA specs subclass `FullAttentionSpec`."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    for gid, group in enumerate(kv_cache_config.kv_cache_groups):
        if isinstance(group.kv_cache_spec, FullAttentionSpec):
            return gid
    return None


def unsupported_prefix_reuse(vllm_config: Any, kv_cache_config: Any) -> str | None:
    """Why cached positions' rows cannot be read back from slots on this engine, or None."""
    if getattr(vllm_config, "kv_transfer_config", None) is not None:
        return "a KV connector (kv_transfer_config): loaded KV blocks were never forwarded here"
    parallel = vllm_config.parallel_config
    for name in ("decode_context_parallel_size", "prefill_context_parallel_size"):
        if getattr(parallel, name, 1) > 1:
            return f"context parallelism ({name} > 1): a rank's slots hold part of the tokens"
    if full_attention_group(kv_cache_config) is None:
        return "no full-attention KV-cache group (its blocks would not keep every position)"
    return None


class SlotRows:
    """Host rows by KV-cache slot: `remember` every forwarded row, `recall` a cached
    prefix. Memory is taken lazily (zeroed pages are mapped on first write), up to
    `num_slots` x `SlotLayout.bytes_per_slot`."""

    def __init__(self, layout: SlotLayout, num_slots: int, group: int, block_size: int) -> None:
        self.num_slots = num_slots
        self.group = group  # the KV-cache group whose slot mapping and block ids are used
        self.block_size = block_size
        self.position = np.full(num_slots, -1, dtype=np.int32)  # -1: never written
        self.token = np.zeros(num_slots, dtype=np.int32)
        shape = (num_slots, layout.num_layers, layout.top_k)
        self.ids = np.zeros(shape, dtype=np.int32)
        self.weights = np.zeros(shape, dtype=np.float32)
        self.logits = (
            np.zeros((num_slots, layout.num_layers, layout.num_experts), layout.values_dtype)
            if layout.logits
            else None
        )
        self.hidden = {
            layer: np.zeros((num_slots, width), dtype=layout.values_dtype)
            for layer, width in layout.hidden.items()
        }
        self._copier: ThreadPoolExecutor | None = None
        self._copying: Future | None = None  # the step being kept in the background

    @classmethod
    def for_engine(cls, vllm_config: Any, kv_cache_config: Any, layout: SlotLayout) -> SlotRows:
        """Slot rows sized for the engine's KV cache. Raises `CaptureError` where cached
        positions' rows cannot be recalled, or would need more memory than allowed."""
        reason = unsupported_prefix_reuse(vllm_config, kv_cache_config)
        if reason is not None:
            raise CaptureError(
                f"moetrace capture with prefix caching cannot record cached prompt positions "
                f"under {reason}; start the engine with --no-enable-prefix-caching"
            )
        group = full_attention_group(kv_cache_config)
        assert group is not None
        block_size = kv_cache_config.kv_cache_groups[group].kv_cache_spec.block_size
        num_slots = int(kv_cache_config.num_blocks) * int(block_size)
        need, allowed = num_slots * layout.bytes_per_slot(), max_bytes()
        if need > allowed:
            raise CaptureError(
                f"moetrace capture with prefix caching keeps each KV-cache slot's rows in host "
                f"memory: {num_slots} slots x {layout.bytes_per_slot()} bytes = "
                f"{need / 2**30:.1f} GiB, over the {allowed / 2**30:.1f} GiB allowed "
                f"({MAX_BYTES_ENV}); capture fewer hidden layers or no logits, raise "
                "the limit, or start the engine with --no-enable-prefix-caching"
            )
        logger.info(
            "moetrace prefix rows: %d KV slots x %d bytes (up to %.2f GiB of host memory)",
            num_slots,
            layout.bytes_per_slot(),
            need / 2**30,
        )
        return cls(layout, num_slots, group, int(block_size))

    def remember(self, slots: np.ndarray, a: dict[str, np.ndarray]) -> None:
        """Keep a step's forwarded rows (host arrays as `StepCollector` copies them, rows
        on axis 0) at their slots; a large step in the background. The caller must not
        change the arrays afterwards."""
        if len(slots) and (slots.min() < 0 or slots.max() >= self.num_slots):
            raise PrefixRowsError(
                f"moetrace prefix rows: a KV slot outside [0, {self.num_slots}) was forwarded"
            )
        self.settle()  # a slot rewritten by this step must get this step's row last
        if sum(v.nbytes for v in a.values()) <= BACKGROUND_BYTES:
            self._keep(slots, a)
            return
        if self._copier is None:
            self._copier = ThreadPoolExecutor(1, thread_name_prefix="moetrace-slots")
        self._copying = self._copier.submit(self._keep, slots, dict(a))

    def settle(self) -> None:
        """Wait until every step handed to `remember` is kept."""
        copying, self._copying = self._copying, None
        if copying is not None:
            copying.result()

    def _keep(self, slots: np.ndarray, a: dict[str, np.ndarray]) -> None:
        self.position[slots] = a["positions"]
        self.token[slots] = a["token_ids"]
        self.ids[slots] = a["ids"]
        self.weights[slots] = a["weights"]
        if self.logits is not None:
            self.logits[slots] = a["logits"]
        for layer, rows in self.hidden.items():
            rows[slots] = a[f"hidden{layer}"]

    def recall(self, block_ids: list[int], prompt: list[int], length: int) -> dict[str, np.ndarray]:
        """Rows of positions ``0..length-1`` of a request whose KV blocks are `block_ids`
        and whose prompt is `prompt`, laid out as `remember` takes them."""
        self.settle()
        positions, size = np.arange(length), self.block_size
        slots = np.asarray(block_ids, dtype=np.int64)[positions // size] * size + positions % size
        expected = np.asarray(prompt[:length], dtype=np.int32)
        stale = (self.position[slots] != positions) | (self.token[slots] != expected)
        if stale.any():
            first = int(np.flatnonzero(stale)[0])
            raise PrefixRowsError(
                f"moetrace prefix rows: cached position {first} (KV slot {int(slots[first])}) "
                "was never forwarded with this prompt's token, so its routing is unknown"
            )
        rows = {
            "positions": positions,
            "token_ids": expected.astype(np.int64),
            "ids": self.ids[slots],
            "weights": self.weights[slots],
        }
        if self.logits is not None:
            rows["logits"] = self.logits[slots]
        for layer, hidden in self.hidden.items():
            rows[f"hidden{layer}"] = hidden[slots]
        return rows
