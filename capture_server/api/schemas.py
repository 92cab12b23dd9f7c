"""Request and response models of the jobs API."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from capture_server.capture.intervention import Intervention, InterventionError
from capture_server.capture.options import CaptureOptions

LABEL_KEY = r"^[A-Za-z0-9_.-]{1,64}$"
MAX_SEED = 2**63 - 1  # vLLM seeds a 64-bit signed generator
MAX_TOKEN_ID = 2**31 - 1  # token ids travel as int32; the vocabulary is checked per model
STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)
"""Request models: unknown fields, NaN and infinities are refused."""


def intervention_field(value: dict[str, Any] | None, field: str) -> dict[str, Any] | None:
    """An intervention in its canonical JSON form (`Intervention.to_dict`), or None for
    none; its shape is checked here, the model's layers and experts when a job is made."""
    try:
        parsed = Intervention.from_dict(value)
    except InterventionError as exc:
        raise ValueError(exc.at(field)) from None
    return parsed.to_dict() or None


def encodable(text: str | None, field: str) -> str | None:
    """`text`, if it can be tokenised: a lone surrogate is not UTF-8 and fails later."""
    if text is not None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"{field}: not valid Unicode at character {exc.start} (a lone surrogate)"
            ) from None
    return text


class PromptItem(BaseModel):
    """One prompt (text or chat messages) of a rollout job, with free labels."""

    model_config = STRICT

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    prompt_token_ids: list[Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]] | None = None
    completion: str | None = None
    """Score jobs: the text to teacher-force after the prompt."""
    completion_token_ids: list[Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]] | None = None
    """Score jobs: the tokens to teacher-force (exact, no re-tokenisation)."""
    labels: dict[str, str | int | float | bool] = Field(default_factory=dict)
    intervention: dict[str, Any] | None = None
    """This prompt's routing change, over the job's (``{"mask": {"3": [5, 9]}}``, ``keep``
    or ``zero``; see docs/interventions.md)."""

    @model_validator(mode="after")
    def one_input(self) -> PromptItem:
        given = [x is not None for x in (self.prompt, self.messages, self.prompt_token_ids)]
        if sum(given) != 1:
            raise ValueError("give exactly one of prompt, messages or prompt_token_ids")
        if self.prompt_token_ids is not None and not self.prompt_token_ids:
            raise ValueError("prompt_token_ids must not be empty")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("prompt must not be empty")
        encodable(self.prompt, "prompt")
        encodable(self.completion, "completion")
        for i, message in enumerate(self.messages or []):
            for key, value in message.items():
                encodable(value, f"messages[{i}].{key}")
        self.intervention = intervention_field(self.intervention, "intervention")
        return self

    @field_validator("labels")
    @classmethod
    def label_keys(cls, labels: dict[str, Any]) -> dict[str, Any]:
        import re

        for key, value in labels.items():
            if not re.match(LABEL_KEY, key):
                raise ValueError(f"label key {key!r} must match {LABEL_KEY}")
            if isinstance(value, int) and not -(2**63) <= value < 2**63:
                raise ValueError(f"labels.{key}: integers must fit in 64 bits")
            if isinstance(value, str):
                encodable(value, f"labels.{key}")
        return labels


class Sampling(BaseModel):
    model_config = STRICT

    n: int = Field(1, ge=1, le=64)
    max_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=10.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    ignore_eos: bool = False
    stop: list[Annotated[str, Field(min_length=1)]] | None = Field(None, max_length=16)
    """Strings that end a sample (not included in its text), as in vLLM."""

    @model_validator(mode="after")
    def samples_need_temperature(self) -> Sampling:
        if self.n > 1 and self.temperature == 0:
            raise ValueError("n > 1 needs temperature > 0 (greedy samples are identical)")
        return self


class Capture(BaseModel):
    model_config = STRICT

    logits: bool = True
    hidden_layers: list[int] = Field(default_factory=list)
    weights_dtype: Literal["float16", "float32"] = "float32"
    logits_dtype: Literal["float16", "float32"] = "float16"

    def options(
        self, store: str, sequence: str, prompt_index: int, labels: dict[str, Any], n: int
    ) -> CaptureOptions:
        """The per-request options that send one sequence's routing to `store`."""
        return CaptureOptions(
            sink=store,
            sequence=sequence,
            prompt_index=prompt_index,
            labels=dict(labels),
            n=n,
            logits=self.logits,
            hidden_layers=tuple(self.hidden_layers),
            store={
                "logits": self.logits,
                "hidden_layers": list(self.hidden_layers),
                "weights_dtype": self.weights_dtype,
                "logits_dtype": self.logits_dtype,
            },
        )


class ChoiceItemBody(BaseModel):
    """A multiple-choice item: the option of highest log-likelihood is the model's answer."""

    model_config = STRICT

    prompt: str = Field(min_length=1)
    options: list[Annotated[str, Field(min_length=1)]] = Field(min_length=2, max_length=26)
    answer: int = Field(ge=0)

    @model_validator(mode="after")
    def answer_is_an_option(self) -> ChoiceItemBody:
        if self.answer >= len(self.options):
            raise ValueError(f"answer: {self.answer} is not an option index")
        return self


class ExperimentSpec(BaseModel):
    """An intervention experiment with random controls (`capture_server.experiments`),
    run as one job: every condition scores every prompt's text (and every item's
    options); the result table is at ``GET /v1/jobs/{id}/result``."""

    model_config = STRICT

    name: Literal["committee_masking", "pruning"]
    usage: list[list[Annotated[float, Field(ge=0)]]] | None = None
    """(MoE layers, experts) expert usage (counts or shares), to match controls
    (committee masking) or to pick the most-used experts (pruning)."""
    usage_job: str | None = Field(None, pattern=r"^[0-9a-f]{16}$")
    """Instead of `usage`: a finished job whose store's top-k selections give it (a score
    job of one hand-written paragraph, as in "Myth" Fig. 8)."""
    committee: dict[str, list[Annotated[int, Field(ge=0)]]] | None = None
    """Committee masking: MoE layer -> committee members (the analyzer's `committee`)."""
    kind: Literal["zero", "mask"] = "zero"
    """Committee masking: zero their weights (CommitteeAudit) or mask them."""
    keep: int | None = Field(None, ge=1)
    """Pruning: experts kept per layer."""
    depths: list[Annotated[int, Field(ge=1)]] = Field(default_factory=list, max_length=64)
    """Pruning: numbers of last MoE layers pruned."""
    seeds: int = Field(3, ge=0, le=16)
    """Random control draws per layer (committee) or depth (pruning)."""
    items: list[ChoiceItemBody] = Field(default_factory=list, max_length=10_000)
    conditions: list[dict[str, Any]] | None = None
    """Filled by the server: the conditions the prompts were expanded into."""
    texts: int = 0
    """Filled by the server: how many of the job's prompts are texts (the rest are the
    items' options)."""

    @model_validator(mode="after")
    def complete(self) -> ExperimentSpec:
        if (self.usage is None) == (self.usage_job is None):
            raise ValueError("give exactly one of usage or usage_job")
        if self.name == "committee_masking" and not self.committee:
            raise ValueError("committee_masking needs a committee (MoE layer -> experts)")
        if self.name == "pruning" and (self.keep is None or not self.depths):
            raise ValueError("pruning needs keep and depths")
        return self


class ErrorBody(BaseModel):
    """Every error reply: a message, or for validation errors one entry per field."""

    detail: str | list[dict[str, Any]]


class JobCreate(BaseModel):
    """A rollout (generate) or score (teacher-force) job."""

    model_config = STRICT

    kind: Literal["rollout", "score", "experiment"]
    model: str = Field(min_length=1, max_length=200)
    prompts: list[PromptItem] | None = Field(None, min_length=1)
    prompts_file: str | None = Field(None, pattern=r"^file-[0-9a-f]{16}$")
    """An uploaded JSONL file (``POST /v1/files``) instead of inline prompts."""
    sampling: Sampling = Field(default_factory=Sampling)
    capture: Capture = Field(default_factory=Capture)
    chat_template: bool = False
    experiment: ExperimentSpec | None = None
    """Experiment jobs: what to run; their prompts are the texts scored (prompt and
    completion text)."""
    nll: bool = True
    """Score jobs: keep each text's per-token NLL (``prompt_nll``, ``completion_nll`` in
    the index), from vLLM's prompt logprobs (one log-softmax over the vocabulary per
    token)."""
    intervention: dict[str, Any] | None = None
    """The routing change of every prompt without its own (docs/interventions.md); needs
    a server started with ``--interventions``."""
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")

    @model_validator(mode="after")
    def prompts_inline_or_uploaded(self) -> JobCreate:
        if (self.prompts is None) == (self.prompts_file is None):
            raise ValueError("give exactly one of prompts or prompts_file")
        if (self.kind == "experiment") != (self.experiment is not None):
            raise ValueError("experiment: give it exactly for kind experiment")
        self.intervention = intervention_field(self.intervention, "intervention")
        if self.prompts is not None and not self.expanded:
            check_score_prompts(self.kind, self.prompts)
        return self

    @property
    def expanded(self) -> bool:
        """An experiment job whose prompts the server has expanded into its conditions."""
        return self.experiment is not None and self.experiment.conditions is not None


def check_score_prompts(kind: str, prompts: list[PromptItem]) -> None:
    if kind == "experiment" and any(
        p.prompt is None or p.completion is None or p.intervention for p in prompts
    ):
        raise ValueError(
            "experiment jobs need a prompt and a completion text per prompt, "
            "and no intervention of their own"
        )
    if kind in ("score", "experiment") and any(
        p.completion is None and p.completion_token_ids is None for p in prompts
    ):
        raise ValueError("score jobs need a completion or completion_token_ids per prompt")


def prompt_interventions(job: JobCreate, prompts: list[PromptItem]) -> dict[str, Intervention]:
    """Field name -> each distinct intervention the job's prompts run, to check against
    the model before the job starts."""
    given = {"intervention": job.intervention} if job.intervention else {}
    for i, item in enumerate(prompts):
        if item.intervention:
            given[f"prompts[{i}].intervention"] = item.intervention
    distinct: dict[str, tuple[str, Intervention]] = {}
    for name, value in given.items():
        parsed = Intervention.from_dict(value)
        distinct.setdefault(parsed.key(), (name, parsed))
    return dict(distinct.values())


class JobPublic(BaseModel):
    id: str
    name: str | None
    kind: str
    model: str
    state: Literal["queued", "running", "open", "cancelling", "done", "failed", "cancelled"]
    sequences_total: int
    sequences_done: int
    sequences_failed: int
    tokens_done: int
    tokens_per_s: float
    store: str
    errors: list[str]
    created_at: float
    updated_at: float


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int
