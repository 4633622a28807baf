"""Typed messages between the job manager and the GPU worker (never bare tuples)."""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.request import CancelToken

from .jobs import Job, JobError, JobOutput


@dataclass(frozen=True)
class RunJob:
    """Manager -> worker: run this job (already marked RUNNING); `cancel` stops it at a step."""

    job: Job
    cancel: CancelToken


@dataclass(frozen=True)
class Progress:
    job_id: str
    step: int
    total: int


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


WorkerEvent = Progress | Succeeded | Failed | Canceled | Interrupted
