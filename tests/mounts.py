"""Size-limited file systems for full-disk tests."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def tmpfs(mount: Path, size: str, why_skip: str) -> Iterator[Path]:
    """A tmpfs of `size` (``384k``, ``64m``) at `mount`, or a skip saying `why_skip`
    where mounting is not allowed."""
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(why_skip)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
