"""Every metric against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from analyzer.metrics import committee, rollout, usage


def test_usage_frequency_counts_visits_per_layer():
    ids = np.array([[[0, 1], [2, 3]], [[0, 2], [2, 1]]])  # 2 tokens, 2 layers, k = 2
    f = usage.usage_frequency(ids, 4)
    np.testing.assert_allclose(f, [[0.5, 0.25, 0.25, 0.0], [0.0, 0.25, 0.5, 0.25]])


def test_cosine_by_hand():
    a, b = np.array([1.0, 0.0, 1.0]), np.array([1.0, 1.0, 0.0])
    assert usage.cosine(a, b) == pytest.approx(0.5)
    assert usage.cosine(a, np.zeros(3)) == 0


def test_top_p_set_reaches_the_mass():
    f = np.array([0.1, 0.5, 0.3, 0.1])
    # sorted: 0.5 (e1), 0.3 (e2) -> 0.8 reaches P = 0.8 with two experts
    np.testing.assert_array_equal(usage.top_p_mask(f, 0.8), [False, True, True, False])
    # P = 0.85 needs a third: tie between e0 and e3 broken by id -> e0
    np.testing.assert_array_equal(usage.top_p_mask(f, 0.85), [True, True, True, False])


def test_top_p_set_follows_its_definition_on_ties_and_zeros():
    """Against the definition written out: experts in order of (-f, id), kept until the
    mass reaches P; zero-frequency experts never count."""
    rng = np.random.default_rng(1)
    counts = rng.integers(0, 4, (300, 6)).astype(np.float64)  # many ties and zeros
    f = counts / np.maximum(counts.sum(-1, keepdims=True), 1)
    for p in (0.5, 0.8, 1.0):
        got = usage.top_p_mask(f, p)
        for row, mask in zip(f, got, strict=True):
            expected, mass = np.zeros(len(row), dtype=bool), 0.0
            for e in sorted(range(len(row)), key=lambda e: (-row[e], e)):
                if mass >= p - 1e-12:
                    break
                expected[e], mass = row[e] > 0, mass + row[e]
            np.testing.assert_array_equal(mask, expected)


def test_top_p_jaccard_by_hand():
    f_a = np.array([0.5, 0.3, 0.1, 0.1])  # set {0, 1}
    f_b = np.array([0.1, 0.5, 0.3, 0.1])  # set {1, 2}
    assert usage.top_p_jaccard(f_a, f_b, 0.8) == pytest.approx(1 / 3)


def test_topk_overlap_hamming_and_overlap():
    a = np.array([[[0, 1]]])
    b = np.array([[[1, 3]]])
    out = usage.topk_overlap(a, b, 4)
    # masks 1100 vs 0101: differ in 2 of 4 -> hamming 0.5; share one of two -> 0.5
    assert out["hamming"][0, 0] == pytest.approx(0.5)
    assert out["overlap"][0, 0] == pytest.approx(0.5)


def test_router_confidence_is_max_softmax():
    logits = np.array([[[0.0, np.log(3.0)]], [[0.0, 0.0]]])  # probs 0.75 and 0.5
    assert usage.router_confidence(logits)[0] == pytest.approx(0.625)


def test_entropy_and_gini_extremes():
    uniform, peaked = np.full(4, 0.25), np.array([1.0, 0, 0, 0])
    assert usage.load_entropy(uniform) == pytest.approx(1.0)
    assert usage.load_entropy(peaked) == pytest.approx(0.0)
    assert usage.gini(uniform) == pytest.approx(0.0)
    # |1-0| appears 6 times in the double sum: 6 / (2 * 4 * 1) = 0.75
    assert usage.gini(peaked) == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("cov", "size", "experts", "paper"),
    [
        (0.705, 4, 64, 35.8),
        (0.670, 5, 128, 49.9),
        (0.439, 3, 64, 15.9),
    ],
)
def test_influence_ratio_reproduces_the_published_rows(cov, size, experts, paper):
    assert committee.influence_ratio(cov, size, experts) == pytest.approx(paper, abs=0.05)


def test_ranks_with_penalty():
    c = np.array([[0.5, 0.1, 0.3, 0.0], [0.0, 0.6, 0.2, 0.4]])
    np.testing.assert_array_equal(committee.ranks_with_penalty(c, 2), [[1, 3, 2, 3], [3, 1, 3, 2]])


def test_standing_committee_by_hand():
    # 3 domains, 5 experts, k = 2. Expert 0 is top-1 everywhere; expert 1 is 2nd in two
    # domains; expert 3 is 2nd in one.
    c = np.array(
        [
            [0.6, 0.3, 0.05, 0.05, 0.0],
            [0.5, 0.3, 0.1, 0.1, 0.0],
            [0.7, 0.0, 0.0, 0.2, 0.1],
        ]
    )
    got = committee.standing_committee(c, k=2, gamma=0.6)
    # presence: e0 3/3, e1 2/3, e3 1/3; need ceil(3 * 0.6) = 2 domains -> candidates {0, 1}
    # ranks e0 = [1,1,1] (mu 1, var 0); e1 = [2,2,3] (mu 7/3, var 2/9): e0 dominates e1
    assert got.members == [0]
    assert got.mean_rank == [1.0] and got.rank_var == [0.0]
    # topk_table coverage: c̄_0 = (0.6+0.5+0.7)/3 = 0.6; denominator mean of top-2 sums
    # = (0.9 + 0.8 + 0.9) / 3 = 0.8667 -> 0.6923
    assert got.coverage == pytest.approx(0.6 / (2.6 / 3))
    assert got.ratio == pytest.approx((got.coverage / 1) / ((1 - got.coverage) / 4))
    # all_experts denominator: 0.6 / mean total (1.0) = 0.6
    assert committee.coverage_of(c, [0], 2, "all_experts") == pytest.approx(0.6)


def test_eci_variants():
    ids = np.array([[0, 1], [0, 2], [1, 2]])
    weights = np.array([[0.7, 0.3], [0.9, 0.1], [0.6, 0.4]])
    np.testing.assert_allclose(committee.eci_frequency(ids, 3), [2 / 3, 2 / 3, 2 / 3])
    # the official definition: per-sample weights with 0 where unselected, min-max over
    # all samples. Expert 0: [0.7, 0.9, 0] -> lo 0, hi 0.9; expert 1: [0.3, 0, 0.6].
    got = committee.eci_frequency_weight(ids, weights, 3)
    assert got[0] == pytest.approx((2 / 3) * (0.7 + 0.9) / (0.9 + 1e-6) / 3, rel=1e-9)
    assert got[1] == pytest.approx((2 / 3) * (0.3 + 0.6) / (0.6 + 1e-6) / 3, rel=1e-9)


def test_eci_frequency_weight_of_an_expert_selected_in_some_samples():
    """Selected once in four samples: the authors' code gives frequency 1/4 x mean
    normalised weight ~1/4 (its zeros count in the min-max), not 0."""
    ids = np.array([[0, 1], [2, 1], [2, 1], [2, 1]])
    weights = np.array([[0.5, 0.5], [0.6, 0.4], [0.7, 0.3], [0.8, 0.2]])
    got = committee.eci_frequency_weight(ids, weights, 3)
    assert got[0] == pytest.approx(0.25 * (0.5 / (0.5 + 1e-6)) / 4, rel=1e-9)
    # an expert selected in every sample: min-max over its own weights
    assert got[1] == pytest.approx(1.0 * ((0.3 + 0.2 + 0.1 + 0.0) / (0.3 + 1e-6)) / 4, rel=1e-9)
    logits = np.log(np.array([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25]]))
    np.testing.assert_allclose(committee.eci_softmax(logits), [0.375, 0.375, 0.25])


def test_cross_domain_jaccard():
    c = np.array([[0.5, 0.4, 0.1], [0.5, 0.1, 0.4]])
    jac = committee.cross_domain_jaccard(c, 2)
    # top-2 sets {0,1} and {0,2}: 1 / 3
    assert jac[0, 1] == pytest.approx(1 / 3) and jac[0, 0] == 1


def test_similarity_through_rollout_scopes():
    # prompt of 2 tokens identical in both; rollouts differ completely
    a = np.array([[[0, 1]], [[0, 1]], [[2, 3]], [[2, 3]]])
    b = np.array([[[0, 1]], [[0, 1]], [[4, 5]], [[4, 5]]])
    cum = rollout.similarity_through_rollout(a, 2, b, 2, 6, [0, 2], "cumulative")
    np.testing.assert_allclose(cum["cosine"][:, 0], [1.0, 0.5])
    gen = rollout.similarity_through_rollout(a, 2, b, 2, 6, [2], "generated")
    assert gen["cosine"][0, 0] == 0 and gen["jaccard"][0, 0] == 0
    pv = rollout.prompt_vs_rollout(a, 2, 6)
    assert pv["cosine"][0] == 0


def test_topk_mass_and_retention():
    c = np.array([[0.5, 0.3, 0.2, 0.0], [0.6, 0.1, 0.1, 0.2]])
    np.testing.assert_allclose(committee.topk_mass(c, 2), [0.8, 0.8])
    # native k = 2 committee is {0}; at k = 1 expert 0 is still first everywhere
    got = committee.retention(c, 2, [1, 2])
    assert got == {1: 1.0, 2: 1.0}
