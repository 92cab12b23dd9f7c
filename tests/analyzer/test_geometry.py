"""Geometry metrics against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from analyzer.metrics import geometry


def test_pooled_similarity_with_and_without_centring():
    a = np.array([[1.0, 0.0], [1.0, 0.0]])
    b = np.array([[1.0, 1.0], [1.0, 1.0]])
    assert geometry.pooled_similarity(a, b) == pytest.approx(1 / np.sqrt(2))
    # centred at (1, 0.5): means become (0, -0.5) and (0, 0.5): opposite
    assert geometry.pooled_similarity(a, b, np.array([1.0, 0.5])) == pytest.approx(-1.0)


def test_rms_distances_by_hand():
    x = np.array([[0.0, 0.0], [3.0, 4.0]])
    d = geometry.rms_distances(x)
    assert d[0, 1] == pytest.approx(np.sqrt(25 / 2)) and d[0, 0] == 0


def test_triangle_pairs_and_centring():
    h = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    z = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0]])  # row 1 is a pure shift of row 0
    dh, dz = geometry.triangle(h, z)
    assert len(dh) == 3
    assert dz[0] == pytest.approx(0.0)  # shift removed by centring over experts


def test_lipschitz_ratio_never_exceeds_the_operator_norm():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 4))
    h = rng.normal(size=(20, 4))
    out = geometry.lipschitz_ratio(h, h @ w.T, w)
    assert 0 < out["empirical"] <= out["operator_norm"] + 1e-9
    # along W's top right singular vector the bound is attained
    v = np.linalg.svd(w)[2][0]
    h2 = np.stack([np.zeros(4), v])
    assert geometry.lipschitz_ratio(h2, h2 @ w.T, w)["fraction"] == pytest.approx(1.0)


def test_shared_direction_energies():
    # every token is the same direction e0 plus a little e1 noise
    h = np.array([[10.0, 1.0], [10.0, -1.0], [10.0, 0.5], [10.0, -0.5]])
    w = np.array([[1.0, 2.0], [1.0, -2.0]])  # both experts read e0 equally: C W e0 = 0
    out = geometry.shared_direction(h, w)
    assert out["hidden_energy"] > 0.98
    assert out["router_energy"] == pytest.approx(0.0, abs=1e-6)
    assert out["retained_logit_energy"] == pytest.approx(1.0, abs=1e-6)


def test_same_token_overlap():
    tokens = np.array([5, 7, 5])
    ids = np.array([[[0, 1]], [[2, 3]], [[1, 4]]])  # token 5 rows share expert 1 of 2
    assert geometry.same_token_overlap(tokens, ids)[0] == pytest.approx(0.5)
    assert np.isnan(geometry.same_token_overlap(np.array([1, 2]), ids[:2])[0])


def test_reroute_follows_the_models_selection_rule():
    h = np.array([[1.0, 0.0]])
    w = np.array([[2.0, 0.0], [1.0, 0.0], [0.0, 0.0]])  # logits 2, 1, 0
    assert geometry.reroute(h, w, 2).tolist() == [[0, 1]]
    # gpt-oss: a logit bias changes the order
    assert geometry.reroute(h, w, 1, bias=np.array([0.0, 0.0, 3.0])).tolist() == [[2]]
    # DeepSeek-V3: sigmoid(2) + 0 < sigmoid(0) + 0.5, so the corrected expert 2 wins
    corrected = geometry.reroute(h, w, 1, "sigmoid", correction=np.array([0.0, 0.0, 0.5]))
    assert corrected.tolist() == [[2]]
    # ties go to the lower id
    assert geometry.reroute(np.zeros((1, 2)), w, 2).tolist() == [[0, 1]]
    with pytest.raises(ValueError, match="scoring"):
        geometry.reroute(h, w, 1, "relu")


def test_direction_ablation_when_routing_ignores_the_shared_direction():
    """Rows share e0 (the top singular direction); the router decides on e1 only, so
    removing one direction changes nothing and removing both leaves all-zero logits."""
    h = np.array([[10.0, 1.0], [10.0, -1.0], [10.0, 1.0], [10.0, -1.0]])
    w = np.array([[0.0, 1.0], [0.0, -1.0], [0.05, 0.0]])
    rows = geometry.direction_ablation(h, w, 1, (0, 1, 2))
    k0, k1, k2 = rows
    assert k0["removed_energy"] == 0 and k0["tokens_changed"] == 0
    assert k1["removed_energy"] == pytest.approx(400 / 404)
    assert k1["token_overlap"] == 1 and k1["usage_cosine"] == pytest.approx(1)
    # all-zero logits pick expert 0 everywhere: the rows that chose expert 1 change
    assert k2["tokens_changed"] == pytest.approx(0.5)
    assert k2["usage_cosine"] == pytest.approx(0.5 / np.sqrt(0.5))  # [.5,.5,0] vs [1,0,0]
    assert k2["top_p_jaccard"] == pytest.approx(0.5)  # {0,1} vs {0}


def test_direction_ablation_when_routing_rides_the_shared_direction():
    h = np.array([[10.0, 1.0], [10.0, -1.0], [10.0, 1.0], [10.0, -1.0]])
    w = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])  # expert 0 reads e0: always first
    _, k1 = geometry.direction_ablation(h, w, 1, (0, 1))
    assert k1["tokens_changed"] == 1 and k1["token_overlap"] == 0
    assert k1["usage_cosine"] == pytest.approx(0) and k1["top_p_jaccard"] == 0
