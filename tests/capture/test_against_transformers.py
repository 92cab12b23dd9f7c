"""Captured routing equals transformers on the same weights, for every specimen architecture.

Two comparisons per architecture:
1. Forward level: transformers' whole forward on the same token sequence gives the same
   router inputs, logits, weights and ids (fp32, 1e-4).
2. Router level: transformers' router module applied to the captured router inputs gives
   the captured logits, weights and ids (fp32, 1e-4). This isolates the capture from
   engine numerics.

3. Interventions: texts scored with experts masked, kept (pruned) or zeroed give the
   same ids, weights and per-token NLL as transformers' forward with the same change
   written into its routers (`TransformersReference.intervene`, a test-only patch).

Documented exception: vLLM's CPU MLA attention (DeepSeek-V3) differs from transformers'
eager attention by a few 1e-2 in the residual stream after position 0, so for that
architecture the forward-level check uses a loose tolerance and compares ids only where
the reference's k-th and (k+1)-th scores are not within that margin.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from capture_server.capture.api import CaptureResult
from capture_server.specimens import ARCHITECTURES, build
from tests.capture.reference import TransformersReference

PROMPTS = [
    "the king signed a treaty with the northern states",
    "def main return value",
    "the bank raised interest rates and the market priced bonds against inflation risk in",
]
TOL = 1e-4
ENGINE_DIFFERS = {"deepseek_v3": 1e-1}  # forward-level tolerance where attention differs


SCORED = [
    ("the king signed a treaty", " with the northern states and the bank"),
    ("def main", " return value of the market priced bonds"),
]
INTERVENTIONS = {
    "mask": {"mask": {0: [0, 3], 2: [5]}},
    "keep": {"keep": {1: [1, 2, 4, 6]}},
    "zero": {"zero": {0: [2, 7], 1: [2, 7], 2: [2, 7]}},
}
CORRECTION_BIAS = {"deepseek_v3"}  # mask and keep are refused there (see Intervention.validate)


@dataclass
class Captured:
    arch: str
    result: CaptureResult  # PROMPTS generated
    ref: TransformersReference
    scored: dict[str, CaptureResult]  # SCORED under each intervention kind, and "none"
    refused: dict[str, str]  # kind -> error message, where the engine refuses it


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def captured(request, specimen) -> Captured:
    """Capture of PROMPTS, and of SCORED under each intervention, for one architecture."""
    from capture_server.capture.api import CaptureEngine
    from capture_server.capture.intervention import InterventionError

    arch = request.param
    path = specimen(arch)
    moe_layers = build.LAYERS - (1 if arch == "deepseek_v3" else 0)
    # MLA on a CPU with AMX tiles defaults to vLLM's AMX_MLA backend, which takes no
    # float32 weights ("expect weight to be bfloat16, ..."); the reference CPU_MLA
    # backend, the default without AMX, does (vllm/platforms/cpu.py, get_attn_backend_cls)
    mla = {"attention_backend": "CPU_MLA"} if arch == "deepseek_v3" else {}
    engine = CaptureEngine(
        str(path),
        hidden_layers=range(moe_layers),
        dtype="float32",
        max_model_len=512,
        seed=0,
        enforce_eager=True,
        interventions=True,
        **mla,
    )
    scored, refused = {}, {}
    prompts, completions = zip(*SCORED, strict=True)
    try:
        result = engine.generate(PROMPTS, max_tokens=12, temperature=0.0, ignore_eos=True)
        for kind, intervention in [("none", None), *INTERVENTIONS.items()]:
            try:
                scored[kind] = engine.score(prompts, completions, intervention=intervention)
            except InterventionError as exc:
                refused[kind] = str(exc)
    finally:
        engine.close()
    return Captured(arch, result, TransformersReference(path), scored, refused)


def test_rows_cover_every_forwarded_token(captured):
    result = captured.result
    for seq in result.sequences:
        p, g = len(seq.prompt_token_ids), len(seq.output_token_ids)
        assert len(seq.rows) == p + g - 1, "the last sampled token has no row"
        np.testing.assert_array_equal(seq.rows.positions, np.arange(p + g - 1))
        np.testing.assert_array_equal(seq.rows.token_ids, seq.token_ids[:-1])
        assert seq.rows.is_prompt.sum() == p


def test_router_level_matches_transformers(captured):
    arch, result, ref = captured.arch, captured.result, captured.ref
    for seq in result.sequences:
        rows = seq.rows
        hidden = [rows.hidden_states[i] for i in range(len(result.meta.moe_layers))]
        want = ref.route_hidden(hidden)
        np.testing.assert_allclose(
            rows.router_logits, want.logits, atol=TOL, rtol=0, err_msg=f"{arch}: router logits"
        )
        np.testing.assert_array_equal(rows.topk_ids, want.ids, err_msg=f"{arch}: top-k ids")
        np.testing.assert_allclose(
            rows.topk_weights, want.weights, atol=TOL, rtol=0, err_msg=f"{arch}: top-k weights"
        )


def test_forward_level_matches_transformers(captured):
    arch, result, ref = captured.arch, captured.result, captured.ref
    tol = ENGINE_DIFFERS.get(arch, TOL)
    for seq in result.sequences:
        want = ref.route(seq.token_ids[:-1])
        rows = seq.rows
        assert result.meta.moe_layers == ref.moe_blocks
        for i in range(len(ref.moe_blocks)):
            np.testing.assert_allclose(
                rows.hidden_states[i],
                want.hidden[i],
                atol=tol,
                rtol=0,
                err_msg=f"{arch}: router input of MoE layer {i}",
            )
        np.testing.assert_allclose(
            rows.router_logits, want.logits, atol=tol, rtol=0, err_msg=f"{arch}: router logits"
        )
        decisive = np.ones(rows.topk_ids.shape[:2], dtype=bool)
        if arch in ENGINE_DIFFERS:
            # sigmoid' <= 1/4: a logit error of tol moves a selection score by tol / 4
            slope = 0.25 if result.meta.scoring_func == "sigmoid" else 1.0
            decisive = _selection_margin(want.logits, result.meta) > 2 * tol * slope
            assert decisive.mean() > 0.5, "too few decisive tokens to compare"
        np.testing.assert_array_equal(
            rows.topk_ids[decisive], want.ids[decisive], err_msg=f"{arch}: top-k ids"
        )
        np.testing.assert_allclose(
            rows.topk_weights[decisive],
            want.weights[decisive],
            atol=tol,
            rtol=0,
            err_msg=f"{arch}: top-k weights",
        )


def _selection_margin(logits: np.ndarray, meta) -> np.ndarray:
    """Gap between the k-th and (k+1)-th selection score per (token, layer)."""
    scores = 1 / (1 + np.exp(-logits)) if meta.scoring_func == "sigmoid" else logits
    if meta.correction_bias is not None:
        scores = scores + meta.correction_bias[None]
    top = -np.sort(-scores, axis=-1)
    return top[..., meta.top_k - 1] - top[..., meta.top_k]


def test_metadata_matches_checkpoint(captured):
    arch, result, ref = captured.arch, captured.result, captured.ref
    meta = result.meta
    np.testing.assert_allclose(meta.router_weights, ref.router_weights, atol=0, rtol=0)
    assert meta.num_experts == 8 and meta.top_k == 2
    if arch == "deepseek_v3":
        assert meta.moe_layers == [1, 2, 3], "block 0 is dense"
        assert meta.scoring_func == "sigmoid" and meta.correction_bias is not None
    if arch == "gpt_oss":
        assert meta.router_bias is not None
    if arch in ("qwen2_moe", "deepseek_v3"):
        assert meta.num_shared_experts == 1


def _reference_change(intervention: dict, layers: int, experts: int) -> dict:
    """The intervention as `TransformersReference.intervene` takes it: keep as a mask of
    the complement."""
    mask = {layer: list(ids) for layer, ids in intervention.get("mask", {}).items()}
    for layer, kept in intervention.get("keep", {}).items():
        mask[layer] = [e for e in range(experts) if e not in kept]
    return {"mask": mask, "zero": intervention.get("zero", {})}


@pytest.mark.parametrize("kind", sorted(INTERVENTIONS))
def test_intervention_matches_transformers(captured, kind):
    """Ids, weights and per-token NLL under the intervention equal transformers' forward
    with the same change, masked experts never appear, zeroed ones carry no weight, and
    the change is real (ids, weights or NLL differ from the plain score)."""
    arch, ref, meta = captured.arch, captured.ref, captured.result.meta
    if arch in CORRECTION_BIAS and kind != "zero":
        assert "correction bias" in captured.refused[kind]
        return
    tol = ENGINE_DIFFERS.get(arch, TOL)
    change = _reference_change(INTERVENTIONS[kind], len(meta.moe_layers), meta.num_experts)
    changed = False
    plain = captured.scored["none"].sequences
    for seq, base in zip(captured.scored[kind].sequences, plain, strict=True):
        with ref.intervene(**change):
            want = ref.route(seq.token_ids)
        rows = seq.rows
        np.testing.assert_array_equal(rows.positions, np.arange(len(seq.token_ids)))
        if arch not in ENGINE_DIFFERS:  # MLA attention moves near-ties (module docstring)
            np.testing.assert_array_equal(rows.topk_ids, want.ids, err_msg=f"{arch} {kind}: ids")
        np.testing.assert_allclose(
            rows.topk_weights, want.weights, atol=tol, rtol=0, err_msg=f"{arch} {kind}: weights"
        )
        np.testing.assert_allclose(
            seq.nll[1:], want.nll[1:], atol=tol, rtol=0, err_msg=f"{arch} {kind}: per-token NLL"
        )
        for layer, masked in change["mask"].items():
            assert not np.isin(rows.topk_ids[:, layer], masked).any(), f"masked at {layer}"
        for layer, zeroed in change["zero"].items():
            hit = np.isin(rows.topk_ids[:, layer], zeroed)
            assert (rows.topk_weights[:, layer][hit] == 0).all(), f"zeroed weight at {layer}"
        changed |= not np.array_equal(rows.topk_ids, base.rows.topk_ids)
        changed |= not np.allclose(rows.topk_weights, base.rows.topk_weights, atol=10 * tol)
        changed |= not np.allclose(seq.nll[1:], base.nll[1:], atol=10 * tol)
    assert changed, f"{arch} {kind}: the intervention changed nothing"


def test_no_intervention_matches_transformers(captured):
    """The plain score's NLL equals transformers' (the NLL path itself is right)."""
    for seq in captured.scored["none"].sequences:
        want = captured.ref.route(seq.token_ids)
        tol = ENGINE_DIFFERS.get(captured.arch, TOL)
        np.testing.assert_allclose(seq.nll[1:], want.nll[1:], atol=tol, rtol=0)
        assert seq.mean_nll("prompt") > 0 and seq.mean_nll("completion") > 0
