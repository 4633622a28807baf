"""The scheduler: which queued job runs next, on which worker, and where each waiting job stands.

Jobs wait in submission order. Each gets a ticket when it is first queued and keeps it until it
ends, so a run that is interrupted (shutdown) goes back to its own place: ahead of everything
submitted after it. A worker takes the OLDEST waiting job it can run (`can_run`): with one worker
that can run everything this is plain FIFO; with several (issue 13) a job that one worker cannot
run waits for one that can, without holding up the others.

Variant affinity: a worker may say which jobs it `prefers` (those whose variant it already holds:
loading a 19 B model costs minutes). It then takes the oldest waiting job it prefers instead of an
older one it would have to load for, but each job can be passed over this way at most
`max_bypass` times (default 2): after that the next worker able to run it takes it first, whatever it
holds. So no job, big or small, waits behind more than `max_bypass` younger jobs for affinity's sake,
and with `prefers` unset the order is plain oldest-first.

Queue positions are the place among waiting jobs (0 = oldest). They are read without the lock:
the waiting ids are an immutable tuple swapped whole by each change, so a reader sees the queue
before or after a change, never half of one. Everything that changes the queue takes the lock,
which the job manager shares (see JobManager), so a job's status and its place change together.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable

MAX_BYPASS = 2  # times a waiting job may be overtaken by a younger one for variant affinity


class Scheduler:
    def __init__(self, lock: threading.RLock | None = None, max_bypass: int = MAX_BYPASS):
        if max_bypass < 0:
            raise ValueError(f"max_bypass must be >= 0, got {max_bypass}")
        self.max_bypass = max_bypass
        self._bypassed: dict[str, int] = {}  # waiting job -> times a younger job was taken before it
        self._lock = lock if lock is not None else threading.RLock()
        self._ready = threading.Condition(self._lock)
        self._tickets: dict[str, int] = {}  # waiting or running job -> its place in submission order
        self._next_ticket = 0
        self._waiting: tuple[str, ...] = ()  # oldest first; replaced, never changed in place
        self._running: dict[str, str] = {}  # job id -> the worker running it

    @property
    def lock(self) -> threading.RLock:
        """The lock every change takes; the job manager holds it around its own transitions."""
        return self._lock

    # -- reads (no lock) -----------------------------------------------------------------------

    def position(self, job_id: str) -> int | None:
        """0-based place among waiting jobs (0 = oldest), or None when the job is not waiting."""
        waiting = self._waiting
        try:
            return waiting.index(job_id)
        except ValueError:
            return None

    def waiting(self) -> tuple[str, ...]:
        """The waiting job ids, oldest first."""
        return self._waiting

    def count(self) -> int:
        return len(self._waiting)

    def worker_of(self, job_id: str) -> str | None:
        """The worker running `job_id`, or None when it is not running."""
        return self._running.get(job_id)

    def running(self) -> dict[str, str]:
        """job id -> worker, for every job a worker has taken and not yet reported the end of."""
        with self._lock:
            return dict(self._running)

    # -- changes -------------------------------------------------------------------------------

    def enqueue(self, job_id: str) -> None:
        """A new job waits behind every job queued before it."""
        with self._lock:
            if job_id in self._tickets:
                raise ValueError(f"job {job_id} is already scheduled")
            self._tickets[job_id] = self._next_ticket
            self._next_ticket += 1
            self._waiting = (*self._waiting, job_id)
            self._ready.notify_all()

    def remove(self, job_id: str) -> bool:
        """A waiting job leaves the queue (canceled, failed, deleted); False if it was not waiting."""
        with self._lock:
            if job_id not in self._waiting:
                return False
            self._waiting = tuple(i for i in self._waiting if i != job_id)
            del self._tickets[job_id]
            self._bypassed.pop(job_id, None)
            return True

    def wait_for(
        self,
        stop: threading.Event,
        can_run: Callable[[str], bool],
        poll: float = 0.5,
        prefers: Callable[[str], bool] | None = None,
    ) -> str | None:
        """Block until a waiting job passes `can_run` and return the one to take (it stays waiting
        until `start`), or return None once `stop` is set: the oldest runnable job, or with
        `prefers` the oldest runnable one it prefers unless an older runnable job has already been
        passed over `max_bypass` times (module docstring). `can_run` is asked again at least every
        `poll` seconds, so a worker whose abilities change (memory freed) finds work without a new
        submit. Call it with the lock held to be sure the job is still waiting at `start`."""
        with self._ready:
            while True:
                if stop.is_set():
                    return None
                runnable = [job_id for job_id in self._waiting if can_run(job_id)]
                if runnable:
                    return self._choose(runnable, prefers)
                self._ready.wait(poll)

    def _choose(self, runnable: list[str], prefers: Callable[[str], bool] | None) -> str:
        """The job to take among `runnable` (oldest first); counts the bypasses it causes."""
        if prefers is None:
            return runnable[0]
        for at, job_id in enumerate(runnable):
            if prefers(job_id) or self._bypassed.get(job_id, 0) >= self.max_bypass:
                for older in runnable[:at]:
                    self._bypassed[older] = self._bypassed.get(older, 0) + 1
                return job_id
        return runnable[0]  # nothing preferred: plain oldest-first

    def bypassed(self, job_id: str) -> int:
        """Times a younger job was taken before waiting job `job_id` (variant affinity)."""
        return self._bypassed.get(job_id, 0)

    def start(self, job_id: str, worker: str) -> None:
        """A waiting job leaves the queue to run on `worker`; it keeps its ticket (see requeue)."""
        with self._lock:
            if job_id not in self._waiting:
                raise ValueError(f"job {job_id} is not waiting")
            self._waiting = tuple(i for i in self._waiting if i != job_id)
            self._running[job_id] = worker
            self._bypassed.pop(job_id, None)

    def requeue(self, job_id: str) -> None:
        """A run was interrupted: the job waits again, in its submission place."""
        with self._lock:
            if self._running.pop(job_id, None) is None:
                raise ValueError(f"job {job_id} is not running")
            ticket = self._tickets[job_id]
            tickets = [self._tickets[i] for i in self._waiting]
            at = bisect.bisect(tickets, ticket)
            self._waiting = (*self._waiting[:at], job_id, *self._waiting[at:])
            self._ready.notify_all()

    def finish(self, job_id: str) -> str | None:
        """A run ended (or its job is gone): forget it. Returns the worker that ran it, if any."""
        with self._lock:
            worker = self._running.pop(job_id, None)
            if worker is not None:
                del self._tickets[job_id]
            return worker

    def wake(self) -> None:
        """Make every worker blocked in wait_for check its stop flag (and `can_run`) now."""
        with self._lock:
            self._ready.notify_all()
