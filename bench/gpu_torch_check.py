"""The capture's GPU-only mechanics, checked with PyTorch alone (no vLLM, no network).

    python bench/gpu_torch_check.py [--out summary.json]

Five checks, each against a plain-torch reference computed eagerly:
1. ``cuda_graph``: the capture buffers' copies (`CaptureBuffers.record`) captured in a
   `torch.cuda.graph` and replayed with new inputs, at several padded batch sizes, fill
   the buffers exactly as eager calls do (what vLLM's CUDA graphs replay).
2. ``compiled_router``: a router wrapped the way the plugin wraps it (`hook_routers`)
   inside a `torch.compile`d forward records the same ids, weights, logits and hidden
   states as eager, at several batch sizes (what vLLM's torch.compile traces).
3. ``host_copy``: the device-to-host path (`HostCopy`: a rows-first gather of the
   (layers, tokens, k) buffers on the compute stream, pinned memory, a copy stream, a
   blocking-sync event) returns what a synchronous copy returns, and compute issued
   after a large copy starts finishes before the copy does.
4. ``expert_load``: counting a step's ids on the device (`ExpertLoad.add`) equals
   numpy's count of the same ids, and on CUDA queues its kernels without a host
   sync (`torch.cuda.set_sync_debug_mode("error")` raises on one).
5. ``float16_capture``: an engine capturing in float16 (`protocol.engine_config`'s
   ``capture_dtype``) casts a bfloat16 model's logits and router inputs inside the
   hooks' copy, in a CUDA graph on CUDA, to the bits the float32 capture gets once cast.

Without CUDA, the CUDA checks are reported as skipped and the rest run on the CPU (the
test suite does this). Prints one JSON summary and exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from capture_server.plugin.buffers import CaptureBuffers  # noqa: E402
from capture_server.plugin.expert_load import ExpertLoad  # noqa: E402
from capture_server.plugin.host_copy import HostCopy  # noqa: E402
from capture_server.plugin.router_hook import hook_routers  # noqa: E402

LAYERS, EXPERTS, TOP_K, HIDDEN, MAX_TOKENS = 3, 16, 4, 64, 256
BATCHES = (1, 3, 17, 64, 256)


class ToyRouter:
    """`select_experts` as vLLM's routers compute it: softmax, top-k, renormalise."""

    def select_experts(
        self,
        hidden_states: torch.Tensor,
        router_logits: torch.Tensor,
        topk_indices_dtype: torch.dtype | None = None,
        *,
        input_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(router_logits.float(), dim=-1)
        weights, ids = torch.topk(probs, TOP_K, dim=-1)
        return weights / weights.sum(-1, keepdim=True), ids.to(torch.int32)


class ToyMoE(torch.nn.Module):
    """Layers of router + a cheap expert mix, each routing through `runner.router`."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.gates = torch.nn.ParameterList(
            [
                torch.nn.Parameter(torch.randn(EXPERTS, HIDDEN, generator=gen).to(device))
                for _ in range(LAYERS)
            ]
        )
        self.runners = [SimpleNamespace(router=ToyRouter()) for _ in range(LAYERS)]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for gate, runner in zip(self.gates, self.runners, strict=True):
            logits = h @ gate.T
            weights, ids = runner.router.select_experts(hidden_states=h, router_logits=logits)
            mixed = h + (weights.sum(-1, keepdim=True) * torch.tanh(h)) * 0.1 + ids[:, :1] * 1e-3
            h = mixed.to(h.dtype)  # a bfloat16 model stays bfloat16
        return h


def _buffers(device: torch.device, dtype: torch.dtype = torch.float32) -> CaptureBuffers:
    return CaptureBuffers(
        num_layers=LAYERS,
        max_tokens=MAX_TOKENS,
        top_k=TOP_K,
        num_experts=EXPERTS,
        hidden_size=HIDDEN,
        hidden_layers=(1,),
        logits=True,
        device=device,
        dtype=dtype,
    )


def _wrapped_model(device: torch.device) -> tuple[ToyMoE, CaptureBuffers]:
    model, buffers = ToyMoE(device), _buffers(device)
    hook_routers(list(enumerate(model.runners)), buffers)
    return model, buffers


def _snapshot(buffers: CaptureBuffers, n: int) -> dict[str, torch.Tensor]:
    assert buffers.logits is not None
    return {
        "ids": buffers.ids[:, :n].clone(),
        "weights": buffers.weights[:, :n].clone(),
        "logits": buffers.logits[:, :n].clone(),
        "hidden": buffers.hidden[1][:n].clone(),
    }


def _expected(h: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    """The same forward, eager, into fresh buffers: the reference."""
    model, buffers = _wrapped_model(device)
    model(h)
    return _snapshot(buffers, len(h))


def _same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    for name in want:
        if name == "ids":
            equal = torch.equal(got[name], want[name])
        else:
            equal = torch.allclose(got[name], want[name], rtol=1e-5, atol=1e-6)
        if not equal:
            raise AssertionError(f"{what}: buffer {name} differs from the eager reference")


def check_cuda_graph(device: torch.device) -> dict:
    """Graphs captured per padded batch size, replayed twice with new inputs."""
    replays = 0
    for n in BATCHES:
        model, buffers = _wrapped_model(device)
        static = torch.randn(n, HIDDEN, device=device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            model(static)  # warm-up outside the graph, as vLLM does
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(static)
        for seed in (1, 2):
            fresh = torch.randn(n, HIDDEN, device=device, generator=_gen(device, seed))
            static.copy_(fresh)
            graph.replay()
            torch.cuda.synchronize()
            _same(_snapshot(buffers, n), _expected(fresh, device), f"graph replay, {n} rows")
            replays += 1
    return {"batches": list(BATCHES), "replays": replays}


def check_float16_capture(device: torch.device) -> dict:
    """An engine capturing in float16 (`capture_dtype`): a bfloat16 model's router
    logits and inputs, cast inside the hooks' copy (in a CUDA graph on CUDA), have the
    bits of the float32 capture cast afterwards, which is what the store's writer keeps
    from a float32 engine."""
    h = torch.randn(64, HIDDEN, device=device, generator=_gen(device, 5)).to(torch.bfloat16)
    got = {}
    for dtype in (torch.float32, torch.float16):
        model = ToyMoE(device).to(torch.bfloat16)
        buffers = _buffers(device, dtype)
        hook_routers(list(enumerate(model.runners)), buffers)
        if device.type == "cuda":
            static = h.clone()
            model(static)  # warm-up outside the graph, as vLLM does
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                model(static)
            graph.replay()
            torch.cuda.synchronize()
        else:
            model(h)
        got[dtype] = _snapshot(buffers, len(h))
    for name in ("logits", "hidden"):
        half, want = got[torch.float16][name], got[torch.float32][name].to(torch.float16)
        if half.dtype != torch.float16 or not torch.equal(
            half.view(torch.int16), want.view(torch.int16)
        ):
            raise AssertionError(f"float16 capture: buffer {name} differs from the cast float32")
    return {"rows": len(h), "in_cuda_graph": device.type == "cuda"}


def _gen(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def check_compiled_router(device: torch.device) -> dict:
    """One compiled forward (dynamic batch) against eager, batch by batch."""
    model, buffers = _wrapped_model(device)
    compiled = torch.compile(model, dynamic=True)
    for n in BATCHES:
        h = torch.randn(n, HIDDEN, device=device, generator=_gen(device, n))
        compiled(h)
        if device.type == "cuda":
            torch.cuda.synchronize()
        _same(_snapshot(buffers, n), _expected(h, device), f"compiled forward, {n} rows")
    return {"batches": list(BATCHES), "backend": "inductor"}


def check_host_copy(device: torch.device) -> dict:
    copier = HostCopy(device)
    gen = _gen(device, 7)
    buffers = {  # (layers, tokens, k), as the router hooks fill them
        "ids": torch.randint(0, EXPERTS, (LAYERS, 1000, TOP_K), device=device, generator=gen),
        "weights": torch.rand(LAYERS, 1000, TOP_K, device=device, generator=gen),
    }
    index = torch.randperm(1000, device=device, generator=gen)[:700]
    # gathered rows-first, as `StepCollector._start_copy` does: a transposed view's rows
    rows = {name: b.transpose(0, 1).index_select(0, index) for name, b in buffers.items()}
    got = copier.start(rows).wait()
    picked = index.cpu().numpy()
    for name, tensor in buffers.items():
        want = tensor.cpu().numpy().transpose(1, 0, 2)[picked]
        if got[name].shape != want.shape or not (got[name] == want).all():
            raise AssertionError(f"host copy of {name} differs from a synchronous copy")
    result: dict = {"equal_to_sync_copy": True}
    if device.type != "cuda":
        result["overlap"] = "skipped: no CUDA (a CPU copy is synchronous)"
        return result
    big = torch.empty(256 * 2**20, dtype=torch.float32, device=device)  # 1 GiB
    a = torch.randn(512, 512, device=device)
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    computed = torch.cuda.Event(enable_timing=True)
    start.record()
    pending = copier.start({"big": big})
    for _ in range(20):  # the "next forward": compute issued after the copy started
        a = torch.tanh(a @ a)
    computed.record()
    computed.synchronize()
    compute_done = time.perf_counter()
    pending.wait()
    copy_done = time.perf_counter()
    result["compute_ms"] = start.elapsed_time(computed)
    result["copy_finished_after_compute_ms"] = (copy_done - compute_done) * 1e3
    if copy_done - compute_done <= 0:
        raise AssertionError("compute waited for the copy: it did not finish first")
    return result


def check_expert_load(device: torch.device) -> dict:
    gen = _gen(device, 11)
    steps = [
        # int32, as the capture buffers hold ids (`CaptureBuffers.ids`)
        torch.randint(
            0, EXPERTS, (rows, LAYERS, TOP_K), device=device, generator=gen, dtype=torch.int32
        )
        for rows in (1, 17, 256, 4096)
    ]
    load = ExpertLoad(LAYERS, EXPERTS, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        for ids in steps:
            load.add(ids)
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    cells = [ids.cpu().numpy() + (np.arange(LAYERS) * EXPERTS)[:, None] for ids in steps]
    want = np.bincount(np.concatenate([c.ravel() for c in cells]), minlength=LAYERS * EXPERTS)
    if not (load.total() == want.reshape(LAYERS, EXPERTS)).all():
        raise AssertionError("the device's expert load differs from numpy's count")
    return {"rows": [len(ids) for ids in steps], "no_host_sync": device.type == "cuda"}


CHECKS: dict[str, tuple[Callable[[torch.device], dict], bool]] = {
    "cuda_graph": (check_cuda_graph, True),  # (check, needs CUDA)
    "compiled_router": (check_compiled_router, False),
    "host_copy": (check_host_copy, False),
    "expert_load": (check_expert_load, False),
    "float16_capture": (check_float16_capture, False),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="Also write the JSON summary here.")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    summary: dict = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "checks": {},
    }
    failed = False
    for name, (check, needs_cuda) in CHECKS.items():
        if needs_cuda and not cuda:
            summary["checks"][name] = {"status": "skipped", "why": "no CUDA device"}
            continue
        started = time.perf_counter()
        try:
            detail = check(device)
            summary["checks"][name] = {"status": "passed", **detail}
        except Exception as exc:
            failed = True
            summary["checks"][name] = {
                "status": "failed",
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc()[-2000:],
            }
        summary["checks"][name]["seconds"] = round(time.perf_counter() - started, 2)
    summary["ok"] = not failed
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
