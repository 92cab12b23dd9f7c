"""Service settings: flags, environment (``MOETRACE_*``) and an optional ``.env`` file."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MOETRACE_", env_file=".env", extra="ignore")

    models: list[str] = Field(default_factory=list)
    """Checkpoint directories (or cached Hugging Face ids) to serve; named by their last
    path component."""
    data_dir: Path = Path("moetrace-data")
    """Job database and stores live here, whatever a client asks."""
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    """Bearer token required on every /v1 route when set."""
    max_body_bytes: int = 8 * 2**20
    """Requests with a larger body are refused with 413."""
    max_prompts: int = 100_000
    max_tokens_limit: int = 32_768
    hidden_layers: list[int] = Field(default_factory=list)
    """MoE layers whose router inputs the engines capture (jobs may keep a subset)."""
    dtype: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 256
    concurrency: int = 512
    """Requests of one job in flight at once."""

    def model_name(self, path: str) -> str:
        return Path(path.rstrip("/")).name
