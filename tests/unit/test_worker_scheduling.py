"""Unit + property tests: several workers on one queue (issue 13). Variant affinity with its bypass
bound (server/scheduler.py), and a job whose worker process died (manager `Lost`): run again with
the same seed, failed after `max_worker_deaths`, the count kept on disk."""

from __future__ import annotations

import json
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.request import GenerationRequest, resolve
from server.events import Lost, Succeeded
from server.jobs import ErrorKind, Job, JobOutput, JobStatus
from server.manager import CancelOutcome, JobManager
from server.scheduler import Scheduler
from server.storage import Storage
from server.store import JobStore

OUT = JobOutput("output.mp4", "video/mp4", 4, 64, 64, 5, 24, 2, 7, "kandinsky5-tiny-t2v", True)
NEVER = threading.Event()


def anything(_job_id: str) -> bool:
    return True


def take(s: Scheduler, worker: str, prefers=None) -> str:
    job_id = s.wait_for(NEVER, anything, 0.01, prefers)
    s.start(job_id, worker)
    return job_id


# -- the scheduler alone ----------------------------------------------------------------------------


def test_a_worker_prefers_a_job_whose_variant_it_holds_within_the_bypass_bound():
    s = Scheduler(max_bypass=2)
    variant = {"x1": "X", "y1": "Y", "y2": "Y", "y3": "Y"}
    for job_id in variant:
        s.enqueue(job_id)
    holds_y = lambda job_id: variant[job_id] == "Y"  # noqa: E731
    assert take(s, "wy", holds_y) == "y1" and s.bypassed("x1") == 1  # x1 overtaken once
    assert take(s, "wy", holds_y) == "y2" and s.bypassed("x1") == 2
    assert take(s, "wy", holds_y) == "x1"  # bypassed twice: now first, whatever the worker holds
    assert s.waiting() == ("y3",) and s.bypassed("x1") == 0


def test_without_a_preference_or_a_match_the_oldest_job_goes_first():
    s = Scheduler()
    for job_id in "abc":
        s.enqueue(job_id)
    assert take(s, "w", lambda _: False) == "a" and s.bypassed("b") == 0
    assert take(s, "w") == "b"
    with pytest.raises(ValueError, match="max_bypass"):
        Scheduler(max_bypass=-1)


@settings(max_examples=60, deadline=None)
@given(
    jobs=st.lists(st.sampled_from("XYZ"), min_size=1, max_size=14),
    held=st.lists(st.sets(st.sampled_from("XYZ"), max_size=2), min_size=1, max_size=3),
    order=st.lists(st.integers(0, 2), min_size=1, max_size=40),
    max_bypass=st.integers(0, 3),
)
def test_property_no_job_is_overtaken_more_than_max_bypass_times(jobs, held, order, max_bypass):
    """Any arrivals, any workers (each holding some variants), any order in which they become free:
    every job starts exactly once, and while it waits at most `max_bypass` younger jobs start
    before it (a younger job starts only as the worker's preferred one or as the oldest)."""
    s = Scheduler(max_bypass=max_bypass)
    variant = {f"j{n}": v for n, v in enumerate(jobs)}
    for job_id in variant:
        s.enqueue(job_id)
    overtaken = dict.fromkeys(variant, 0)
    started: list[str] = []
    turns = iter(order * (len(jobs) + 1))
    while s.count():
        worker = next(turns, 0) % len(held)
        prefers = lambda job_id, w=worker: variant[job_id] in held[w]  # noqa: E731
        oldest = s.waiting()[0]
        job_id = take(s, f"w{worker}", prefers)
        assert job_id == oldest or prefers(job_id)
        for older in s.waiting():
            if int(older[1:]) < int(job_id[1:]):
                overtaken[older] += 1
        started.append(job_id)
        s.finish(job_id)
    assert sorted(started) == sorted(variant)
    assert max(overtaken.values()) <= max_bypass


# -- under the job manager: worker deaths -------------------------------------------------------------


@pytest.fixture
def manager(tmp_path):
    storage = Storage(tmp_path)
    manager = JobManager(JobStore(storage.database), storage, max_queue=100, max_worker_deaths=2)
    yield manager
    manager.store.close()


def submit(manager: JobManager, prompt: str = "a fox", variant: str = "kandinsky5-tiny-t2v") -> Job:
    req = GenerationRequest(variant=variant, prompt=prompt, steps=2, seed=11)
    return manager.submit(contract="fal", model="m", request=req, resolved=resolve(req))


def test_a_job_whose_worker_died_runs_again_with_its_seed_in_its_place(manager):
    a, b = submit(manager, "a"), submit(manager, "b")
    run = manager.next_job(NEVER, worker="w0")
    assert run.job.id == a.id
    manager.handle(Lost(a.id, "killed by SIGKILL"))
    job = manager.get(a.id)
    assert job.status is JobStatus.QUEUED and job.worker_deaths == 1
    assert manager.queue_position(a.id) == 0 and manager.queue_position(b.id) == 1  # ahead of b
    assert "the worker process died (killed by SIGKILL); worker deaths 1/2" in job.logs[-1].message
    again = manager.next_job(NEVER, worker="w1")
    assert again.job.id == a.id and again.job.resolved.seed == 11 and again.job.attempts == 2
    manager.handle(Succeeded(a.id, OUT))
    assert manager.get(a.id).status is JobStatus.SUCCEEDED


def test_a_poison_job_fails_after_killing_max_worker_deaths_workers(manager):
    a = submit(manager)
    for worker in ("w0", "w1"):
        manager.next_job(NEVER, worker=worker)
        manager.handle(Lost(a.id, f"{worker} killed by SIGKILL"))
    job = manager.get(a.id)
    assert job.status is JobStatus.FAILED and job.error.kind is ErrorKind.DEVICE_FAILURE
    assert "stopped 2 worker processes (last: w1 killed by SIGKILL)" in job.error.message
    assert "K5SERVE_WORKER_MAX_DEATHS=2" in job.error.message
    assert manager.queued_count() == 0 and manager.scheduler.running() == {}
    stored = manager.store.get(a.id)
    assert stored.worker_deaths == 2 and stored.status is JobStatus.FAILED


def test_a_cancel_asked_before_the_worker_died_ends_the_job_canceled(manager):
    a = submit(manager)
    manager.next_job(NEVER, worker="w0")
    assert manager.cancel(a.id) is CancelOutcome.REQUESTED
    manager.handle(Lost(a.id, "killed"))
    assert manager.get(a.id).status is JobStatus.CANCELED and manager.queued_count() == 0


def test_the_death_count_survives_a_restart_and_old_records_load(manager, tmp_path):
    a = submit(manager)
    manager.next_job(NEVER, worker="w0")
    manager.handle(Lost(a.id, "killed"))
    assert json.loads(json.dumps(manager.get(a.id).to_dict()))["worker_deaths"] == 1
    assert manager.store.get(a.id).worker_deaths == 1
    old = manager.get(a.id).to_dict()
    del old["worker_deaths"]  # a record written before the field existed
    assert Job.from_dict(old).worker_deaths == 0


def test_manager_refuses_a_death_limit_below_one(tmp_path):
    storage = Storage(tmp_path / "x")
    with pytest.raises(ValueError, match="max_worker_deaths"):
        JobManager(JobStore(storage.database), storage, max_worker_deaths=0)
