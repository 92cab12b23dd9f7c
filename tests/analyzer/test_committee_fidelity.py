"""The committee audit as its authors define it: prompts counted once, whatever their n.

Proof against hand-computed values on a hand-made store, through the production path
(block plan -> map task -> fold), without Ray.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

from analyzer import registry
from analyzer.fold import StoreFold, fold_block
from analyzer.params import Params
from analyzer.plan import BlockPlan
from capture_server.capture.records import ModelMeta, RoutingRows, SequenceEnd
from capture_server.store import StoreOptions, open_store
from capture_server.store.writer import StoreWriter

EXPERTS, PROMPT_LEN, ROWS = 8, 4, 6


def _sequence(key: str, sample: int, domain: str, last_prompt_experts: tuple[int, int]):
    """A sequence whose last prompt token (position 3) routes to `last_prompt_experts`."""
    ids = np.tile(np.array([6, 7], np.int32), (ROWS, 1, 1))
    ids[PROMPT_LEN - 1, 0] = last_prompt_experts
    end = SequenceEnd(key, sample, PROMPT_LEN, 0, ROWS, labels={"domain": domain})
    rows = RoutingRows(
        request_ids=np.array([key] * ROWS, dtype=object),
        sample_index=np.full(ROWS, sample, np.int32),
        positions=np.arange(ROWS),
        token_ids=np.arange(ROWS),
        is_prompt=np.arange(ROWS) < PROMPT_LEN,
        topk_ids=ids,
        topk_weights=np.full((ROWS, 1, 2), 0.5, np.float32),
    )
    return end, rows


def _committee_rows(path) -> dict:
    store = open_store(path)
    analyses = registry.chosen(["committee"])
    plan = BlockPlan(store, None, keep=set())
    fold = StoreFold("s", Params(), set(), frozenset({"committee"}))
    for block in plan.blocks:
        empty = StoreFold("s", Params(), parts=frozenset({"committee"}))
        part, _ = fold_block(
            str(path),
            block.start,
            block.stop,
            plan.rows(block),
            registry.arrays_needed(analyses),
            empty,
        )
        fold.merge(part)
    return fold.committee


def test_a_prompt_with_many_samples_counts_once(tmp_path):
    """Prompt p0 has 3 samples, p1 one, both in domain "math": the audit's frequency of
    expert 0 is 1 of 2 prompts, not 3 of 4 sequences."""
    writer = StoreWriter(str(tmp_path / "s"), StoreOptions(logits=False, chunk_tokens=16))
    writer.open(ModelMeta.synthetic([0], EXPERTS, 2, 4))
    for end, rows in [
        _sequence("p0", 0, "math", (0, 1)),
        _sequence("p0", 1, "math", (0, 1)),
        _sequence("p0", 2, "math", (0, 1)),
        _sequence("p1", 0, "math", (2, 3)),
        _sequence("p2", 1, "code", (4, 5)),  # sample 0 failed: sample 1 stands for p2
    ]:
        writer.add_sequence(end, rows)
    writer.close()

    # the map task runs in a process of its own, as under Ray: compiling its loops here
    # would leave llvmlite's `ffi.lib` in this process, whose attribute lookups break
    # vLLM's module scan when a later test starts an in-process engine
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        sums = pool.submit(_committee_rows, tmp_path / "s").result()
    assert sums.count("math") == 2 and sums.count("code") == 1
    domains, c = sums.contributions("frequency", EXPERTS)
    assert domains == ["code", "math"]
    np.testing.assert_allclose(c[0, 1], [0.5, 0.5, 0.5, 0.5, 0, 0, 0, 0])
    np.testing.assert_allclose(c[0, 0], [0, 0, 0, 0, 1, 1, 0, 0])
    assert c[0, 1, 0] != pytest.approx(0.75), "per-sequence counting would give 3/4"


def test_a_tie_at_the_cutoff_is_reported_with_the_committees_it_allows():
    """Top-1 audit over three domains; in "d0" experts 0 and 1 tie at the only slot.
    Nobody is top-1 in every domain, so the code's fallback takes the most present
    expert: 0 when the tie goes to the lowest id, 1 when it goes to the highest."""
    from analyzer.metrics import committee as cm
    from analyzer.tables.committee import CommitteeRows, committee_tables

    sums = CommitteeRows()
    for domain, picks in {"d0": [0, 1], "d1": [0, 0, 0, 1, 1], "d2": [0, 0, 1, 1, 1]}.items():
        ids = np.array(picks, np.int32).reshape(-1, 1, 1)  # (samples, layers, k=1)
        sums.add(domain, ids, np.ones(ids.shape, np.float32), None)
    domains, c = sums.contributions("frequency", 3)
    np.testing.assert_allclose(c[0], [[0.5, 0.5, 0], [0.6, 0.4, 0], [0.4, 0.6, 0]])

    tied, inside = cm.ties_at_cutoff(c[0], 1)
    assert tied.tolist() == [2, 1, 1] and inside.tolist() == [1, 1, 1]
    assert cm.committee_under_tie_orders(c[0], 1) == [[0], [1]]

    tables = committee_tables("s", sums, Params(committee_variant="frequency"), 1, 3)
    row = tables["committee"].row(0, named=True)
    assert row["members"] == [0] and row["stability"] == "tie-dependent"
    assert row["tie_alternatives"] == 2
    ties = tables["committee_ties"].filter(decides_membership=True)
    assert ties["domain"].to_list() == ["d0"] and ties["tied_at_k"].to_list() == [2]
