"""Property test: the job queue (JobManager over a real SQLite JobStore in a temp dir) against a
plain model, under random submit / cancel / take / progress / complete / fail / interrupt /
delete / crash sequences. A crash closes the store mid-whatever and a new manager recovers.

Invariants after every step: queued jobs run in submission order (FIFO), no accepted job is lost,
a terminal state never changes, a submit is refused once max_queue jobs wait (only the worker's
own interrupted job can come back on top), memory and disk agree, and a finished job's file
exists exactly as long as its record does.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pipelines.request import GenerationRequest
from server.events import Canceled, Failed, Interrupted, Progress, RunJob, Succeeded
from server.jobs import ErrorKind, JobError, JobOutput, JobStatus
from server.manager import CancelOutcome, JobManager, QueueFull
from server.storage import OUTPUT_NAME, Storage
from server.store import JobStore

MAX_QUEUE = 4
REQ = GenerationRequest(variant="kandinsky5-tiny-t2v", prompt="a fox", steps=3)
OUT = JobOutput(OUTPUT_NAME, "video/mp4", 4, 64, 64, 5, 24, 3, 7, "kandinsky5-tiny-t2v", True)
BAD = JobError(ErrorKind.INVALID_INPUT, "prompt must not be empty", "prompt", "")

EXPECTED_CANCEL = {
    JobStatus.QUEUED: CancelOutcome.CANCELED,
    JobStatus.RUNNING: CancelOutcome.REQUESTED,
    JobStatus.CANCELED: CancelOutcome.CANCELED,
    JobStatus.SUCCEEDED: CancelOutcome.ALREADY_DONE,
    JobStatus.FAILED: CancelOutcome.ALREADY_DONE,
}


class QueueMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="k5queue-"))
        self.manager = self._open()
        self.status: dict[str, JobStatus] = {}  # the model: every job that exists
        self.order: list[str] = []  # submission order
        self.queue: list[str] = []
        self.run: RunJob | None = None  # the one worker's current job
        self.orphan_run = False  # the running job was deleted; the worker has not reported yet
        self.deleted: set[str] = set()
        self.file_ids: dict[str, str] = {}
        self.first_end: dict[str, JobStatus] = {}  # the terminal state each job reached first

    def _open(self) -> JobManager:
        storage = Storage(self.dir)
        manager = JobManager(JobStore(storage.database), storage, max_queue=MAX_QUEUE)
        manager.recover()
        return manager

    def teardown(self):
        self.manager.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _pick(self, data, pool) -> str:
        # by submission order, not by id: ids are random, and a replay must pick the same job
        return data.draw(st.sampled_from([job_id for job_id in self.order if job_id in pool]))

    # -- contract side ---------------------------------------------------------------------------

    @rule()
    def submit(self):
        if len(self.queue) >= MAX_QUEUE:
            try:
                self.manager.submit(contract="fal", model="m", request=REQ)
            except QueueFull:
                return
            raise AssertionError("a submit beyond max_queue was accepted")
        job = self.manager.submit(contract="fal", model="m", request=REQ)
        assert job.status is JobStatus.QUEUED
        self.status[job.id] = JobStatus.QUEUED
        self.order.append(job.id)
        self.queue.append(job.id)
        self.file_ids[job.id] = job.file_id

    @rule()
    def submit_rejected_input(self):
        job = self.manager.submit(contract="fal", model="m", request=REQ, error=BAD)
        self.status[job.id] = JobStatus.FAILED
        self.order.append(job.id)
        self.file_ids[job.id] = job.file_id

    @precondition(lambda self: self.status or self.deleted)
    @rule(data=st.data())
    def cancel(self, data):
        job_id = self._pick(data, set(self.status) | self.deleted)
        outcome = self.manager.cancel(job_id)
        if job_id in self.deleted:
            assert outcome is CancelOutcome.NOT_FOUND
            return
        assert outcome is EXPECTED_CANCEL[self.status[job_id]]
        if self.status[job_id] is JobStatus.QUEUED:
            self.status[job_id] = JobStatus.CANCELED
            self.queue.remove(job_id)

    @precondition(lambda self: self.status)
    @rule(data=st.data())
    def delete(self, data):
        job_id = self._pick(data, self.status)
        assert self.manager.delete(job_id)
        assert not self.manager.delete(job_id)
        if self.status.pop(job_id) is JobStatus.RUNNING:
            self.orphan_run = True
        if job_id in self.queue:
            self.queue.remove(job_id)
        self.deleted.add(job_id)

    # -- worker side ---------------------------------------------------------------------------------

    @precondition(lambda self: self.run is None and self.queue)
    @rule()
    def take(self):
        self.run = self.manager.next_job(threading.Event())
        assert self.run is not None and self.run.job.id == self.queue.pop(0)  # FIFO
        self.status[self.run.job.id] = JobStatus.RUNNING

    @precondition(lambda self: self.run is not None)
    @rule(step=st.integers(1, 3))
    def progress(self, step):
        self.manager.handle(Progress(self.run.job.id, step, 3))

    @precondition(lambda self: self.run is not None)
    @rule(how=st.sampled_from(["succeed", "fail", "stop", "interrupt"]))
    def finish(self, how):
        """The run ends; a canceled token makes a real worker report Canceled, unless it had
        already finished (then Succeeded/Failed win: a late cancel changes nothing)."""
        job_id = self.run.job.id
        if how == "stop" and not self.run.cancel.cancelled:
            how = "succeed"
        if how == "succeed":
            path = self.manager.storage.output_path(self.run.job.file_id)
            path.write_bytes(b"mp4!")
            event, final = Succeeded(job_id, OUT), JobStatus.SUCCEEDED
        elif how == "fail":
            event, final = Failed(job_id, JobError(ErrorKind.OUT_OF_MEMORY, "oom")), JobStatus.FAILED
        elif how == "stop":
            event, final = Canceled(job_id), JobStatus.CANCELED
        else:
            event, final = Interrupted(job_id), JobStatus.QUEUED
        self.manager.handle(event)
        self.run = None
        if self.orphan_run:  # deleted while running: the end is not recorded, the file not kept
            self.orphan_run = False
            assert not (self.manager.storage.files / self.file_ids[job_id]).exists()
            return
        self.status[job_id] = final
        if final is JobStatus.QUEUED:
            self.queue.insert(0, job_id)

    # -- the process dies ----------------------------------------------------------------------------

    @rule()
    def crash(self):
        """kill -9: nothing in memory survives; a new manager loads the store. The job that was
        running goes back to the queue ahead of the others (it was submitted before them)."""
        self.manager.store.close()
        self.manager = self._open()
        if self.run is not None and not self.orphan_run:
            job_id = self.run.job.id
            self.status[job_id] = JobStatus.QUEUED
            self.queue.insert(0, job_id)
        self.run, self.orphan_run = None, False

    # -- invariants ------------------------------------------------------------------------------------

    @invariant()
    def terminal_states_never_change(self):
        for job_id, status in self.status.items():
            if status.terminal:
                self.first_end.setdefault(job_id, status)
                assert self.manager.get(job_id).status is self.first_end[job_id]

    @invariant()
    def fifo_and_bounded(self):
        positions = [self.manager.queue_position(job_id) for job_id in self.queue]
        assert positions == list(range(len(self.queue)))
        # admission stops at MAX_QUEUE; the one job a worker was running may come back on top of
        # that (interrupted, or after a crash): accepted work is never dropped to honour the limit
        assert self.manager.queued_count() == len(self.queue) <= MAX_QUEUE + 1
        assert self.queue == sorted(self.queue, key=self.order.index)  # submission order

    @invariant()
    def nothing_lost_and_memory_matches_disk(self):
        in_memory = {job.id: job.status for job in self.manager.list()}
        on_disk = {job.id: job.status for job in self.manager.store.load_all()}
        assert in_memory == self.status
        assert on_disk == self.status
        assert [job.id for job in self.manager.store.load_all()] == [i for i in self.order if i in self.status]

    @invariant()
    def files_live_exactly_as_long_as_finished_records(self):
        for job_id, status in self.status.items():
            has_file = self.manager.storage.has_output(self.file_ids[job_id])
            if status is JobStatus.SUCCEEDED:
                assert has_file
            elif status is not JobStatus.RUNNING:
                assert not has_file
        for job_id in self.deleted:
            if self.run is None or self.run.job.id != job_id:
                assert not (self.manager.storage.files / self.file_ids[job_id]).exists()


TestQueueMachine = QueueMachine.TestCase
TestQueueMachine.settings = settings(
    max_examples=50, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
