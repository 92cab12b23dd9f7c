"""Cross-store alignment: sequences paired by labels / prompt index, hand-computed."""

from __future__ import annotations

import numpy as np
import pytest

from analyzer.params import Params
from analyzer.profiles import SequenceProfile
from analyzer.tables.alignment import alignment_table, matched_layer

USAGE = [[5, 5, 0, 0], [5, 5, 0, 0], [0, 0, 5, 5], [5, 0, 5, 0]]  # top-p sets {01} {01} {23} {02}


def _profiles(usage, permutation=None, extra=0):
    out = []
    for i, row in enumerate([*usage, *[[1, 1, 1, 1]] * extra]):
        c = np.array([row], dtype=np.int32)  # one layer, four experts
        if permutation is not None:
            c = c[:, np.argsort(permutation)]  # expert e is called permutation[e]
        out.append(
            SequenceProfile(
                sequence_id=i,
                prompt_index=i,
                sample_index=0,
                prompt_len=4,
                num_rows=10,
                labels={},
                scope_counts={"cumulative": c},
            )
        )
    return out


def test_relabelled_experts_align_perfectly():
    """Model B routes like A up to expert names, and saw one prompt A did not."""
    table = alignment_table(
        {"a": _profiles(USAGE), "b": _profiles(USAGE, permutation=[2, 3, 0, 1], extra=1)},
        Params(),
    )
    row = table.row(0, named=True)
    assert row["aligned_sequences"] == 4 and row["pairs"] == 6
    # pair Jaccards: (0,1)=1, (0,2)=0, (0,3)=1/3, (1,2)=0, (1,3)=1/3, (2,3)=1/3
    assert row["jaccard_a"] == pytest.approx(1 / 3) and row["jaccard_b"] == pytest.approx(1 / 3)
    assert row["pearson"] == pytest.approx(1.0)
    # identical pair values in every resample; shuffled across pairs they disagree
    assert row["pearson_lo"] == pytest.approx(1.0) and row["pearson_hi"] == pytest.approx(1.0)
    assert row["pearson_shuffled"] < 0.9


def test_disagreeing_models_correlate_negatively():
    flipped = [[0, 0, 5, 5], [5, 0, 5, 0], [0, 0, 5, 5], [5, 5, 0, 0]]  # {23} {02} {23} {01}
    # pair Jaccards in b: (0,1)=1/3, (0,2)=1, (0,3)=0, (1,2)=1/3, (1,3)=1/3, (2,3)=0
    row = alignment_table({"a": _profiles(USAGE), "b": _profiles(flipped)}, Params()).row(
        0, named=True
    )
    a = np.array([1, 0, 1 / 3, 0, 1 / 3, 1 / 3])
    b = np.array([1 / 3, 1, 0, 1 / 3, 1 / 3, 0])
    assert row["pearson"] == pytest.approx(np.corrcoef(a, b)[0, 1])
    assert row["pearson"] < 0


def test_labels_take_precedence_over_prompt_index():
    a = _profiles(USAGE)
    b = _profiles(USAGE)[::-1]  # same texts, submitted in the other order...
    for i, p in enumerate(a):
        p.labels = {"question": f"q{i}"}
    for i, p in enumerate(b):
        p.prompt_index = i
        p.labels = {"question": f"q{3 - i}"}  # ...but labelled with their question
    row = alignment_table({"a": a, "b": b}, Params()).row(0, named=True)
    assert row["aligned_sequences"] == 4 and row["pearson"] == pytest.approx(1.0)


def test_layers_match_by_relative_depth():
    assert [matched_layer(layer, 4, 2) for layer in range(4)] == [0, 0, 1, 1]
    assert [matched_layer(layer, 3, 5) for layer in range(3)] == [0, 2, 4]
    assert matched_layer(2, 6, 6) == 2


def _block(usage, first_id: int, labels: list[dict]):
    """A block of sequences whose prompt and rollout each route as `usage` (one layer):
    its counts grid built by hand, two cells (prompt, rollout) per sequence."""
    from analyzer.profiles import BlockProfiles

    n = len(usage)
    grid = np.repeat(np.array(usage, dtype=np.int32)[:, None, None, :], 2, axis=1)
    rows = {"topk_ids": np.zeros((10 * n, 1, 2), dtype=np.uint8)}
    sequences = [
        {
            "sequence_id": first_id + i,
            "prompt_index": first_id + i,
            "sample_index": 0,
            "prompt_len": 4,
            "num_rows": 10,
            "labels": labels[i],
            "curve": False,
        }
        for i in range(n)
    ]
    first = np.arange(n) * 10
    return BlockProfiles(
        sequences,
        rows,
        4,
        grid.reshape(2 * n, 1, 4),
        np.arange(n) * 2,
        np.zeros(n, bool),
        first,
        np.full(n, 4),
    )


def test_fold_keeps_sums_of_all_and_whole_profiles_of_some():
    from analyzer.fold import StoreFold

    labels = [{"domain": "math"}, {}, {}, {}]  # the committee audit wants sequence 0
    # two map tasks fold a block each; the driver merges their folds
    blocks = [StoreFold("s", Params(), keep={1, 3}) for _ in range(2)]
    blocks[0].add(_block(USAGE[:2], 0, labels[:2]))
    blocks[1].add(_block(USAGE[2:], 2, labels[2:]))
    fold = StoreFold("s", Params(), keep={1, 3})
    for block in blocks:
        fold.merge(block)
    np.testing.assert_array_equal(fold.usage, 2 * np.array([[15, 10, 10, 5]]))
    assert fold.num_sequences == 4
    assert [p.sequence_id for p in fold.whole()] == [1, 3]
    np.testing.assert_array_equal(fold.whole()[1].scope_counts["generated"], [USAGE[3]])
    # only sequence 0 has a domain: the committee rows hold its last token alone
    assert list(fold.committee.rows) == ["math"] and fold.committee.count("math") == 1
    table = fold.pop_sequence_table()
    assert table["sequence_id"].to_list() == [0, 1, 2, 3]
    assert table["confidence"].null_count() == 4  # no logits: null, not NaN
    assert table["prompt_vs_rollout_jaccard"].to_list() == pytest.approx([1.0] * 4)
    assert fold.pop_sequence_table().is_empty() and fold.num_sequences == 4
    assert table["prompt_vs_rollout_cosine"].to_list() == pytest.approx([1.0] * 4)


def test_pair_sample_follows_keys_not_sequence_ids():
    import json

    import polars as pl

    from analyzer.plan import pair_sequences

    def index(order):
        return pl.DataFrame(
            {
                "sequence_id": list(range(len(order))),
                "prompt_index": order,
                "sample_index": [0] * len(order),
                "labels": [json.dumps({"question": f"q{q}"}) for q in order],
            }
        )

    forward, backward = list(range(50)), list(range(50))[::-1]
    a = pair_sequences(index(forward), limit=10)
    b = pair_sequences(index(backward), limit=10)
    assert len(a) == len(b) == 10
    assert {forward[s] for s in a} == {backward[s] for s in b}  # the same questions
    assert pair_sequences(index(forward), limit=100) == set(range(50))


def test_committee_rows_give_the_contribution_indices_of_all_members():
    """Contributions from rows merged across folds equal the metric functions (hand-tested
    in test_metrics) applied to every member's last token at once."""
    from analyzer.metrics import committee as cm
    from analyzer.tables.committee import CommitteeRows

    rng = np.random.default_rng(3)
    n, layers, k, experts = 40, 2, 3, 7
    ids = np.argsort(rng.random((n, layers, experts)), -1)[..., :k]
    weights = rng.random((n, layers, k))
    logits = rng.normal(size=(n, layers, experts))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    merged = CommitteeRows()
    for part in (slice(0, 15), slice(15, 40)):  # two map tasks
        sums = CommitteeRows()
        sums.add("code", ids[part], weights[part], probs[part])
        merged.merge(sums)
    for variant, expected in (
        ("frequency", [cm.eci_frequency(ids[:, layer], experts) for layer in range(layers)]),
        (
            "frequency_weight",
            [
                cm.eci_frequency_weight(ids[:, layer], weights[:, layer], experts)
                for layer in range(layers)
            ],
        ),
        ("softmax", [cm.eci_softmax(logits[:, layer]) for layer in range(layers)]),
    ):
        domains, c = merged.contributions(variant, experts)
        assert domains == ["code"]
        # rows keep weights and probabilities in float32: agreement to its precision
        np.testing.assert_allclose(c[:, 0], np.stack(expected), rtol=1e-6, atol=1e-9)


def test_committee_rows_say_what_a_variant_lacks():
    from analyzer.tables.committee import CommitteeRows

    sums = CommitteeRows()
    sums.add("math", np.zeros((2, 1, 1), dtype=np.uint8), None, None)
    with pytest.raises(ValueError, match="gate weights"):
        sums.contributions("frequency_weight", 3)
    with pytest.raises(ValueError, match="router logits"):
        sums.contributions("softmax", 3)
    with pytest.raises(ValueError, match="committee_variant"):
        sums.contributions("median", 3)


def test_resampled_contributions_equal_the_metric_functions_on_repeated_rows():
    """A bootstrap draw counts prompt i `times[i]` times: equal to the metric functions
    on the rows repeated that often (prompts drawn 0 times left out of min-max too)."""
    from analyzer.metrics import committee as cm
    from analyzer.tables.committee import CommitteeRows

    rng = np.random.default_rng(5)
    n, k, experts = 12, 2, 6
    ids = np.argsort(rng.random((n, 1, experts)), -1)[..., :k]
    weights = rng.random((n, 1, k)).astype(np.float32)
    logits = rng.normal(size=(n, 1, experts))
    probs = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    rows = CommitteeRows()
    rows.add("math", ids, weights, probs)
    times = np.array([0, 3, 1, 0, 2, 1, 1, 0, 0, 2, 1, 1], np.float64)
    rep = np.repeat(np.arange(n), times.astype(int))
    for variant, expected in (
        ("frequency", cm.eci_frequency(ids[rep, 0], experts)),
        ("frequency_weight", cm.eci_frequency_weight(ids[rep, 0], weights[rep, 0], experts)),
        ("softmax", probs[rep, 0].astype(np.float64).mean(0)),
    ):
        _, c = rows.contributions(variant, experts, {"math": times})
        np.testing.assert_allclose(c[0, 0], expected, rtol=1e-6, atol=1e-9)
