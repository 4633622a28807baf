"""What the server needs from an engine: pipelines.engine.Engine, and the fakes in tests.

Every method the server calls is here; nothing reaches past it (no getattr probing). The server
never imports torch: the real engine is built in worker processes (server/worker_main.py) and only the worker
thread calls `generate` and `warmup`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from pipelines.cancel import Cancellation
from pipelines.request import GenerationRequest, GenerationResult, ResolvedRequest


class WorkerLost(Exception):
    """The process (or Ray actor) running an engine died during a call (kill -9, a poisoned CUDA
    context, a lost node). Raised by the proxies that run an engine elsewhere; the worker puts the
    job back in the queue and restarts the engine (issue 13)."""


class EngineLike(Protocol):
    demo: bool  # no real checkpoint: every variant is served by the tiny random-weight model
    device: str  # e.g. "cuda:0", "cpu"

    def available(self) -> list[str]:
        """Variant names this engine serves (GET /readyz lists them)."""
        ...

    def prepare(self, req: GenerationRequest) -> ResolvedRequest:
        """The request as it will run: demo stand-in, weights present, fits the device's memory.
        Raises pipelines.errors.InvalidRequest or WeightsMissing. Called at admission only."""
        ...

    def generate(
        self,
        req: ResolvedRequest,
        output: Path,
        *,
        on_step: Callable[[int, int], None] | None = None,
        on_phase: Callable[[str, int, int], None] | None = None,
        cancel: Cancellation | None = None,
    ) -> GenerationResult:
        """Run an admitted request as it is (never re-resolved) and write the mp4 at `output`.

        `on_step(i, n)` after each denoising step; `on_phase(phase, i, n)` for what follows the
        steps: ("decoding", i, n) as the decode starts (i=0) and after each of its n chunks, then
        ("writing", 0, 1) before the mp4 is written. `cancel` is honoured at each of these points;
        a cancelled run raises pipelines.errors.Cancelled and leaves no file."""
        ...

    def warmup(self) -> None:
        """Load what will be served before the first job (the worker calls it once)."""
        ...

    def memory_in_use(self) -> int | None:
        """Bytes of device memory the engine holds now; None where the device cannot say (CPU)."""
        ...

    def describe(self) -> dict:
        """What the engine holds now, as plain data (it crosses process boundaries: JSON types only):
        {"variants": [loaded variant names], "resident": [{"component", "id", "bytes", "variants"}, ...],
        "counters": {name: number} (e.g. loads, evictions, swap_seconds), "memory_in_use": int | None}.
        /readyz and /metrics show it per worker."""
        ...


class RemoteEngine(EngineLike, Protocol):
    """An engine the worker pool can start, stop and restart (server/pool.py): a worker process
    (process_engine.ProcessEngine), a Ray actor, or an in-process engine adapted by the pool.

    `start()` launches it (its warm-up runs there; `warmup()` waits for it), `stop()` ends it in
    order, `kill()` at once; `pid` is the process that runs it, `node` its Ray node (None locally).
    A call whose process died raises WorkerLost."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def kill(self) -> None: ...

    @property
    def alive(self) -> bool: ...

    @property
    def pid(self) -> int | None: ...

    @property
    def node(self) -> str | None: ...
