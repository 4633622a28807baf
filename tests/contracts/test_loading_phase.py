"""Issue 17: the engine reports "loading" and "encoding" before a job's first step; the studio's
/api/jobs shows them, and every contract renders them exactly as it rendered a running job before
its first step (no fal log line, AI/ML API's `phase` null, OpenAI's progress 0, OneRouter still
holding its connection). The fake engine stops at its "load" and "encode" pause points, so each
contract's wire is read while the job is in that phase, not guessed with sleeps."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import fakes
import pytest
from server_fixtures import app_client, wait_until

from server.api import aimlapi, openai

BEFORE_STEPS = (("loading", "load"), ("encoding", "encode"))


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pauses")
    engine = fakes.FakeEngine(pause_at=("load", "encode"), pause_dir=folder)
    with app_client(engine, tmp_path_factory.mktemp("data")) as client:
        yield client, folder
        (folder / "release").touch()  # nothing left waiting at shutdown, whatever failed


def in_each_phase(client, folder: Path, job_id: str, read) -> list:
    """`read()` while the job stops in loading, then in encoding (each checked on /api/jobs too);
    then let it run to the end."""
    seen = []
    for phase, point in BEFORE_STEPS:
        wait_until(lambda p=point: (folder / f"paused-{p}").exists(), what=f"the {point} pause")
        native = client.get(f"/api/jobs/{job_id}").json()
        assert (native["status"], native["phase"], native["progress"], native["percent"]) == ("running", phase, None, 0)
        seen.append(read())
        (folder / f"release-{point}").touch()
    wait_until(lambda: client.get(f"/api/jobs/{job_id}").json()["status"] == "succeeded", what="the video")
    return seen


def services(client):
    return client.app.state.services


def test_fal_status_and_logs_are_as_before_the_first_step(app):
    client, folder = app
    rid = client.post("/fal-ai/kandinsky5/text-to-video", json={"prompt": "x", "num_inference_steps": 2}).json()
    rid = rid["request_id"]
    url = f"/fal-ai/kandinsky5/requests/{rid}/status?logs=1"
    seen = in_each_phase(client, folder, rid, lambda: client.get(url).json())
    for body in seen:
        assert body["status"] == "IN_PROGRESS" and body["logs"] == [] and body["metrics"] == {}
    logs = [line["message"] for line in client.get(url).json()["logs"]]
    assert logs[0] == "step 1/2"  # nothing about loading or encoding before it


def test_openai_video_is_as_before_the_first_step(app):
    client, folder = app
    vid = client.post("/v1/videos", json={"prompt": "x", "num_inference_steps": 2}).json()["id"]
    manager = services(client).manager

    def read() -> tuple[dict, dict]:
        job = manager.get(vid)
        return client.get(f"/v1/videos/{vid}").json(), openai.video_object(dataclasses.replace(job, phase=None))

    for wire, without_phase in in_each_phase(client, folder, vid, read):
        assert wire == without_phase and (wire["status"], wire["progress"]) == ("in_progress", 0)


def test_aimlapi_phase_stays_null_and_the_body_as_without_a_phase(app):
    """The whole poll body, not just `phase`: what a job with no phase yet rendered."""
    client, folder = app
    body = {"model": "sber-ai/kandinsky5-t2v", "prompt": "x", "num_inference_steps": 2}
    gid = client.post("/v2/video/generations", json=body).json()["id"]
    job_id, manager = gid.split(":")[0], services(client).manager
    base = "http://testserver"

    def read() -> tuple[dict, dict]:
        job = manager.get(job_id)
        wire = client.get("/v2/video/generations", params={"generation_id": gid}).json()
        return wire, aimlapi.poll_body(dataclasses.replace(job, phase=None), base)

    for wire, without_phase in in_each_phase(client, folder, job_id, read):
        assert wire == without_phase and (wire["status"], wire["phase"]) == ("generating", None)


def test_onerouter_holds_its_connection_through_loading_and_encoding(app):
    client, folder = app
    answer: dict = {}
    body = {"model": "kandinsky5-text-to-video", "prompt": "x", "num_inference_steps": 2}
    call = threading.Thread(target=lambda: answer.update(r=client.post("/v1/videos/generations", json=body)))
    call.start()
    jobs = wait_until(lambda: [j for j in client.get("/api/jobs").json()["jobs"] if j["contract"] == "onerouter"])
    seen = in_each_phase(client, folder, jobs[0]["id"], lambda: "r" in answer)
    call.join(10)
    assert seen == [False, False]  # no early answer while loading or encoding
    assert answer["r"].status_code == 200 and answer["r"].json()["data"][0]["url"].endswith(".mp4")
