"""Fake engines for server tests: the EngineLike protocol without torch, one behaviour each.

They validate with the real (torch-free) `pipelines.request.resolve`, report steps, honour the
cancel token at step boundaries and write their "video" atomically, like the real engine.
"""

from __future__ import annotations

import hashlib
import json
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
    ):
        self.step_time = step_time
        self.warmup_time = warmup_time
        self.warmup_error = warmup_error
        self.fail = fail
        self.fail_at_step = fail_at_step
        self.calls: list[GenerationRequest] = []
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
        r = self.prepare(req)
        with self._lock:
            self._running += 1
            self.max_parallel = max(self.max_parallel, self._running)
            self.calls.append(req)
        done = 0
        try:
            for step in range(1, r.steps + 1):
                if cancel is not None:
                    cancel.raise_if_cancelled()
                if self.fail is not None and step > self.fail_at_step:
                    raise self.fail
                time.sleep(self.step_time)
                done = step
                if on_step is not None:
                    on_step(step, r.steps)
            if cancel is not None:
                cancel.raise_if_cancelled()
            data = fake_video_bytes(req)
            tmp = Path(str(output) + ".part")
            tmp.write_bytes(data)
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
            self.calls.append(req)
            raise OutOfMemory("out of memory (first call)")
        return super().generate(req, output, on_step=on_step, cancel=cancel)


__all__ = ["Cancelled", "FakeEngine", "FlakyEngine"]
