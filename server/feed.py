"""The change feed: who hears that a job changed, and how coroutines wait for it.

The job manager publishes every change here once it is saved and swapped into the table.
Listeners (metrics, the state log, the webhook dispatcher's wake-up) are called synchronously,
on whichever thread made the change and under the manager's lock, so each sees one job's changes
in the order they happened. Coroutines on the event loop (`wait_for_change`: SSE streams, the
synchronous contracts' long polls) are woken through `call_soon_threadsafe`; they never take a
lock, they re-read the job themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from .jobs import Job, JobStatus

log = logging.getLogger("k5serve.jobs")

# Called with a copy of the job and its status before the change: on submit (None), on every
# status change, and on each progress step (previous == job.status). Listeners must be quick and
# must not call back into the job manager.
JobListener = Callable[[Job, JobStatus | None], None]
# Called with the id of a job that was deleted or expired: a deleted running job sends no further
# changes, so observers drop what they keep for it.
DeleteListener = Callable[[str], None]
# Reads the current state of a job (JobManager.get): waiters re-read it, they are never handed one.
JobReader = Callable[[str], Job | None]


class ChangeFeed:
    def __init__(self) -> None:
        self._listeners: tuple[JobListener, ...] = ()  # replaced on add: iterated without a lock
        self._delete_listeners: tuple[DeleteListener, ...] = ()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: dict[str, asyncio.Event] = {}  # touched on the event loop only

    # -- subscribing ---------------------------------------------------------------------------

    def attach_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop whose coroutines wait in wait_for_change."""
        self._loop = loop

    def add_listener(self, listener: JobListener) -> None:
        self._listeners = (*self._listeners, listener)

    def add_delete_listener(self, listener: DeleteListener) -> None:
        self._delete_listeners = (*self._delete_listeners, listener)

    # -- publishing (the job manager, under its lock) -------------------------------------------

    def changed(self, job: Job, previous: JobStatus | None) -> None:
        """`job` (now in the table) changed from `previous`: wake its waiters, tell the listeners."""
        self.wake(job.id)
        if not self._listeners:
            return
        snapshot = job.snapshot()
        for listener in self._listeners:
            try:
                listener(snapshot, previous)
            except Exception:  # an observer's bug must never break the queue
                log.exception("job %s: listener %r failed", job.id, listener)

    def deleted(self, job_id: str) -> None:
        for listener in self._delete_listeners:
            try:
                listener(job_id)
            except Exception:  # an observer must never break a delete
                log.exception("delete listener failed for job %s", job_id)
        self.wake(job_id)

    def wake(self, job_id: str) -> None:
        """Wake the coroutines waiting on `job_id` (thread-safe)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop is closing during shutdown
            loop.call_soon_threadsafe(self._wake, job_id)

    def _wake(self, job_id: str) -> None:
        event = self._changed.pop(job_id, None)
        if event is not None:
            event.set()

    # -- waiting (coroutines on the attached loop) -----------------------------------------------

    async def wait_for_change(
        self, read: JobReader, job_id: str, version: int, timeout: float | None = None
    ) -> Job | None:
        """Return the job once its version differs from `version`, or as it is at `timeout`
        (None once it is gone)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = read(job_id)
            if job is None or job.version != version:
                return job
            event = self._changed.setdefault(job_id, asyncio.Event())
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return job
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except asyncio.TimeoutError:
                return read(job_id)

    async def wait_until_done(self, read: JobReader, job_id: str, timeout: float | None = None) -> Job | None:
        """Return the job once it is terminal (or gone), or as it is at `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        job = read(job_id)
        while job is not None and not job.status.terminal:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            job = await self.wait_for_change(read, job_id, job.version, remaining)
        return job
