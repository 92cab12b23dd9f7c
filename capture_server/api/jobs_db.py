"""Job records in SQLite under the data dir: they survive restarts."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from capture_server.errors import JobsDatabaseError

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    name TEXT,
    kind TEXT NOT NULL,
    model TEXT NOT NULL,
    state TEXT NOT NULL,
    request TEXT NOT NULL,
    sequences_total INTEGER NOT NULL,
    prompts_total INTEGER NOT NULL DEFAULT 0,
    sequences_done INTEGER NOT NULL DEFAULT 0,
    sequences_failed INTEGER NOT NULL DEFAULT 0,
    tokens_done INTEGER NOT NULL DEFAULT 0,
    tokens_per_s REAL NOT NULL DEFAULT 0,
    errors TEXT NOT NULL DEFAULT '[]',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
)
"""
UNFINISHED = ("queued", "running")


class JobsDB:
    """Thread-safe access to the jobs table."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        with self._writing():
            path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            # commits survive a killed process without an fsync each (WAL with NORMAL:
            # only a power loss can lose the last ones, as with the stores' default
            # buffered writes); every online request reserves and records progress, and
            # an fsync in the event loop held up all of them
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute(SCHEMA)
            # a write at start-up: a database that cannot take one fails now, not mid-job
            self._conn.execute(f"PRAGMA user_version = {int(time.time()) % 2**31}")

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """SQLite's and the file system's errors as one `JobsDatabaseError` naming the file."""
        try:
            yield
        except (sqlite3.Error, OSError) as exc:
            raise JobsDatabaseError(f"job database {self.path}: {exc}") from None

    def create(self, request: dict[str, Any], sequences_total: int, state: str = "queued") -> str:
        job_id = uuid.uuid4().hex[:16]
        now = time.time()
        with self._lock, self._writing():
            self._conn.execute(
                "INSERT INTO jobs (id, name, kind, model, state, request, sequences_total, "
                "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    request.get("name"),
                    request["kind"],
                    request["model"],
                    state,
                    json.dumps(request),
                    sequences_total,
                    now,
                    now,
                ),
            )
        return job_id

    def find_open(self, name: str, model: str) -> dict[str, Any] | None:
        """The open online job of this name and model, if any."""
        with self._lock:
            cur = self._conn.execute(
                "SELECT * FROM jobs WHERE name = ? AND model = ? AND kind = 'online' "
                "AND state = 'open' ORDER BY created_at DESC LIMIT 1",
                (name, model),
            )
            row = cur.fetchone()
            names = [d[0] for d in cur.description]
        return None if row is None else self._decode(dict(zip(names, row, strict=True)))

    def reserve(self, job_id: str, prompts: int, n: int) -> int:
        """Add `prompts` prompts of `n` samples to a job; returns the first prompt's index."""
        with self._lock, self._writing():
            (first,) = self._conn.execute(
                "UPDATE jobs SET prompts_total = prompts_total + ?, "
                "sequences_total = sequences_total + ?, updated_at = ? "
                "WHERE id = ? RETURNING prompts_total - ?",
                (prompts, prompts * n, time.time(), job_id, prompts),
            ).fetchone()
        return first

    def add_progress(self, job_id: str, *, done: int = 0, failed: int = 0, tokens: int = 0) -> None:
        with self._lock, self._writing():
            self._conn.execute(
                "UPDATE jobs SET sequences_done = sequences_done + ?, "
                "sequences_failed = sequences_failed + ?, tokens_done = tokens_done + ?, "
                "updated_at = ? WHERE id = ?",
                (done, failed, tokens, time.time(), job_id),
            )

    def update(self, job_id: str, **fields: Any) -> None:
        if "errors" in fields:
            fields["errors"] = json.dumps(fields["errors"])
        fields["updated_at"] = time.time()
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self._lock, self._writing():
            self._conn.execute(f"UPDATE jobs SET {cols} WHERE id = ?", (*fields.values(), job_id))

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            cur = self._conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,))
            row = cur.fetchone()
            names = [d[0] for d in cur.description]
        return None if row is None else self._decode(dict(zip(names, row, strict=True)))

    def list(self, offset: int, limit: int) -> tuple[list[dict[str, Any]], int]:
        with self._lock:
            cur = self._conn.execute(
                "SELECT * FROM jobs ORDER BY created_at DESC LIMIT ? OFFSET ?", (limit, offset)
            )
            names = [d[0] for d in cur.description]
            rows = [self._decode(dict(zip(names, r, strict=True))) for r in cur.fetchall()]
            count = self._conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
        return rows, count

    def unfinished(self) -> list[dict[str, Any]]:
        with self._lock:
            cur = self._conn.execute(
                "SELECT * FROM jobs WHERE state IN (?, ?) ORDER BY created_at", UNFINISHED
            )
            names = [d[0] for d in cur.description]
            return [self._decode(dict(zip(names, r, strict=True))) for r in cur.fetchall()]

    def request_cancel(self, job_id: str) -> bool:
        """Mark a queued or running job ``cancelling``, once: True for the call that did.
        A cancelling job never resumes after a restart (`unfinished` leaves it out)."""
        with self._lock, self._writing():
            cur = self._conn.execute(
                "UPDATE jobs SET state = 'cancelling', updated_at = ? "
                "WHERE id = ? AND state IN (?, ?)",
                (time.time(), job_id, *UNFINISHED),
            )
        return cur.rowcount == 1

    def start(self, job_id: str, sequences_done: int) -> bool:
        """Mark a queued (or resumed running) job running; False if it is being cancelled."""
        with self._lock, self._writing():
            cur = self._conn.execute(
                "UPDATE jobs SET state = 'running', sequences_done = ?, updated_at = ? "
                "WHERE id = ? AND state IN (?, ?)",
                (sequences_done, time.time(), job_id, *UNFINISHED),
            )
        return cur.rowcount == 1

    def finish_interrupted_cancels(self, job_id: str | None = None) -> int:
        """Jobs (all, or `job_id`) whose cancel was under way when their task ended or the
        server restarted are cancelled: no writer is left; what it committed stays."""
        where, args = ("", ()) if job_id is None else (" AND id = ?", (job_id,))
        with self._lock, self._writing():
            cur = self._conn.execute(
                "UPDATE jobs SET state = 'cancelled', updated_at = ? "
                f"WHERE state = 'cancelling'{where}",
                (time.time(), *args),
            )
        return cur.rowcount

    def count_by_state(self) -> dict[str, int]:
        with self._lock:
            return dict(self._conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"))

    @staticmethod
    def _decode(row: dict[str, Any]) -> dict[str, Any]:
        row["errors"] = json.loads(row["errors"])
        row["request"] = json.loads(row["request"])
        return row
