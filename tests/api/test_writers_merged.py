"""One engine's capture as the service reports it, from several writers (one per
data-parallel rank; TP replicas report nothing): hand-built per-worker results."""

from __future__ import annotations

from capture_server.protocol import merged_sink_states, writer_stats

STORE = "/data/stores/job"


def _writer(steps: int, load: list[list[int]], committed: int, lag: float) -> dict:
    return {
        "role": "writer",
        "steps": steps,
        "routing": {"num_layers": 1},
        "expert_load": load,
        "sinks": {STORE: {"sequences_committed": committed, "lag_seconds": lag}},
        "sink_errors": {},
    }


def test_writers_counters_and_expert_load_add_up():
    merged = writer_stats(
        [_writer(3, [[1, 2]], 4, 0.5), {"role": "replica"}, _writer(5, [[10, 0]], 6, 0.2)]
    )
    assert merged["steps"] == 8
    assert merged["expert_load"] == [[11, 2]]
    assert merged["sinks"][STORE] == {"sequences_committed": 10.0, "lag_seconds": 0.5}
    assert merged["routing"] == {"num_layers": 1}


def test_one_writer_is_reported_as_it_is():
    one = _writer(3, [[1, 2]], 4, 0.5)
    assert writer_stats([one, {"role": "replica"}]) is one
    assert writer_stats([{"role": "replica"}]) == {}


def test_a_store_is_done_only_when_every_writer_is():
    def states(*per_worker: str) -> str:
        return merged_sink_states([{STORE: s} for s in per_worker] + [{}], [STORE])[STORE]

    assert states("closed", "closed") == "closed"
    assert states("closed", "closing") == "closing"
    assert states("open", "closed") == "open"
    assert states("closing", "failed: disk full") == "failed: disk full"
    assert merged_sink_states([{}, {}], [STORE]) == {STORE: "closed"}


def test_pipeline_stages_join_their_layers_and_count_tokens_once():
    def stage(s: int, dp: int, load: list[list[int]]) -> dict:
        writer = _writer(3, load, 2, 0.1)
        return {**writer, "part": {"dp_rank": dp, "pp_stage": s, "pp_size": 2}}

    merged = writer_stats(
        [stage(0, 0, [[1, 0]]), stage(1, 0, [[0, 1]]), stage(0, 1, [[2, 0]]), stage(1, 1, [[0, 3]])]
    )
    assert merged["expert_load"] == [[3, 0], [0, 4]]  # stage 0's layer, then stage 1's
    assert merged["routing"]["num_layers"] == 2
    assert merged["steps"] == 6  # two DP ranks' steps; the stages ran the same ones
