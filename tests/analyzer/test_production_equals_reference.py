"""The analyzer's production path (one counting pass per block, statistics from counts,
rollout curves from checkpoint counts) equals the reference metric functions in
`analyzer.metrics` applied to each sequence's raw expert ids.

This is a proof against an independent definition: the reference functions are
hand-tested in test_metrics and work on token rows, the production path never sees
them. Edge cases: empty prompts, prompt-only sequences, single rows, rollouts past the
last checkpoint, and many ties at the top-p cut (8 experts, few tokens).

Production runs in a spawned child, as in the analyzer's Ray workers: it loads the
compiled loops, which this process (it runs in-process vLLM engines) must not.
"""

from __future__ import annotations

import itertools
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

from analyzer.metrics.rollout import prompt_vs_rollout, similarity_through_rollout
from analyzer.metrics.usage import load_entropy, usage_frequency

EXPERTS, LAYERS, K = 8, 3, 2
CHECKPOINTS = (0, 4, 8, 16, 32, 64, 128, 256, 512, 1024)  # analyzer.profiles.CHECKPOINTS


def _make_sequences(seed: int) -> tuple[list[dict], np.ndarray]:
    """Index rows and the block's ids: 3 samples of 5 prompts, plus edge cases."""
    rng = np.random.default_rng(seed)
    shapes = []  # (prompt index, sample index, prompt_len, rollout rows)
    for prompt in range(5):
        prompt_len = int(rng.integers(1, 40))
        for sample in range(3):
            shapes.append((prompt, sample, prompt_len, int(rng.integers(0, 300))))
    shapes += [(5, 0, 0, 50), (6, 0, 12, 0), (7, 0, 1, 0), (8, 0, 3, 1100)]
    sequences, ids, offset = [], [], 0
    for number, (prompt, sample, prompt_len, rollout) in enumerate(shapes):
        rows = prompt_len + rollout
        # a few popular experts per sequence, so that counts tie often
        favourites = rng.choice(EXPERTS, size=4, replace=False)
        picks = np.stack(
            [rng.choice(favourites, size=K, replace=False) for _ in range(rows * LAYERS)]
        )
        ids.append(picks.reshape(rows, LAYERS, K))
        sequences.append(
            {
                "sequence_id": number,
                "prompt_index": prompt,
                "sample_index": sample,
                "prompt_len": prompt_len,
                "token_offset": offset,
                "num_rows": rows,
                "labels": {},
                "curve": True,
            }
        )
        offset += rows
    return sequences, np.concatenate(ids).astype(np.uint8)


def _production(args):
    from analyzer.fold import sequence_stats
    from analyzer.params import Params
    from analyzer.profiles import profile_rows
    from analyzer.tables.rollout import rollout_curve_table

    sequences, ids, top_p = args
    positions = np.concatenate([np.arange(s["num_rows"]) for s in sequences])
    block = profile_rows(sequences, {"topk_ids": ids, "positions": positions}, 0, EXPERTS)
    params = Params(top_p=top_p)
    profiles = [block.profile(i) for i in range(len(sequences))]
    return {
        "prompt": block.prompt,
        "cumulative": block.cumulative,
        "numpy": sequence_stats(block, params, compiled=False),
        "compiled": sequence_stats(block, params, compiled=True),
        "curve": rollout_curve_table("s", profiles, params).to_dicts(),
    }


@pytest.fixture(scope="module")
def pool():
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool


@pytest.mark.parametrize(("seed", "top_p"), [(0, 0.8), (1, 0.5), (2, 1.0)])
def test_profiles_and_statistics_equal_the_reference(pool, seed, top_p):
    sequences, ids = _make_sequences(seed)
    got = pool.submit(_production, (sequences, ids, top_p)).result(300)
    for i, s in enumerate(sequences):
        rows = ids[s["token_offset"] : s["token_offset"] + s["num_rows"]]
        p = s["prompt_len"]
        # counts are frequencies times the slots (tokens x k) they were counted over
        np.testing.assert_allclose(
            got["prompt"][i], usage_frequency(rows[:p], EXPERTS) * p * K, rtol=1e-12
        )
        np.testing.assert_allclose(
            got["cumulative"][i], usage_frequency(rows, EXPERTS) * len(rows) * K, rtol=1e-12
        )
        reference = prompt_vs_rollout(rows, p, EXPERTS, top_p)
        entropy = load_entropy(usage_frequency(rows, EXPERTS))
        for path in ("numpy", "compiled"):
            stats = got[path]
            np.testing.assert_allclose(stats["entropy"][i], entropy, atol=1e-12)
            np.testing.assert_allclose(
                stats["prompt_vs_rollout_cosine"][i], reference["cosine"], atol=1e-12
            )
            np.testing.assert_array_equal(
                stats["prompt_vs_rollout_jaccard"][i], reference["jaccard"]
            )


@pytest.mark.parametrize(("seed", "top_p"), [(0, 0.8), (3, 0.6)])
def test_rollout_curves_equal_the_reference(pool, seed, top_p):
    """Each curve point is the mean over pairs of `similarity_through_rollout` on the two
    sequences' ids: samples of one prompt ("same prompt"), first samples of different
    prompts ("other prompt")."""
    sequences, ids = _make_sequences(seed)
    got = pool.submit(_production, (sequences, ids, top_p)).result(300)
    rows = {
        s["sequence_id"]: ids[s["token_offset"] : s["token_offset"] + s["num_rows"]]
        for s in sequences
    }
    by_prompt: dict[int, list[dict]] = {}
    for s in sequences:
        by_prompt.setdefault(s["prompt_index"], []).append(s)
    pairs = {
        "same prompt": [
            p for group in by_prompt.values() for p in itertools.combinations(group, 2)
        ],
        "other prompt": list(itertools.combinations([g[0] for g in by_prompt.values()], 2)),
    }
    reference = {}
    for relation, relation_pairs in pairs.items():
        for scope in ("cumulative", "generated"):
            sims = [
                similarity_through_rollout(
                    rows[a["sequence_id"]],
                    a["prompt_len"],
                    rows[b["sequence_id"]],
                    b["prompt_len"],
                    EXPERTS,
                    list(CHECKPOINTS),
                    scope,
                    top_p,
                )
                for a, b in relation_pairs
            ]
            for name in ("cosine", "jaccard"):
                mean = np.mean([s[name] for s in sims], axis=0)  # (checkpoints, layers)
                for c, g in enumerate(CHECKPOINTS):
                    for layer in range(LAYERS):
                        reference[relation, scope, g, layer, name] = mean[c, layer]
    assert len(got["curve"]) > 50
    points = {(r["relation"], r["scope"]) for r in got["curve"]}
    assert points == {(rel, scope) for rel in pairs for scope in ("cumulative", "generated")}
    for row in got["curve"]:
        key = (row["relation"], row["scope"], row["rollout_tokens"], row["layer"])
        for name in ("cosine", "jaccard"):
            assert row[name] == pytest.approx(reference[(*key, name)], abs=1e-12), (key, name)
