"""OpenAI-compatible ``/v1/completions`` and ``/v1/chat/completions`` with capture.

Existing OpenAI clients and RL frameworks record routing by adding one field to the
body (the OpenAI SDK's ``extra_body``)::

    client.completions.create(model="m", prompt="...", extra_body={
        "moetrace": {"job": "rl-step-7", "labels": {"step": 7}, "logits": True}})

Requests without ``moetrace`` are served without capture. The response carries a
``moetrace`` object naming the job, its store and the sequence keys.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import replace
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, Field, model_validator

from capture_server.api.online import CaptureConflictError
from capture_server.api.routes import (
    COMMON_ERRORS,
    Auth,
    check_capture_dtype,
    check_interventions,
    errors,
)
from capture_server.api.schemas import (
    LABEL_KEY,
    MAX_SEED,
    STRICT,
    Capture,
    encodable,
    intervention_field,
)
from capture_server.api.tokens import check_token_ids
from capture_server.capture.intervention import Intervention
from capture_server.protocol import (
    CONFIG_KEY,
    Annotation,
    forwarded_positions,
    online_sequence_key,
)

router = APIRouter(tags=["openai"], responses=COMMON_ERRORS)


class OnlineCapture(Capture):
    """``moetrace`` in the body: the named job store to record into, and labels."""

    job: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    labels: dict[Annotated[str, Field(pattern=LABEL_KEY)], str | int | float | bool] = Field(
        default_factory=dict
    )
    intervention: dict[str, Any] | None = None
    """This request's routing change (docs/interventions.md); needs a server started
    with ``--interventions``."""

    @model_validator(mode="after")
    def parsed_intervention(self) -> OnlineCapture:
        self.intervention = intervention_field(self.intervention, "moetrace.intervention")
        return self

    def capture(self) -> Capture:
        return Capture(**self.model_dump(include=set(Capture.model_fields)))


class _Common(BaseModel):
    model_config = STRICT

    model: str = Field(min_length=1, max_length=200)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=10.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=64)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: Annotated[str, Field(min_length=1)] | list[Annotated[str, Field(min_length=1)]] | None = (
        None
    )
    stream: Literal[False] = False
    """Streaming is not offered: a response returns once its routing is committed."""
    user: str | None = None
    ignore_eos: bool = False
    """vLLM's extension: keep generating past the end-of-sequence token."""
    moetrace: OnlineCapture | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]

    @model_validator(mode="after")
    def non_empty(self) -> CompletionRequest:
        if not self.prompt or any(not p for p in self.prompts()):
            raise ValueError("prompt must not be empty")
        for p in self.prompts():
            if isinstance(p, str):
                encodable(p, "prompt")
        return self

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]  # one tokenised prompt
        return list(p)


class ChatMessage(BaseModel):
    model_config = STRICT

    role: Literal["system", "user", "assistant"]
    content: str

    @model_validator(mode="after")
    def tokenisable(self) -> ChatMessage:
        encodable(self.content, "content")
        return self


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def _limits(body: _Common, app: Any) -> tuple[Any, int | None]:
    if body.model not in app.engines.engines:
        raise HTTPException(404, detail="Model not found")
    max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
    if max_tokens and max_tokens > app.settings.max_tokens_limit:
        raise HTTPException(422, detail=f"max_tokens: at most {app.settings.max_tokens_limit}")
    if body.moetrace and not set(body.moetrace.hidden_layers) <= set(app.settings.hidden_layers):
        raise HTTPException(
            422,
            detail=f"moetrace.hidden_layers: the server captures only "
            f"{sorted(app.settings.hidden_layers)}",
        )
    if body.moetrace:
        check_capture_dtype("moetrace", body.moetrace, app.settings)
    if body.moetrace and body.moetrace.intervention:
        named = {"moetrace.intervention": Intervention.from_dict(body.moetrace.intervention)}
        check_interventions(named, app.engines.routing.get(body.model, {}))
    return app.engines.engines[body.model], max_tokens


def _check_lengths(prompts: list[list[int]], engine: Any) -> None:
    """Refuse the whole request before anything runs or is recorded (OpenAI's 400)."""
    limit = engine.model_config.max_model_len
    for k, ids in enumerate(prompts):
        if len(ids) >= limit:
            where = "prompt" if len(prompts) == 1 else f"prompt[{k}]"
            raise HTTPException(
                400, detail=f"{where}: {len(ids)} tokens; the model allows fewer than {limit}"
            )


async def _generate(
    body: _Common, app: Any, prompts: list[list[int]], max_tokens: int | None, engine: Any
) -> tuple[list[Any], dict[str, Any] | None]:
    """Run every prompt (with capture when asked); returns final outputs and capture info.

    Without `max_tokens` a prompt may fill the model's context, as in vLLM's server.
    """
    import asyncio

    from vllm import SamplingParams

    _check_lengths(prompts, engine)
    named = [
        ("prompt" if len(prompts) == 1 else f"prompt[{k}]", ids) for k, ids in enumerate(prompts)
    ]
    check_token_ids(named, engine)
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    job_id = first = None
    if body.moetrace:
        try:
            job_id = await app.online.job_for(
                body.moetrace.job, body.model, body.moetrace.capture()
            )
        except CaptureConflictError as exc:
            raise HTTPException(409, detail=str(exc)) from None
        first = app.online.reserve(job_id, len(prompts), body.n, engine)
    store = app.runner.store_path(job_id) if job_id else ""
    tag = uuid.uuid4().hex[:12]

    async def one(k: int, ids: list[int]) -> Any:
        extra = None
        if job_id is not None:
            key = online_sequence_key(first + k)
            opts = body.moetrace.capture().options(
                store, key, first + k, body.moetrace.labels, body.n
            )
            extra = replace(  # committed with the texts
                opts, texts=True, intervention=body.moetrace.intervention or {}
            ).to_extra_args()
        params = SamplingParams(
            n=body.n,
            max_tokens=max_tokens or max(1, engine.model_config.max_model_len - len(ids)),
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop=body.stop,
            ignore_eos=body.ignore_eos,
            extra_args=extra,
            output_kind=RequestOutputKind.FINAL_ONLY,  # one output holding all n samples
        )
        final = None
        rid = f"{job_id or 'plain'}-c{first + k if job_id else k}-{tag}"
        async for out in engine.generate(TokensPrompt(prompt_token_ids=ids), params, rid):
            final = out
        return rid, final

    from vllm.exceptions import VLLMClientError

    try:
        results = await asyncio.gather(*(one(k, ids) for k, ids in enumerate(prompts)))
    except (ValueError, VLLMClientError) as exc:  # e.g. a prompt longer than the model allows
        if job_id is not None:
            app.db.add_progress(job_id, failed=len(prompts) * body.n)
        raise HTTPException(400, detail=str(exc)) from None
    finals = [final for _, final in results]
    if job_id is None:
        return finals, None
    annotations = [
        Annotation(
            request_id=online_sequence_key(first + k),
            sample_index=c.index,
            completion_text=c.text,
            finish_reason=c.finish_reason or "",
            generated_len=len(c.token_ids),
            completion_token_ids=list(c.token_ids),
            positions=forwarded_positions(len(final.prompt_token_ids), len(c.token_ids)),
        )
        for k, final in enumerate(finals)
        for c in final.outputs
    ]
    tokens = sum(len(c.token_ids) for f in finals for c in f.outputs)
    error = await app.online.commit(
        job_id, engine, [rid for rid, _ in results], annotations, tokens
    )
    if error:
        raise HTTPException(500, detail=f"store: {error}")
    return finals, {
        "job": job_id,
        "store": store,
        "sequences": [online_sequence_key(first + k) for k in range(len(prompts))],
    }


def _usage(finals: list[Any]) -> dict[str, int]:
    prompt = sum(len(f.prompt_token_ids) for f in finals)
    completion = sum(len(c.token_ids) for f in finals for c in f.outputs)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


@router.post("/v1/completions", dependencies=[Auth], responses=errors(400, 404, 409, 413))
async def completions(body: CompletionRequest, request: Request) -> dict:
    """OpenAI-compatible text completion; ``moetrace`` in the body records routing."""
    app = request.app.state
    engine, max_tokens = _limits(body, app)
    max_tokens = max_tokens or 16  # the OpenAI default for completions
    tokenizer = engine.get_tokenizer()
    prompts = [
        p if isinstance(p, list) else tokenizer.encode(p, add_special_tokens=False)
        for p in body.prompts()
    ]
    finals, capture = await _generate(body, app, prompts, max_tokens, engine)
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.model,
        "choices": [
            {
                "index": k * body.n + c.index,
                "text": c.text,
                "finish_reason": c.finish_reason,
                "logprobs": None,
            }
            for k, f in enumerate(finals)
            for c in f.outputs
        ],
        "usage": _usage(finals),
        CONFIG_KEY: capture,
    }


@router.post("/v1/chat/completions", dependencies=[Auth], responses=errors(400, 404, 409, 413))
async def chat_completions(body: ChatCompletionRequest, request: Request) -> dict:
    """OpenAI-compatible chat completion (the model's chat template); capture as above."""
    app = request.app.state
    engine, max_tokens = _limits(body, app)
    tokenizer = engine.get_tokenizer()
    text = tokenizer.apply_chat_template(
        [m.model_dump() for m in body.messages], add_generation_prompt=True, tokenize=False
    )
    prompt = tokenizer.encode(text, add_special_tokens=False)
    finals, capture = await _generate(body, app, [prompt], max_tokens, engine)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.model,
        "choices": [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason,
                "logprobs": None,
            }
            for c in finals[0].outputs
        ],
        "usage": _usage(finals),
        CONFIG_KEY: capture,
    }
