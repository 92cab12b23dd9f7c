"""Per-request capture options, carried to the worker in `SamplingParams.extra_args`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from capture_server.protocol import CONFIG_KEY


@dataclass(frozen=True, slots=True)
class CaptureOptions:
    """What to record for one request, and where to send it.

    Requests without options in their `extra_args` are not recorded: their rows are
    dropped on the host after the step and cost no sink work.
    """

    sink: str
    """Sink URL in the worker, e.g. ``memory://name`` (one-process mode) or a store path."""
    sequence: str = ""
    """Caller's sequence key; the request id is used when empty."""
    logits: bool = True
    """Keep the full router logits (when the engine captures them). Top-k ids and
    weights are always kept."""
    hidden_layers: tuple[int, ...] = ()
    """MoE-layer indices (0-based among MoE layers) whose router input to keep; each must
    be one the engine captures (``additional_config["moetrace"]["hidden_layers"]``)."""
    n: int = 1
    """Samples per prompt; the worker parses the sample index from child request ids."""
    sample: int = -1
    """Sample index to record for a single-sample request (n = 1) that stands for one
    sample of a prompt with more: a resumed job reruns only the samples it lacks."""
    texts: bool = False
    """The caller sends each sequence's texts to the worker (`protocol.annotate_rpc`),
    and the sequence is committed only together with them: a crash never leaves routing
    without its texts. A sequence whose texts never come (an aborted request) is not
    committed."""
    prompt_index: int = -1
    """Caller's index of the prompt, stored in the sequence index."""
    prompt_len: int = -1
    """Prompt length to record when it differs from the engine's: a scored text is all
    prompt to the engine, but only its first `prompt_len` tokens are the prompt."""
    labels: dict[str, Any] = field(default_factory=dict)
    """Free labels stored with the sequence (domain, question id, author model, seed...)."""
    store: dict[str, Any] = field(default_factory=dict)
    """`StoreOptions` fields for a store sink, used when the store is created."""
    intervention: dict[str, Any] = field(default_factory=dict)
    """`Intervention.to_dict` of the routing change this request runs with (mask, keep
    or zero experts per MoE layer); empty: the model routes as it is. Needs an engine
    started with interventions (``additional_config["moetrace"]["interventions"]``)."""

    def to_extra_args(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden_layers"] = list(self.hidden_layers)
        return {CONFIG_KEY: d}

    @classmethod
    def from_extra_args(cls, extra_args: dict[str, Any] | None) -> CaptureOptions | None:
        """Options of a request, or None when the request is not captured."""
        if not extra_args or CONFIG_KEY not in extra_args:
            return None
        d = dict(extra_args[CONFIG_KEY])
        d["hidden_layers"] = tuple(d.get("hidden_layers", ()))
        return cls(**d)
