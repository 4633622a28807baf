"""Prometheus metrics at GET /metrics, one CollectorRegistry per app (tests build many apps).

Job counters and timing histograms are fed by a change-feed listener; queue depth and GPU memory
are read when scraped. GPU memory is the engine's `memory_in_use()` (bytes; this module never
imports torch). Where the device cannot say (the CPU), k5serve_gpu_memory_bytes has no sample
rather than a made-up 0.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .engine_protocol import EngineLike
from .jobs import DENOISING, Job, JobStatus
from .manager import JobManager

if TYPE_CHECKING:
    from .pool import WorkerPool

log = logging.getLogger("k5serve.metrics")

GENERATION_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600)
STEP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 60)


class Metrics:
    def __init__(self, manager: JobManager, engine: EngineLike, pool: WorkerPool | None = None):
        self.registry = CollectorRegistry(auto_describe=True)
        queue = Gauge("k5serve_queue_depth", "Jobs waiting in the queue", registry=self.registry)
        queue.set_function(manager.queued_count)
        self.registry.register(_DeviceMemory(engine))
        self.registry.register(_JobsByStatus(manager))
        if pool is not None:
            self.registry.register(_Workers(pool))
        if pool is not None:
            self.registry.register(_Residency(lambda: [(w.name, w.engine) for w in pool.workers]))
        else:
            self.registry.register(_Residency(lambda: [("0", engine)]))
        self.finished = Counter(
            "k5serve_jobs_finished", "Jobs that ended, by status and contract", ["status", "contract"],
            registry=self.registry,
        )  # fmt: skip
        self.generation = Histogram(
            "k5serve_generation_seconds", "Run time of succeeded jobs", ["variant"],
            buckets=GENERATION_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.step = Histogram(
            "k5serve_step_seconds", "Time per denoising step", ["variant"], buckets=STEP_BUCKETS, registry=self.registry
        )
        self._lock = threading.Lock()
        self._last_step: dict[str, float] = {}  # job id -> monotonic time of its start / last step
        self._steps: dict[str, list[float]] = {}  # step durations, labelled when the variant is known

    def observe(self, job: Job, previous: JobStatus | None) -> None:
        now = time.monotonic()
        with self._lock:
            if previous is job.status:  # progress: a step, or a decode chunk (not a step)
                if job.phase != DENOISING:
                    return
                last = self._last_step.get(job.id)
                if last is not None:
                    self._steps.setdefault(job.id, []).append(now - last)
                self._last_step[job.id] = now
                return
            if job.status is JobStatus.RUNNING:
                self._last_step[job.id] = now
            elif job.status is JobStatus.QUEUED:  # interrupted: the steps will run again
                self._forget(job.id)
            else:
                self._finish(job)

    def forget(self, job_id: str) -> None:
        """A deleted job (possibly mid-run: no terminal event will come) keeps nothing here."""
        with self._lock:
            self._forget(job_id)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def _finish(self, job: Job) -> None:
        self.finished.labels(job.status.value, job.contract).inc()
        variant = job.output.variant if job.output else (job.request.variant if job.request else "unknown")
        for seconds in self._steps.get(job.id, []):
            self.step.labels(variant).observe(seconds)
        if job.status is JobStatus.SUCCEEDED and job.inference_time is not None:
            self.generation.labels(variant).observe(job.inference_time)
        self._forget(job.id)

    def _forget(self, job_id: str) -> None:
        self._last_step.pop(job_id, None)
        self._steps.pop(job_id, None)


class _JobsByStatus:
    """k5serve_jobs{status,contract}, counted from the job table at scrape time (so jobs recovered
    from disk at start-up are included)."""

    def describe(self) -> list:
        return []

    def __init__(self, manager: JobManager):
        self.manager = manager

    def collect(self):
        family = GaugeMetricFamily("k5serve_jobs", "Jobs by current status and contract", labels=["status", "contract"])
        counts = collections.Counter((job.status.value, job.contract) for job in self.manager.list())
        for (status, contract), n in sorted(counts.items()):
            family.add_metric([status, contract], n)
        yield family


class _Workers:
    """Per worker (label worker=id, as /readyz names them): busy seconds, restarts, runs ended."""

    def __init__(self, pool: WorkerPool):
        self.pool = pool

    def describe(self) -> list:
        return []

    def collect(self):
        busy = CounterMetricFamily(
            "k5serve_worker_busy_seconds", "Seconds each worker spent running jobs", labels=["worker"]
        )
        restarts = CounterMetricFamily(
            "k5serve_worker_restarts", "Fresh engine processes started after one died", labels=["worker"]
        )
        jobs = CounterMetricFamily(
            "k5serve_worker_jobs", "Runs that ended on each worker (any outcome)", labels=["worker"]
        )
        up = GaugeMetricFamily("k5serve_worker_ready", "1 while the worker can take jobs", labels=["worker"])
        for worker in self.pool.workers:
            busy.add_metric([worker.name], worker.busy_seconds)
            restarts.add_metric([worker.name], worker.restarts)
            jobs.add_metric([worker.name], worker.jobs)
            up.add_metric([worker.name], 1.0 if worker.ready else 0.0)
        yield from (busy, restarts, jobs, up)


class _DeviceMemory:
    """k5serve_gpu_memory_bytes, read from the engine at scrape time; no sample when not measurable."""

    def __init__(self, engine: EngineLike):
        self.engine = engine

    def describe(self) -> list:
        return []

    def collect(self):
        family = GaugeMetricFamily(
            "k5serve_gpu_memory_bytes", "Device memory held by the engine (no sample where the device cannot say)"
        )
        try:
            value = self.engine.memory_in_use()
        except Exception:  # a scrape must not fail because the device is busy or gone
            log.warning("could not read the engine's memory in use", exc_info=True)
            value = None
        if value is not None:
            family.add_metric([], float(value))
        yield family


class _Residency:
    """Per worker (label worker=id): model loads, evictions and swap time, and the bytes resident per
    component, from each engine's describe() at scrape time (pipelines/residency.py; a worker process
    reports its engine's after each job); a counter an engine does not report has no sample."""

    COUNTERS = (
        ("loads", "k5serve_component_loads", "Models (transformer, text encoders, VAE) read from disk onto the device"),
        (
            "evictions",
            "k5serve_component_evictions",
            "Models moved off the device to make room (to host RAM or dropped)",
        ),
        ("swap_seconds", "k5serve_component_swap_seconds", "Seconds spent bringing evicted models back from host RAM"),
    )

    def __init__(self, engines: Callable[[], list[tuple[str, EngineLike]]]):
        self.engines = engines  # () -> [(worker id, engine)]

    def describe(self) -> list:
        return []

    def collect(self):
        families = {key: CounterMetricFamily(name, text, labels=["worker"]) for key, name, text in self.COUNTERS}
        resident = GaugeMetricFamily(
            "k5serve_resident_bytes",
            "Bytes of models resident on each worker's device, by component",
            labels=["worker", "component"],
        )
        for worker, engine in self.engines():
            try:
                held = engine.describe()
            except Exception:  # a scrape must not fail because an engine is busy or gone
                log.warning("could not read what worker %s holds", worker, exc_info=True)
                held = {}
            counters = held.get("counters") or {}
            for key, family in families.items():
                if key in counters:
                    family.add_metric([worker], float(counters[key]))
            by_component: collections.Counter = collections.Counter()
            for entry in held.get("resident") or []:
                by_component[entry["component"]] += entry["bytes"]
            for component, nbytes in sorted(by_component.items()):
                resident.add_metric([worker, component], float(nbytes))
        yield from families.values()
        yield resident


def metrics_router(metrics: Metrics) -> APIRouter:
    router = APIRouter()

    @router.get("/metrics", include_in_schema=False)
    async def scrape() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return router
