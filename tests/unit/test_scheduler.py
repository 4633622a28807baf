"""Unit tests: the scheduler (which job runs next, on which worker; queue positions), alone and
under a JobManager with a real SQLite store and several worker threads."""

from __future__ import annotations

import collections
import threading
import time

import pytest

from pipelines.request import GenerationRequest
from server.events import Interrupted, Succeeded
from server.jobs import JobOutput, JobStatus
from server.manager import JobManager
from server.scheduler import Scheduler
from server.storage import Storage
from server.store import JobStore

OUT = JobOutput("output.mp4", "video/mp4", 4, 64, 64, 5, 24, 2, 7, "kandinsky5-tiny-t2v", True)


def request(prompt: str = "a fox", variant: str = "kandinsky5-tiny-t2v") -> GenerationRequest:
    return GenerationRequest(variant=variant, prompt=prompt, steps=2)


def anything(_job_id: str) -> bool:
    return True


# -- the scheduler alone ----------------------------------------------------------------------------


def test_waiting_jobs_keep_submission_order_and_positions_count_from_zero():
    s = Scheduler()
    for job_id in "abc":
        s.enqueue(job_id)
    assert [s.position(i) for i in "abc"] == [0, 1, 2] and s.count() == 3
    assert s.wait_for(threading.Event(), anything) == "a"
    assert s.position("a") == 0  # wait_for only picks; start takes
    s.start("a", "w1")
    assert s.position("a") is None and [s.position(i) for i in "bc"] == [0, 1]
    assert s.worker_of("a") == "w1" and s.running() == {"a": "w1"}
    assert s.remove("c") and not s.remove("c") and s.waiting() == ("b",)
    assert s.finish("a") == "w1" and s.running() == {} and s.finish("a") is None


def test_an_interrupted_job_goes_back_to_its_submission_place():
    """Ahead of every job queued after it, behind any older one still waiting (several workers)."""
    s = Scheduler()
    for job_id in "abcd":
        s.enqueue(job_id)
    s.start("b", "w1")  # w1 could not run a, took b
    s.start("a", "w2")
    s.enqueue("e")
    s.requeue("b")
    assert s.waiting() == ("b", "c", "d", "e")
    s.requeue("a")
    assert s.waiting() == ("a", "b", "c", "d", "e")
    with pytest.raises(ValueError, match="not running"):
        s.requeue("a")


def test_a_worker_takes_the_oldest_job_it_can_run():
    s = Scheduler()
    for job_id in ("big-1", "small-1", "big-2", "small-2"):
        s.enqueue(job_id)
    small_only = lambda job_id: job_id.startswith("small")  # noqa: E731
    assert s.wait_for(threading.Event(), small_only) == "small-1"
    s.start("small-1", "small-gpu")
    assert s.waiting() == ("big-1", "big-2", "small-2")  # the big ones keep their places
    assert s.wait_for(threading.Event(), anything) == "big-1"


def test_wait_for_blocks_until_a_runnable_job_arrives_or_stop_is_set():
    s = Scheduler()
    stop = threading.Event()
    got = []
    waiter = threading.Thread(target=lambda: got.append(s.wait_for(stop, lambda i: i == "mine", poll=5)))
    waiter.start()
    s.enqueue("other")  # wakes the waiter, which cannot run it and waits again
    time.sleep(0.1)
    assert waiter.is_alive()
    s.enqueue("mine")
    waiter.join(2)
    assert got == ["mine"]

    stopper = threading.Thread(target=lambda: got.append(s.wait_for(stop, lambda i: False, poll=5)))
    stopper.start()
    time.sleep(0.05)
    stop.set()
    s.wake()  # without it the waiter would notice stop only after `poll`
    stopper.join(2)
    assert not stopper.is_alive() and got[-1] is None


def test_can_run_is_asked_again_at_each_poll():
    """A worker that could not run anything finds work once it can (memory freed), without a submit."""
    s = Scheduler()
    s.enqueue("a")
    able = threading.Event()
    started = time.monotonic()
    threading.Timer(0.1, able.set).start()
    assert s.wait_for(threading.Event(), lambda _i: able.is_set(), poll=0.02) == "a"
    assert time.monotonic() - started < 2


def test_scheduling_an_id_twice_or_starting_a_job_that_is_not_waiting_is_refused():
    s = Scheduler()
    s.enqueue("a")
    with pytest.raises(ValueError, match="already scheduled"):
        s.enqueue("a")
    with pytest.raises(ValueError, match="not waiting"):
        s.start("b", "w1")


# -- several workers through the job manager ---------------------------------------------------------


@pytest.fixture
def manager(tmp_path):
    storage = Storage(tmp_path)
    manager = JobManager(JobStore(storage.database), storage, max_queue=1000)
    yield manager
    manager.store.close()


def test_several_workers_never_get_the_same_job(manager):
    jobs = [manager.submit(contract="fal", model="m", request=request(f"job {n}")) for n in range(60)]
    stop = threading.Event()
    taken: dict[str, list[str]] = collections.defaultdict(list)
    barrier = threading.Barrier(6)

    def work(name: str) -> None:
        barrier.wait()  # all ask at once
        while (run := manager.next_job(stop, worker=name, poll=0.01)) is not None:
            taken[name].append(run.job.id)
            assert manager.scheduler.worker_of(run.job.id) == name
            manager.handle(Succeeded(run.job.id, OUT))
            if manager.queued_count() == 0:
                stop.set()
                manager.wake_workers()

    workers = [threading.Thread(target=work, args=(f"w{n}",)) for n in range(6)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(30)
    assert not any(thread.is_alive() for thread in workers)
    everything = [job_id for ids in taken.values() for job_id in ids]
    assert sorted(everything) == sorted(j.id for j in jobs)  # each job exactly once
    assert all(manager.get(j.id).status is JobStatus.SUCCEEDED for j in jobs)
    assert all(ids == sorted(ids, key=[j.id for j in jobs].index) for ids in taken.values())  # oldest first
    assert manager.scheduler.running() == {}


def test_a_worker_takes_the_oldest_job_it_can_run_and_positions_stay_true(manager):
    big = lambda job: job.request.variant == "kandinsky5-pro-t2v"  # noqa: E731
    a = manager.submit(contract="fal", model="m", request=request(variant="kandinsky5-pro-t2v"))
    b = manager.submit(contract="fal", model="m", request=request())
    c = manager.submit(contract="fal", model="m", request=request())
    small = manager.next_job(threading.Event(), can_run=lambda job: not big(job), worker="small")
    assert small.job.id == b.id and manager.get(b.id).status is JobStatus.RUNNING
    assert [manager.queue_position(j.id) for j in (a, b, c)] == [0, None, 1]
    large = manager.next_job(threading.Event(), can_run=big, worker="large")
    assert large.job.id == a.id and manager.queue_position(c.id) == 0
    assert manager.scheduler.running() == {a.id: "large", b.id: "small"}

    manager.handle(Interrupted(b.id))  # shutdown of the small worker: b waits again, ahead of c
    assert [manager.queue_position(j.id) for j in (b, c)] == [0, 1]
    assert manager.scheduler.running() == {a.id: "large"}


def test_a_worker_that_can_run_nothing_waits_and_stops_cleanly(manager):
    manager.submit(contract="fal", model="m", request=request())
    stop = threading.Event()
    got = []
    worker = threading.Thread(target=lambda: got.append(manager.next_job(stop, can_run=lambda job: False)))
    worker.start()
    time.sleep(0.1)
    assert worker.is_alive() and manager.queued_count() == 1
    stop.set()
    manager.wake_workers()
    worker.join(2)
    assert got == [None] and manager.queued_count() == 1
