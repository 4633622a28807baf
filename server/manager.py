"""JobManager: the FIFO queue, the live job table and the bridge between HTTP and the worker.

Contracts call submit/get/cancel/list and await wait_for_change/wait_until_done; the worker
calls next_job and handle(event). The HTTP side never waits on the GPU: every read is an
in-memory lookup, every write is a small SQLite transaction.

Cancellation by state (queue semantics, see ../shared/style.md):
  QUEUED    -> removed from the queue and CANCELED at once
  RUNNING   -> the job's CancelToken is set; the engine stops at the next step boundary
  terminal  -> ALREADY_DONE (idempotent, nothing changes)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from pipelines.request import CancelToken, GenerationRequest

from .events import Canceled, Failed, Interrupted, Progress, RunJob, Succeeded, WorkerEvent
from .jobs import Job, JobError, JobStatus
from .storage import Storage
from .store import JobStore, WebhookBody

log = logging.getLogger("k5serve.jobs")

WebhookFormatter = Callable[[Job], WebhookBody | None]
# Called (under the manager's lock, on whichever thread made the change) with a snapshot of the job
# and its status before the change: on submit (None), every status change, and each progress step
# (previous == job.status). Listeners must be quick and must not call back into the manager.
JobListener = Callable[[Job, JobStatus | None], None]


class QueueFull(Exception):
    def __init__(self, limit: int):
        super().__init__(f"the queue is full ({limit} jobs waiting); try again later")
        self.limit = limit


class CancelOutcome(str, enum.Enum):
    CANCELED = "canceled"  # was queued; now CANCELED
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
        self._tokens: dict[str, CancelToken] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: dict[str, asyncio.Event] = {}  # touched on the event loop only
        self._webhook_formats: dict[str, WebhookFormatter] = {}
        self.on_webhook_queued: Callable[[], None] = lambda: None
        self._listeners: list[JobListener] = []

    # -- setup ---------------------------------------------------------------------------------

    def attach_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def set_webhook_format(self, contract: str, formatter: WebhookFormatter) -> None:
        """How `contract` words its webhook body; called once per contract at app creation."""
        self._webhook_formats[contract] = formatter

    def add_listener(self, listener: JobListener) -> None:
        """Observe job changes (metrics, structured logs); see JobListener."""
        self._listeners.append(listener)

    def recover(self) -> dict[str, int]:
        """Load every job from disk; interrupted runs go back to the queue in submission order."""
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
            self._work.notify_all()
        return dict(counts)

    # -- contract side -------------------------------------------------------------------------

    def submit(
        self,
        *,
        contract: str,
        model: str,
        request: GenerationRequest,
        base_url: str | None = None,
        webhook_url: str | None = None,
        meta: dict[str, Any] | None = None,
        error: JobError | None = None,
        job_id: str | None = None,
    ) -> Job:
        """Queue a job. With `error` the job is recorded as already FAILED (input rejected at the
        edge), so every contract can still report it through its own status/result routes."""
        job = Job.new(
            contract=contract,
            model=model,
            request=request,
            now=self.clock(),
            base_url=base_url,
            webhook_url=webhook_url,
            meta=dict(meta or {}),
        )
        if job_id is not None:
            job.id = job_id
        with self._lock:
            if error is None and len(self._queue) >= self.max_queue:
                raise QueueFull(self.max_queue)
            self._jobs[job.id] = job
            if error is not None:
                job.fail(error, now=self.clock())
                self._save_terminal(job)
            else:
                self.store.save(job)
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
            if job.status.terminal:
                return CancelOutcome.ALREADY_DONE
            if job.status is JobStatus.QUEUED:
                self._queue.remove(job.id)
                job.cancel(now=self.clock())
                self._save_terminal(job)
                log.info("job %s: canceled while queued", job.id)
                self._emit(job, JobStatus.QUEUED)
                return CancelOutcome.CANCELED
            self._tokens[job.id].cancel()
            log.info("job %s: cancel requested while running", job.id)
            return CancelOutcome.REQUESTED

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
            job = self._jobs[self._queue.popleft()]
            job.start(now=self.clock())
            self.store.save(job)
            token = CancelToken()
            self._tokens[job.id] = token
            log.info("job %s: running (attempt %d)", job.id, job.attempts)
            self._emit(job, JobStatus.QUEUED)
            self._notify(job.id)
            return RunJob(job.snapshot(), token)

    def wake_workers(self) -> None:
        """Make every worker blocked in next_job re-check its stop flag now (shutdown)."""
        with self._lock:
            self._work.notify_all()

    def handle(self, event: WorkerEvent) -> None:
        with self._lock:
            job = self._jobs[event.job_id]
            if isinstance(event, Progress):
                job.record_progress(event.step, event.total, now=self.clock())
                self._notify(job.id)
                self._emit(job, job.status)
                return
            self._tokens.pop(job.id, None)
            if isinstance(event, Succeeded):
                job.log("video written", now=self.clock())
                job.succeed(event.output, now=self.clock())
            elif isinstance(event, Failed):
                job.log(event.error.message, level="ERROR", now=self.clock())
                job.fail(event.error, now=self.clock())
            elif isinstance(event, Canceled):
                job.cancel(now=self.clock())
            elif isinstance(event, Interrupted):
                job.requeue()
                self.store.save(job)
                self._queue.appendleft(job.id)
                self._notify(job.id)
                self._emit(job, JobStatus.RUNNING)
                return
            log.info("job %s: %s", job.id, job.status.value)
            self._save_terminal(job)
            self._emit(job, JobStatus.RUNNING)

    # -- internals -----------------------------------------------------------------------------

    def _save_terminal(self, job: Job) -> None:
        webhook = None
        if job.webhook_url:
            formatter = self._webhook_formats.get(job.contract)
            try:
                webhook = formatter(job) if formatter else None
            except Exception:  # a formatting bug must not lose the job's result
                log.exception("job %s: could not build the webhook body", job.id)
        self.store.save(job, webhook=webhook, now=self.clock())
        self.storage.remove_inputs(job.id)
        self._notify(job.id)
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
