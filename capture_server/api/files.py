"""Uploaded JSONL prompt files: validated line by line, kept under the data dir.

A job names a file by id (``prompts_file``) instead of carrying its prompts inline, so
a 100k-prompt rollout is one streamed upload and a small job body. The file stays as
long as the data dir: a job that resumes after a restart reads it again.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from pydantic import ValidationError

from capture_server.api.schemas import PromptItem

FILE_ID = r"^file-[0-9a-f]{16}$"


class UploadError(ValueError):
    """An upload that is not a JSONL file of prompts; the message names the line."""


class UploadTooLargeError(UploadError):
    pass


class PromptFiles:
    def __init__(self, data_dir: Path, max_bytes: int) -> None:
        self.root = data_dir / "files"
        self.max_bytes = max_bytes

    def path(self, file_id: str) -> Path:
        return self.root / f"{file_id}.jsonl"

    def exists(self, file_id: str) -> bool:
        return self.path(file_id).is_file()

    async def save(self, chunks: AsyncIterator[bytes]) -> dict[str, int | str]:
        """Stream an upload to disk, validate every line, publish it atomically."""
        self.root.mkdir(parents=True, exist_ok=True)
        file_id = f"file-{uuid.uuid4().hex[:16]}"
        partial = self.root / f".{file_id}.partial"
        size = 0
        try:
            with partial.open("wb") as out:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise UploadTooLargeError(
                            f"upload too large (limit {self.max_bytes} bytes)"
                        )
                    out.write(chunk)
            count = sum(1 for _ in _parse(partial))
            if count == 0:
                raise UploadError("the file has no prompts")
            os.replace(partial, self.path(file_id))
        finally:
            partial.unlink(missing_ok=True)
        return {"id": file_id, "prompts": count, "bytes": size}

    def load(self, file_id: str) -> list[PromptItem]:
        return list(_parse(self.path(file_id)))


def _parse(path: Path):
    with path.open("rb") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                yield PromptItem.model_validate(json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise UploadError(f"line {number}: not valid JSON ({exc})") from None
            except RecursionError:
                raise UploadError(f"line {number}: JSON nested too deeply") from None
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"]) or "prompt"
                raise UploadError(f"line {number}: {where}: {first['msg']}") from None
