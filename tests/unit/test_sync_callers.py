"""Unit tests: jobs whose caller holds the connection (`Job.waits`: OneRouter, fal's run host).

A hang-up cancels such a job with the reason recorded; a restart cancels it instead of running it
again (nobody is left to fetch the result), while every other interrupted job runs again.
"""

from __future__ import annotations

import threading

import pytest

from pipelines.request import GenerationRequest
from server.events import Canceled
from server.jobs import (
    CANCELLED_BY_CLIENT,
    CLIENT_DISCONNECTED,
    RESTARTED_WHILE_WAITING,
    ErrorKind,
    Job,
    JobStatus,
)
from server.manager import CancelOutcome, JobManager
from server.storage import Storage
from server.store import JobStore

REQ = GenerationRequest(variant="kandinsky5-tiny-t2v", prompt="a fox", steps=2)


@pytest.fixture
def storage(tmp_path) -> Storage:
    return Storage(tmp_path)


def manager_on(storage: Storage) -> JobManager:
    return JobManager(JobStore(storage.database), storage)


def test_waits_is_stored_with_the_job_and_old_records_read_as_not_waiting():
    job = Job.new(contract="onerouter", model="kandinsky5", request=REQ, waits=True)
    assert Job.from_dict(job.to_dict()).waits is True
    old = job.to_dict()
    del old["waits"]  # a record written before the field existed
    assert Job.from_dict(old).waits is False


def test_recover_cancels_waiting_jobs_and_reruns_the_others(storage):
    first = manager_on(storage)
    sync_running = first.submit(contract="onerouter", model="m", request=REQ, waits=True)
    queue_running = first.submit(contract="fal", model="m", request=REQ)
    sync_queued = first.submit(contract="fal", model="m", request=REQ, waits=True)  # fal's run host
    queue_queued = first.submit(contract="aimlapi", model="m", request=REQ)
    first.next_job(threading.Event(), worker="gpu0")
    first.next_job(threading.Event(), worker="gpu1")  # both running when the process dies
    first.store.close()

    second = manager_on(storage)
    counts = second.recover()
    assert counts == {"caller_gone": 2, "canceled": 2, "requeued": 1, "queued": 2}
    for job_id, attempts in ((sync_running.id, 1), (sync_queued.id, 0)):
        job = second.get(job_id)
        assert job.status is JobStatus.CANCELED and job.attempts == attempts  # not started again
        assert job.error.kind is ErrorKind.CANCELED and job.error.message == RESTARTED_WHILE_WAITING
        assert job.logs[-1].level == "WARN" and RESTARTED_WHILE_WAITING in job.logs[-1].message
        assert second.queue_position(job_id) is None
    assert [second.queue_position(j.id) for j in (queue_running, queue_queued)] == [0, 1]
    run = second.next_job(threading.Event())
    assert run.job.id == queue_running.id and run.job.attempts == 2
    second.store.close()

    third = manager_on(storage)  # the cancel was written to disk, not only made in memory
    third.recover()
    assert third.get(sync_running.id).status is JobStatus.CANCELED
    assert third.get(sync_running.id).error.message == RESTARTED_WHILE_WAITING


def test_a_finished_waiting_job_is_left_alone_by_recovery(storage):
    first = manager_on(storage)
    job = first.submit(contract="onerouter", model="m", request=REQ, waits=True)
    first.next_job(threading.Event())
    first.handle(Canceled(job.id))
    first.store.close()
    second = manager_on(storage)
    assert second.recover() == {"canceled": 1}
    assert second.get(job.id).error.message == CANCELLED_BY_CLIENT


def test_cancel_records_its_reason_queued_or_running(storage):
    manager = manager_on(storage)
    running = manager.submit(contract="onerouter", model="m", request=REQ, waits=True)
    queued = manager.submit(contract="onerouter", model="m", request=REQ, waits=True)
    other = manager.submit(contract="fal", model="m", request=REQ)
    manager.next_job(threading.Event())

    assert manager.cancel(queued.id, CLIENT_DISCONNECTED) is CancelOutcome.CANCELED
    assert manager.get(queued.id).error.message == CLIENT_DISCONNECTED

    assert manager.cancel(running.id, CLIENT_DISCONNECTED) is CancelOutcome.REQUESTED
    assert manager.cancel(running.id) is CancelOutcome.REQUESTED  # a later cancel: the first reason stays
    manager.handle(Canceled(running.id))  # the worker stopped at a step
    assert manager.get(running.id).error.message == CLIENT_DISCONNECTED

    assert manager.cancel(other.id) is CancelOutcome.CANCELED
    assert manager.get(other.id).error.message == CANCELLED_BY_CLIENT  # the default, as before
