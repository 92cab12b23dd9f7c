"""An engine capturing in float16 (`capture_dtype`: cast on the device, inside the
forward's copy into the capture buffers).

Proof against an independent implementation: its router logits and router inputs are
transformers' on the same weights (fp32, 1e-4) rounded to float16, and its ids and
weights are unchanged. Its store keeps those float16 values as they are, cached prompt
positions included (their rows recalled from float16 slot rows), and a store
asking for float32 logits is refused with a message that says why, not filled with
rounded values that look exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from capture_server.capture.api import CaptureResult
from capture_server.errors import StoreWriteError
from capture_server.store import RoutingStore
from tests.capture.reference import TransformersReference

PROMPTS: list[str | list[int]] = [
    np.random.default_rng(0).integers(1, 100, size=300).tolist(),  # longer than a KV block
    "def main return value",
]
TOL = 1e-4


@dataclass
class HalfCapture:
    memory: CaptureResult
    store: RoutingStore
    refused: str
    ref: TransformersReference


@pytest.fixture(scope="module")
def half(specimen, tmp_path_factory) -> HalfCapture:
    from capture_server.capture.api import CaptureEngine

    path = specimen("qwen3_moe")
    root = tmp_path_factory.mktemp("half")
    engine = CaptureEngine(
        str(path),
        hidden_layers=[1],
        capture_dtype="float16",
        dtype="float32",
        max_model_len=512,
        seed=0,
        enforce_eager=True,
    )
    sampling = dict(max_tokens=8, temperature=0.0, ignore_eos=True)
    try:
        memory = engine.generate(PROMPTS, **sampling)
        store = engine.generate_to_store(PROMPTS, str(root / "store"), **sampling)
        # the prompts' blocks were cached by the first call: their rows came from the
        # host's float16 slot rows (`prefix_rows`), not from a forward
        assert engine.stats()["prefix_rows_reused"] > 0
        with pytest.raises(StoreWriteError) as refused:
            f32 = {"logits_dtype": "float32"}
            engine.generate_to_store(PROMPTS[:1], str(root / "f32"), store_options=f32, **sampling)
    finally:
        engine.close()
    return HalfCapture(memory, store, str(refused.value), TransformersReference(path))


def _rounded_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """`got` is float16 and within TOL of `want` plus float16's rounding (half a unit
    in the last place: 2**-11 of the value)."""
    assert got.dtype == np.float16, what
    slack = TOL + np.abs(want) * 2.0**-11
    err = np.abs(got.astype(np.float32) - want)
    assert (err <= slack).all(), f"{what}: largest excess {(err - slack).max():.3g}"


def test_float16_rows_are_transformers_rounded(half):
    for seq in half.memory.sequences:
        want = half.ref.route(seq.token_ids[:-1])
        rows = seq.rows
        _rounded_close(rows.router_logits, want.logits, "router logits")
        _rounded_close(rows.hidden_states[1], want.hidden[1], "router input of MoE layer 1")
        np.testing.assert_array_equal(rows.topk_ids, want.ids)
        assert rows.topk_weights.dtype == np.float32  # weights stay exact
        np.testing.assert_allclose(rows.topk_weights, want.weights, atol=TOL, rtol=0)


def test_store_keeps_the_float16_values(half):
    """Regression check of the store against the same engine's in-memory rows."""
    index = half.store.index
    assert len(index) == len(PROMPTS)
    for seq in half.memory.sequences:
        row = index.filter(index["prompt_index"] == seq.prompt_index).row(0, named=True)
        stored = half.store.sequence(row["sequence_id"])
        np.testing.assert_array_equal(
            stored["router_logits"].view(np.uint16), seq.rows.router_logits.view(np.uint16)
        )
        np.testing.assert_array_equal(stored["topk_ids"], seq.rows.topk_ids)


def test_float32_store_is_refused_with_the_reason(half):
    assert "logits_dtype" in half.refused and "float16" in half.refused
