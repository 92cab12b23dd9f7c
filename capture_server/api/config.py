"""Service settings: flags, environment (``MOETRACE_*``), ``.env`` and a TOML file.

Precedence, highest first: command-line flags, environment, ``.env``, the ``--config``
file, defaults. The file uses the field names below; vLLM engine settings are the
``vllm serve`` flags with underscores, for every model and per model::

    models = ["/models/Qwen3-30B-A3B", "/models/OLMoE-1B-7B"]
    data_dir = "/data"
    hidden_layers = [0, 24]
    token = "..."

    [engine]                      # every model (MOETRACE_ENGINE='{"dtype": "bfloat16"}')
    dtype = "bfloat16"
    gpu_memory_utilization = 0.85

    [model_engine.Qwen3-30B-A3B]  # one model, over [engine]
    tensor_parallel_size = 2
    moe_backend = "triton"

Engine flags given on the command line come last and win (see `engine_argv`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MOETRACE_", env_file=".env", extra="ignore")

    models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Checkpoint directories (or cached Hugging Face ids) to serve; named by their last
    path component."""
    data_dir: Path = Path("moetrace-data")
    """Job database and stores live here, whatever a client asks."""
    store_root: str | None = None
    """Write job stores under this URL (``s3://bucket/prefix``, any fsspec URL) instead
    of ``data_dir/stores``; credentials come from the usual environment (for S3:
    ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``)."""
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    """Bearer token required on every /v1 route, /metrics and the API docs when set."""
    public_metrics: bool = False
    """Serve /metrics without the token (for a Prometheus that cannot send one)."""
    max_body_bytes: int = 8 * 2**20
    """Requests with a larger body are refused with 413."""
    max_upload_bytes: int = 1024 * 2**20
    """Uploaded prompt files (``POST /v1/files``) may be this large."""
    max_prompts: int = 1_000_000
    max_tokens_limit: int = 32_768
    hidden_layers: Annotated[list[int], NoDecode] = Field(default_factory=list)
    """MoE layers whose router inputs the engines capture (jobs may keep a subset)."""
    capture_dtype: Literal["float32", "float16"] = "float32"
    """Dtype the engines capture router logits and hidden states in (float16: cast on
    the device, half the bytes copied out and nothing for the writers to convert; jobs
    then keep them in float16 only; `protocol.engine_config`)."""
    interventions: bool = False
    """Start the engines with per-request interventions on, so jobs may mask, keep or
    zero experts (`capture.intervention`)."""
    engine: dict[str, Any] = Field(default_factory=dict)
    """vLLM engine settings for every model, by ``vllm serve`` flag name (``-`` or ``_``);
    vLLM's defaults apply to the rest (see `api.engine_args`)."""
    model_engine: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Per model name (the checkpoint directory's name): engine settings over `engine`."""
    engine_flags: list[str] = Field(default_factory=list)
    """vLLM engine flags from the command line, as given; they apply to every model and
    win over `engine` and `model_engine`."""
    online_idle_seconds: float = 60.0
    """An online (OpenAI-endpoint) job's store writer closes after this long without a
    request; the job stays open and its next request reopens the store."""
    concurrency: int = 512
    """Requests of one job in flight at once."""

    @field_validator("models", "hidden_layers", mode="before")
    @classmethod
    def comma_separated(cls, value: Any) -> Any:
        """``MOETRACE_MODELS=/m/a,/m/b`` (or a JSON list) in the environment."""
        if isinstance(value, str):
            value = value.strip()
            if value.startswith("["):
                return json.loads(value)
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    def model_name(self, path: str) -> str:
        return Path(path.rstrip("/")).name

    def engine_argv(self, path: str) -> list[str]:
        """The vLLM engine flags of the model at `path`, lowest precedence first."""
        from capture_server.api.engine_args import to_argv

        own = self.model_engine.get(self.model_name(path), {})
        return [*to_argv(self.engine), *to_argv(own), *self.engine_flags]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            env_settings,
            dotenv_settings,
            TomlConfigSettingsSource(settings_cls),
            file_secret_settings,
        )


def load_settings(config: Path | None = None, **flags: Any) -> Settings:
    """Settings from flags given (None means not given), environment and `config`."""
    given = {k: v for k, v in flags.items() if v is not None}
    if config is None:
        return Settings(**given)
    if not config.is_file():
        raise FileNotFoundError(f"config file not found: {config}")

    class FromFile(Settings):
        model_config = SettingsConfigDict(toml_file=config)

    return Settings(**FromFile(**given).model_dump())
