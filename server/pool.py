"""The worker pool: one GpuWorker per device or sequence-parallel group, each driving its own engine.

The pool takes an engine FACTORY, `(WorkerSpec) -> RemoteEngine`: worker processes on this host
(`process_factory`), Ray actors (server/ray_engine.py), or one in-process engine injected by a test
or an embedding program (`InThreadEngine`, which keeps `create_app(settings, engine)` as it was:
one worker, in a thread of this process). Each worker takes the oldest job it can run from the
shared queue (scheduler.py); a worker whose process dies is restarted by its own thread while the
others keep serving (worker.py).

The front end never imports torch, so admission cannot ask an Engine: `FrontEngine` answers
`prepare` / `available` / `demo` with pipelines.preparer.Preparer, given the smallest device memory
of the workers (server/devices.py probes it in a subprocess).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipelines.cancel import Cancellation
from pipelines.request import GenerationRequest, GenerationResult, ResolvedRequest

from .devices import Gpus, WorkerSpec, capacity, parse_devices, probe
from .engine_protocol import EngineLike, RemoteEngine
from .manager import JobManager
from .storage import Storage
from .worker import GpuWorker, Health

log = logging.getLogger("k5serve.pool")

EngineFactory = Callable[[WorkerSpec], RemoteEngine]


class InThreadEngine:
    """An engine object of this process as a RemoteEngine: start/stop/kill do nothing (there is no
    process to start or restart), pid is this process. A DeviceFailure here stops the worker for
    good (worker.py), as before worker processes."""

    node: str | None = None

    def __init__(self, engine: EngineLike):
        self.inner = engine

    @property
    def demo(self) -> bool:
        return self.inner.demo

    @property
    def device(self) -> str:
        return self.inner.device

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def kill(self) -> None:
        pass

    @property
    def alive(self) -> bool:
        return True

    @property
    def pid(self) -> int | None:
        return os.getpid()

    def available(self) -> list[str]:
        return self.inner.available()

    def prepare(self, req: GenerationRequest) -> ResolvedRequest:
        return self.inner.prepare(req)

    def generate(
        self,
        req: ResolvedRequest,
        output: Path,
        *,
        on_step: Callable[[int, int], None] | None = None,
        on_phase: Callable[[str, int, int], None] | None = None,
        cancel: Cancellation | None = None,
    ) -> GenerationResult:
        return self.inner.generate(req, output, on_step=on_step, on_phase=on_phase, cancel=cancel)

    def warmup(self) -> None:
        self.inner.warmup()

    def memory_in_use(self) -> int | None:
        return self.inner.memory_in_use()

    def describe(self) -> dict:
        return self.inner.describe()


class WorkerPool:
    def __init__(self, specs: list[WorkerSpec], factory: EngineFactory, manager: JobManager, storage: Storage):
        if not specs:
            raise ValueError("a worker pool needs at least one worker")
        self.specs = list(specs)
        self.manager = manager
        self._lock = threading.Lock()
        self.workers = [
            GpuWorker(factory(spec), manager, storage, spec.id, on_give_up=self._gave_up) for spec in self.specs
        ]

    def start(self) -> None:
        for worker in self.workers:
            worker.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Every worker stops taking jobs at once (running ones are interrupted and requeued), then
        each is joined and its engine stopped."""
        for worker in self.workers:
            worker.request_stop()
        for worker in self.workers:
            worker.stop(timeout)

    @property
    def alive(self) -> bool:
        """Some worker thread still runs (the store must stay open)."""
        return any(w.alive for w in self.workers)

    @property
    def ready(self) -> bool:
        """At least one worker can serve."""
        return any(w.ready for w in self.workers)

    @property
    def health(self) -> Health:
        """The pool's /readyz status: ready while one worker is; starting while one may still be;
        else how the first worker failed."""
        states = [w.health for w in self.workers]
        if Health.READY in states:
            return Health.READY
        if Health.RESTARTING in states:
            return Health.RESTARTING
        if Health.STARTING in states:
            return Health.STARTING
        return states[0]

    @property
    def health_detail(self) -> str | None:
        details = [f"{w.name}: {w.health_detail}" for w in self.workers if w.health_detail]
        if len(self.workers) == 1:
            return self.workers[0].health_detail
        return "; ".join(details) or None

    def memory_in_use(self) -> int | None:
        """Device memory held by all workers (None where none can say)."""
        values = [w.engine.memory_in_use() for w in self.workers]
        known = [v for v in values if v is not None]
        return sum(known) if known else None

    def describe(self) -> list[dict]:
        """/readyz `workers`: one object per worker."""
        return [self._describe(spec, w) for spec, w in zip(self.specs, self.workers, strict=True)]

    @staticmethod
    def _describe(spec: WorkerSpec, worker: GpuWorker) -> dict:
        engine = worker.engine
        try:
            held = engine.describe()
        except Exception:  # a report must not fail /readyz
            log.warning("worker %s: describe() failed", worker.name, exc_info=True)
            held = {}
        body = {
            "id": worker.name,
            "devices": list(spec.devices),
            "pid": engine.pid if engine.alive else None,
            "node": engine.node,
            "state": worker.state,
            "job": worker.current_job_id,
            "variants": list(held.get("variants") or []),
            "resident": list(held.get("resident") or []),
            "memory_in_use": held.get("memory_in_use"),
            "restarts": worker.restarts,
        }
        if worker.health_detail:
            body["detail"] = worker.health_detail
        return body

    def _gave_up(self, worker: GpuWorker) -> None:
        """A worker stopped for good: new jobs are refused only once no worker is left to run them."""
        with self._lock:
            if all(w.health.gone for w in self.workers):
                self.manager.stop_accepting(
                    f"no worker can run jobs ({self.health_detail}); restart k5serve to accept new jobs"
                )
            else:
                log.error("worker %s stopped for good (%s); the others keep serving", worker.name, worker.health_detail)


class FrontEngine:
    """What the front end asks of "the engine" when the engines run elsewhere: admission (prepare,
    via the torch-free Preparer), /readyz (demo, device, available) and /metrics (memory, summed
    over the workers). Never generates."""

    def __init__(self, preparer, pool: WorkerPool | None = None, device: str = ""):
        self.preparer = preparer
        self.pool = pool
        self.demo = preparer.demo
        self.device = device

    def available(self) -> list[str]:
        return self.preparer.available()

    def prepare(self, req: GenerationRequest) -> ResolvedRequest:
        return self.preparer.prepare(req)

    def memory_in_use(self) -> int | None:
        return self.pool.memory_in_use() if self.pool is not None else None

    def describe(self) -> dict:
        return {"variants": [], "resident": [], "counters": {}, "memory_in_use": self.memory_in_use()}

    def warmup(self) -> None:
        pass

    def generate(self, *_args, **_kwargs) -> GenerationResult:
        raise RuntimeError("the front end does not generate: its workers do")


@dataclass
class Workers:
    """How the server runs its engines: the workers and the factory that makes each one's engine,
    and the front end's torch-free stand-in for admission. `create_app(settings, workers)`."""

    specs: list[WorkerSpec]
    factory: EngineFactory
    front: FrontEngine


def process_factory(settings) -> EngineFactory:
    """Worker processes on this host, building their engines with settings.engine_factory."""
    from .process_engine import ProcessEngine

    options = settings.engine_options()
    return lambda spec: ProcessEngine(spec.id, spec.devices, factory=settings.engine_factory, engine_kwargs=options)


def local_workers(settings, gpus: Gpus | None = None) -> Workers:
    """`k5serve serve` without Ray: one worker process per device or group of settings.devices
    (settings.device as a one-device list when unset). Raises ValueError (a bad device list, an
    unknown model) or WeightsMissing (--require-weights), worded for the command line."""
    from pipelines.placement import Placement
    from pipelines.preparer import Preparer
    from pipelines.sources import WeightsFolder
    from pipelines.variants import sp_degree_problem

    text = settings.devices if settings.devices is not None else settings.device
    needs_probe = any(part.strip().startswith("cuda") or part.strip() in ("auto", "all") for part in text.split(","))
    gpus = gpus if gpus is not None else (probe() if needs_probe else Gpus())
    specs = parse_devices(text, settings.sp_degree, gpus)
    # fp8 compute: a CPU worker would only fail its set-up, so refuse here; a card's capability is
    # the engine's own check (it needs torch)
    if settings.fp8_compute and any(d == "cpu" for spec in specs for d in spec.devices):
        from pipelines.device import fp8_unsupported

        raise ValueError(fp8_unsupported("cpu"))
    host = int(settings.host_memory * 2**30) if settings.host_memory else None
    budget = int(settings.device_memory * 2**30) if settings.device_memory else capacity(specs, gpus)
    placements = Placement(budget, settings.memory_mode, host_capacity=host)
    preparer = Preparer(
        WeightsFolder(settings.weights_dir), placements, settings.models, settings.require_weights,
        str(settings.weights_dir),
    )  # fmt: skip
    for degree in sorted({len(spec.devices) for spec in specs} - {1}):  # refused here, not in each worker
        problem = sp_degree_problem(preparer.runs(), degree)
        if problem:
            raise ValueError(problem)
    device = ",".join(spec.label for spec in specs)
    return Workers(specs, process_factory(settings), FrontEngine(preparer, device=device))
