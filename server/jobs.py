"""The one internal Job model every contract translates onto.

    QUEUED ──start──▶ RUNNING ──succeed──▶ SUCCEEDED
      │   ◀──requeue──   │ ──fail────────▶ FAILED
      │                  └──cancel───────▶ CANCELED
      └──fail / cancel──▶ FAILED / CANCELED

Status only changes through the methods below; an illegal transition raises InvalidTransition.
`requeue` exists for crash recovery and graceful shutdown: an interrupted job runs again, unless
its caller held the connection for the result (`waits`): that caller is gone after a restart, so
recovery cancels it instead (manager.recover).
Nothing here knows any contract: a job records its contract name and public model id, and
contracts keep their own extras in the opaque `meta` dict.

    >>> job = Job.new(contract="fal", model="fal-ai/kandinsky5/text-to-video", request=req)
    >>> job.start(); job.record_progress(1, 30); job.succeed(output)

A running job moves through phases (`Job.phase`): "loading" (the variant's weights) and "encoding"
(the prompt) before its first step (no log line and no percent: the contracts render them as they
rendered a run that had not reached its first step), "denoising" (`progress`: steps done / steps),
"decoding" (`phase_progress`: the VAE's temporal chunks decoded / chunks, from 0/n as the decode
starts) and "writing" (the mp4). `Job.percent` maps them onto one 0-100 scale for the contracts
that have one.
"""

from __future__ import annotations

import enum
import json
import math
import secrets
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from pipelines.request import GenerationRequest, ResolvedRequest


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)


_ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.FAILED, JobStatus.CANCELED}),
    JobStatus.RUNNING: frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.QUEUED}),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELED: frozenset(),
}


LOADING, ENCODING = "loading", "encoding"
DENOISING, DECODING, WRITING = "denoising", "decoding", "writing"
PHASES = (LOADING, ENCODING, DENOISING, DECODING, WRITING)
# What a run reports before its first step. A contract whose wire predates them (AI/ML API's `phase`)
# shows them as it showed a run with no phase yet: the wire does not change.
BEFORE_STEPS = frozenset({LOADING, ENCODING})
# Job.percent: denoising fills 0..DENOISE_END, decoding DENOISE_END..DECODE_END, writing sits at
# DECODE_END; 100 only once the video is written. On a 2-core CPU the decode and the write of the demo
# video take longer than its steps, on a GPU a large share of a distilled run: they get their own band.
DENOISE_END, DECODE_END = 90, 99


class InvalidTransition(Exception):
    def __init__(self, job_id: str, current: JobStatus, wanted: JobStatus | str):
        wanted_name = wanted.value if isinstance(wanted, JobStatus) else wanted
        super().__init__(f"job {job_id}: cannot go from {current.value} to {wanted_name}")
        self.current = current
        self.wanted = wanted


class ErrorKind(str, enum.Enum):
    """Why a job failed, independent of any contract (each contract maps these to its wire codes)."""

    INVALID_INPUT = "invalid_input"  # the request cannot be done: 4xx in every contract
    UNAVAILABLE = "unavailable"  # weights for the variant are missing
    OUT_OF_MEMORY = "out_of_memory"
    DEVICE_FAILURE = "device_failure"
    CANCELED = "canceled"
    INTERNAL = "internal"


@dataclass(frozen=True)
class JobError:
    kind: ErrorKind
    message: str
    field: str | None = None  # the request field at fault (INVALID_INPUT)
    value: Any = None  # what was sent for it, JSON-safe and short

    def to_dict(self) -> dict:
        return {"kind": self.kind.value, "message": self.message, "field": self.field, "value": self.value}

    @classmethod
    def from_dict(cls, data: dict) -> JobError:
        return cls(ErrorKind(data["kind"]), data["message"], data.get("field"), data.get("value"))


@dataclass(frozen=True)
class JobOutput:
    """The finished video, as stored under the data dir (see storage.py)."""

    file_name: str
    content_type: str
    file_size: int
    width: int
    height: int
    num_frames: int
    fps: int
    steps: int
    seed: int
    variant: str
    demo: bool
    timings: dict[str, float] = field(default_factory=dict)
    # "regular": MagCache ran (approximate output); cached_steps transformer evaluations were reused
    acceleration: str = "none"
    cached_steps: int = 0
    # The prompt as encoded when prompt expansion rewrote it (pipelines/expand.py); None: as sent
    revised_prompt: str | None = None
    # Opt-in approximate weight storage the engine ran with (pipelines/quant.py), one label each
    approximations: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return self.num_frames / self.fps if self.fps else 0.0


@dataclass(frozen=True)
class LogLine:
    message: str
    level: str = "INFO"
    timestamp: float = 0.0


# Why a job was cancelled: its error message (every contract's record of it, /api/jobs' `error`).
CANCELLED_BY_CLIENT = "cancelled by the client"  # a cancel route (fal, OpenAI has none: delete)
CLIENT_DISCONNECTED = "client disconnected"  # a synchronous caller hung up while it waited
RESTARTED_WHILE_WAITING = "client disconnected (the server restarted while the caller waited)"


def new_job_id() -> str:
    return str(uuid.uuid4())


def new_file_id() -> str:
    """Unguessable capability token naming the job's output folder (see storage.py)."""
    return secrets.token_urlsafe(24)


@dataclass
class Job:
    id: str
    contract: str  # "fal", "aimlapi", ... : who submitted it (for its webhook/result format)
    model: str  # the public model id as the client sent it
    request: GenerationRequest | None  # what the client asked for (None: refused at the edge, see fal)
    file_id: str
    status: JobStatus = JobStatus.QUEUED
    created_at: float = 0.0
    started_at: float | None = None
    completed_at: float | None = None
    base_url: str | None = None  # scheme://host[:port] the client used, for absolute URLs later
    webhook_url: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # contract extras; the queue never reads it
    attempts: int = 0
    progress: tuple[int, int] | None = None  # (step, total) while running
    phase: str | None = None  # denoising, decoding, writing (PHASES); None before the first step
    phase_progress: tuple[int, int] | None = None  # (done, total) of a phase after the steps
    logs: list[LogLine] = field(default_factory=list)
    error: JobError | None = None
    output: JobOutput | None = None
    version: int = 0  # bumped on every change; waiters compare it (not persisted meaningfully)
    # what admission resolved and the worker runs as is (the tiny stand-in in demo mode)
    resolved: ResolvedRequest | None = None
    # a caller holds the connection for the result (OneRouter, fal's run host): once that connection
    # is gone nobody can fetch it, so the job is cancelled rather than run (see manager.recover)
    waits: bool = False
    # worker processes that died while running this job (kill -9, a poisoned CUDA context): it runs
    # again until it has killed `worker_max_deaths` of them, then fails (a poison job must not loop)
    worker_deaths: int = 0

    @classmethod
    def new(
        cls, *, contract: str, model: str, request: GenerationRequest | None, now: float | None = None, **extra: Any
    ) -> Job:
        return cls(
            id=new_job_id(),
            contract=contract,
            model=model,
            request=request,
            file_id=new_file_id(),
            created_at=time.time() if now is None else now,
            **extra,
        )

    # -- transitions ---------------------------------------------------------------------------

    def _move(self, wanted: JobStatus) -> None:
        if wanted not in _ALLOWED[self.status]:
            raise InvalidTransition(self.id, self.status, wanted)
        self.status = wanted
        self.version += 1

    def start(self, now: float | None = None) -> None:
        self._move(JobStatus.RUNNING)
        self.started_at = time.time() if now is None else now
        self.attempts += 1
        self.progress = self.phase = self.phase_progress = None

    def succeed(self, output: JobOutput, now: float | None = None) -> None:
        self._move(JobStatus.SUCCEEDED)
        self.output = output
        self.completed_at = time.time() if now is None else now

    def fail(self, error: JobError, now: float | None = None) -> None:
        self._move(JobStatus.FAILED)
        self.error = error
        self.completed_at = time.time() if now is None else now

    def cancel(self, now: float | None = None, reason: str = CANCELLED_BY_CLIENT) -> None:
        """-> CANCELED; `reason` is recorded as the error message (CLIENT_DISCONNECTED, ...)."""
        self._move(JobStatus.CANCELED)
        self.error = JobError(ErrorKind.CANCELED, reason)
        self.completed_at = time.time() if now is None else now

    def requeue(self) -> None:
        """RUNNING -> QUEUED: the run was interrupted (crash, shutdown) and will start again."""
        self._move(JobStatus.QUEUED)
        self.started_at = None
        self.progress = self.phase = self.phase_progress = None

    def record_progress(self, step: int, total: int, now: float | None = None, phase: str = DENOISING) -> None:
        """`step` of `total` done in `phase`; logged as "step i/n", "decoding i/n" or "writing"
        (loading and encoding only move `phase`)."""
        if self.status is not JobStatus.RUNNING:
            raise InvalidTransition(self.id, self.status, "progress")
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {', '.join(PHASES)}, got {phase!r}")
        self.phase = phase
        if phase in BEFORE_STEPS:  # seen by watchers (the studio), not logged: fal's logs stay as they were
            self.version += 1
            return
        if phase == DENOISING:
            self.progress = (step, total)
        else:
            self.phase_progress = (step, total)
        line = {DENOISING: f"step {step}/{total}", DECODING: f"decoding {step}/{total}", WRITING: "writing"}
        self.log(line[phase], now=now)

    def log(self, message: str, level: str = "INFO", now: float | None = None) -> None:
        self.logs.append(LogLine(message, level, time.time() if now is None else now))
        self.version += 1

    def log_how_made(self, output: JobOutput, now: float | None = None) -> None:
        """What every contract's logs (fal's above all) and the record should say about how the video
        was made: the prompt the model really encoded, and approximate output (MagCache, 8-bit weights), labelled."""
        if output.revised_prompt is not None:
            self.log(f"prompt expanded (Qwen2.5-VL, as the official pipelines): {output.revised_prompt}", now=now)
        if output.acceleration != "none":
            self.log(
                f"acceleration {output.acceleration} (approximate): {output.cached_steps} transformer evaluations "
                "reused from earlier steps (MagCache)",
                now=now,
            )
        for label in output.approximations:
            self.log(f"approximate: {label} (opt-in server setting)", now=now)

    # -- views ---------------------------------------------------------------------------------

    @property
    def prompt(self) -> str:
        return self.request.prompt if self.request is not None else ""

    @property
    def percent(self) -> int:
        """0-100 over the whole run: steps 0..90, the decode 90..99, writing 99, 100 once written."""
        if self.status is JobStatus.SUCCEEDED:
            return 100
        if self.phase == WRITING:
            return DECODE_END
        if self.phase == DECODING and self.phase_progress is not None:
            return DENOISE_END + int(_share(self.phase_progress) * (DECODE_END - DENOISE_END))
        if self.progress is None:
            return 0
        return int(_share(self.progress) * DENOISE_END)

    @property
    def inference_time(self) -> float | None:
        if self.started_at is None or self.completed_at is None or self.status is not JobStatus.SUCCEEDED:
            return None
        return max(0.0, self.completed_at - self.started_at)

    def snapshot(self) -> Job:
        """A copy safe to read on another thread while the worker keeps updating the original."""
        return replace(self, logs=list(self.logs), meta=dict(self.meta))

    def to_dict(self) -> dict:
        data = {
            "id": self.id,
            "contract": self.contract,
            "model": self.model,
            "request": self.request.to_dict() if self.request is not None else None,
            "resolved": self.resolved.to_dict() if self.resolved is not None else None,
            "waits": self.waits,
            "file_id": self.file_id,
            "status": self.status.value,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "completed_at": self.completed_at,
            "base_url": self.base_url,
            "webhook_url": self.webhook_url,
            "meta": self.meta,
            "attempts": self.attempts,
            "worker_deaths": self.worker_deaths,
            "progress": list(self.progress) if self.progress is not None else None,
            "phase": self.phase,
            "phase_progress": list(self.phase_progress) if self.phase_progress is not None else None,
            "logs": [asdict(line) for line in self.logs],
            "error": self.error.to_dict() if self.error else None,
            "output": asdict(self.output) if self.output else None,
        }
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Job:
        return cls(
            id=data["id"],
            contract=data["contract"],
            model=data["model"],
            request=GenerationRequest.from_dict(data["request"]) if data.get("request") else None,
            resolved=ResolvedRequest.from_dict(data["resolved"]) if data.get("resolved") else None,
            waits=bool(data.get("waits", False)),  # records older than the field: as before, run again
            file_id=data["file_id"],
            status=JobStatus(data["status"]),
            created_at=data["created_at"],
            started_at=data.get("started_at"),
            completed_at=data.get("completed_at"),
            base_url=data.get("base_url"),
            webhook_url=data.get("webhook_url"),
            meta=data.get("meta") or {},
            attempts=data.get("attempts", 0),
            worker_deaths=data.get("worker_deaths", 0),  # records older than the field: none
            progress=tuple(data["progress"]) if data.get("progress") else None,
            phase=data.get("phase"),
            phase_progress=tuple(data["phase_progress"]) if data.get("phase_progress") else None,
            logs=[LogLine(**line) for line in data.get("logs") or []],
            error=JobError.from_dict(data["error"]) if data.get("error") else None,
            output=JobOutput(**data["output"]) if data.get("output") else None,
        )


def _share(progress: tuple[int, int]) -> float:
    done, total = progress
    return min(done, total) / max(total, 1)


def short_value(value: object, limit: int = 200) -> object:
    """A JSON-safe, short echo of a bad input value (data: URIs can be megabytes)."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # JSON has no NaN/Infinity (a client may send them; responses must not)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def json_echo(value: object, budget: int = 2000, limit: int = 200) -> object:
    """A bounded echo of a JSON input value that keeps its shape: an object stays an object and an
    array an array (pydantic's 422 `input`, which fal returns, is the value sent, not its repr).
    Strings are cut like short_value; once about `budget` characters are spent, a container ends
    with a "…" entry (an array's last item, an object's "…" key); nesting past 8 levels is echoed
    as short_value's text."""
    left = [budget]
    return _echo(value, left, limit, 0)


def _echo(value: object, left: list[int], limit: int, depth: int) -> object:
    if not isinstance(value, (dict, list, tuple)):
        echoed = short_value(value, max(1, min(limit, left[0])))
        left[0] -= len(json.dumps(echoed)) + 2  # as sent: escapes count, and the separator
        return echoed
    if depth >= 8:
        return _echo(short_value(value, limit), left, limit, depth)
    left[0] -= 2  # the brackets
    if isinstance(value, dict):
        out: dict[str, object] = {}
        for key, item in value.items():
            if left[0] <= 0:
                out["…"] = "…"
                break
            name = str(short_value(str(key), limit))
            left[0] -= len(json.dumps(name)) + 2
            out[name] = _echo(item, left, limit, depth + 1)
        return out
    items: list[object] = []
    for item in value:
        if left[0] <= 0:
            items.append("…")
            break
        items.append(_echo(item, left, limit, depth + 1))
    return items
