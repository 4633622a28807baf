"""The GPU worker: one thread per engine (a device, a sequence-parallel group, a Ray actor), the
only code that calls it.

It warms the engine up, then takes jobs from the JobManager one at a time and reports back with
typed events. The HTTP layer never waits on it. Torch stays behind the `EngineLike` protocol (engine_protocol.py):
this module imports nothing heavier than pipelines.request and pipelines.errors.
"""

from __future__ import annotations

import enum
import errno
import gc
import logging
import sys
import threading
import time
from collections.abc import Callable

from pipelines.errors import Cancelled, DeviceFailure, InvalidRequest, OutOfMemory, WeightsMissing
from pipelines.request import GenerationResult

from .engine_protocol import RemoteEngine, WorkerLost
from .events import Canceled, Failed, Interrupted, Lost, Progress, RunJob, Succeeded, WorkerEvent
from .jobs import ErrorKind, Job, JobError, JobOutput, short_value
from .manager import JobManager
from .storage import OUTPUT_NAME, VIDEO_CONTENT_TYPE, Storage, fsync_file

log = logging.getLogger("k5serve.worker")


class Health(str, enum.Enum):
    STARTING = "starting"  # warming up (loading models / building the demo checkpoints)
    READY = "ready"
    RESTARTING = "restarting"  # its process died: a fresh one is starting
    SETUP_FAILED = "setup_failed"  # warm-up raised: nothing will run
    DEFUNCT = "defunct"  # an unrecoverable device error: later jobs would fail too

    @property
    def gone(self) -> bool:
        """This worker will not serve again (until the server restarts)."""
        return self in (Health.SETUP_FAILED, Health.DEFUNCT)


RESTART_TRIES = 3  # fresh processes tried in a row after a death before the worker gives up
RESTART_BACKOFF = 1.0  # seconds before the first retry of a failed restart, doubled each time


class GpuWorker:
    """One worker: a thread that drives one engine. The engine is a `RemoteEngine`
    (engine_protocol.py): a worker process, a Ray actor, or an in-process engine adapted by the
    pool (pool.py). When the engine's process dies mid-job (WorkerLost) the job goes back to the
    queue (manager: `Lost`) and the worker starts a fresh process; other workers keep serving."""

    def __init__(
        self,
        engine: RemoteEngine,
        manager: JobManager,
        storage: Storage,
        name: str = "w0",
        *,
        on_give_up: Callable[[GpuWorker], None] | None = None,
    ):
        """`on_give_up(worker)`: called when this worker stops for good (the pool decides whether
        the server still accepts jobs); default: the manager stops accepting them."""
        self.engine = engine
        self.manager = manager
        self.storage = storage
        self.name = name
        self.health = Health.STARTING
        self.health_detail: str | None = None
        self.restarts = 0  # fresh processes started after a death
        self.jobs = 0  # runs that ended here (succeeded, failed, canceled or lost)
        self.busy_seconds = 0.0
        self._on_give_up = on_give_up
        self._stop = threading.Event()
        self._current: RunJob | None = None
        self._thread = threading.Thread(target=self._run, name=f"worker-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def current_job_id(self) -> str | None:
        """The job being generated right now, if any."""
        current = self._current
        return current.job.id if current is not None else None

    @property
    def state(self) -> str:
        """For /readyz: starting, ready, busy, restarting or failed."""
        if self.health.gone:
            return "failed"
        if self.health is Health.READY and self._current is not None:
            return "busy"
        return self.health.value

    def request_stop(self) -> None:
        """Take no more jobs; a running job is interrupted at its next step and queued again."""
        self._stop.set()
        self.manager.wake_workers()
        current = self._current
        if current is not None:
            current.cancel.cancel()

    def stop(self, timeout: float = 30.0) -> None:
        """`request_stop`, wait for the thread, then stop the engine (its process) last."""
        self.request_stop()
        if self._thread.is_alive():
            self._thread.join(timeout)
        try:
            self.engine.stop()
        except Exception:  # shutting down: say so, go on
            log.warning("worker %s: could not stop its engine", self.name, exc_info=True)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def ready(self) -> bool:
        return self.health is Health.READY

    # -- thread body ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.engine.start()
            self.engine.warmup()
        except Exception as exc:
            log.exception("worker %s: engine warm-up failed", self.name)
            self._give_up(Health.SETUP_FAILED, f"warm-up failed: {exc}", "the engine failed to start")
            return
        self.health = Health.READY
        log.info("worker %s ready on %s%s", self.name, self.engine.device, " (DEMO MODE)" if self.engine.demo else "")
        while not self._stop.is_set():
            if not self.engine.alive and not self._restart("its process ended while idle"):
                return  # (checked before taking a job: a death between jobs is no job's fault)
            try:
                event = self._one_job()
            except Exception:  # e.g. the store cannot write: never let the worker thread die
                log.exception("worker: could not take or record a job; retrying in 1 s")
                self._stop.wait(1.0)
                continue
            if event is None:
                break
            if isinstance(event, Lost) and not self._restart(event.reason):
                return
            if isinstance(event, Failed) and event.error.kind is ErrorKind.DEVICE_FAILURE:
                self._give_up(Health.DEFUNCT, event.error.message, "the GPU is in an unrecoverable state")
                log.critical("device is unusable, the worker stops: %s", event.error.message)
                return

    def _restart(self, reason: str) -> bool:
        """A fresh engine process after a death; False (given up) when RESTART_TRIES in a row fail."""
        self.health, self.health_detail = Health.RESTARTING, reason
        delay = RESTART_BACKOFF
        for attempt in range(1, RESTART_TRIES + 1):
            if self._stop.is_set():
                return False
            self.restarts += 1
            log.warning("worker %s: restarting its engine (%d/%d) after: %s", self.name, attempt, RESTART_TRIES, reason)
            try:
                self.engine.kill()
                self.engine.start()
                self.engine.warmup()
            except Exception as exc:
                log.exception("worker %s: restart %d failed", self.name, attempt)
                reason = f"restart failed: {exc}"
                self._stop.wait(delay)
                delay *= 2
                continue
            self.health, self.health_detail = Health.READY, None
            log.info("worker %s ready again on %s (pid %s)", self.name, self.engine.device, self.engine.pid)
            return True
        self._give_up(Health.SETUP_FAILED, reason, f"worker {self.name} could not be restarted")
        return False

    def _prefers(self) -> Callable[[Job], bool]:
        """Jobs whose variant this engine already holds (scheduler.py: variant affinity)."""
        try:
            held = set(self.engine.describe().get("variants") or ())
        except Exception:  # a report that fails must not stop the worker
            held = set()
        return lambda job: job.resolved is not None and job.resolved.variant.name in held

    def _one_job(self) -> WorkerEvent | None:
        run = self.manager.next_job(self._stop, worker=self.name, prefers=self._prefers())
        if run is None:
            return None
        self._current = run
        began = time.monotonic()
        try:
            event = self._execute(run)
        finally:
            self._current = None
            self.busy_seconds += time.monotonic() - began
        if not isinstance(event, Interrupted):
            self.jobs += 1
        if not isinstance(event, (Succeeded, Lost)):
            free_device_memory()  # what the failed run held (its traceback is gone by now)
        self.manager.handle(event)
        return event

    def _give_up(self, health: Health, detail: str, what: str) -> None:
        """Stop for good: this worker answers `detail` in /readyz. Without a pool the manager
        refuses new jobs (503 until a restart); jobs already queued stay queued."""
        self.health, self.health_detail = health, detail
        if self._on_give_up is not None:
            self._on_give_up(self)
        else:
            self.manager.stop_accepting(f"{what} ({detail}); restart k5serve to accept new jobs")

    def _execute(self, run: RunJob) -> WorkerEvent:
        job = run.job
        output = self.storage.output_path(job.file_id, OUTPUT_NAME)

        def on_step(step: int, total: int) -> None:
            self.manager.handle(Progress(job.id, step, total))

        def on_phase(phase: str, done: int, total: int) -> None:  # loading, encoding, decoding i/n, writing
            self.manager.handle(Progress(job.id, done, total, phase))

        if not self.engine.alive:  # it died while idle: the job goes back, uncounted; the loop restarts it
            return Interrupted(job.id)
        try:
            # the request as admitted; records from before admission stored it are resolved once here
            request = job.resolved if job.resolved is not None else self.engine.prepare(job.request)
            result = self.engine.generate(request, output, on_step=on_step, on_phase=on_phase, cancel=run.cancel)
            fsync_file(result.path)
        except WorkerLost as exc:
            log.error("job %s: %s", job.id, exc)
            self.storage.discard_output(job.file_id)
            return Lost(job.id, str(exc))
        except Cancelled:
            self.storage.discard_output(job.file_id)
            return Interrupted(job.id) if self._stop.is_set() else Canceled(job.id)
        except Exception as exc:
            self.storage.discard_output(job.file_id)  # never serve a partial or unflushed file
            return Failed(job.id, _job_error(job.id, exc))
        return Succeeded(job.id, _output(result))


def free_device_memory() -> None:
    """Release what a failed run left behind: Python garbage, and torch's cached CUDA blocks when
    torch is already loaded (this module never imports it)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is None:
        return
    try:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # a broken device: the next job reports it
        log.warning("could not empty the CUDA cache", exc_info=True)


# errno of a failed output write -> what the client is told (no paths: they stay in the log)
STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on the server's disk",
    errno.EDQUOT: "the server's disk quota is exceeded",
    errno.EFBIG: "the file is larger than the server allows",
    errno.EIO: "a disk I/O error on the server",
    errno.EROFS: "the server's data directory is read-only",
}


def _output(result: GenerationResult) -> JobOutput:
    return JobOutput(
        file_name=OUTPUT_NAME,
        content_type=VIDEO_CONTENT_TYPE,
        file_size=result.file_size,
        width=result.width,
        height=result.height,
        num_frames=result.num_frames,
        fps=result.fps,
        steps=result.steps,
        seed=result.seed,
        variant=result.variant,
        demo=result.demo,
        timings=dict(result.timings),
        acceleration=result.acceleration,
        cached_steps=result.cached_steps,
        revised_prompt=result.revised_prompt,
        approximations=list(getattr(result, "approximations", ())),
    )


def _job_error(job_id: str, exc: Exception) -> JobError:
    """Engine exceptions -> contract-neutral errors: short message for clients, traceback to the log."""
    if isinstance(exc, InvalidRequest):
        return JobError(ErrorKind.INVALID_INPUT, exc.message, exc.field, short_value(exc.value))
    if isinstance(exc, WeightsMissing):
        return JobError(ErrorKind.UNAVAILABLE, str(exc))
    if isinstance(exc, OutOfMemory):
        log.warning("job %s: out of memory: %s", job_id, exc)
        return JobError(ErrorKind.OUT_OF_MEMORY, str(exc))
    if isinstance(exc, DeviceFailure):
        log.error("job %s: device failure", job_id, exc_info=exc)
        return JobError(ErrorKind.DEVICE_FAILURE, str(exc))
    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
        log.error("job %s: could not write the output", job_id, exc_info=exc)
        reason = STORAGE_ERRNOS[exc.errno]
        return JobError(ErrorKind.INTERNAL, f"the server could not write the video: {reason}; nothing was kept")
    log.error("job %s: generation failed", job_id, exc_info=exc)
    return JobError(ErrorKind.INTERNAL, f"generation failed ({type(exc).__name__})")
