"""Unit tests: retention (finished jobs expire with their files; unfinished ones and pending
webhooks are kept; the periodic sweep survives a failing round)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from pipelines.request import GenerationRequest
from server.events import Succeeded
from server.jobs import JobOutput, JobStatus
from server.manager import JobManager
from server.retention import Retention
from server.storage import OUTPUT_NAME, Storage
from server.store import JobStore, WebhookBody

REQ = GenerationRequest(variant="kandinsky5-tiny-t2v", prompt="a fox", steps=1)
OUT = JobOutput(OUTPUT_NAME, "video/mp4", 4, 64, 64, 5, 24, 1, 7, "kandinsky5-tiny-t2v", True)
HOUR = 3600.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def manager(tmp_path, clock):
    storage = Storage(tmp_path)
    webhook = lambda job: WebhookBody(job.webhook_url, b"{}", {}) if job.webhook_url else None  # noqa: E731
    manager = JobManager(JobStore(storage.database), storage, clock=clock, webhook_body=webhook)
    yield manager
    manager.store.close()


def finish(manager: JobManager) -> str:
    job = manager.submit(contract="fal", model="m", request=REQ)
    run = manager.next_job(threading.Event(), can_run=lambda j: j.id == job.id)
    manager.storage.output_path(run.job.file_id).write_bytes(b"mp4!")
    manager.handle(Succeeded(job.id, OUT))
    return job.id


def test_finished_jobs_expire_oldest_first_with_their_files_and_nothing_else_does(manager, clock):
    first, second = finish(manager), finish(manager)
    files = [manager.get(i).file_id for i in (first, second)]
    waiting = manager.submit(contract="fal", model="m", request=REQ)  # as old, but not finished
    clock.now += 2 * HOUR
    recent = finish(manager)
    retention = Retention(manager, manager.store, hours=1, clock=clock)
    assert retention.expire() == [first, second]
    assert manager.get(first) is None and manager.store.get(second) is None
    assert not any((manager.storage.files / f).exists() for f in files)
    assert manager.get(recent).status is JobStatus.SUCCEEDED and manager.get(waiting.id) is not None
    assert retention.expire() == []


def test_a_job_whose_webhook_is_still_pending_is_kept_until_its_delivery_ends(manager, clock):
    hooked = manager.submit(contract="fal", model="m", request=REQ, webhook_url="http://127.0.0.1:9/hook")
    manager.cancel(hooked.id)
    clock.now += 2 * HOUR
    retention = Retention(manager, manager.store, hours=1, clock=clock)
    assert retention.expire() == []
    delivery = manager.store.webhook(hooked.id)
    manager.store.webhook_attempted(delivery.id, state="abandoned", next_at=clock.now, error="HTTP 500")
    assert retention.expire() == [hooked.id] and manager.store.webhook(hooked.id) is None


def test_the_sweep_runs_at_start_and_again_after_a_failed_round(manager, clock):
    old = finish(manager)
    clock.now += 2 * HOUR
    failing = {"rounds": 0}

    class Flaky:
        """The manager, whose first listing fails as a locked database would."""

        def list(self):
            failing["rounds"] += 1
            if failing["rounds"] == 1:
                raise RuntimeError("database is locked")
            return manager.list()

        def delete(self, job_id):
            return manager.delete(job_id)

    retention = Retention(Flaky(), manager.store, hours=1, clock=clock)
    retention.interval = 0.01

    async def scenario():
        task = asyncio.create_task(retention.run())
        for _ in range(200):
            if manager.get(old) is None:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert manager.get(old) is None and failing["rounds"] >= 2


@pytest.mark.parametrize("hours", [0, -1])
def test_retention_needs_a_positive_age(manager, hours):
    with pytest.raises(ValueError, match="positive"):
        Retention(manager, manager.store, hours=hours)
