"""Interventions on the planted model: routing under a mask is the planted ranking with
the masked experts removed (ground truth, not a comparison with moetrace), the store marks
intervened sequences, and bad interventions are refused before anything runs."""

from __future__ import annotations

import numpy as np
import pytest

from capture_server.capture.intervention import Intervention, InterventionError
from capture_server.specimens.planted import planted_ranking

LAYERS = 4  # MoE layers of the specimen


@pytest.fixture(scope="module")
def engine(specimen):
    from capture_server.capture.api import CaptureEngine

    engine = CaptureEngine(
        str(specimen("qwen3_moe", planted=True)),
        dtype="float32",
        max_model_len=512,
        seed=0,
        enforce_eager=True,
        interventions=True,
    )
    yield engine
    engine.close()


def _prompts(engine, count: int) -> list[list[int]]:
    vocab = len(engine.tokenizer)
    rng = np.random.default_rng(0)
    return [rng.integers(1, vocab, size=12).tolist() for _ in range(count)]


def test_masked_expert_never_appears_and_the_rest_follow_the_plant(engine):
    """Request i masks expert i at every layer. The planted first three experts of every
    token are distinct with clear gaps, so with one masked the top-2 are the first two
    of the others."""
    masks = [{"mask": {layer: [i] for layer in range(LAYERS)}} for i in range(8)]
    result = engine.generate(
        _prompts(engine, 8), max_tokens=10, temperature=0.0, ignore_eos=True, intervention=masks
    )
    checked = 0
    for seq in result.sequences:
        masked = seq.prompt_index
        for layer in range(LAYERS):
            ranking = planted_ranking(seq.rows.token_ids, layer)
            want = np.array([[e for e in r if e != masked][:2] for r in ranking])
            got = seq.rows.topk_ids[:, layer]
            assert not (got == masked).any(), f"masked expert {masked} selected at {layer}"
            np.testing.assert_array_equal(got, want, err_msg=f"mask {masked}, layer {layer}")
            checked += int((ranking[:, :2] == masked).any(axis=1).sum())
    assert checked > 20, "too few rows where the mask hit the planted top-2"


def test_keep_prunes_to_the_kept_experts(engine):
    """Keeping experts 0-3 removes every second choice (4-7): the third takes its place."""
    keep = {"keep": {layer: [0, 1, 2, 3] for layer in range(LAYERS)}}
    seq = engine.generate(
        _prompts(engine, 1), max_tokens=6, temperature=0.0, ignore_eos=True, intervention=keep
    ).sequences[0]
    for layer in range(LAYERS):
        ranking = planted_ranking(seq.rows.token_ids, layer)
        np.testing.assert_array_equal(seq.rows.topk_ids[:, layer], ranking[:, [0, 2]])


def test_zero_keeps_the_selection_and_moves_its_weight(engine):
    """Zeroing experts 4-7 keeps the planted top-2 and gives the first all the weight."""
    zero = {"zero": {layer: [4, 5, 6, 7] for layer in range(LAYERS)}}
    seq = engine.generate(
        _prompts(engine, 1), max_tokens=6, temperature=0.0, ignore_eos=True, intervention=zero
    ).sequences[0]
    for layer in range(LAYERS):
        ranking = planted_ranking(seq.rows.token_ids, layer)
        np.testing.assert_array_equal(seq.rows.topk_ids[:, layer], ranking[:, :2])
    np.testing.assert_allclose(seq.rows.topk_weights[..., 0], 1.0, atol=1e-6)
    assert (seq.rows.topk_weights[..., 1] == 0).all()


def test_store_marks_intervened_sequences(engine, tmp_path):
    mask = Intervention.from_dict({"mask": {"2": [1, 5]}})
    store = engine.generate_to_store(
        _prompts(engine, 3),
        str(tmp_path / "store"),
        max_tokens=4,
        temperature=0.0,
        intervention=[None, mask, None],
    )
    marks = store.index.sort("prompt_index")["intervention"].to_list()
    assert marks == ["", mask.key(), ""]
    assert Intervention.from_dict(__import__("json").loads(marks[1])) == mask


@pytest.mark.parametrize(
    ("intervention", "message"),
    [
        ({"mask": {4: [0]}}, "intervention.mask: MoE layer 4 does not exist"),
        ({"zero": {0: [8]}}, "intervention.zero: expert 8 of MoE layer 0 does not exist"),
        ({"keep": {1: [3]}}, "MoE layer 1 leaves 1 experts selectable, fewer than the 2"),
        ({"mask": {0: list(range(7))}}, "MoE layer 0 leaves 1 experts selectable"),
        ({"drop": {0: [1]}}, "unknown kind 'drop'"),
        ({"mask": {"first": [1]}}, "layer 'first': expected an integer layer"),
    ],
)
def test_bad_interventions_are_refused_before_running(engine, intervention, message):
    steps = engine.stats()["steps"]
    with pytest.raises(InterventionError, match=message):
        engine.generate(_prompts(engine, 1), max_tokens=2, intervention=intervention)
    assert engine.stats()["steps"] == steps, "nothing may run"


def test_intervened_requests_never_share_cached_blocks_with_others(engine):
    """Prefix caching is on: a long prompt run plain, then masked, then masked again.
    The masked run must not reuse the plain run's blocks (their KV and rows come from
    another routing; the engine salts intervened requests), and the second masked run
    reuses the first's. Ground truth: the masked expert never appears, at any position."""
    vocab = len(engine.tokenizer)
    prompt = np.random.default_rng(9).integers(1, vocab, size=300).tolist()
    mask = {"mask": {layer: [0] for layer in range(LAYERS)}}
    run = dict(max_tokens=4, temperature=0.0, ignore_eos=True)

    def reused() -> int:
        return engine.stats()["prefix_rows_reused"]

    plain = engine.generate([prompt], **run).sequences[0]
    assert (plain.rows.topk_ids == 0).any(), "the plain run must use the masked expert"
    before = reused()
    masked = engine.generate([prompt], intervention=mask, **run).sequences[0]
    assert reused() == before, "a masked request read blocks computed without the mask"
    again = engine.generate([prompt], intervention=mask, **run).sequences[0]
    assert reused() > before, "equal interventions should share their blocks"
    for seq in (masked, again):
        np.testing.assert_array_equal(seq.rows.positions, np.arange(300 + 4 - 1))
        assert not (seq.rows.topk_ids == 0).any(), "masked expert selected"
    np.testing.assert_array_equal(again.rows.topk_ids, masked.rows.topk_ids)
