"""Cancellation in every state, through every contract that has a cancel.

fal: `PUT …/requests/{id}/cancel`. OpenAI Videos: `DELETE /v1/videos/{id}` (deleting an unfinished
video stops it). OneRouter and fal's run host: hanging up on the synchronous call (the job's
error says "client disconnected"). AI/ML API documents no cancel.
What the rest of the suite already covers is not repeated here (test_server_fal: 202/499 shapes;
test_contracts_scenarios: a running job through each contract). These tests pin down the timing
and consistency: a queued job leaves the queue at once, a running one stops at a step boundary
and leaves no file, a cancel racing the end of a run leaves one story, and a repeated cancel gets
the same answer.
"""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from contract_fixtures import threaded_server
from fakes import FakeEngine
from server_fixtures import app_client, wait_until

from server.jobs import CLIENT_DISCONNECTED, JobStatus

T2V = "/fal-ai/kandinsky5/text-to-video"
REQUESTS = "/fal-ai/kandinsky5/requests"


class HoldEngine(FakeEngine):
    """Stops each run at `point` until `go` is set:
    "start"        before the first step (the job is RUNNING, nothing done yet)
    "before-write" after the last step, before any byte of the video is written
    "after-write"  the video is complete on disk, the worker has not reported yet."""

    def __init__(self, point: str = "start", **kwargs):
        super().__init__(**kwargs)
        self.point = point
        self.at = threading.Event()
        self.go = threading.Event()

    def _hold(self) -> None:
        self.at.set()
        assert self.go.wait(10), "the test never released the engine"

    def generate(self, req, output, *, on_step=None, on_phase=None, cancel=None):
        if self.point == "start":
            self._hold()

        def step(i: int, n: int) -> None:
            if on_step is not None:
                on_step(i, n)
            if self.point == "before-write" and i == n:
                self._hold()

        result = super().generate(req, output, on_step=step, on_phase=on_phase, cancel=cancel)
        if self.point == "after-write":
            self._hold()
        return result


def fal_submit(client, prompt: str, steps: int = 2, webhook: str | None = None) -> str:
    params = {"fal_webhook": webhook} if webhook else None
    response = client.post(T2V, json={"prompt": prompt, "num_inference_steps": steps}, params=params)
    assert response.status_code == 200, response.text
    return response.json()["request_id"]


def fal_status(client, rid: str) -> dict:
    return client.get(f"{REQUESTS}/{rid}/status").json()


def fal_cancel(client, rid: str) -> tuple[int, dict]:
    response = client.put(f"{REQUESTS}/{rid}/cancel")
    return response.status_code, response.json()


# -- queued: leaves the queue at once ------------------------------------------------------------------


def test_fal_cancel_of_a_queued_job_takes_effect_before_the_answer(tmp_path):
    engine = HoldEngine("start")
    with app_client(engine, tmp_path) as client:
        running = fal_submit(client, "running")
        assert engine.at.wait(10)
        first, second, third = (fal_submit(client, f"queued {i}") for i in range(3))
        assert [fal_status(client, r)["queue_position"] for r in (first, second, third)] == [0, 1, 2]

        assert fal_cancel(client, second) == (202, {"status": "CANCELLATION_REQUESTED"})
        # no waiting: the answer comes after the job has left the queue and is recorded
        status = fal_status(client, second)
        assert status["status"] == "COMPLETED" and status["error_type"] == "client_cancelled"
        assert fal_status(client, third)["queue_position"] == 1
        assert client.app.state.services.store.get(second).status is JobStatus.CANCELED
        result = client.get(f"{REQUESTS}/{second}")
        assert result.status_code == 499 and result.json() == {
            "detail": "Request cancelled",
            "error_type": "client_cancelled",
        }

        assert fal_cancel(client, second) == (202, {"status": "CANCELLATION_REQUESTED"})  # the same answer
        engine.go.set()
        for rid in (running, first, third):
            wait_until(lambda rid=rid: fal_status(client, rid)["status"] == "COMPLETED", what=rid)
            assert "error" not in fal_status(client, rid)
    assert [r.prompt for r in engine.calls] == ["running", "queued 0", "queued 2"]  # never ran


def test_onerouter_hang_up_while_queued_cancels_before_it_runs(tmp_path):
    engine = HoldEngine("start")
    body = {"model": "kandinsky5-text-to-video", "prompt": "waiting", "num_inference_steps": 2}
    with threaded_server(engine, tmp_path) as server:
        manager = server.services.manager
        url = server.url + "/v1/videos/generations"
        holder = threading.Thread(target=lambda: httpx.post(url, json={**body, "prompt": "first"}, timeout=30))
        holder.start()
        assert engine.at.wait(10)
        with pytest.raises(httpx.ReadTimeout):  # the client gives up while its job is queued
            httpx.post(url, json=body, timeout=httpx.Timeout(30, read=0.5))
        (queued,) = [j for j in manager.list(contract="onerouter") if j.request.prompt == "waiting"]
        wait_until(lambda: manager.get(queued.id).status.terminal, timeout=5, what="the hang-up to cancel")
        assert manager.get(queued.id).status is JobStatus.CANCELED and manager.queued_count() == 0
        assert manager.get(queued.id).error.message == CLIENT_DISCONNECTED
        engine.go.set()
        holder.join(10)
    assert [r.prompt for r in engine.calls] == ["first"]


def test_fal_run_host_hang_up_while_running_cancels_with_the_reason(tmp_path):
    """The run host through the proxy route (`x-fal-target-url: https://fal.run/...`): a caller
    that gives up mid-run stops its job; /api/jobs and fal's status route say why."""
    engine = FakeEngine(step_time=0.1)
    with threaded_server(engine, tmp_path) as server:
        headers = {"x-fal-target-url": f"https://fal.run{T2V}"}
        body = {"prompt": "abandoned", "num_inference_steps": 100}  # 10 s if nobody stops it
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/api/fal/proxy", json=body, headers=headers, timeout=httpx.Timeout(30, read=0.8))
        manager = server.services.manager
        (job,) = manager.list(contract="fal")
        assert job.waits
        wait_until(lambda: manager.get(job.id).status.terminal, timeout=5, what="the hang-up to cancel")
        (listed,) = httpx.get(f"{server.url}/api/jobs").json()["jobs"]
        assert listed["status"] == "canceled" and listed["error"] == CLIENT_DISCONNECTED
        status = httpx.get(f"{server.url}{REQUESTS}/{job.id}/status").json()
        assert status["error"] == CLIENT_DISCONNECTED and status["error_type"] == "client_cancelled"
    assert engine.steps_run[0] < 100


# -- running: stops at the next step, no file --------------------------------------------------------


def test_fal_cancel_of_a_running_job_stops_it_and_keeps_no_file(tmp_path):
    engine = FakeEngine(step_time=0.05)
    with app_client(engine, tmp_path) as client:
        services = client.app.state.services
        rid = fal_submit(client, "long", steps=100)
        wait_until(lambda: services.manager.get(rid).progress is not None, what="a step")
        assert fal_cancel(client, rid) == (202, {"status": "CANCELLATION_REQUESTED"})
        assert fal_cancel(client, rid) == (202, {"status": "CANCELLATION_REQUESTED"})  # still stopping: same
        wait_until(lambda: fal_status(client, rid)["status"] == "COMPLETED", what="the cancel")
        assert fal_status(client, rid)["error_type"] == "client_cancelled"
        assert fal_cancel(client, rid) == (202, {"status": "CANCELLATION_REQUESTED"})  # done: still the same
        job = services.manager.get(rid)
        assert not (services.storage.files / job.file_id).exists()  # no video, not even a .part
        assert job.progress is not None and job.progress[0] < 100
    assert engine.steps_run[0] < 100


def test_fal_cancel_during_the_decode_stops_it_within_a_chunk_and_keeps_no_file(tmp_path):
    """After the last step the decode still honours a cancel: at the next chunk, not at its end."""
    engine = FakeEngine(step_time=0.01, decode_chunks=20, decode_time=0.1)
    with app_client(engine, tmp_path) as client:
        services = client.app.state.services
        rid = fal_submit(client, "decoding", steps=2)
        wait_until(lambda: services.manager.get(rid).phase == "decoding", what="the decode")
        assert fal_cancel(client, rid) == (202, {"status": "CANCELLATION_REQUESTED"})
        wait_until(lambda: fal_status(client, rid)["status"] == "COMPLETED", what="the cancel")
        assert fal_status(client, rid)["error_type"] == "client_cancelled"
        job = services.manager.get(rid)
        assert not (services.storage.files / job.file_id).exists()
        messages = [line.message for line in job.logs]
        assert "decoding 0/20" in messages and "writing" not in messages and "video written" not in messages
    assert engine.steps_run == [2] and engine.chunks_run[0] < 20


def test_openai_delete_of_a_running_video_stops_it_and_keeps_no_file(tmp_path):
    engine = FakeEngine(step_time=0.05)
    with app_client(engine, tmp_path) as client:
        services = client.app.state.services
        vid = client.post("/v1/videos", json={"prompt": "long", "num_inference_steps": 100}).json()["id"]
        wait_until(lambda: services.manager.get(vid).progress is not None, what="a step")
        file_id = services.manager.get(vid).file_id
        assert client.delete(f"/v1/videos/{vid}").json()["deleted"] is True
        assert client.get(f"/v1/videos/{vid}").status_code == 404  # at once
        wait_until(lambda: services.worker.current_job_id is None, what="the run to stop")
        assert not (services.storage.files / file_id).exists()
        assert client.delete(f"/v1/videos/{vid}").status_code == 404  # OpenAI: a deleted video is not found
    assert engine.steps_run[0] < 100


# -- cancel racing the end of a run: one story ----------------------------------------------------------


@pytest.mark.parametrize("point", ["before-write", "after-write"])
def test_cancel_racing_completion_leaves_one_consistent_final_state(tmp_path, loopback, point):
    """The cancel lands after the last step. Before the video is written, the cancel wins; once the
    file is complete, the run has finished and the cancel is too late. Either way the status, the
    result, the webhook and the file agree."""
    engine = HoldEngine(point)
    with app_client(engine, tmp_path, url_allowlist=["127.0.0.1"], webhook_backoff=0.1) as client:
        services = client.app.state.services
        rid = fal_submit(client, "close call", steps=3, webhook=f"{loopback.url}/hook")
        assert engine.at.wait(10)
        assert fal_cancel(client, rid) == (202, {"status": "CANCELLATION_REQUESTED"})
        engine.go.set()
        wait_until(lambda: fal_status(client, rid)["status"] == "COMPLETED", what="the end of the run")
        wait_until(lambda: loopback.ok_deliveries(), what="the webhook")

        status = fal_status(client, rid)
        result = client.get(f"{REQUESTS}/{rid}")
        (hook,) = loopback.ok_deliveries()
        job = services.manager.get(rid)
        folder = services.storage.files / job.file_id
        if point == "before-write":  # the cancel won
            assert job.status is JobStatus.CANCELED and status["error_type"] == "client_cancelled"
            assert result.status_code == 499
            assert hook["status"] == "ERROR" and hook["payload"]["error_type"] == "client_cancelled"
            assert not folder.exists()
            assert fal_cancel(client, rid) == (202, {"status": "CANCELLATION_REQUESTED"})
        else:  # the run had finished: a late cancel changes nothing
            assert job.status is JobStatus.SUCCEEDED and "error" not in status
            assert result.status_code == 200
            assert hook["status"] == "OK" and hook["payload"] == result.json()
            assert client.get(result.json()["video"]["url"]).content == (folder / "output.mp4").read_bytes()
            assert fal_cancel(client, rid) == (400, {"status": "ALREADY_COMPLETED"})
        stored = services.store.get(rid)
        assert (
            stored.status is job.status
            and services.store.webhook(rid).body == json.dumps(hook, sort_keys=True).encode()
        )
    assert len(loopback.ok_deliveries()) == 1
