"""JobManager: the job table and the rules for changing it, between HTTP and the workers.

Contracts call submit/get/cancel/list and await wait_for_change/wait_until_done; workers call
next_job and handle(event). The parts it is made of, wired together in Services.build:

  Scheduler   (scheduler.py)  which waiting job runs next, on which worker; queue positions
  JobStore    (store.py)      the SQLite repository every change is written to
  ChangeFeed  (feed.py)       listeners (metrics, logs, webhooks) and coroutines waiting for a change
  retention   (retention.py)  finished jobs expire after a while

Reads never take a lock: the table maps each id to a Job that is never changed once it is in
the table (a change is made on a copy that replaces it), and the scheduler's queue is a tuple
swapped whole, so an HTTP handler never waits while a worker thread writes SQLite. The new copy
goes into the table last, after the queue and the last error are updated: whoever sees a job's
new state also sees everything that follows from it. Every change
(submit, cancel, delete, next_job, handle, recover) takes one lock, shared with the scheduler, so
a job's status and its place in the queue change together; changes are blocking calls (SQLite,
file deletion): async code runs them in a thread.

A restart runs interrupted jobs again, except those whose caller held the connection for the result
(`Job.waits`: OneRouter, fal's run host): that connection died with the process and nobody can
fetch the result, so recovery cancels them (RESTARTED_WHILE_WAITING) instead of spending the GPU.

Cancellation by state (queue semantics, see ../shared/style.md):
  QUEUED    -> removed from the queue and CANCELED at once
  RUNNING   -> the run's cancel switch is set; the engine stops at the next step or decode chunk
  CANCELED  -> CANCELED again: a repeated cancel (a client retrying) gets the first answer
  SUCCEEDED / FAILED -> ALREADY_DONE (nothing changes)
A cancel racing the end of a run is decided under the lock: whichever comes first wins, and
status, result, webhook and file all tell that one story.

Every change is written to the store before it is published: a change is made on a copy of the
job, saved, and only then swapped into the table, so a failed write (disk full) changes nothing
that anyone can see. Deleting (`delete`, retention) goes the other way round: the record first,
then the file, so a crash in between leaves an orphan file (swept at start-up), never a finished
job whose URL is dead.
"""

from __future__ import annotations

import asyncio
import collections
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

from pipelines.cancel import CancelSwitch, CancelToken
from pipelines.request import GenerationRequest, ResolvedRequest

from .errors import QueueFull, Unavailable
from .events import Failed, Interrupted, Lost, Progress, RunJob, Succeeded, WorkerEvent
from .feed import ChangeFeed, DeleteListener, JobListener
from .jobs import CANCELLED_BY_CLIENT, RESTARTED_WHILE_WAITING, ErrorKind, Job, JobError, JobStatus
from .scheduler import Scheduler
from .storage import Storage
from .store import JobStore, WebhookBody

__all__ = ["CancelOutcome", "JobListener", "JobManager", "QueueFull", "Unavailable", "WebhookFormatter"]

log = logging.getLogger("k5serve.jobs")

# How a finished job's webhook is worded (None: no webhook), by its contract.
WebhookFormatter = Callable[[Job], WebhookBody | None]


class CancelOutcome(str, enum.Enum):
    CANCELED = "canceled"  # was queued (or already canceled); now CANCELED
    REQUESTED = "requested"  # is running; stops at the next step
    ALREADY_DONE = "already_done"
    NOT_FOUND = "not_found"


def any_job(_job: Job) -> bool:
    """The default `can_run`: a worker that can run every job."""
    return True


class JobManager:
    def __init__(
        self,
        store: JobStore,
        storage: Storage,
        *,
        max_queue: int = 100,
        clock: Callable[[], float] = time.time,
        scheduler: Scheduler | None = None,
        feed: ChangeFeed | None = None,
        webhook_body: WebhookFormatter | None = None,
        cancel_switch: Callable[[], CancelSwitch] = CancelToken,
        max_worker_deaths: int = 2,
    ):
        """`cancel_switch` makes the token each run is handed (RunJob.cancel): an in-process one by
        default; a worker in another process needs one that crosses (pipelines/cancel.py).
        `max_worker_deaths`: a job whose runs killed this many worker processes fails instead of
        running again (K5SERVE_WORKER_MAX_DEATHS)."""
        if max_worker_deaths < 1:
            raise ValueError(f"max_worker_deaths must be >= 1, got {max_worker_deaths}")
        self.max_worker_deaths = max_worker_deaths
        self.store = store
        self.storage = storage
        self.max_queue = max_queue
        self.clock = clock
        self.scheduler = scheduler if scheduler is not None else Scheduler()
        self.feed = feed if feed is not None else ChangeFeed()
        self._lock = self.scheduler.lock  # one lock: a job's status and its queue place change together
        self._jobs: dict[str, Job] = {}  # id -> a Job never changed in place (see module docstring)
        self._runs: dict[str, RunJob] = {}  # running job id -> what its worker was handed
        self._cancel_reasons: dict[str, str] = {}  # running job id -> why its cancel was asked (first wins)
        self._refusal: str | None = None  # why new jobs are refused (None: accepting)
        self._last_error: dict[str, Any] | None = None  # replaced whole, read without the lock
        self._webhook_body = webhook_body  # the contract registry's: a finished job's webhook, if any
        self._cancel_switch = cancel_switch

    # -- setup ---------------------------------------------------------------------------------

    def attach_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self.feed.attach_loop(loop)

    def add_listener(self, listener: JobListener) -> None:
        """Observe job changes (metrics, structured logs); see feed.JobListener."""
        self.feed.add_listener(listener)

    def add_delete_listener(self, listener: DeleteListener) -> None:
        """Called with the job id when a job is deleted or expires (see feed.DeleteListener)."""
        self.feed.add_delete_listener(listener)

    def recover(self) -> dict[str, int]:
        """Load every job from disk; interrupted runs go back to the queue in submission order,
        and unfinished jobs whose caller waited on the connection (`Job.waits`) are cancelled: that
        caller is gone. Then sweep the data dir: only finished jobs keep an output folder, only
        waiting jobs their inputs, and no `*.part` file survives (see Storage.sweep)."""
        counts = collections.Counter()
        with self._lock:  # jobs are not in the table yet: changing them in place is safe here
            for job in self.store.load_all():
                if job.waits and not job.status.terminal:
                    job.log(RESTARTED_WHILE_WAITING + ": not run again", level="WARN", now=self.clock())
                    job.cancel(now=self.clock(), reason=RESTARTED_WHILE_WAITING)
                    self._save(job)
                    counts["caller_gone"] += 1
                elif job.status is JobStatus.RUNNING:
                    job.requeue()
                    job.log("server restarted: running again", level="WARN", now=self.clock())
                    self.store.save(job)
                    counts["requeued"] += 1
                elif job.status is JobStatus.SUCCEEDED and not self.storage.has_output(job.file_id):
                    log.error("job %s: finished output %s is missing from disk", job.id, job.file_id)
                counts[job.status.value] += 1
                if job.status is JobStatus.QUEUED:
                    self.scheduler.enqueue(job.id)
                self._jobs[job.id] = job
            ran_and_failed = [j for j in self._jobs.values() if j.status is JobStatus.FAILED and j.attempts]
            if ran_and_failed:  # for /readyz: the latest failure survives a restart
                self._last_error = _failure(max(ran_and_failed, key=lambda j: j.completed_at or 0.0))
            finished = [j.file_id for j in self._jobs.values() if j.status is JobStatus.SUCCEEDED]
            swept = self.storage.sweep(finished, self.scheduler.waiting())
            if any(swept.values()):
                log.warning("start-up clean-up removed %s", ", ".join(f"{n} {k}" for k, n in swept.items() if n))
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
        error = self._last_error
        if error is None:
            return None
        when = datetime.fromtimestamp(error["time"], tz=timezone.utc)
        return {**error, "time": when.isoformat(timespec="seconds").replace("+00:00", "Z")}

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
        waits: bool = False,
    ) -> Job:
        """Queue a job. With `error` the job is recorded as already FAILED (input rejected at the
        edge), so every contract can still report it through its own status/result routes.
        `waits`: the caller holds the connection for the result (see recover).

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
            waits=waits,
        )
        if job_id is not None:
            job.id = job_id
        with self._lock:
            if job.id in self._jobs:
                raise ValueError(f"job id {job.id} is already taken")
            if error is None and self._refusal is not None:
                raise Unavailable(self._refusal)
            if error is None and self.scheduler.count() >= self.max_queue:
                raise QueueFull(self.max_queue)
            if error is not None:
                job.fail(error, now=self.clock())
            try:
                self._save(job)  # accepted only once it is on disk
            except sqlite3.Error as exc:
                raise Unavailable(f"the job store could not record the request ({exc}); try again later") from exc
            if error is None:
                self.scheduler.enqueue(job.id)
            log.info("job %s: %s %s %s", job.id, contract, model, job.status.value)
            self._put(job, None)
            return job.snapshot()

    def get(self, job_id: str) -> Job | None:
        job = self._jobs.get(job_id)
        return job.snapshot() if job else None

    def queue_position(self, job_id: str) -> int | None:
        """0-based place in the queue (0 = next to run), or None when not queued."""
        return self.scheduler.position(job_id)

    def queued_count(self) -> int:
        return self.scheduler.count()

    def list(self, *, contract: str | None = None, limit: int | None = None) -> list[Job]:
        """Jobs newest first, optionally only one contract's."""
        table = self._jobs.copy()  # one atomic copy: the table as it is at this moment
        jobs = [j for j in reversed(table.values()) if contract is None or j.contract == contract]
        return [j.snapshot() for j in jobs[:limit]]

    def cancel(self, job_id: str, reason: str = CANCELLED_BY_CLIENT) -> CancelOutcome:
        """Cancel by state (module docstring); `reason` becomes the job's error message."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return CancelOutcome.NOT_FOUND
            if job.status is JobStatus.CANCELED:
                return CancelOutcome.CANCELED
            if job.status.terminal:
                return CancelOutcome.ALREADY_DONE
            if job.status is JobStatus.QUEUED:
                job = self._commit(job, lambda j: j.cancel(now=self.clock(), reason=reason))
                self.scheduler.remove(job.id)
                log.info("job %s: canceled while queued (%s)", job.id, reason)
                self._put(job, JobStatus.QUEUED)
                return CancelOutcome.CANCELED
            self._cancel_reasons.setdefault(job.id, reason)
            self._runs[job.id].cancel.cancel()
            worker = self.scheduler.worker_of(job.id)
            log.info("job %s: cancel requested while running on %s (%s)", job.id, worker, reason)
            return CancelOutcome.REQUESTED

    def delete(self, job_id: str) -> bool:
        """Forget a job: its record (and webhook) first, then its files. A running job is also
        cancelled; the worker stops at the next step and its output is discarded (see handle)."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return False
            self.store.delete(job_id)
            if job.status is JobStatus.QUEUED:
                self.scheduler.remove(job_id)
            del self._jobs[job_id]
            run = self._runs.get(job_id)
            if run is not None:
                run.cancel.cancel()
            else:
                self.storage.discard_output(job.file_id)
                self.storage.remove_inputs(job_id)
            log.info("job %s: deleted (was %s)", job_id, job.status.value)
            self.feed.deleted(job_id)
            return True

    async def wait_for_change(self, job_id: str, version: int, timeout: float | None = None) -> Job | None:
        """Return the job once its version differs from `version` (or at `timeout`)."""
        return await self.feed.wait_for_change(self.get, job_id, version, timeout)

    async def wait_until_done(self, job_id: str, timeout: float | None = None) -> Job | None:
        return await self.feed.wait_until_done(self.get, job_id, timeout)

    # -- worker side ---------------------------------------------------------------------------

    def next_job(
        self,
        stop: threading.Event,
        can_run: Callable[[Job], bool] = any_job,
        worker: str = "worker",
        *,
        poll: float = 0.5,
        prefers: Callable[[Job], bool] | None = None,
    ) -> RunJob | None:
        """Block until a queued job passes `can_run`, then take the oldest such (or, with `prefers`,
        the oldest it prefers within the scheduler's bypass bound: scheduler.py): it is RUNNING on
        `worker` (persisted) and returned. Returns None once `stop` is set. Any number of workers
        may call this at once; each job goes to exactly one."""
        prefer = None if prefers is None else (lambda i: prefers(self._jobs[i]))
        with self._lock:
            job_id = self.scheduler.wait_for(stop, lambda i: can_run(self._jobs[i].snapshot()), poll, prefer)
            if job_id is None:
                return None
            job = self._commit(self._jobs[job_id], lambda j: j.start(now=self.clock()))
            self.scheduler.start(job_id, worker)
            run = RunJob(job.snapshot(), self._cancel_switch())
            self._runs[job_id] = run
            log.info("job %s: running on %s (attempt %d)", job_id, worker, job.attempts)
            self._put(job, JobStatus.QUEUED)
            return run

    def wake_workers(self) -> None:
        """Make every worker blocked in next_job re-check its stop flag now (shutdown)."""
        self.scheduler.wake()

    def handle(self, event: WorkerEvent) -> None:
        with self._lock:
            job = self._jobs.get(event.job_id)
            if job is None:  # deleted while it ran: nothing to record, nothing to keep
                run = None if isinstance(event, Progress) else self._runs.pop(event.job_id, None)
                if run is not None:
                    self._cancel_reasons.pop(event.job_id, None)
                    self.scheduler.finish(event.job_id)
                    self.storage.discard_output(run.job.file_id)
                    self.storage.remove_inputs(event.job_id)
                return
            if isinstance(event, Progress):  # memory only: a restart runs the job from step 0
                now, step = self.clock(), (event.step, event.total)
                job = _changed(job, lambda j: j.record_progress(*step, now=now, phase=event.phase))
                self._put(job, job.status)
                return
            self._runs.pop(job.id, None)
            cancel_asked = job.id in self._cancel_reasons
            reason = self._cancel_reasons.pop(job.id, CANCELLED_BY_CLIENT)
            now = self.clock()
            if isinstance(event, Interrupted):
                self._publish(job, lambda j: j.requeue())
                return
            if isinstance(event, Lost):
                self._lost(job, event, reason if cancel_asked else None)
                return
            if isinstance(event, Succeeded):
                change = lambda j: (  # noqa: E731
                    j.log_how_made(event.output, now=now),
                    j.log("video written", now=now),
                    j.succeed(event.output, now=now),
                )
            elif isinstance(event, Failed):
                change = lambda j: (j.log(event.error.message, "ERROR", now), j.fail(event.error, now=now))  # noqa: E731
            else:
                change = lambda j: j.cancel(now=now, reason=reason)  # noqa: E731
            job = self._publish(job, change)
            log.info("job %s: %s", job.id, job.status.value)

    def _lost(self, job: Job, event: Lost, cancel_reason: str | None) -> None:
        """The worker process died under `job`: run it again (same resolved request, same seed) in
        its submission place, unless it has now killed `max_worker_deaths` workers or a cancel was
        asked while it ran."""
        now = self.clock()
        deaths = job.worker_deaths + 1
        note = f"the worker process died ({event.reason}); worker deaths {deaths}/{self.max_worker_deaths}"
        if cancel_reason is not None:  # a cancel was asked while it ran: it ends as asked
            change = lambda j: (setattr(j, "worker_deaths", deaths), j.cancel(now=now, reason=cancel_reason))  # noqa: E731
        elif deaths >= self.max_worker_deaths:
            message = (
                f"the job was not run again: it stopped {deaths} worker processes (last: {event.reason}); "
                f"the limit is K5SERVE_WORKER_MAX_DEATHS={self.max_worker_deaths}"
            )
            error = JobError(ErrorKind.DEVICE_FAILURE, message)
            change = lambda j: (  # noqa: E731
                setattr(j, "worker_deaths", deaths),
                j.log(note, "ERROR", now),
                j.fail(error, now=now),
            )
        else:
            change = lambda j: (setattr(j, "worker_deaths", deaths), j.log(note, "WARN", now), j.requeue())  # noqa: E731
        job = self._publish(job, change)
        log.warning("job %s: %s; now %s", job.id, note, job.status.value)

    def _publish(self, job: Job, change: Callable[[Job], object]) -> Job:
        """The end of a run: save and announce it. If the store cannot write, the job still ends
        for its clients (failed, in memory only); on disk it stays RUNNING, so a restart runs it
        again rather than losing it."""
        previous = job.status
        try:
            job = self._commit(job, change)
        except sqlite3.Error as exc:
            log.error("job %s: could not record the end of its run: %s", job.id, exc)
            self.scheduler.finish(job.id)
            self.storage.discard_output(job.file_id)
            message = f"the job store could not record the result ({exc}); the job runs again after a restart"
            job = _changed(job, lambda j: j.fail(JobError(ErrorKind.INTERNAL, message), now=self.clock()))
        else:
            if job.status is JobStatus.QUEUED:  # interrupted: back to its place in the queue
                self.scheduler.requeue(job.id)
            else:
                self.scheduler.finish(job.id)
        if job.status is JobStatus.FAILED and job.error is not None:
            self._last_error = _failure(job)
        self._put(job, previous)
        return job

    # -- internals -----------------------------------------------------------------------------

    def _commit(self, job: Job, change: Callable[[Job], object]) -> Job:
        """Apply `change` to a copy of `job` and save the copy; the caller then updates what
        follows from it and `_put`s it. If the change or the save raises, nothing changed."""
        draft = _changed(job, change)
        self._save(draft)
        return draft

    def _put(self, job: Job, previous: JobStatus | None) -> None:
        """Make `job` the live one (readers see the old copy or this one, never a half-made
        change), then tell the feed."""
        self._jobs[job.id] = job
        self.feed.changed(job, previous)

    def _save(self, job: Job) -> None:
        """Persist `job`; a terminal state goes to disk together with its webhook delivery (the
        dispatcher hears of it through the feed: see Services.build)."""
        if not job.status.terminal:
            self.store.save(job)
            return
        webhook = None
        if job.webhook_url and self._webhook_body is not None:
            try:
                webhook = self._webhook_body(job)
            except Exception:  # a formatting bug must not lose the job's result
                log.exception("job %s: could not build the webhook body", job.id)
        self.store.save(job, webhook=webhook, now=self.clock())
        self.storage.remove_inputs(job.id)


def _changed(job: Job, change: Callable[[Job], object]) -> Job:
    """A changed copy of `job`; the original, which readers may hold, stays as it was."""
    draft = job.snapshot()
    change(draft)
    return draft


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
