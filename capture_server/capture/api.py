"""In-process Python API: generate or score with a vLLM engine and get each sequence's routing.

Example:
    >>> from capture_server.capture.api import CaptureEngine
    >>> engine = CaptureEngine("path/to/moe-checkpoint", hidden_layers=[0])
    >>> result = engine.generate(["The capital of France is"], max_tokens=16)
    >>> result.sequences[0].rows.topk_ids.shape   # (P + G - 1, moe_layers, top_k)

The routing arrives through a memory sink in this process, so the engine runs in
vLLM's one-process mode (``VLLM_ENABLE_V1_MULTIPROCESSING=0``).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from capture_server.capture.active import require_active
from capture_server.capture.intervention import Intervention, InterventionError, check_for_engine
from capture_server.capture.options import CaptureOptions
from capture_server.capture.records import ModelMeta, RoutingRows
from capture_server.capture.registry import memory_sink
from capture_server.capture.scoring import token_nll
from capture_server.errors import CaptureError, StoreWriteError
from capture_server.protocol import (
    Annotation,
    annotate_rpc,
    call_sequence_key,
    engine_config,
    flush_rpc,
    forwarded_positions,
    merged_sink_states,
    sink_error,
    sink_states_rpc,
    stats_rpc,
    writer_stats,
)

InterventionArg = Intervention | dict[str, Any] | list[Any] | None
"""One intervention for every prompt, one per prompt, or none."""

_engine_ids = itertools.count()
_live_engines = 0  # at most one: engines in one process share vLLM's distributed state


@dataclass(slots=True)
class CapturedSequence:
    """One prompt's sample, with its tokens and its routing rows."""

    prompt_index: int
    sample_index: int
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    text: str
    finish_reason: str | None
    rows: RoutingRows
    """Rows by position. A generated sequence of P prompt and G generated tokens has
    P + G - 1 rows: the last sampled token is never forwarded, so it has no routing."""
    labels: dict[str, Any] = field(default_factory=dict)
    nll: np.ndarray | None = None
    """Per token of `token_ids`, minus its log-probability given the tokens before it
    (NaN for the first token); from `CaptureEngine.score`, None when not asked for."""

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def mean_nll(self, part: str) -> float:
        """Mean per-token NLL of the ``prompt`` part (tokens after the first) or of the
        ``completion`` part."""
        if self.nll is None:
            raise ValueError("this sequence has no NLL; score it with CaptureEngine.score")
        plen = len(self.prompt_token_ids)
        values = self.nll[1:plen] if part == "prompt" else self.nll[plen:]
        return float(np.mean(values)) if len(values) else float("nan")


@dataclass(slots=True)
class CaptureResult:
    meta: ModelMeta
    sequences: list[CapturedSequence]


class CaptureEngine:
    """A vLLM `LLM` with routing capture on; build it once and call it many times.

    Args:
        model: checkpoint directory or Hugging Face id (already in the local cache).
        hidden_layers: MoE-layer indices whose router input hidden states are kept.
        logits: keep the full router logits (engine-wide: decides what the forward copies).
        enable_prefix_caching: on by default, as in vLLM: cached prompt positions get the
            rows of the forward that computed their KV blocks, kept by KV slot on the
            host (`capture_server.plugin.prefix_rows`), so every position has its row.
        interventions: let requests change their routing (the ``intervention`` argument
            of `generate` and `score`); off, the forward is exactly the model's.
        capture_dtype: ``float32`` (exact) or ``float16``: router logits and hidden
            states cast on the device, half the bytes copied out of it and held on the
            host; stores then keep them in float16 only.
        **llm_kwargs: vLLM engine arguments, passed to `vllm.LLM` as they are (dtype,
            max_model_len, tensor_parallel_size, moe_backend, ...); vLLM's defaults apply
            to the rest (compiled, with CUDA graphs on GPU; ``enforce_eager=True`` starts
            faster on a CPU).
            On CPU, per-request seeds need ``enable_chunked_prefill=False``: vLLM rewinds
            a seeded request's generator when its prompt is split across steps, which a
            CPU generator cannot do (the capture service sets this itself).
    """

    def __init__(
        self,
        model: str,
        *,
        hidden_layers: Sequence[int] = (),
        logits: bool = True,
        enable_prefix_caching: bool = True,
        interventions: bool = False,
        capture_dtype: str = "float32",
        **llm_kwargs: Any,
    ) -> None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        self.hidden_layers = tuple(hidden_layers)
        self._sink_name = f"engine{next(_engine_ids)}-{os.getpid()}"
        self._calls = itertools.count()
        global _live_engines
        if _live_engines:
            raise RuntimeError(
                "another CaptureEngine is open in this process; close() it first (engines "
                "in vLLM's one-process mode share the distributed state, and shutting one "
                "down tears it down for all)"
            )
        self.llm = LLM(
            model,
            enable_prefix_caching=enable_prefix_caching,
            additional_config=engine_config(
                self.hidden_layers, logits, interventions, capture_dtype
            ),
            **llm_kwargs,
        )
        _live_engines += 1
        try:
            stats: list[dict[str, Any]] | BaseException = stats_rpc().run(self.llm)
        except Exception as exc:
            stats = exc
        try:
            require_active(stats, model)
        except CaptureError:
            self.close()
            raise
        assert not isinstance(stats, BaseException)
        self.routing: dict[str, Any] = writer_stats(stats)["routing"]
        """The served routing: MoE layers, experts, top-k, and whether interventions run."""
        self.tokenizer = self.llm.get_tokenizer()

    def generate(
        self,
        prompts: Sequence[str | list[int]],
        sampling: Any = None,
        *,
        labels: Sequence[dict[str, Any]] | None = None,
        intervention: InterventionArg = None,
        **sampling_kwargs: Any,
    ) -> CaptureResult:
        """Generate from `prompts` (texts or token ids) and return every sample's routing.

        `sampling` is a `vllm.SamplingParams` (or one per prompt); without it,
        `sampling_kwargs` build one (for example ``max_tokens=16, temperature=0``).
        `intervention` (an `Intervention`, its dict form, or one per prompt) changes the
        routing of those requests; the engine must have been built with interventions.
        Rows come back in memory, so the engine's workers must run in this process
        (``tensor_parallel_size=1``); otherwise use `generate_to_store`.
        """
        from vllm import SamplingParams

        world = self.llm.llm_engine.vllm_config.parallel_config.world_size
        if world > 1:
            raise CaptureError(
                f"generate() keeps rows in this process's memory, but this engine's "
                f"{world} workers run in their own processes; use generate_to_store()"
            )
        if sampling is None:
            sampling = SamplingParams(**sampling_kwargs)
        outputs = self._run(
            prompts, sampling, labels, sink=f"memory://{self._sink_name}", intervention=intervention
        )
        sink = memory_sink(self._sink_name)
        sequences = []
        for i, (key, out) in enumerate(outputs):
            for completion in out.outputs:
                sequences.append(
                    CapturedSequence(
                        prompt_index=i,
                        sample_index=completion.index,
                        prompt_token_ids=list(out.prompt_token_ids),
                        output_token_ids=list(completion.token_ids),
                        text=completion.text,
                        finish_reason=completion.finish_reason,
                        rows=_clip(
                            sink.sequence(key, completion.index, pop=True),
                            forwarded_positions(
                                len(out.prompt_token_ids), len(completion.token_ids)
                            ),
                        ),
                        labels=dict(labels[i]) if labels else {},
                        nll=token_nll(out),
                    )
                )
        assert sink.meta is not None
        return CaptureResult(meta=sink.meta, sequences=sequences)

    def generate_to_store(
        self,
        prompts: Sequence[str | list[int]],
        store: str,
        sampling: Any = None,
        *,
        labels: Sequence[dict[str, Any]] | None = None,
        store_options: dict[str, Any] | None = None,
        intervention: InterventionArg = None,
        **sampling_kwargs: Any,
    ) -> Any:
        """Generate and stream every sample's routing into the routing store `store`.

        Returns the store opened for reading (`capture_server.store.RoutingStore`), with
        prompt and completion texts and finish reasons joined onto its index.
        """
        from vllm import SamplingParams

        from capture_server.store import open_store

        if sampling is None:
            sampling = SamplingParams(**sampling_kwargs)
        options = {"hidden_layers": list(self.hidden_layers), **(store_options or {})}
        self._run(
            prompts,
            sampling,
            labels,
            sink=store,
            store=options,
            texts=_texts_of,
            intervention=intervention,
        )
        states = merged_sink_states(sink_states_rpc([store]).run(self.llm), [store])
        error = sink_error(states[store])
        if error is not None:  # the worker dropped the store's rows: say why
            raise StoreWriteError(f"{store}: {error}")
        return open_store(store)

    def _run(
        self,
        prompts: Sequence[str | list[int]],
        sampling: Any,
        labels: Sequence[dict[str, Any]] | None,
        *,
        sink: str,
        store: dict[str, Any] | None = None,
        texts: Callable[[list[tuple[str, Any]]], list[Annotation]] | None = None,
        intervention: InterventionArg = None,
    ) -> list[tuple[str, Any]]:
        """Run the prompts with capture options; return (sequence key, RequestOutput) pairs.

        With `texts`, the sink commits each sequence only together with the texts that
        `texts` makes of the outputs (`CaptureOptions.texts`).
        """
        from vllm.inputs import TokensPrompt

        per_prompt = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        interventions = self._interventions(intervention, len(prompts))
        call = next(self._calls)
        keys = [call_sequence_key(call, i) for i in range(len(prompts))]
        params = []
        for i, (base, key) in enumerate(zip(per_prompt, keys, strict=True)):
            p = base.clone()
            options = CaptureOptions(
                sink=sink,
                sequence=key,
                n=p.n,
                hidden_layers=self.hidden_layers,
                prompt_index=i,
                labels=dict(labels[i]) if labels else {},
                store=dict(store or {}),
                texts=texts is not None,
                intervention=interventions[i].to_dict(),
            )
            p.extra_args = {**(p.extra_args or {}), **options.to_extra_args()}
            params.append(p)
        inputs = [
            TokensPrompt(prompt_token_ids=list(p)) if not isinstance(p, str) else p for p in prompts
        ]
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        pairs = list(zip(keys, outputs, strict=True))
        if texts is not None:
            annotate_rpc({sink: texts(pairs)}).run(self.llm)
        self._flush([o.request_id for o in outputs])
        return pairs

    def score(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        *,
        labels: Sequence[dict[str, Any]] | None = None,
        intervention: InterventionArg = None,
    ) -> CaptureResult:
        """Teacher-force ``prompt + completion`` texts and return the routing of every token.

        Nothing is generated: each text is run as a prompt with ``max_tokens=1`` and the
        sampled token is discarded, so every token of the text has a row. Rows of the
        completion part have ``is_prompt`` false. Each sequence's `nll` holds the
        negative log-likelihood of every token given those before it (vLLM's prompt
        logprobs), so `CapturedSequence.mean_nll` gives the prompt and completion NLL.
        """
        from vllm import SamplingParams

        token_lists, prompt_lens = [], []
        for prompt, completion in zip(prompts, completions, strict=True):
            p_ids = self.tokenizer.encode(prompt, add_special_tokens=False)
            c_ids = self.tokenizer.encode(completion, add_special_tokens=False)
            token_lists.append(p_ids + c_ids)
            prompt_lens.append(len(p_ids))
        result = self.generate(
            token_lists,
            SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0),
            labels=labels,
            intervention=intervention,
        )
        for seq, plen in zip(result.sequences, prompt_lens, strict=True):
            seq.output_token_ids = seq.prompt_token_ids[plen:]
            seq.prompt_token_ids = seq.prompt_token_ids[:plen]
            seq.text = self.tokenizer.decode(seq.output_token_ids)
            seq.finish_reason = "scored"
            seq.rows.is_prompt = seq.rows.positions < plen
            if seq.nll is not None:
                seq.nll = seq.nll[: plen + len(seq.output_token_ids)]
        return result

    def _interventions(self, intervention: InterventionArg, count: int) -> list[Intervention]:
        """One checked `Intervention` per prompt."""
        given = intervention if isinstance(intervention, list) else [intervention] * count
        if len(given) != count:
            raise InterventionError(
                f"intervention: {len(given)} given for {count} prompts; give one, or one per prompt"
            )
        out = [x if isinstance(x, Intervention) else Intervention.from_dict(x) for x in given]
        for x in {x.key(): x for x in out}.values():  # each distinct one once
            check_for_engine(x, self.routing)
        return out

    def _flush(self, request_ids: list[str]) -> None:
        flush_rpc(request_ids).run(self.llm)

    def stats(self) -> dict[str, Any]:
        """Capture counters of the worker: steps, rows, preempted requests, dropped recomputes."""
        return writer_stats(stats_rpc().run(self.llm))

    def close(self) -> None:
        """Shut the engine down and free its memory."""
        import gc

        from vllm.distributed import cleanup_dist_env_and_memory

        global _live_engines
        if not hasattr(self, "llm"):
            return
        engine = getattr(self.llm, "llm_engine", None)
        if engine is not None and hasattr(engine, "engine_core"):
            engine.engine_core.shutdown()
        del self.llm
        gc.collect()
        _live_engines -= 1
        cleanup_dist_env_and_memory()


def _clip(rows: RoutingRows, positions: int) -> RoutingRows:
    """The rows of positions the returned output forwarded (see
    `protocol.Annotation.positions`): a stop string can end the output before the last
    position the engine forwarded."""
    return (
        rows
        if len(rows) == 0 or rows.positions[-1] < positions
        else rows.select(rows.positions < positions)
    )


def generate(model: str, prompts: Sequence[str | list[int]], **kwargs: Any) -> CaptureResult:
    """One-shot helper: build a `CaptureEngine`, generate, close it.

    Engine options (`hidden_layers`, `dtype`, `max_model_len`, ...) and sampling options
    (`max_tokens`, `temperature`, `n`, ...) share `kwargs`; sampling keys are those of
    `vllm.SamplingParams`.
    """
    import inspect

    from vllm import SamplingParams

    sampling_keys = set(inspect.signature(SamplingParams).parameters)
    sampling = {k: v for k, v in kwargs.items() if k in sampling_keys}
    engine_kwargs = {k: v for k, v in kwargs.items() if k not in sampling_keys}
    engine = CaptureEngine(model, **engine_kwargs)
    try:
        return engine.generate(prompts, **sampling)
    finally:
        engine.close()


def _texts_of(outputs: list[tuple[str, Any]]) -> list[Annotation]:
    """The texts a store keeps of each (sequence key, RequestOutput) sample."""
    return [
        Annotation(
            request_id=key,
            sample_index=c.index,
            prompt_text=out.prompt or "",
            completion_text=c.text,
            finish_reason=c.finish_reason or "",
            generated_len=len(c.token_ids),
            positions=forwarded_positions(len(out.prompt_token_ids), len(c.token_ids)),
        )
        for key, out in outputs
        for c in out.outputs
    ]
