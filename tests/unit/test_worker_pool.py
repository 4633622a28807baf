"""Unit tests: the worker pool (server/pool.py) with fake engines in threads: each worker takes its
own job, a cancel reaches the worker running that job only, and a worker that cannot start leaves
the others serving (new jobs are refused only once none is left)."""

from __future__ import annotations

import fakes
import pytest
from server_fixtures import wait_until

from pipelines.request import GenerationRequest, resolve
from server.devices import WorkerSpec
from server.errors import Unavailable
from server.jobs import JobStatus
from server.manager import CancelOutcome, JobManager
from server.pool import InThreadEngine, WorkerPool
from server.storage import Storage
from server.store import JobStore

SPECS = [WorkerSpec("w0", ("cpu",)), WorkerSpec("w1", ("cpu",))]


@pytest.fixture
def manager(tmp_path):
    storage = Storage(tmp_path)
    manager = JobManager(JobStore(storage.database), storage)
    yield manager
    manager.store.close()


def submit(manager: JobManager, prompt: str, steps: int = 40):
    req = GenerationRequest(variant="kandinsky5-tiny-t2v", prompt=prompt, steps=steps, seed=1)
    return manager.submit(contract="fal", model="m", request=req, resolved=resolve(req))


def pool_of(manager: JobManager, engines: dict[str, fakes.FakeEngine]) -> WorkerPool:
    return WorkerPool(SPECS, lambda spec: InThreadEngine(engines[spec.id]), manager, manager.storage)


def test_each_worker_runs_its_own_job_and_a_cancel_reaches_only_that_one(manager):
    engines = {s.id: fakes.FakeEngine(step_time=0.02) for s in SPECS}
    pool = pool_of(manager, engines)
    pool.start()
    try:
        wait_until(lambda: pool.ready and all(w.ready for w in pool.workers), what="both workers ready")
        a, b = submit(manager, "a"), submit(manager, "b", steps=10)
        wait_until(lambda: {w.current_job_id for w in pool.workers} == {a.id, b.id}, what="both running")
        on = {w.current_job_id: w.name for w in pool.workers}
        assert {d["job"]: d["state"] for d in pool.describe()} == {a.id: "busy", b.id: "busy"}
        assert manager.cancel(a.id) is CancelOutcome.REQUESTED
        wait_until(lambda: manager.get(a.id).status is JobStatus.CANCELED, what="a canceled")
        wait_until(lambda: manager.get(b.id).status is JobStatus.SUCCEEDED, what="b done")
        ran_b = engines[on[b.id]]
        assert ran_b.steps_run[-1] == 10  # b ran every step: the cancel went to a's worker only
        assert engines[on[a.id]].steps_run[-1] < 40
    finally:
        pool.stop()


def test_a_worker_that_cannot_start_leaves_the_others_serving(manager):
    engines = {"w0": fakes.FakeEngine(warmup_error=RuntimeError("no GPU here")), "w1": fakes.FakeEngine()}
    pool = pool_of(manager, engines)
    pool.start()
    try:
        wait_until(lambda: pool.workers[0].health.gone and pool.ready, what="w0 failed, w1 ready")
        assert manager.refusal is None and pool.health.value == "ready"
        states = {d["id"]: (d["state"], d.get("detail")) for d in pool.describe()}
        assert states == {"w0": ("failed", "warm-up failed: no GPU here"), "w1": ("ready", None)}
        job = submit(manager, "still served", steps=2)
        wait_until(lambda: manager.get(job.id).status is JobStatus.SUCCEEDED, what="served by w1")
    finally:
        pool.stop()


def test_new_jobs_are_refused_once_no_worker_is_left(manager):
    engines = {s.id: fakes.FakeEngine(warmup_error=RuntimeError(f"{s.id} broke")) for s in SPECS}
    pool = pool_of(manager, engines)
    pool.start()
    try:
        wait_until(lambda: all(w.health.gone for w in pool.workers), what="both failed")
        wait_until(lambda: manager.refusal is not None, what="refusing")
        assert "w0: warm-up failed: w0 broke; w1: warm-up failed: w1 broke" in manager.refusal
        assert not pool.ready and pool.health.value == "setup_failed"
        with pytest.raises(Unavailable):
            submit(manager, "nobody to run it")
    finally:
        pool.stop()
