"""ProcessEngine: the front end's proxy for an engine that runs in its own worker process.

It implements EngineLike (engine_protocol.py) plus the remote-engine seam the worker pool drives
(pool.py): `start()` spawns the process, which builds the engine and warms it up; `warmup()` waits
for it to be ready; `stop()` asks it to end, `kill()` ends it hard; `alive`, `pid`, `node` (None:
this host). A call whose process dies (kill -9, an OOM kill, a poisoned CUDA context reported as
DeviceFailure) raises WorkerLost: the worker puts the job back and starts a fresh process.

Torch-free: torch is imported in the child only (worker_main.py). Processes are spawned, never
forked: CUDA cannot be used in a forked child, and a fork would copy the server's threads' locks.
Progress comes back over the pipe while a run goes on; a cancel seen on the run's token is passed on
through a process-crossing token (pipelines/cancel.py), which the engine checks at its next step.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines.cancel import Cancellation, ProcessCancelToken
from pipelines.request import GenerationRequest, GenerationResult, ResolvedRequest

from .engine_protocol import WorkerLost
from .worker_main import DEFAULT_FACTORY, decode_error, main

log = logging.getLogger("k5serve.worker")

POLL_SECONDS = 0.05  # how often a running job's cancel token and the process are looked at
START_TIMEOUT = 1800.0  # seconds for the process to build and warm up its engine (loading Pro: minutes)
STOP_TIMEOUT = 10.0


class ProcessEngine:
    """One engine in a child process, on `devices` (one device, or a sequence-parallel group).
    `factory` ("module:function", called in the child as factory(devices, **engine_kwargs)) builds
    it: the default is pipelines.group.build_engine; tests name a fake's."""

    def __init__(
        self,
        worker_id: str,
        devices: tuple[str, ...],
        *,
        factory: str = DEFAULT_FACTORY,
        engine_kwargs: dict | None = None,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        self.worker_id = worker_id
        self.devices = tuple(devices)
        self.factory = factory
        self.engine_kwargs = dict(engine_kwargs or {})
        self.start_timeout = start_timeout
        self.demo = False  # filled in by the child at warm-up
        self.device = "+".join(self.devices)
        self.node: str | None = None  # a local process: no Ray node
        self._available: list[str] = []
        self._describe: dict = {"variants": [], "resident": [], "counters": {}, "memory_in_use": None}
        self._ctx = multiprocessing.get_context("spawn")
        self._process: Any = None
        self._conn: Any = None
        self._cancel: ProcessCancelToken | None = None

    # ---- lifecycle (the worker pool's seam) -----------------------------------------------------------

    def start(self) -> None:
        """Spawn the worker process; it builds its engine and warms up (`warmup` waits for that)."""
        if self.alive:
            raise RuntimeError(f"worker {self.worker_id} is already running (pid {self.pid})")
        parent, child = self._ctx.Pipe()
        self._cancel = ProcessCancelToken(self._ctx)
        self._process = self._ctx.Process(
            target=main,
            args=(child, self._cancel, self.factory, self.devices, self.engine_kwargs),
            name=f"k5serve-{self.worker_id}",
            daemon=True,
        )
        self._process.start()
        child.close()  # the child's end lives in the child: EOF here when it dies
        self._conn = parent
        log.info("worker %s: process %s started on %s", self.worker_id, self._process.pid, self.device)

    def warmup(self) -> None:
        """Wait until the process has built and warmed up its engine. Raises RuntimeError when its
        set-up failed (nothing will run there), WorkerLost when it died on the way."""
        kind, *rest = self._receive(deadline=time.monotonic() + self.start_timeout)
        if kind == "setup_failed":
            self._reap()
            raise RuntimeError(rest[0])
        if kind != "ready":
            raise WorkerLost(f"worker {self.worker_id}: unexpected {kind!r} from its process at start-up")
        info = rest[0]
        self.demo, self.device = bool(info["demo"]), str(info["device"])
        self._available, self._describe = list(info["available"]), dict(info["describe"])

    def stop(self) -> None:
        """Ask the process to end (it finishes nothing: the worker stops taking jobs first); kill it
        if it does not end within STOP_TIMEOUT seconds."""
        if self._process is None:
            return
        with contextlib.suppress(OSError, ValueError, AttributeError):  # already gone: fine
            self._conn.send(("stop",))
        self._process.join(STOP_TIMEOUT)
        self.kill()

    def kill(self) -> None:
        """End the process now (SIGKILL) and reap it."""
        if self._process is None:
            return
        if self._process.is_alive():
            self._process.kill()
        self._reap()

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    # ---- EngineLike ---------------------------------------------------------------------------------

    def available(self) -> list[str]:
        return list(self._available)

    def prepare(self, req: GenerationRequest) -> ResolvedRequest:
        """Resolved in the child (only for records admitted before the server stored resolutions)."""
        self._send(("prepare", req))
        kind, *rest = self._receive()
        if kind == "prepared":
            return rest[0]
        raise decode_error(rest[0])

    def memory_in_use(self) -> int | None:
        return self._describe.get("memory_in_use")

    def describe(self) -> dict:
        """As the child last reported it (at warm-up and after each run): never waits on a run."""
        return dict(self._describe)

    def generate(
        self,
        req: ResolvedRequest,
        output: Path,
        *,
        on_step: Callable[[int, int], None] | None = None,
        on_phase: Callable[[str, int, int], None] | None = None,
        cancel: Cancellation | None = None,
    ) -> GenerationResult:
        assert self._cancel is not None, "start() first"
        self._cancel.reset()
        self._send(("generate", req, str(output)))
        while True:
            kind, *rest = self._receive(cancel=cancel)
            if kind == "step" and on_step is not None:
                on_step(*rest)
            elif kind == "phase" and on_phase is not None:
                on_phase(*rest)
            elif kind == "done":
                self._remember(rest[1])
                return rest[0]
            elif kind == "error":
                self._remember(rest[1])
                raise decode_error(rest[0])
            elif kind not in ("step", "phase"):
                raise WorkerLost(f"worker {self.worker_id}: unexpected {kind!r} from its process")

    # ---- the pipe -----------------------------------------------------------------------------------

    def _send(self, message: tuple) -> None:
        try:
            self._conn.send(message)
        except (OSError, ValueError, AttributeError) as exc:
            raise self._lost(f"could not reach it ({exc})") from exc

    def _receive(self, cancel: Cancellation | None = None, deadline: float | None = None) -> tuple:
        """The next message, passing on a cancel meanwhile; WorkerLost if the process dies."""
        while True:
            # passed on before each read: a busy pipe (a step every few ms) must not hold a cancel back
            if cancel is not None and cancel.cancelled and self._cancel is not None and not self._cancel.cancelled:
                self._cancel.cancel()  # the engine sees it at its next step
            try:
                if self._conn.poll(POLL_SECONDS):
                    message = self._conn.recv()
                    if message[0] == "lost":
                        self._process.join(STOP_TIMEOUT)
                        raise self._lost(message[1])
                    return message
            except (EOFError, OSError) as exc:
                raise self._lost("its process ended") from exc
            if not self._process.is_alive() and not self._conn.poll(0):
                raise self._lost("its process ended")
            if deadline is not None and time.monotonic() > deadline:
                self.kill()
                raise self._lost(f"not ready within {self.start_timeout:.0f} s")

    def _lost(self, why: str) -> WorkerLost:
        self.kill()
        code = self._process.exitcode if self._process is not None else None
        how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        return WorkerLost(f"worker {self.worker_id} (pid {self.pid}) on {'+'.join(self.devices)}: {why}, {how}")

    def _reap(self) -> None:
        self._process.join(STOP_TIMEOUT)
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _remember(self, describe: dict | None) -> None:
        if describe is not None:
            self._describe = dict(describe)
