"""The fake engine for server tests: the engine protocol without torch, every behaviour a parameter.

It validates with the real (torch-free) `pipelines.request.resolve`, reports steps, honours the
cancel token at step boundaries and writes its "video" atomically, like the real engine. Nothing
it does depends on the prompt: a behaviour that should hit only some jobs names the calls it
applies to (1-based, in the order `generate` is called).

Crash tests run a FakeEngine in a child server (fake_serve.py -> engine_from_env) with a pause
folder: the engine (or the submit path) stops at a named point, touches `paused-<point>` there and
waits, so the test can `kill -9` at exactly that moment instead of guessing with sleeps.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import replace
from pathlib import Path

from pipelines.errors import DeviceFailure, OutOfMemory
from pipelines.request import CancelToken, GenerationRequest, GenerationResult, ResolvedRequest, resolve

PAUSE_POINTS = ("load", "encode", "step", "write")


def expanded(prompt: str) -> str:
    """The fake engine's stand-in for prompt expansion (the real one: pipelines/expand.py)."""
    return f"{prompt}, rewritten in rich detail"


# before the second step; with half the video file on disk


class FakeEngine:
    """Every behaviour is a keyword argument (all off by default: a fast engine that always works).

    Timing: `step_time` seconds per denoising step, `warmup_time` seconds of warm-up.
    Phases: like the real engine, every run reports ("loading", 0, 1) and then ("encoding", 0, 1)
    through `on_phase` before its first step. With `decode_chunks` > 0, after the steps it reports
    ("decoding", i, n) for i in 0..n (sleeping `decode_time` per chunk and honouring the cancel token
    between chunks, like the real engine's chunked decode) and then ("writing", 0, 1); 0: no reports
    after the steps.
    Failures: `warmup_error` is raised by warmup(); `fail` is raised by a run once `fail_at_step`
    steps are done (0: before the first step, once loading and encoding are reported); `write_error` is raised with half
    the video written to its `.part` file (disk full, EIO, ...). `fail_times`: only the first N calls
    fail (None: every call); it applies to `fail` and `write_error` alike.
    Size: `big_bytes` pads the video of each call in `big_calls` (None: every call) to that size.
    Kill points: each call in `pause_calls` (None: every call) stops at each point of `pause_at`
    ("load" and "encode": just after reporting that phase; "step": before the second step; "write":
    with half the video on disk) until `release` (or a one-shot `release-<point>`) appears in
    `pause_dir` (see `pause`).
    Identity: `demo` and `device` as the real engine reports them (None: the class default, so a
    subclass may set them as class attributes); `memory_bytes` is what memory_in_use() reports
    (None: not measured, like the real engine on the CPU).

    Inspection: `calls` holds each run's request as asked (`ResolvedRequest.requested`, with the seed
    it ran with), `resolved` exactly what ran, `steps_run` the steps completed per call and
    `max_parallel` the most runs at once.
    """

    demo: bool = True
    device: str = "cpu"

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
        big_calls: Collection[int] | None = None,
        pause_at: str | Collection[str] = (),
        pause_calls: Collection[int] | None = None,
        pause_dir: Path | None = None,
        memory_bytes: int | None = None,
        decode_chunks: int = 0,
        decode_time: float = 0.0,
        demo: bool | None = None,
        device: str | None = None,
    ):
        points = {pause_at} if isinstance(pause_at, str) else set(pause_at)
        unknown = sorted(points - set(PAUSE_POINTS))
        if unknown:
            raise ValueError(f"pause_at {unknown} not in {PAUSE_POINTS}")
        if points and pause_dir is None:
            raise ValueError(f"pause_at {sorted(points)} needs a pause_dir to report in")
        for name, calls in (("big_calls", big_calls), ("pause_calls", pause_calls)):
            if calls is not None and any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in calls):
                raise ValueError(f"{name} must be call numbers from 1, got {sorted(calls)!r}")
        self.step_time = step_time
        self.warmup_time = warmup_time
        self.warmup_error = warmup_error
        self.fail = fail
        self.fail_at_step = fail_at_step
        self.fail_times = fail_times
        self.write_error = write_error
        self.big_bytes = big_bytes
        self.big_calls = big_calls
        self.pause_at = frozenset(points)
        self.pause_calls = pause_calls
        self.pause_dir = pause_dir
        self.memory_bytes = memory_bytes
        self.decode_chunks = decode_chunks
        self.decode_time = decode_time
        self.chunks_run: list[int] = []  # decode chunks completed per call (with decode_chunks > 0)
        if demo is not None:
            self.demo = demo
        if device is not None:
            self.device = device
        self.calls: list[GenerationRequest] = []
        self.resolved: list[ResolvedRequest] = []
        self.steps_run: list[int] = []
        self.max_parallel = 0
        self._running = 0
        self._lock = threading.Lock()

    # ---- the engine protocol -----------------------------------------------------------------------

    def available(self) -> list[str]:
        return ["kandinsky5-tiny-i2v", "kandinsky5-tiny-t2v"]

    def warmup(self) -> None:
        time.sleep(self.warmup_time)
        if self.warmup_error is not None:
            raise self.warmup_error

    def memory_in_use(self) -> int | None:
        return self.memory_bytes

    def describe(self) -> dict:
        """What it holds: the variants it has generated with (it loads nothing)."""
        with self._lock:
            ran = sorted({r.variant.name for r in self.resolved})
        return {"variants": ran, "resident": [], "counters": {}, "memory_in_use": self.memory_bytes}

    def prepare(self, req: GenerationRequest) -> ResolvedRequest:
        """Like the real engine in demo mode: validate, then serve every variant by the tiny model."""
        resolved = resolve(req)
        return resolved if resolved.variant.demo else resolved.as_demo()

    def generate(
        self,
        req: GenerationRequest | ResolvedRequest,
        output: Path,
        *,
        on_step: Callable[[int, int], None] | None = None,
        on_phase: Callable[[str, int, int], None] | None = None,
        cancel: CancelToken | None = None,
    ) -> GenerationResult:
        """Run `req`: a ResolvedRequest exactly as given, a GenerationRequest through prepare()."""
        r = req if isinstance(req, ResolvedRequest) else self.prepare(req)
        with self._lock:
            self._running += 1
            self.max_parallel = max(self.max_parallel, self._running)
            self.calls.append(replace(r.requested, seed=r.seed))
            self.resolved.append(r)
            n = len(self.calls)
        failing = self.fail_times is None or n <= self.fail_times
        pausing = self.pause_at if _chosen(self.pause_calls, n) else frozenset()
        done = 0
        report = on_phase or (lambda *_: None)
        try:
            for phase, point in (("loading", "load"), ("encoding", "encode")):
                if cancel is not None:
                    cancel.raise_if_cancelled()
                report(phase, 0, 1)
                if point in pausing:
                    self._pause(point, cancel)
            for step in range(1, r.steps + 1):
                if cancel is not None:
                    cancel.raise_if_cancelled()
                if failing and self.fail is not None and step > self.fail_at_step:
                    raise self.fail
                if step == 2 and "step" in pausing:
                    self._pause("step", cancel)
                time.sleep(self.step_time)
                done = step
                if on_step is not None:
                    on_step(step, r.steps)
            if cancel is not None:
                cancel.raise_if_cancelled()
            self._decode(on_phase, cancel)
            data = fake_video_bytes(r)
            if _chosen(self.big_calls, n) and len(data) < self.big_bytes:
                data += b"\x00" * (self.big_bytes - len(data))
            write_error = self.write_error if failing else None
            self._write(Path(output), data, write_error, pause="write" in pausing, cancel=cancel)
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
            fps=r.variant.fps,
            steps=r.steps,
            seed=r.seed,
            file_size=len(data),
            demo=r.demo or r.variant.demo,
            timings={"denoise": 0.0},
            # like the engine: "regular" reuses some transformer evaluations (MagCache)
            acceleration=r.acceleration,
            cached_steps=r.steps // 2 if r.acceleration == "regular" else 0,
            revised_prompt=expanded(r.prompt) if r.expand_prompt else None,
        )

    # ---- parts ---------------------------------------------------------------------------------------

    def _decode(self, on_phase: Callable[[str, int, int], None] | None, cancel: CancelToken | None) -> None:
        """The decode and write phases as the real engine reports them (`decode_chunks` > 0 only)."""
        if not self.decode_chunks:
            return
        n, done = self.decode_chunks, 0
        report = on_phase or (lambda *_: None)
        try:
            report("decoding", 0, n)
            for chunk in range(1, n + 1):
                if cancel is not None:
                    cancel.raise_if_cancelled()
                time.sleep(self.decode_time)
                done = chunk
                report("decoding", chunk, n)
        finally:
            self.chunks_run.append(done)
        if cancel is not None:
            cancel.raise_if_cancelled()
        report("writing", 0, 1)

    def _write(
        self, output: Path, data: bytes, error: OSError | None, *, pause: bool, cancel: CancelToken | None
    ) -> None:
        """Write atomically through `<output>.part`; an error or a pause strikes with half of it on disk."""
        tmp = Path(str(output) + ".part")
        with open(tmp, "wb") as fh:
            if error is None and not pause:
                fh.write(data)
            else:
                fh.write(data[: len(data) // 2])
                fh.flush()
                os.fsync(fh.fileno())
                if error is not None:
                    raise error
                self._pause("write", cancel)
                fh.write(data[len(data) // 2 :])
        os.replace(tmp, output)

    def _pause(self, point: str, cancel: CancelToken | None) -> None:
        assert self.pause_dir is not None  # the constructor refuses pause_at without one
        pause(self.pause_dir, point, cancel)


def _chosen(calls: Collection[int] | None, n: int) -> bool:
    """Does a behaviour limited to `calls` (None: all of them) apply to call number `n`?"""
    return calls is None or n in calls


def pause(folder: Path, point: str, cancel: CancelToken | None = None, timeout: float = 120.0) -> None:
    """Tell the test we reached `point`, then wait for `release` (or a cancel) in `folder`.

    `release` lets every pause through from then on; `release-<point>` lets one through (the pause
    that sees it deletes it, and `paused-<point>`, so the test can wait for the next one).
    A pause nobody releases fails after `timeout` seconds rather than hanging the suite."""
    (folder / f"paused-{point}").touch()
    deadline = time.monotonic() + timeout
    once = folder / f"release-{point}"
    while not (folder / "release").exists():
        if once.exists():
            (folder / f"paused-{point}").unlink(missing_ok=True)
            once.unlink()
            return
        if cancel is not None:
            cancel.raise_if_cancelled()
        if time.monotonic() > deadline:
            raise TimeoutError(f"nobody released pause point {point!r} in {folder} within {timeout:.0f} s")
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


def engine_from_env(env: Mapping[str, str] | None = None) -> FakeEngine:
    """The child server's engine (tests/fake_serve.py), configured through K5SERVE_FAKE_* variables:

    STEP_TIME     seconds per step (default 0.05)
    BIG_BYTES     pad videos to this size; BIG_CALLS: which calls, e.g. "1,3" (unset: every call)
    PAUSE_DIR     the pause folder (kill points, and "arm-submit" for the submit path)
    PAUSE_AT      points among "load,encode,step,write"; PAUSE_CALLS: which calls (unset: every call)
    MEMORY_BYTES  what memory_in_use() reports (unset: not measured)
    DECODE_CHUNKS, DECODE_TIME  a decode phase of that many chunks of that many seconds (unset: none)
    FSIZE_LIMIT   bytes: RLIMIT_FSIZE with SIGXFSZ ignored, so large writes fail with EFBIG
    """
    env = os.environ if env is None else env
    pause_dir = Path(env["K5SERVE_FAKE_PAUSE_DIR"]) if env.get("K5SERVE_FAKE_PAUSE_DIR") else None
    engine = FakeEngine(
        step_time=float(env.get("K5SERVE_FAKE_STEP_TIME", "0.05")),
        big_bytes=int(env.get("K5SERVE_FAKE_BIG_BYTES", "0")),
        big_calls=_call_numbers(env.get("K5SERVE_FAKE_BIG_CALLS")),
        pause_at=[p for p in env.get("K5SERVE_FAKE_PAUSE_AT", "").split(",") if p],
        pause_calls=_call_numbers(env.get("K5SERVE_FAKE_PAUSE_CALLS")),
        pause_dir=pause_dir,
        memory_bytes=int(env["K5SERVE_FAKE_MEMORY_BYTES"]) if env.get("K5SERVE_FAKE_MEMORY_BYTES") else None,
        decode_chunks=int(env.get("K5SERVE_FAKE_DECODE_CHUNKS", "0")),
        decode_time=float(env.get("K5SERVE_FAKE_DECODE_TIME", "0")),
    )
    if pause_dir is not None:
        logging.getLogger("k5serve.jobs").addHandler(PauseAfterSubmit(pause_dir))
    if env.get("K5SERVE_FAKE_FSIZE_LIMIT"):
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        limit = int(env["K5SERVE_FAKE_FSIZE_LIMIT"])
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return engine


def worker_engine(devices: list[str], **_options) -> FakeEngine:
    """The engine factory of a worker PROCESS in tests (K5SERVE_ENGINE_FACTORY=fakes:worker_engine):
    engine_from_env's fake on `devices`, with two knobs of its own:

    K5SERVE_FAKE_PAUSE_DIR  as above, but each worker process pauses in its own subfolder, named
                            after its pid: a test kills exactly the process that paused there
    K5SERVE_FAKE_POISON     a prompt whose runs kill their worker process (SIGKILL, as a segfault
                            or the kernel's OOM killer would) before the first step
    """
    env = dict(os.environ)
    if env.get("K5SERVE_FAKE_PAUSE_DIR"):
        own = Path(env["K5SERVE_FAKE_PAUSE_DIR"]) / str(os.getpid())
        own.mkdir(parents=True, exist_ok=True)
        env["K5SERVE_FAKE_PAUSE_DIR"] = str(own)
    engine = engine_from_env(env)
    engine.device = devices[0]
    poison = env.get("K5SERVE_FAKE_POISON")
    if poison:
        generate = engine.generate

        def deadly(req, output, **kwargs):
            if req.prompt == poison:
                os.kill(os.getpid(), signal.SIGKILL)
            return generate(req, output, **kwargs)

        engine.generate = deadly  # type: ignore[method-assign]
    return engine


def _call_numbers(text: str | None) -> frozenset[int] | None:
    """ "1,3" -> {1, 3}; unset or empty -> None (every call)."""
    if not text:
        return None
    return frozenset(int(part) for part in text.split(","))


def fake_video_bytes(r: ResolvedRequest) -> bytes:
    """Deterministic per resolved request, so a test can tell outputs apart and compare downloads."""
    digest = hashlib.sha256(json.dumps(r.to_dict(), sort_keys=True, default=str).encode()).hexdigest()
    return b"\x00\x00\x00\x18ftypmp42FAKE" + digest.encode() * 8


# ---- one-liners for the common cases -------------------------------------------------------------------


def slow(step_time: float = 0.2) -> FakeEngine:
    return FakeEngine(step_time=step_time)


def raising() -> FakeEngine:
    return FakeEngine(fail=RuntimeError("boom: internal detail that must not leak"), fail_at_step=1)


def out_of_memory(times: int | None = None) -> FakeEngine:
    """Every call (or only the first `times`) runs out of memory before its first step."""
    message = "out of GPU memory at 768x512, 121 frames on cuda:0; try a smaller size"
    return FakeEngine(fail=OutOfMemory(message), fail_times=times)


def device_failure() -> FakeEngine:
    return FakeEngine(fail=DeviceFailure("unrecoverable device error on cuda:0"))


__all__ = ["FakeEngine", "engine_from_env", "fake_video_bytes", "pause", "worker_engine"]


def failing_worker_engine(devices: list[str], **_options) -> FakeEngine:
    """A worker process's fake that fails as K5SERVE_FAKE_FAILURE says: "device" (DeviceFailure at
    step 1, a poisoned CUDA context), "setup" (warm-up raises), "invalid" (InvalidRequest)."""
    from pipelines.errors import InvalidRequest

    kind = os.environ.get("K5SERVE_FAKE_FAILURE", "")
    failures = {
        "device": {"fail": DeviceFailure("unrecoverable device error on cuda:0: an illegal memory access"),
                   "fail_at_step": 1},
        "setup": {"warmup_error": RuntimeError("no checkpoint here")},
        "invalid": {"fail": InvalidRequest("steps", 0, "steps must be at least 1")},
    }  # fmt: skip
    return FakeEngine(device=devices[0], step_time=0.01, **failures.get(kind, {}))
