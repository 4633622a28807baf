"""Fake engines for server tests: the EngineLike protocol without torch, one behaviour each.

They validate with the real (torch-free) `pipelines.request.resolve`, report steps, honour the
cancel token at step boundaries and write their "video" atomically, like the real engine.

Crash tests run a FakeEngine in a child server (fake_serve.py -> engine_from_env) with a pause
folder: the engine (or the submit path) stops at a named point, touches `paused-<point>` there and
waits, so the test can `kill -9` at exactly that moment instead of guessing with sleeps.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path

from pipelines.errors import Cancelled, DeviceFailure, OutOfMemory
from pipelines.request import CancelToken, GenerationRequest, GenerationResult, ResolvedRequest, resolve


class FakeEngine:
    demo = True
    device = "cpu"

    def __init__(
        self,
        *,
        step_time: float = 0.0,
        warmup_time: float = 0.0,
        warmup_error: Exception | None = None,
        fail: Exception | None = None,
        fail_at_step: int = 0,
        fail_times: int | None = None,
        write_error: OSError | None = None,
        big_bytes: int = 0,
        pause_dir: Path | None = None,
    ):
        self.step_time = step_time
        self.warmup_time = warmup_time
        self.warmup_error = warmup_error
        self.fail = fail
        self.fail_at_step = fail_at_step
        self.fail_times = fail_times  # only the first N calls fail (None: every call)
        self.write_error = write_error  # raised half-way through writing the video (disk full, ...)
        self.big_bytes = big_bytes  # a prompt containing "[big]" writes a video this large
        self.pause_dir = pause_dir  # prompts "[pause-step]" / "[pause-write]" stop there (see module doc)
        self.calls: list[GenerationRequest] = []
        self.runs: list[ResolvedRequest] = []
        self.steps_run: list[int] = []  # steps completed per call
        self.max_parallel = 0
        self._running = 0
        self._lock = threading.Lock()

    def available(self) -> list[str]:
        return ["kandinsky5-tiny-i2v", "kandinsky5-tiny-t2v"]

    def warmup(self) -> None:
        time.sleep(self.warmup_time)
        if self.warmup_error is not None:
            raise self.warmup_error

    def prepare(self, req: GenerationRequest) -> ResolvedRequest:
        resolved = resolve(req, default_seed=42)
        return resolved if resolved.variant.demo else resolved.as_demo()

    def generate(self, req, output: Path, *, on_step=None, cancel: CancelToken | None = None) -> GenerationResult:
        r = req if isinstance(req, ResolvedRequest) else self.prepare(req)
        with self._lock:
            self._running += 1
            self.max_parallel = max(self.max_parallel, self._running)
            self.calls.append(r.requested)  # what the contract asked for (the seed drawn at admission)
            self.runs.append(r)  # what ran: resolved at admission, the tiny stand-in in demo mode
            failing = self.fail_times is None or len(self.calls) <= self.fail_times
        done = 0
        try:
            for step in range(1, r.steps + 1):
                if cancel is not None:
                    cancel.raise_if_cancelled()
                if failing and self.fail is not None and step > self.fail_at_step:
                    raise self.fail
                if step == 2 and "[pause-step]" in req.prompt:
                    self._pause("step", cancel)
                time.sleep(self.step_time)
                done = step
                if on_step is not None:
                    on_step(step, r.steps)
            if cancel is not None:
                cancel.raise_if_cancelled()
            data = fake_video_bytes(req)
            if "[big]" in req.prompt and len(data) < self.big_bytes:
                data += b"\x00" * (self.big_bytes - len(data))
            tmp = Path(str(output) + ".part")
            with open(tmp, "wb") as fh:
                if "[pause-write]" in req.prompt or (failing and self.write_error is not None):
                    fh.write(data[: len(data) // 2])  # half the file on disk, then stop or fail
                    fh.flush()
                    os.fsync(fh.fileno())
                    if failing and self.write_error is not None:
                        raise self.write_error
                    self._pause("write", cancel)
                    fh.write(data[len(data) // 2 :])
                else:
                    fh.write(data)
            os.replace(tmp, output)
        finally:
            with self._lock:
                self._running -= 1
                self.steps_run.append(done)
        return GenerationResult(
            path=Path(output),
            variant=r.variant.name,
            width=r.width,
            height=r.height,
            num_frames=r.num_frames,
            fps=24,
            steps=r.steps,
            seed=r.seed,
            file_size=len(data),
            demo=True,
            timings={"denoise": 0.0},
            # like the engine: "regular" reuses some transformer evaluations (MagCache)
            acceleration=r.acceleration,
            cached_steps=r.steps // 2 if r.acceleration == "regular" else 0,
        )

    def _pause(self, point: str, cancel: CancelToken | None) -> None:
        if self.pause_dir is not None:
            pause(self.pause_dir, point, cancel)


def pause(folder: Path, point: str, cancel: CancelToken | None = None) -> None:
    """Tell the test we reached `point`, then wait for `release` (or a cancel) in `folder`."""
    (folder / f"paused-{point}").touch()
    while not (folder / "release").exists():
        if cancel is not None:
            cancel.raise_if_cancelled()
        time.sleep(0.01)


class PauseAfterSubmit(logging.Handler):
    """While `arm-submit` exists in the pause folder, the next accepted job stops the server right
    after it is on disk and before the client hears back (the manager logs "job …: queued" there)."""

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = folder

    def emit(self, record: logging.LogRecord) -> None:
        queued = record.msg == "job %s: %s %s %s" and record.args and record.args[-1] == "queued"
        if queued and (self.folder / "arm-submit").exists():
            pause(self.folder, "submit")


def engine_from_env() -> FakeEngine:
    """The child server's engine (tests/fake_serve.py), configured through K5SERVE_FAKE_* variables:
    STEP_TIME (s/step), BIG_BYTES (size of "[big]" videos), PAUSE_DIR (kill points), and
    FSIZE_LIMIT (bytes: RLIMIT_FSIZE with SIGXFSZ ignored, so large writes fail with EFBIG)."""
    env = os.environ
    pause_dir = Path(env["K5SERVE_FAKE_PAUSE_DIR"]) if env.get("K5SERVE_FAKE_PAUSE_DIR") else None
    if pause_dir is not None:
        logging.getLogger("k5serve.jobs").addHandler(PauseAfterSubmit(pause_dir))
    if env.get("K5SERVE_FAKE_FSIZE_LIMIT"):
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        limit = int(env["K5SERVE_FAKE_FSIZE_LIMIT"])
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return FakeEngine(
        step_time=float(env.get("K5SERVE_FAKE_STEP_TIME", "0.05")),
        big_bytes=int(env.get("K5SERVE_FAKE_BIG_BYTES", "0")),
        pause_dir=pause_dir,
    )


def fake_video_bytes(req: GenerationRequest) -> bytes:
    """Deterministic per request, so a test can tell outputs apart and compare downloads."""
    digest = hashlib.sha256(json.dumps(req.to_dict(), sort_keys=True, default=str).encode()).hexdigest()
    return b"\x00\x00\x00\x18ftypmp42FAKE" + digest.encode() * 8


def slow(step_time: float = 0.2) -> FakeEngine:
    return FakeEngine(step_time=step_time)


def raising() -> FakeEngine:
    return FakeEngine(fail=RuntimeError("boom: internal detail that must not leak"), fail_at_step=1)


def out_of_memory() -> FakeEngine:
    return FakeEngine(fail=OutOfMemory("out of GPU memory at 768x512, 121 frames on cuda:0; try a smaller size"))


def device_failure() -> FakeEngine:
    return FakeEngine(fail=DeviceFailure("unrecoverable device error on cuda:0"))


class FlakyEngine(FakeEngine):
    """Fails its first job with OOM, then behaves."""

    def generate(self, req, output, *, on_step=None, cancel=None):
        if not self.calls:
            self.calls.append(req.requested)
            raise OutOfMemory("out of memory (first call)")
        return super().generate(req, output, on_step=on_step, cancel=cancel)


__all__ = ["Cancelled", "FakeEngine", "FlakyEngine"]
