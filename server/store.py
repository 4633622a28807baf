"""Durable job and webhook records: one SQLite file under --data-dir, in WAL mode.

Every state change of a job is written before anyone is told about it, so a `kill -9` at any
moment leaves either the old or the new state on disk, never half of one. A terminal state and
its webhook delivery are written in one transaction: a finished job always has its delivery.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .jobs import Job

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,  -- submission order = queue order
    id         TEXT NOT NULL UNIQUE,
    status     TEXT NOT NULL,
    contract   TEXT NOT NULL,
    created_at REAL NOT NULL,
    data       TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS webhooks (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id       TEXT NOT NULL UNIQUE,  -- at most one delivery per job
    url          TEXT NOT NULL,
    body         BLOB NOT NULL,
    headers      TEXT NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_at      REAL NOT NULL,
    state        TEXT NOT NULL DEFAULT 'pending',  -- pending | delivered | abandoned
    last_error   TEXT
);
CREATE INDEX IF NOT EXISTS webhooks_due ON webhooks (state, next_at);
"""


@dataclass(frozen=True)
class WebhookBody:
    """What a contract wants POSTed when a job finishes."""

    url: str
    body: bytes
    headers: dict[str, str]


@dataclass(frozen=True)
class WebhookDelivery:
    id: int
    job_id: str
    url: str
    body: bytes
    headers: dict[str, str]
    attempts: int
    next_at: float
    state: str
    last_error: str | None


class JobStore:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL is durable against process crashes (kill -9); FULL would add power-loss safety.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- jobs ----------------------------------------------------------------------------------

    def save(self, job: Job, webhook: WebhookBody | None = None, now: float | None = None) -> None:
        """Insert or update `job`; with `webhook`, queue its delivery in the same transaction."""
        data = json.dumps(job.to_dict(), separators=(",", ":"))
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO jobs (id, status, contract, created_at, data) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET status = excluded.status, data = excluded.data",
                    (job.id, job.status.value, job.contract, job.created_at, data),
                )
                if webhook is not None:
                    self._db.execute(
                        "INSERT OR IGNORE INTO webhooks (job_id, url, body, headers, next_at) VALUES (?, ?, ?, ?, ?)",
                        (
                            job.id,
                            webhook.url,
                            webhook.body,
                            json.dumps(webhook.headers),
                            time.time() if now is None else now,
                        ),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise

    def delete(self, job_id: str) -> bool:
        """Remove a job and its webhook delivery in one transaction; False if it was not there."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                gone = self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,)).rowcount
                self._db.execute("DELETE FROM webhooks WHERE job_id = ?", (job_id,))
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
        return gone > 0

    def _rollback(self) -> None:
        # SQLite may already have rolled back on its own (SQLITE_FULL, SQLITE_IOERR): keep the first error.
        with contextlib.suppress(sqlite3.Error):
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")

    def load_all(self) -> list[Job]:
        """Every job, in submission order."""
        with self._lock:
            rows = self._db.execute("SELECT data FROM jobs ORDER BY seq").fetchall()
        return [Job.from_dict(json.loads(row[0])) for row in rows]

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT data FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job.from_dict(json.loads(row[0])) if row else None

    # -- webhooks ------------------------------------------------------------------------------

    def due_webhooks(self, now: float, limit: int = 16) -> list[WebhookDelivery]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, job_id, url, body, headers, attempts, next_at, state, last_error FROM webhooks "
                "WHERE state = 'pending' AND next_at <= ? ORDER BY next_at LIMIT ?",
                (now, limit),
            ).fetchall()
        return [_delivery(row) for row in rows]

    def next_webhook_at(self) -> float | None:
        with self._lock:
            row = self._db.execute("SELECT MIN(next_at) FROM webhooks WHERE state = 'pending'").fetchone()
        return row[0] if row else None

    def webhook(self, job_id: str) -> WebhookDelivery | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, job_id, url, body, headers, attempts, next_at, state, last_error FROM webhooks "
                "WHERE job_id = ?",
                (job_id,),
            ).fetchone()
        return _delivery(row) if row else None

    def webhook_pending(self, job_id: str) -> bool:
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM webhooks WHERE job_id = ? AND state = 'pending'", (job_id,)
            ).fetchone()
        return row is not None

    def integrity(self) -> str:
        """`PRAGMA integrity_check`: "ok" for a sound database file."""
        with self._lock:
            return "; ".join(row[0] for row in self._db.execute("PRAGMA integrity_check").fetchall())

    def webhook_attempted(self, delivery_id: int, *, state: str, next_at: float, error: str | None) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE webhooks SET attempts = attempts + 1, state = ?, next_at = ?, last_error = ? WHERE id = ?",
                (state, next_at, error, delivery_id),
            )


def _delivery(row: tuple) -> WebhookDelivery:
    return WebhookDelivery(
        id=row[0],
        job_id=row[1],
        url=row[2],
        body=bytes(row[3]),
        headers=json.loads(row[4]),
        attempts=row[5],
        next_at=row[6],
        state=row[7],
        last_error=row[8],
    )
