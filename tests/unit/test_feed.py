"""Unit tests: the change feed (listeners, delete listeners, coroutines waiting for a change)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

from pipelines.request import GenerationRequest
from server.feed import ChangeFeed
from server.jobs import Job, JobStatus

REQ = GenerationRequest(variant="kandinsky5-tiny-t2v", prompt="a fox", steps=2)


class Table:
    """The reader the feed's waiters use: a dict of jobs, changed from any thread."""

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def add(self) -> Job:
        job = Job.new(contract="fal", model="m", request=REQ, now=1.0)
        self.jobs[job.id] = job
        return job

    def change(self, feed: ChangeFeed, job: Job) -> Job:
        new = dataclasses.replace(job.snapshot(), version=job.version + 1)
        self.jobs[job.id] = new
        feed.changed(new, job.status)
        return new


def new_job() -> Job:
    return Job.new(contract="fal", model="m", request=REQ, now=1.0)


def test_listeners_hear_every_change_in_order_with_a_copy_and_a_broken_one_is_skipped():
    feed = ChangeFeed()
    heard: list[tuple[str, JobStatus | None]] = []

    def broken(job, previous):
        raise RuntimeError("observer bug")

    def keep(job, previous):
        heard.append((job.status.value, previous))
        job.meta["touched"] = True  # a listener's copy: the published job is not affected

    feed.add_listener(broken)
    feed.add_listener(keep)
    job = new_job()
    feed.changed(job, None)
    job.start()
    feed.changed(job, JobStatus.QUEUED)
    assert heard == [("queued", None), ("running", JobStatus.QUEUED)]
    assert job.meta == {}


def test_delete_listeners_hear_the_id_and_a_broken_one_is_skipped():
    feed = ChangeFeed()
    gone = []
    feed.add_delete_listener(lambda job_id: 1 / 0)
    feed.add_delete_listener(gone.append)
    feed.deleted("j1")
    assert gone == ["j1"]


def test_a_waiter_wakes_when_another_thread_changes_the_job():
    async def scenario():
        feed, table = ChangeFeed(), Table()
        feed.attach_loop(asyncio.get_running_loop())
        job = table.add()
        waiter = asyncio.create_task(feed.wait_for_change(table.get, job.id, job.version, timeout=5))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        changer = threading.Thread(target=table.change, args=(feed, job))
        changer.start()
        changed = await asyncio.wait_for(waiter, 2)
        changer.join()
        assert changed.version == job.version + 1

    asyncio.run(scenario())


def test_waiting_returns_at_once_for_a_stale_version_a_gone_job_or_a_timeout():
    async def scenario():
        feed, table = ChangeFeed(), Table()
        feed.attach_loop(asyncio.get_running_loop())
        job = table.add()
        assert (await feed.wait_for_change(table.get, job.id, job.version - 1)) is job  # already newer
        assert (await feed.wait_for_change(table.get, "nope", 0)) is None
        assert (await feed.wait_for_change(table.get, job.id, job.version, timeout=0.02)) is job
        assert (await feed.wait_until_done(table.get, job.id, timeout=0.02)).status is JobStatus.QUEUED

    asyncio.run(scenario())


def test_wait_until_done_follows_changes_to_the_end_and_a_delete_ends_it():
    async def scenario():
        feed, table = ChangeFeed(), Table()
        feed.attach_loop(asyncio.get_running_loop())
        job = table.add()
        done = asyncio.create_task(feed.wait_until_done(table.get, job.id, timeout=5))

        def run() -> None:
            running = job.snapshot()
            running.start()
            table.jobs[job.id] = running
            feed.changed(running, JobStatus.QUEUED)
            finished = running.snapshot()
            finished.cancel()
            table.jobs[job.id] = finished
            feed.changed(finished, JobStatus.RUNNING)

        await asyncio.to_thread(run)
        assert (await asyncio.wait_for(done, 2)).status is JobStatus.CANCELED

        other = table.add()
        gone = asyncio.create_task(feed.wait_until_done(table.get, other.id, timeout=5))
        await asyncio.sleep(0.01)
        del table.jobs[other.id]
        await asyncio.to_thread(feed.deleted, other.id)
        assert (await asyncio.wait_for(gone, 2)) is None

    asyncio.run(scenario())


def test_changes_after_the_loop_closed_are_ignored():
    feed = ChangeFeed()
    loop = asyncio.new_event_loop()
    feed.attach_loop(loop)
    loop.close()
    feed.changed(new_job(), None)  # shutdown: nothing to wake, nothing raised
    feed.wake("j")
