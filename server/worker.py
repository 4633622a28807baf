"""The GPU worker: one thread per device, the only code that calls the engine.

It warms the engine up, then takes jobs from the JobManager one at a time and reports back with
typed events. The HTTP layer never waits on it. Torch stays behind the `EngineLike` protocol:
this module imports nothing heavier than pipelines.request and pipelines.errors.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from pipelines.errors import Cancelled, DeviceFailure, InvalidRequest, OutOfMemory, WeightsMissing
from pipelines.request import CancelToken, GenerationRequest, GenerationResult

from .events import Canceled, Failed, Interrupted, Progress, RunJob, Succeeded, WorkerEvent
from .jobs import ErrorKind, JobError, JobOutput, short_value
from .manager import JobManager
from .storage import OUTPUT_NAME, VIDEO_CONTENT_TYPE, Storage, fsync_file

log = logging.getLogger("k5serve.worker")


class EngineLike(Protocol):
    """What the server needs from pipelines.engine.Engine (fakes in tests implement the same)."""

    demo: bool
    device: str

    def prepare(self, req: GenerationRequest) -> Any: ...

    def generate(
        self,
        req: GenerationRequest,
        output: Path,
        *,
        on_step: Callable[[int, int], None] | None = None,
        cancel: CancelToken | None = None,
    ) -> GenerationResult: ...

    def warmup(self) -> None: ...


class Health(str, enum.Enum):
    STARTING = "starting"  # warming up (loading models / building the demo checkpoints)
    READY = "ready"
    SETUP_FAILED = "setup_failed"  # warm-up raised: nothing will run
    DEFUNCT = "defunct"  # an unrecoverable device error: later jobs would fail too


class GpuWorker:
    def __init__(self, engine: EngineLike, manager: JobManager, storage: Storage, name: str = "gpu-worker"):
        self.engine = engine
        self.manager = manager
        self.storage = storage
        self.health = Health.STARTING
        self.health_detail: str | None = None
        self._stop = threading.Event()
        self._current: RunJob | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking jobs; a running job is interrupted at its next step and queued again."""
        self._stop.set()
        self.manager.wake_workers()
        current = self._current
        if current is not None:
            current.cancel.cancel()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def ready(self) -> bool:
        return self.health is Health.READY

    # -- thread body ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.engine.warmup()
        except Exception as exc:
            log.exception("engine warm-up failed")
            self.health, self.health_detail = Health.SETUP_FAILED, f"warm-up failed: {exc}"
            return
        self.health = Health.READY
        log.info("worker ready on %s%s", self.engine.device, " (DEMO MODE)" if self.engine.demo else "")
        while not self._stop.is_set():
            run = self.manager.next_job(self._stop)
            if run is None:
                break
            self._current = run
            try:
                event = self._execute(run)
            finally:
                self._current = None
            self.manager.handle(event)
            if isinstance(event, Failed) and event.error.kind is ErrorKind.DEVICE_FAILURE:
                self.health, self.health_detail = Health.DEFUNCT, event.error.message
                log.critical("device is unusable, the worker stops: %s", event.error.message)
                return

    def _execute(self, run: RunJob) -> WorkerEvent:
        job = run.job
        output = self.storage.output_path(job.file_id, OUTPUT_NAME)

        def on_step(step: int, total: int) -> None:
            self.manager.handle(Progress(job.id, step, total))

        try:
            result = self.engine.generate(job.request, output, on_step=on_step, cancel=run.cancel)
            fsync_file(result.path)
        except Cancelled:
            return Interrupted(job.id) if self._stop.is_set() else Canceled(job.id)
        except Exception as exc:
            return Failed(job.id, _job_error(job.id, exc))
        return Succeeded(job.id, _output(result))


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
    log.error("job %s: generation failed", job_id, exc_info=exc)
    return JobError(ErrorKind.INTERNAL, f"generation failed ({type(exc).__name__})")
