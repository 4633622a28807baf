"""Typed messages between the job manager and the GPU worker (never bare tuples)."""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.cancel import CancelSwitch

from .jobs import DENOISING, Job, JobError, JobOutput


@dataclass(frozen=True)
class RunJob:
    """Manager -> worker: run this job (already marked RUNNING); `cancel` stops it at a step. The
    token is an interface (pipelines/cancel.py): a thread's today, one that crosses into a worker
    process or a Ray actor where the worker runs there."""

    job: Job
    cancel: CancelSwitch


@dataclass(frozen=True)
class Progress:
    """Worker -> manager: `step` of `total` done in `phase` (jobs.PHASES: the start of the load or
    of the prompt's encoding, a denoising step, a decode chunk, or the start of the write)."""

    job_id: str
    step: int
    total: int
    phase: str = DENOISING


@dataclass(frozen=True)
class Succeeded:
    job_id: str
    output: JobOutput


@dataclass(frozen=True)
class Failed:
    job_id: str
    error: JobError


@dataclass(frozen=True)
class Canceled:
    job_id: str


@dataclass(frozen=True)
class Interrupted:
    """The run stopped because the server is shutting down: the job goes back to the queue."""

    job_id: str


@dataclass(frozen=True)
class Lost:
    """The worker process (or Ray actor) running the job died (engine_protocol.WorkerLost): the job
    goes back to the queue, or fails once it has killed `worker_max_deaths` workers."""

    job_id: str
    reason: str


WorkerEvent = Progress | Succeeded | Failed | Canceled | Interrupted | Lost
