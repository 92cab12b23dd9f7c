"""Which rows of a router call belong to this data-parallel rank.

Under data parallelism a MoE layer whose kernel does not dispatch by itself gathers every
DP rank's tokens before routing (`MoERunner._maybe_dispatch` in
vllm/model_executor/layers/fused_moe/runner/moe_runner.py: ``dispatch_router_logits``
all-gathers hidden states and router logits over the DP group, rank after rank, each
with its ``num_tokens_across_dp`` rows). A modular kernel routes before it dispatches, so
its router sees only the rank's own rows. The row count tells the two apart; any other
count is refused, loudly, rather than filed under the wrong tokens.

The slice depends on per-rank token counts known only on the host. That is right under
CUDA graphs too: with graphs on, vLLM pads every DP rank to the same token count
(`_synchronize_dp_ranks` in vllm/v1/worker/dp_utils.py), so rank r's rows always start
at ``r * n`` for a graph of ``n`` tokens per rank.
"""

from __future__ import annotations

from typing import Any

from capture_server.errors import CaptureError, CaptureUnsupportedError


def rows_of_rank(runners: list[tuple[int, Any]], vllm_config: Any) -> DataParallelRows | None:
    """The narrowing this data-parallel rank's hooks need, or None where every MoE layer
    routes only the rank's own rows (its kernel dispatches after routing:
    `MoERunner.do_naive_dispatch_combine` is false).

    Raises `CaptureUnsupportedError` where a layer routes the gathered rows inside a
    traced forward: on CPU and TPU the MoE forward is traced with the model
    (`MoERunner._select_forward`; on GPUs it is the opaque ``moe_forward`` op, whose
    Python runs at every call), and the rank's slice depends on token counts the trace
    cannot branch on."""
    parallel = vllm_config.parallel_config
    naive = [block for block, r in runners if getattr(r, "do_naive_dispatch_combine", True)]
    if parallel.data_parallel_size == 1 or not naive:
        return None
    from vllm.platforms import current_platform

    traced = vllm_config.compilation_config.mode.name != "NONE"
    if traced and (current_platform.is_cpu() or current_platform.is_tpu()):
        raise CaptureUnsupportedError(
            f"moetrace capture cannot attribute the rows of MoE blocks {naive}: they route "
            "every data-parallel rank's tokens inside a compiled forward on this platform; "
            "run the engine eager (--enforce-eager)"
        )
    return DataParallelRows(int(parallel.data_parallel_rank), int(parallel.data_parallel_size))


class DataParallelRows:
    """The rows of a router call that are this DP rank's own tokens."""

    def __init__(self, dp_rank: int, dp_size: int) -> None:
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self._counts_of: tuple[object, list[int]] | None = None  # (DP metadata, its counts)

    def span(self, num_rows: int) -> tuple[int, int]:
        """``(start, stop)`` of this rank's rows among `num_rows` rows routed together.

        Raises `CaptureError` for a row count that is neither this rank's tokens nor
        every rank's (sequence-parallel shards, refused at start-up, would be one)."""
        from vllm.forward_context import get_forward_context, is_forward_context_available

        dp = get_forward_context().dp_metadata if is_forward_context_available() else None
        if dp is None:  # a forward that does not synchronise ranks routes only its own
            return 0, num_rows
        counts = self._counts(dp)
        own = counts[self.dp_rank]
        if num_rows == own:
            return 0, own
        if num_rows == sum(counts):
            start = sum(counts[: self.dp_rank])
            return start, start + own
        raise CaptureError(
            f"moetrace capture: a router call of {num_rows} rows on data-parallel rank "
            f"{self.dp_rank}, whose ranks hold {counts} tokens: neither its own rows nor "
            "all ranks' rows, so they cannot be attributed"
        )

    def _counts(self, dp: object) -> list[int]:
        """Tokens per rank in this forward, read once per forward (every MoE layer asks)."""
        if self._counts_of is not None and self._counts_of[0] is dp:
            return self._counts_of[1]
        counts = [int(c) for c in dp.num_tokens_across_dp_cpu.tolist()]  # type: ignore[attr-defined]
        if len(counts) != self.dp_size:
            raise CaptureError(
                f"moetrace capture: {len(counts)} data-parallel token counts, expected "
                f"{self.dp_size}"
            )
        self._counts_of = (dp, counts)
        return counts
