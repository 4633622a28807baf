"""Retention: finished jobs are deleted, record and files together, once they are old enough;
files uploaded through fal's storage protocol (uploads.py) expire the same time after their upload.

A job counts from when it ended (or was created, for one that never ran). A job whose webhook is
still being retried is kept until its delivery ends, so a receiver never gets a result whose
URL is already dead. Deleting goes through the job manager's `delete` (record first, then files).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from .jobs import Job
from .store import JobStore
from .uploads import Uploads

log = logging.getLogger("k5serve.jobs")


class Jobs(Protocol):
    """What retention needs from the job manager."""

    def list(self) -> list[Job]: ...

    def delete(self, job_id: str) -> bool: ...


def expire(jobs: Jobs, store: JobStore, older_than: float) -> list[str]:
    """Delete finished jobs that ended before `older_than`; returns the ids deleted."""
    old = [j.id for j in jobs.list() if j.status.terminal and (j.completed_at or j.created_at) < older_than]
    old.reverse()  # oldest first, as they were submitted
    expired = [job_id for job_id in old if not store.webhook_pending(job_id) and jobs.delete(job_id)]
    if expired:
        log.info("retention: %d finished job(s) expired with their files", len(expired))
    return expired


class Retention:
    """Expires finished jobs older than `hours`, at start and then periodically (see run)."""

    def __init__(
        self,
        jobs: Jobs,
        store: JobStore,
        hours: float,
        clock: Callable[[], float] = time.time,
        uploads: Uploads | None = None,
    ):
        if hours <= 0:
            raise ValueError(f"retention hours must be positive, not {hours!r}")
        self.jobs, self.store, self.clock, self.uploads = jobs, store, clock, uploads
        self.keep = hours * 3600.0
        # often enough that a job outlives its limit by at most a quarter of it (and a minute at most)
        self.interval = min(60.0, max(0.2, self.keep / 4))

    def expire(self) -> list[str]:
        """One sweep now (blocking: SQLite writes and file deletions). Uploaded files expire as
        long after their upload as jobs after their end."""
        cutoff = self.clock() - self.keep
        if self.uploads is not None and (gone := self.uploads.expire(cutoff)):
            log.info("retention: %d upload(s) expired", gone)
        return expire(self.jobs, self.store, cutoff)

    async def run(self) -> None:
        """Sweep off the event loop every `interval` seconds until cancelled."""
        while True:
            try:
                await asyncio.to_thread(self.expire)
            except Exception:  # a full disk or a locked database: try again next time
                log.exception("retention sweep failed")
            await asyncio.sleep(self.interval)
