"""Unit tests: the Job state machine, its persistence and the JobManager queue rules."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from typing import ClassVar

import pytest
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from pipelines.request import GenerationRequest
from server.events import Canceled, Failed, Interrupted, Progress, Succeeded
from server.jobs import ErrorKind, InvalidTransition, Job, JobError, JobOutput, JobStatus
from server.manager import CancelOutcome, JobManager, QueueFull
from server.storage import Storage
from server.store import JobStore, WebhookBody

REQ = GenerationRequest(variant="kandinsky5-tiny-t2v", prompt="a fox", steps=2)
OUT = JobOutput("output.mp4", "video/mp4", 123, 64, 64, 5, 24, 2, 7, "kandinsky5-tiny-t2v", True, {"denoise": 0.1})
OOM = JobError(ErrorKind.OUT_OF_MEMORY, "out of memory")


def new_job() -> Job:
    return Job.new(contract="fal", model="fal-ai/kandinsky5/text-to-video", request=REQ, now=100.0)


# -- state machine ------------------------------------------------------------------------------


def test_happy_path_stamps_times_and_counts_attempts():
    job = new_job()
    job.start(now=101.0)
    job.record_progress(1, 2, now=102.0)
    job.succeed(OUT, now=103.0)
    assert job.status is JobStatus.SUCCEEDED and job.status.terminal
    assert (job.created_at, job.started_at, job.completed_at) == (100.0, 101.0, 103.0)
    assert job.attempts == 1 and job.inference_time == 2.0
    assert [line.message for line in job.logs] == ["step 1/2"]


def test_phases_after_the_steps_are_logged_and_keep_the_step_count():
    job = new_job()
    job.start(now=101.0)
    job.record_progress(2, 2)
    for i in range(3):
        job.record_progress(i, 2, phase="decoding")
    job.record_progress(0, 1, phase="writing")
    lines = [line.message for line in job.logs]
    assert lines == ["step 2/2", "decoding 0/2", "decoding 1/2", "decoding 2/2", "writing"]
    assert (job.phase, job.progress, job.phase_progress) == ("writing", (2, 2), (0, 1))
    with pytest.raises(ValueError, match="'uploading'"):
        job.record_progress(0, 1, phase="uploading")
    job.requeue()  # a run that starts again starts from nothing
    assert (job.phase, job.progress, job.phase_progress) == (None, None, None)


def test_percent_steps_fill_0_to_90_the_decode_90_to_99_and_100_once_written():
    job = new_job()
    assert job.percent == 0
    job.start()
    assert job.percent == 0
    seen = []
    for step in range(1, 5):
        job.record_progress(step, 4)
        seen.append(job.percent)
    for chunk in range(4):
        job.record_progress(chunk, 3, phase="decoding")
        seen.append(job.percent)
    job.record_progress(0, 1, phase="writing")
    seen.append(job.percent)
    assert seen == [22, 45, 67, 90, 90, 93, 96, 99, 99]
    job.succeed(OUT)
    assert job.percent == 100


def test_phase_survives_the_record_round_trip():
    job = new_job()
    job.start()
    job.record_progress(3, 3)
    job.record_progress(1, 2, phase="decoding")
    back = Job.from_dict(job.to_dict())
    assert (back.phase, back.progress, back.phase_progress) == ("decoding", (3, 3), (1, 2))


@pytest.mark.parametrize(
    ("setup", "action"),
    [
        ([], lambda j: j.succeed(OUT)),  # cannot succeed without running
        ([], lambda j: j.requeue()),
        ([], lambda j: j.record_progress(1, 2)),
        (["start"], lambda j: j.start()),
        (["start", "succeed"], lambda j: j.fail(OOM)),
        (["start", "succeed"], lambda j: j.cancel()),
        (["cancel"], lambda j: j.start()),
        (["fail"], lambda j: j.requeue()),
    ],
)
def test_illegal_transitions_raise(setup, action):
    job = new_job()
    for step in setup:
        {
            "start": job.start,
            "succeed": lambda: job.succeed(OUT),
            "cancel": job.cancel,
            "fail": lambda: job.fail(OOM),
        }[step]()
    before = job.status
    with pytest.raises(InvalidTransition):
        action(job)
    assert job.status is before


def test_queued_job_can_fail_or_cancel_without_running():
    a, b = new_job(), new_job()
    a.fail(JobError(ErrorKind.INVALID_INPUT, "bad", "prompt", ""))
    b.cancel()
    assert a.status is JobStatus.FAILED and a.started_at is None
    assert b.status is JobStatus.CANCELED and b.error.kind is ErrorKind.CANCELED


def test_requeue_returns_a_running_job_to_the_queue():
    job = new_job()
    job.start()
    job.record_progress(1, 3)
    job.requeue()
    assert job.status is JobStatus.QUEUED and job.progress is None and job.started_at is None
    job.start()
    assert job.attempts == 2


def test_round_trip_through_dict():
    job = new_job()
    job.start(now=101.0)
    job.record_progress(1, 2, now=101.5)
    job.succeed(OUT, now=102.0)
    job.meta["size"] = "64x64"
    again = Job.from_dict(job.to_dict())
    assert again.to_dict() == job.to_dict()
    assert again.request == REQ and again.output == OUT


class JobLifecycle(RuleBasedStateMachine):
    """Any sequence of method calls either follows the documented table or raises and changes nothing."""

    LEGAL: ClassVar[dict[str, set[JobStatus]]] = {
        "start": {JobStatus.QUEUED},
        "succeed": {JobStatus.RUNNING},
        "fail": {JobStatus.QUEUED, JobStatus.RUNNING},
        "cancel": {JobStatus.QUEUED, JobStatus.RUNNING},
        "requeue": {JobStatus.RUNNING},
        "progress": {JobStatus.RUNNING},
    }

    def __init__(self):
        super().__init__()
        self.job = new_job()

    @rule(action=st.sampled_from(sorted(LEGAL)))
    def act(self, action):
        before = self.job.status
        call = {
            "start": self.job.start,
            "succeed": lambda: self.job.succeed(OUT),
            "fail": lambda: self.job.fail(OOM),
            "cancel": self.job.cancel,
            "requeue": self.job.requeue,
            "progress": lambda: self.job.record_progress(1, 2),
        }[action]
        if before in self.LEGAL[action]:
            call()
        else:
            with pytest.raises(InvalidTransition):
                call()
            assert self.job.status is before

    @invariant()
    def terminal_jobs_have_an_end(self):
        if self.job.status.terminal:
            assert self.job.completed_at is not None
        if self.job.status is JobStatus.SUCCEEDED:
            assert self.job.output is not None and self.job.error is None
        if self.job.status in (JobStatus.FAILED, JobStatus.CANCELED):
            assert self.job.error is not None


TestJobLifecycle = JobLifecycle.TestCase
TestJobLifecycle.settings = hsettings(max_examples=60, stateful_step_count=12, deadline=None)


# -- store --------------------------------------------------------------------------------------


def test_store_persists_state_and_webhook_atomically(tmp_path):
    store = JobStore(tmp_path / "db.sqlite3")
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    job = new_job()
    store.save(job)
    job.start()
    job.succeed(OUT)
    store.save(
        job,
        webhook=WebhookBody("http://127.0.0.1:9/hook", b"{}", {"content-type": "application/json"}),
        now=5.0,
    )
    store.close()

    store = JobStore(tmp_path / "db.sqlite3")
    [loaded] = store.load_all()
    assert loaded.status is JobStatus.SUCCEEDED and loaded.output == OUT
    [delivery] = store.due_webhooks(now=10.0)
    assert delivery.job_id == job.id and delivery.body == b"{}" and delivery.attempts == 0
    store.webhook_attempted(delivery.id, state="delivered", next_at=10.0, error=None)
    assert store.due_webhooks(now=100.0) == []
    # a second terminal save never queues a second delivery
    store.save(job, webhook=WebhookBody("http://127.0.0.1:9/hook", b"{}", {}))
    assert store.webhook(job.id).state == "delivered"


# -- manager ------------------------------------------------------------------------------------


@pytest.fixture
def manager(tmp_path):
    storage = Storage(tmp_path)
    return JobManager(JobStore(storage.database), storage, max_queue=3)


def test_fifo_queue_positions_and_cancel_by_state(manager):
    a, b, c = (manager.submit(contract="fal", model="m", request=REQ) for _ in range(3))
    assert [manager.queue_position(j.id) for j in (a, b, c)] == [0, 1, 2]
    with pytest.raises(QueueFull):
        manager.submit(contract="fal", model="m", request=REQ)

    run = manager.next_job(threading.Event())
    assert run.job.id == a.id and manager.get(a.id).status is JobStatus.RUNNING
    assert manager.queue_position(a.id) is None and manager.queue_position(c.id) == 1

    assert manager.cancel(b.id) is CancelOutcome.CANCELED
    assert manager.get(b.id).status is JobStatus.CANCELED and manager.queue_position(c.id) == 0
    assert manager.cancel(a.id) is CancelOutcome.REQUESTED and run.cancel.cancelled
    manager.handle(Canceled(a.id))
    assert manager.cancel(a.id) is CancelOutcome.CANCELED  # a retried cancel: the same answer
    assert manager.cancel(b.id) is CancelOutcome.CANCELED
    manager.next_job(threading.Event())
    manager.handle(Succeeded(c.id, OUT))
    assert manager.cancel(c.id) is CancelOutcome.ALREADY_DONE
    assert manager.cancel("nope") is CancelOutcome.NOT_FOUND


def test_worker_events_drive_the_job(manager):
    job = manager.submit(contract="fal", model="m", request=REQ)
    manager.next_job(threading.Event())
    manager.handle(Progress(job.id, 1, 2))
    assert manager.get(job.id).progress == (1, 2)
    held = manager.get(job.id)
    manager.handle(Progress(job.id, 1, 3, "decoding"))
    assert (manager.get(job.id).phase, manager.get(job.id).phase_progress) == ("decoding", (1, 3))
    assert held.phase == "denoising" and held.phase_progress is None  # a new copy, as for every change
    manager.handle(Succeeded(job.id, OUT))
    assert manager.get(job.id).status is JobStatus.SUCCEEDED


def test_loading_and_encoding_are_recorded_for_watchers_but_not_logged(manager):
    """Issue 17: the engine's phases before the first step move `phase` (a watcher waiting on the
    version wakes) without a log line or a percent: fal's logs and OpenAI's progress stay as they were."""
    job = manager.submit(contract="fal", model="m", request=REQ)
    manager.next_job(threading.Event())
    started = manager.get(job.id)
    seen = []
    for phase in ("loading", "encoding"):
        before = manager.get(job.id).version
        manager.handle(Progress(job.id, 0, 1, phase))
        now = manager.get(job.id)
        assert now.version > before
        seen.append((now.phase, now.progress, now.phase_progress, now.percent, len(now.logs)))
    assert seen == [(p, None, None, 0, len(started.logs)) for p in ("loading", "encoding")]
    manager.handle(Progress(job.id, 1, 2))
    now = manager.get(job.id)
    assert (now.phase, now.progress, now.phase_progress) == ("denoising", (1, 2), None)
    assert [line.message for line in now.logs][len(started.logs) :] == ["step 1/2"]

    other = manager.submit(contract="fal", model="m", request=REQ)
    manager.next_job(threading.Event())
    manager.handle(Failed(other.id, OOM))
    assert manager.get(other.id).error == OOM


def test_interrupted_job_goes_back_to_the_head_of_the_queue(manager):
    a = manager.submit(contract="fal", model="m", request=REQ)
    b = manager.submit(contract="fal", model="m", request=REQ)
    manager.next_job(threading.Event())
    manager.handle(Interrupted(a.id))
    assert manager.queue_position(a.id) == 0 and manager.queue_position(b.id) == 1


def test_pre_failed_submission_is_terminal_and_not_queued(manager):
    err = JobError(ErrorKind.INVALID_INPUT, "prompt must be a non-empty string", "prompt", "")
    job = manager.submit(contract="fal", model="m", request=REQ, error=err)
    assert job.status is JobStatus.FAILED and manager.queued_count() == 0


def test_recover_requeues_running_jobs_in_order(tmp_path):
    storage = Storage(tmp_path)
    first = JobManager(JobStore(storage.database), storage)
    a = first.submit(contract="fal", model="m", request=REQ)
    b = first.submit(contract="fal", model="m", request=REQ)
    done = first.submit(contract="fal", model="m", request=REQ)
    first.next_job(threading.Event())  # a is running when the "crash" happens
    first.store.close()

    second = JobManager(JobStore(storage.database), storage)
    counts = second.recover()
    assert counts["requeued"] == 1 and counts["queued"] == 3
    assert [second.queue_position(j.id) for j in (a, b, done)] == [0, 1, 2]
    assert second.get(a.id).attempts == 1 and "restarted" in second.get(a.id).logs[-1].message


def test_wait_for_change_wakes_on_worker_events(manager):
    async def scenario():
        manager.attach_loop(asyncio.get_running_loop())
        job = manager.submit(contract="fal", model="m", request=REQ)
        waiter = asyncio.create_task(manager.wait_until_done(job.id, timeout=5))

        def work():
            manager.next_job(threading.Event())
            manager.handle(Progress(job.id, 1, 1))
            manager.handle(Succeeded(job.id, OUT))

        await asyncio.to_thread(work)
        done = await waiter
        assert done.status is JobStatus.SUCCEEDED
        # a timeout returns the unchanged job instead of hanging
        same = await manager.wait_for_change(job.id, done.version, timeout=0.05)
        assert same.version == done.version

    asyncio.run(scenario())


def test_a_seedless_request_gets_its_seed_at_submit_and_keeps_it_across_a_restart(tmp_path):
    storage = Storage(tmp_path)
    first = JobManager(JobStore(storage.database), storage)
    seeds = {first.submit(contract="fal", model="m", request=REQ).request.seed for _ in range(8)}
    assert None not in seeds and len(seeds) > 1  # drawn per job, not a constant
    pinned = first.submit(contract="fal", model="m", request=dataclasses.replace(REQ, seed=7))
    assert pinned.request.seed == 7
    run = first.next_job(threading.Event())  # running when the process dies
    first.store.close()

    again = JobManager(JobStore(storage.database), storage)
    again.recover()
    rerun = again.next_job(threading.Event())
    assert rerun.job.id == run.job.id and rerun.job.request.seed == run.job.request.seed
    assert again.get(pinned.id).request.seed == 7


# -- reads never wait for a write ---------------------------------------------------------------


class SlowStore(JobStore):
    """A real JobStore that, once `hold` is set, stops inside its next write transaction (the
    database locked, the manager's lock held by the writer) until `release` is set."""

    def __init__(self, path):
        super().__init__(path)
        self.hold, self.inside, self.release = threading.Event(), threading.Event(), threading.Event()

    def save(self, job, webhook=None, now=None):
        if self.hold.is_set():
            with self._lock:
                self._db.execute("BEGIN IMMEDIATE")
                self.inside.set()
                self.release.wait(30)
                self._db.execute("ROLLBACK")
        super().save(job, webhook, now)


def test_reads_answer_while_the_worker_thread_is_in_the_middle_of_a_sqlite_write(tmp_path):
    storage = Storage(tmp_path)
    store = SlowStore(storage.database)
    manager = JobManager(store, storage)
    failed = manager.submit(contract="fal", model="m", request=REQ)
    manager.next_job(threading.Event())
    manager.handle(Failed(failed.id, OOM))
    running = manager.submit(contract="fal", model="m", request=REQ)
    waiting = manager.submit(contract="fal", model="m", request=REQ)
    manager.next_job(threading.Event())
    manager.handle(Progress(running.id, 1, 2))

    store.hold.set()
    writer = threading.Thread(target=manager.handle, args=(Succeeded(running.id, OUT),))
    writer.start()
    assert store.inside.wait(10)  # the worker thread holds the lock, mid-transaction
    canceler = threading.Thread(target=manager.cancel, args=(waiting.id,))  # a change must wait its turn
    canceler.start()

    seen = {}

    def read():
        seen["get"] = manager.get(running.id)
        seen["position"] = manager.queue_position(waiting.id)
        seen["count"] = manager.queued_count()
        seen["list"] = [j.id for j in manager.list()]
        seen["last_error"] = manager.last_error()
        seen["refusal"] = manager.refusal

        async def waits():
            job = manager.get(running.id)
            changed = await manager.wait_for_change(running.id, job.version, timeout=0.05)
            done = await manager.wait_until_done(running.id, timeout=0.05)
            return changed, done

        seen["waits"] = asyncio.run(waits())

    reader = threading.Thread(target=read)
    reader.start()
    reader.join(5)
    try:
        assert not reader.is_alive(), "a read waited for the write in progress"
        assert writer.is_alive() and canceler.is_alive()  # the write really was still going on
        assert seen["get"].status is JobStatus.RUNNING and seen["get"].progress == (1, 2)  # before the write
        assert (seen["position"], seen["count"]) == (0, 1)
        assert seen["list"] == [waiting.id, running.id, failed.id]
        assert seen["last_error"]["job_id"] == failed.id and seen["refusal"] is None
        assert [j.status for j in seen["waits"]] == [JobStatus.RUNNING, JobStatus.RUNNING]
    finally:
        store.hold.clear()
        store.release.set()
        writer.join(10)
        canceler.join(10)
    assert manager.get(running.id).status is JobStatus.SUCCEEDED
    assert manager.get(waiting.id).status is JobStatus.CANCELED and manager.queued_count() == 0


def test_a_job_in_the_table_is_never_changed_in_place(manager):
    """A reader holding the job as it was (a listener, a request half-way through rendering) keeps
    a consistent view: each change, progress included, replaces the job with a changed copy."""
    job = manager.submit(contract="fal", model="m", request=REQ)
    manager.next_job(threading.Event())
    held = manager._jobs[job.id]
    manager.handle(Progress(job.id, 1, 2))
    assert held.progress is None and held.logs == [] and held.status is JobStatus.RUNNING
    assert manager.get(job.id).progress == (1, 2)
    held = manager._jobs[job.id]
    manager.handle(Succeeded(job.id, OUT))
    assert held.status is JobStatus.RUNNING and held.output is None


def test_a_deleted_run_that_reports_a_step_and_then_finishes_leaves_no_file(manager):
    """Regression: a progress step of a deleted run used to drop the manager's record of the run,
    so its end no longer discarded the finished video (an orphan folder until the next restart)."""
    job = manager.submit(contract="fal", model="m", request=REQ)
    manager.next_job(threading.Event())
    assert manager.delete(job.id)
    manager.handle(Progress(job.id, 1, 2))
    manager.storage.output_path(job.file_id).write_bytes(b"mp4!")
    manager.handle(Succeeded(job.id, OUT))
    assert not (manager.storage.files / job.file_id).exists()
    assert manager.scheduler.running() == {}


def test_an_injected_webhook_body_words_every_finished_job(tmp_path):
    storage = Storage(tmp_path)
    worded = []

    def webhook_body(job):
        worded.append(job.status)
        return WebhookBody(job.webhook_url, job.status.value.encode(), {})

    manager = JobManager(JobStore(storage.database), storage, webhook_body=webhook_body)
    job = manager.submit(contract="openai", model="m", request=REQ, webhook_url="http://127.0.0.1:9/hook")
    manager.cancel(job.id)
    assert worded == [JobStatus.CANCELED] and manager.store.webhook(job.id).body == b"canceled"


def test_each_run_gets_a_token_from_the_injected_cancel_switch(tmp_path):
    """Cancellation is an interface: a worker in another process gets a token that crosses there."""
    from pipelines.cancel import ProcessCancelToken

    storage = Storage(tmp_path)
    manager = JobManager(JobStore(storage.database), storage, cancel_switch=ProcessCancelToken)
    job = manager.submit(contract="fal", model="m", request=REQ)
    run = manager.next_job(threading.Event())
    assert isinstance(run.cancel, ProcessCancelToken) and not run.cancel.cancelled
    assert manager.cancel(job.id) is CancelOutcome.REQUESTED
    assert run.cancel.cancelled
    manager.store.close()
