"""JobManager: the FIFO queue, the live job table and the bridge between HTTP and the worker.

Contracts call submit/get/cancel/list and await wait_for_change/wait_until_done; the worker
calls next_job and handle(event). The HTTP side never waits on the GPU: every read is an
in-memory lookup, every write is a small SQLite transaction.

Cancellation by state (queue semantics, see ../shared/style.md):
  QUEUED    -> removed from the queue and CANCELED at once
  RUNNING   -> the job's CancelToken is set; the engine stops at the next step boundary
  CANCELED  -> CANCELED again: a repeated cancel (a client retrying) gets the first answer
  SUCCEEDED / FAILED -> ALREADY_DONE (nothing changes)
A cancel racing the end of a run is decided under the manager's lock: whichever comes first wins,
and status, result, webhook and file all tell that one story.

Every change is written to the store before it is published: a change is made on a copy of the
job, saved, and only then swapped into the table, so a failed write (disk full) changes nothing
that anyone can see. Deleting (`delete`, retention) goes the other way round: the record first,
then the file, so a crash in between leaves an orphan file (swept at start-up), never a finished
job whose URL is dead.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import enum
import logging
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from pipelines.request import CancelToken, GenerationRequest, ResolvedRequest

from .errors import QueueFull, Unavailable
from .events import Failed, Interrupted, Progress, RunJob, Succeeded, WorkerEvent
from .jobs import ErrorKind, Job, JobError, JobOutput, JobStatus
from .storage import Storage
from .store import JobStore, WebhookBody

log = logging.getLogger("k5serve.jobs")

WebhookFormatter = Callable[[Job], WebhookBody | None]
# Called (under the manager's lock, on whichever thread made the change) with a snapshot of the job
# and its status before the change: on submit (None), every status change, and each progress step
# (previous == job.status). Listeners must be quick and must not call back into the manager.
JobListener = Callable[[Job, JobStatus | None], None]


class CancelOutcome(str, enum.Enum):
    CANCELED = "canceled"  # was queued (or already canceled); now CANCELED
    REQUESTED = "requested"  # is running; stops at the next step
    ALREADY_DONE = "already_done"
    NOT_FOUND = "not_found"


class JobManager:
    def __init__(
        self,
        store: JobStore,
        storage: Storage,
        *,
        max_queue: int = 100,
        clock: Callable[[], float] = time.time,
    ):
        self.store = store
        self.storage = storage
        self.max_queue = max_queue
        self.clock = clock
        self._lock = threading.RLock()
        self._work = threading.Condition(self._lock)
        self._jobs: dict[str, Job] = {}
        self._queue: collections.deque[str] = collections.deque()
        self._runs: dict[str, RunJob] = {}  # running job id -> what the worker was handed
        self._refusal: str | None = None  # why new jobs are refused (None: accepting)
        self._last_error: dict[str, Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: dict[str, asyncio.Event] = {}  # touched on the event loop only
        self._webhook_formats: dict[str, WebhookFormatter] = {}
        self.on_webhook_queued: Callable[[], None] = lambda: None
        self._listeners: list[JobListener] = []
        self._delete_listeners: list[Callable[[str], None]] = []

    # -- setup ---------------------------------------------------------------------------------

    def attach_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def set_webhook_format(self, contract: str, formatter: WebhookFormatter) -> None:
        """How `contract` words its webhook body; called once per contract at app creation."""
        self._webhook_formats[contract] = formatter

    def add_listener(self, listener: JobListener) -> None:
        """Observe job changes (metrics, structured logs); see JobListener."""
        self._listeners.append(listener)

    def add_delete_listener(self, listener: Callable[[str], None]) -> None:
        """Called with the job id (under the manager's lock) when a job is deleted or expires: a
        deleted running job sends no further events, so observers drop what they keep for it."""
        self._delete_listeners.append(listener)

    def recover(self) -> dict[str, int]:
        """Load every job from disk; interrupted runs go back to the queue in submission order.
        Then sweep the data dir: only finished jobs keep an output folder, only waiting jobs their
        inputs, and no `*.part` file survives (see Storage.sweep)."""
        counts = collections.Counter()
        with self._lock:
            for job in self.store.load_all():
                if job.status is JobStatus.RUNNING:
                    job.requeue()
                    job.log("server restarted: running again", level="WARN", now=self.clock())
                    self.store.save(job)
                    counts["requeued"] += 1
                if job.status is JobStatus.QUEUED:
                    self._queue.append(job.id)
                elif job.status is JobStatus.SUCCEEDED and not self.storage.has_output(job.file_id):
                    log.error("job %s: finished output %s is missing from disk", job.id, job.file_id)
                counts[job.status.value] += 1
                self._jobs[job.id] = job
            ran_and_failed = [j for j in self._jobs.values() if j.status is JobStatus.FAILED and j.attempts]
            if ran_and_failed:  # for /readyz: the latest failure survives a restart
                self._last_error = _failure(max(ran_and_failed, key=lambda j: j.completed_at or 0.0))
            finished = [j.file_id for j in self._jobs.values() if j.status is JobStatus.SUCCEEDED]
            swept = self.storage.sweep(finished, self._queue)
            if any(swept.values()):
                log.warning("start-up clean-up removed %s", ", ".join(f"{n} {k}" for k, n in swept.items() if n))
            self._work.notify_all()
        return dict(counts)

    # -- health --------------------------------------------------------------------------------

    def stop_accepting(self, reason: str) -> None:
        """Refuse new jobs from now on (the worker cannot run them); queued ones keep waiting."""
        with self._lock:
            self._refusal = reason

    @property
    def refusal(self) -> str | None:
        return self._refusal

    def last_error(self) -> dict[str, Any] | None:
        """The most recent job that failed while running: {job_id, contract, kind, message, time}."""
        with self._lock:
            if self._last_error is None:
                return None
            when = datetime.fromtimestamp(self._last_error["time"], tz=timezone.utc)
            return {**self._last_error, "time": when.isoformat(timespec="seconds").replace("+00:00", "Z")}

    # -- contract side -------------------------------------------------------------------------

    def submit(
        self,
        *,
        contract: str,
        model: str,
        request: GenerationRequest | None,
        resolved: ResolvedRequest | None = None,
        base_url: str | None = None,
        webhook_url: str | None = None,
        meta: dict[str, Any] | None = None,
        error: JobError | None = None,
        job_id: str | None = None,
    ) -> Job:
        """Queue a job. With `error` the job is recorded as already FAILED (input rejected at the
        edge), so every contract can still report it through its own status/result routes.

        A request without a seed gets one here, stored with the job: a run repeated after a crash or
        a restart makes the same video, and the seed reported is the one that was used."""
        if request is not None and request.seed is None and error is None:
            request = dataclasses.replace(request, seed=secrets.randbelow(2**31))
        job = Job.new(
            contract=contract,
            model=model,
            request=request,
            now=self.clock(),
            base_url=base_url,
            webhook_url=webhook_url,
            meta=dict(meta or {}),
            resolved=resolved,
        )
        if job_id is not None:
            job.id = job_id
        with self._lock:
            if error is None and self._refusal is not None:
                raise Unavailable(self._refusal)
            if error is None and len(self._queue) >= self.max_queue:
                raise QueueFull(self.max_queue)
            if error is not None:
                job.fail(error, now=self.clock())
            try:
                self._save(job)  # accepted only once it is on disk
            except sqlite3.Error as exc:
                raise Unavailable(f"the job store could not record the request ({exc}); try again later") from exc
            self._jobs[job.id] = job
            if error is None:
                self._queue.append(job.id)
                self._work.notify_all()
            log.info("job %s: %s %s %s", job.id, contract, model, job.status.value)
            self._emit(job, None)
            return job.snapshot()

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            job = self._jobs.get(job_id)
            return job.snapshot() if job else None

    def queue_position(self, job_id: str) -> int | None:
        """0-based place in the queue (0 = next to run), or None when not queued."""
        with self._lock:
            try:
                return self._queue.index(job_id)
            except ValueError:
                return None

    def queued_count(self) -> int:
        with self._lock:
            return len(self._queue)

    def list(self, *, contract: str | None = None, limit: int | None = None) -> list[Job]:
        """Jobs newest first, optionally only one contract's."""
        with self._lock:
            jobs = [j for j in reversed(self._jobs.values()) if contract is None or j.contract == contract]
            return [j.snapshot() for j in jobs[:limit]]

    def cancel(self, job_id: str) -> CancelOutcome:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return CancelOutcome.NOT_FOUND
            if job.status is JobStatus.CANCELED:
                return CancelOutcome.CANCELED
            if job.status.terminal:
                return CancelOutcome.ALREADY_DONE
            if job.status is JobStatus.QUEUED:
                job = self._commit(job, lambda j: j.cancel(now=self.clock()))
                self._queue.remove(job.id)
                log.info("job %s: canceled while queued", job.id)
                self._emit(job, JobStatus.QUEUED)
                return CancelOutcome.CANCELED
            self._runs[job.id].cancel.cancel()
            log.info("job %s: cancel requested while running", job.id)
            return CancelOutcome.REQUESTED

    def delete(self, job_id: str) -> bool:
        """Forget a job: its record (and webhook) first, then its files. A running job is also
        cancelled; the worker stops at the next step and its output is discarded (see handle)."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return False
            self.store.delete(job_id)
            del self._jobs[job_id]
            run = self._runs.get(job_id)
            if run is not None:
                run.cancel.cancel()
            else:
                if job.status is JobStatus.QUEUED:
                    self._queue.remove(job_id)
                self.storage.discard_output(job.file_id)
                self.storage.remove_inputs(job_id)
            log.info("job %s: deleted (was %s)", job_id, job.status.value)
            for listener in self._delete_listeners:
                try:
                    listener(job_id)
                except Exception:  # an observer must never break a delete
                    log.exception("delete listener failed for job %s", job_id)
            self._notify(job_id)
            return True

    def expire(self, older_than: float) -> list[str]:
        """Delete finished jobs that ended before `older_than` (retention). A job whose webhook is
        still being retried is kept until its delivery ends."""
        with self._lock:
            old = [
                j.id for j in self._jobs.values() if j.status.terminal and (j.completed_at or j.created_at) < older_than
            ]
        expired = [job_id for job_id in old if not self.store.webhook_pending(job_id) and self.delete(job_id)]
        if expired:
            log.info("retention: %d finished job(s) expired with their files", len(expired))
        return expired

    async def wait_for_change(self, job_id: str, version: int, timeout: float | None = None) -> Job | None:
        """Return the job once its version differs from `version` (or at `timeout`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if job is None or job.version != version:
                return job
            event = self._changed.setdefault(job_id, asyncio.Event())
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return job
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except asyncio.TimeoutError:
                return self.get(job_id)

    async def wait_until_done(self, job_id: str, timeout: float | None = None) -> Job | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        job = self.get(job_id)
        while job is not None and not job.status.terminal:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            job = await self.wait_for_change(job_id, job.version, remaining)
        return job

    # -- worker side ---------------------------------------------------------------------------

    def next_job(self, stop: threading.Event, poll: float = 0.5) -> RunJob | None:
        """Block until a job is queued (-> RUNNING, persisted) or `stop` is set (-> None)."""
        with self._lock:
            while not self._queue:
                if stop.is_set():
                    return None
                self._work.wait(poll)
            if stop.is_set():
                return None
            job = self._commit(self._jobs[self._queue[0]], lambda j: j.start(now=self.clock()))
            self._queue.popleft()
            run = RunJob(job.snapshot(), CancelToken())
            self._runs[job.id] = run
            log.info("job %s: running (attempt %d)", job.id, job.attempts)
            self._emit(job, JobStatus.QUEUED)
            self._notify(job.id)
            return run

    def wake_workers(self) -> None:
        """Make every worker blocked in next_job re-check its stop flag now (shutdown)."""
        with self._lock:
            self._work.notify_all()

    def handle(self, event: WorkerEvent) -> None:
        with self._lock:
            job = self._jobs.get(event.job_id)
            if job is None:  # deleted while it ran: nothing to record, nothing to keep
                run = self._runs.pop(event.job_id, None)
                if run is not None and not isinstance(event, Progress):
                    self.storage.discard_output(run.job.file_id)
                    self.storage.remove_inputs(event.job_id)
                return
            if isinstance(event, Progress):
                job.record_progress(event.step, event.total, now=self.clock())
                self._notify(job.id)
                self._emit(job, job.status)
                return
            self._runs.pop(job.id, None)
            now = self.clock()
            if isinstance(event, Interrupted):
                self._queue.appendleft(job.id)
                self._publish(job, lambda j: j.requeue())
                return
            if isinstance(event, Succeeded):
                change = lambda j: (  # noqa: E731
                    _log_acceleration(j, event.output, now),
                    j.log("video written", now=now),
                    j.succeed(event.output, now=now),
                )
            elif isinstance(event, Failed):
                change = lambda j: (j.log(event.error.message, "ERROR", now), j.fail(event.error, now=now))  # noqa: E731
            else:
                change = lambda j: j.cancel(now=now)  # noqa: E731
            job = self._publish(job, change)
            if job.status is JobStatus.FAILED and job.error is not None:
                self._last_error = _failure(job)
            log.info("job %s: %s", job.id, job.status.value)

    def _publish(self, job: Job, change: Callable[[Job], object]) -> Job:
        """The end of a run: save and announce it. If the store cannot write, the job still ends
        for its clients (failed, in memory only); on disk it stays RUNNING, so a restart runs it
        again rather than losing it."""
        previous = job.status
        try:
            job = self._commit(job, change)
        except sqlite3.Error as exc:
            log.error("job %s: could not record the end of its run: %s", job.id, exc)
            if job.id in self._queue:
                self._queue.remove(job.id)
            self.storage.discard_output(job.file_id)
            message = f"the job store could not record the result ({exc}); the job runs again after a restart"
            job.fail(JobError(ErrorKind.INTERNAL, message), now=self.clock())
            self._notify(job.id)
        self._emit(job, previous)
        return job

    # -- internals -----------------------------------------------------------------------------

    def _commit(self, job: Job, change: Callable[[Job], object]) -> Job:
        """Apply `change` to a copy of `job`, save the copy, then make it the live job. If the
        change or the save raises, the live job (memory and disk) is as it was."""
        draft = job.snapshot()
        change(draft)
        self._save(draft)
        self._jobs[draft.id] = draft
        self._notify(draft.id)
        return draft

    def _save(self, job: Job) -> None:
        """Persist `job`; a terminal state goes to disk together with its webhook delivery."""
        if not job.status.terminal:
            self.store.save(job)
            return
        webhook = None
        if job.webhook_url:
            formatter = self._webhook_formats.get(job.contract)
            try:
                webhook = formatter(job) if formatter else None
            except Exception:  # a formatting bug must not lose the job's result
                log.exception("job %s: could not build the webhook body", job.id)
        self.store.save(job, webhook=webhook, now=self.clock())
        self.storage.remove_inputs(job.id)
        if webhook is not None:
            self.on_webhook_queued()

    def _emit(self, job: Job, previous: JobStatus | None) -> None:
        if not self._listeners:
            return
        snapshot = job.snapshot()
        for listener in self._listeners:
            try:
                listener(snapshot, previous)
            except Exception:  # an observer's bug must never break the queue
                log.exception("job %s: listener %r failed", job.id, listener)

    def _notify(self, job_id: str) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop is closing during shutdown
            loop.call_soon_threadsafe(self._wake, job_id)

    def _wake(self, job_id: str) -> None:
        event = self._changed.pop(job_id, None)
        if event is not None:
            event.set()


def _failure(job: Job) -> dict[str, Any]:
    assert job.error is not None
    when = job.completed_at or job.created_at
    return {
        "job_id": job.id,
        "contract": job.contract,
        "kind": job.error.kind.value,
        "message": job.error.message,
        "time": when,
    }


async def retention_loop(manager: JobManager, hours: float, clock: Callable[[], float] = time.time) -> None:
    """Expire finished jobs older than `hours`, at start and then periodically (cancel to stop)."""
    keep = hours * 3600.0
    interval = min(60.0, max(0.2, keep / 4))
    while True:
        try:
            await asyncio.to_thread(manager.expire, clock() - keep)
        except Exception:  # a full disk or a locked database: try again next time
            log.exception("retention sweep failed")
        await asyncio.sleep(interval)


def _log_acceleration(job: Job, output: JobOutput, now: float) -> None:
    """Approximate output is labelled where every contract's logs and the job record can show it."""
    if output.acceleration != "none":
        job.log(
            f"acceleration {output.acceleration} (approximate): {output.cached_steps} transformer evaluations "
            "reused from earlier steps (MagCache)",
            now=now,
        )
