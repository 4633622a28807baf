"""Durability: `kill -9` with jobs finished, running and queued; the restarted server finishes all
of them and still serves every earlier result URL, byte for byte.

The crash tests kill at deterministic points: the child's fake engine (fakes.engine_from_env)
stops at a named point and touches `paused-<point>` in a pause folder, and the test kills it
there: right after a submit is on disk but before the client hears back, mid-generation,
mid-file-write, and mid-webhook-delivery (the receiver holds the POST). After each: the store
passes `PRAGMA integrity_check`, every accepted job is present, interrupted ones run again, no
partial file is served, and the webhook arrives (at least once). Except jobs whose caller waited on
the connection (OneRouter, fal's run host): that caller died with the process, so they are
cancelled with the reason instead of run for nobody.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from pathlib import Path

import httpx
import pytest
from server_fixtures import ServerProcess, server_process, wait_until

from server.jobs import RESTARTED_WHILE_WAITING

T2V = "fal-ai/kandinsky5/text-to-video"

pytestmark = pytest.mark.slow


def test_kill_9_loses_nothing(tmp_path, tls_files):
    server = server_process(tmp_path, fake=True, tls=tls_files, run_port=False, env={"K5SERVE_FAKE_STEP_TIME": "0.1"})
    server.start()
    try:
        with server.client() as client:

            def submit(prompt, steps):
                body = {"prompt": prompt, "num_inference_steps": steps}
                return client.post(f"/{T2V}", json=body).json()["request_id"]

            def status(rid):
                return client.get(f"/fal-ai/kandinsky5/requests/{rid}/status", params={"logs": 1}).json()

            finished = [submit(f"finished {i}", 1) for i in range(2)]
            for rid in finished:
                wait_until(lambda rid=rid: status(rid)["status"] == "COMPLETED", what="finished jobs")
            urls = {rid: client.get(f"/fal-ai/kandinsky5/requests/{rid}").json()["video"]["url"] for rid in finished}
            before = {rid: client.get(url).content for rid, url in urls.items()}

            running = submit("running", 40)
            queued = [submit(f"queued {i}", 2) for i in range(3)]
            wait_until(
                lambda: status(running)["status"] == "IN_PROGRESS" and status(running)["logs"],
                what="the running job to make progress",
            )
            assert [status(rid)["queue_position"] for rid in queued] == [0, 1, 2]

        server.kill9()
        server.start()

        with server.client() as client:
            for rid in [running, *queued]:
                wait_until(
                    lambda rid=rid: status_after(client, rid)["status"] == "COMPLETED",
                    timeout=20,
                    what=f"{rid} to finish after the restart",
                )
                res = client.get(f"/fal-ai/kandinsky5/requests/{rid}")
                assert res.status_code == 200, res.text
                assert client.get(res.json()["video"]["url"]).content  # its file exists
            logs = [entry["message"] for entry in status_after(client, running)["logs"]]
            assert any("restarted" in m for m in logs) and "step 40/40" in logs
            for rid, url in urls.items():
                assert client.get(f"/fal-ai/kandinsky5/requests/{rid}").json()["video"]["url"] == url
                assert client.get(url).content == before[rid]
    finally:
        server.stop()
    leftovers = [p for p in (tmp_path / "data" / "files").rglob("*") if p.name.endswith(".part")]
    assert leftovers == []


def status_after(client: httpx.Client, rid: str) -> dict:
    return client.get(f"/fal-ai/kandinsky5/requests/{rid}/status", params={"logs": "true"}).json()


def test_graceful_stop_requeues_the_running_job(tmp_path):
    server = server_process(tmp_path, fake=True, run_port=False, env={"K5SERVE_FAKE_STEP_TIME": "0.1"})
    server.start()
    try:
        with server.client() as client:
            rid = client.post(f"/{T2V}", json={"prompt": "long", "num_inference_steps": 100}).json()["request_id"]
            wait_until(lambda: status_after(client, rid)["status"] == "IN_PROGRESS", what="running")
        server.stop()  # SIGTERM: the run is interrupted at a step and goes back to the queue
        # uvicorn re-raises the SIGTERM it handled, after a clean shutdown
        assert server.proc.returncode in (0, -15) and "Finished server process" in server.log_tail(), server.log_tail()
        server.start()
        with server.client() as client:
            wait_until(lambda: status_after(client, rid)["status"] == "COMPLETED", timeout=30, what="rerun")
            assert client.get(f"/fal-ai/kandinsky5/requests/{rid}").status_code == 200
    finally:
        server.stop()


# -- kill -9 at deterministic points -----------------------------------------------------------------

FAKE_HEAD = b"\x00\x00\x00\x18ftypmp42FAKE"  # what fakes.fake_video_bytes starts with


def crash_server(tmp_path: Path, run_port: bool = False, **env: str) -> tuple[ServerProcess, Path]:
    pause = tmp_path / "pause"
    pause.mkdir()
    base = {
        "K5SERVE_FAKE_PAUSE_DIR": str(pause),
        "K5SERVE_FAKE_STEP_TIME": "0.01",
        "K5SERVE_URL_ALLOWLIST": "127.0.0.1",  # the webhook receiver is on loopback
        "K5SERVE_WEBHOOK_BACKOFF": "0.1",
    }
    return server_process(tmp_path, fake=True, run_port=run_port, env={**base, **env}), pause


def kill_at(server: ServerProcess, pause: Path, point: str) -> None:
    """Wait until the child reports `point`, kill -9 it, and check the store file is sound."""
    wait_until(lambda: (pause / f"paused-{point}").exists(), timeout=20, what=f"the child to reach {point}")
    server.kill9()
    assert integrity(server) == "ok"
    (pause / "release").touch()  # the restarted child passes every pause point


def integrity(server: ServerProcess) -> str:
    db = sqlite3.connect(server.log_path.parent / "data" / "jobs.sqlite3")
    try:
        return db.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        db.close()


def complete_video(data: bytes) -> bool:
    """A whole fake video: the header and then one 64-hex digest, exactly 8 times."""
    body = data[len(FAKE_HEAD) :]
    return data.startswith(FAKE_HEAD) and len(body) == 8 * 64 and body == body[:64] * 8


def wait_completed(client: httpx.Client, rid: str) -> dict:
    wait_until(lambda: status_after(client, rid)["status"] == "COMPLETED", timeout=30, what=f"{rid} to complete")
    return client.get(f"/fal-ai/kandinsky5/requests/{rid}").json()


def part_files(tmp_path: Path) -> list[Path]:
    return [p for p in (tmp_path / "data" / "files").rglob("*") if p.name.endswith(".part")]


@pytest.mark.parametrize("point", ["step", "write"])
def test_kill_9_mid_generation_or_mid_write_reruns_the_job(tmp_path, point):
    server, pause = crash_server(tmp_path, K5SERVE_FAKE_PAUSE_AT=point, K5SERVE_FAKE_PAUSE_CALLS="2")
    server.start()
    try:
        with server.client() as client:
            done = client.post(f"/{T2V}", json={"prompt": "before", "num_inference_steps": 2}).json()["request_id"]
            url = wait_completed(client, done)["video"]["url"]
            before = client.get(url).content
            body = {"prompt": "interrupted", "num_inference_steps": 4}
            victim = client.post(f"/{T2V}", json=body).json()["request_id"]  # the 2nd call: it pauses
            queued = client.post(f"/{T2V}", json={"prompt": "behind", "num_inference_steps": 2}).json()["request_id"]
        kill_at(server, pause, point)
        if point == "write":
            assert [p.stat().st_size for p in part_files(tmp_path)] != []  # killed with half a file on disk

        server.start()
        with server.client() as client:
            for rid in (victim, queued):
                video = wait_completed(client, rid)["video"]
                data = client.get(video["url"]).content
                assert complete_video(data) and len(data) == video["file_size"]
            logs = [e["message"] for e in status_after(client, victim)["logs"]]
            assert any("restarted" in m for m in logs) and "step 4/4" in logs
            assert client.get(url).content == before  # earlier results untouched
            assert part_files(tmp_path) == []
    finally:
        server.stop()
    assert integrity(server) == "ok"


def test_kill_9_after_a_submit_is_stored_but_before_the_answer(tmp_path):
    """The client never heard back, yet the job was accepted on disk: it is there after the restart
    and runs (at-least-once; nothing half-written). Jobs answered before the crash are all there."""
    server, pause = crash_server(tmp_path)
    server.start()
    try:
        with server.client() as client:
            answered = [
                client.post("/v1/videos", json={"prompt": f"answered {i}", "num_inference_steps": 2}).json()["id"]
                for i in range(3)
            ]
            (pause / "arm-submit").touch()
            outcome: list[object] = []

            def submit() -> None:
                try:
                    outcome.append(client.post("/v1/videos", json={"prompt": "unanswered", "num_inference_steps": 2}))
                except httpx.HTTPError as exc:
                    outcome.append(exc)

            sender = threading.Thread(target=submit)
            sender.start()
            kill_at(server, pause, "submit")
            sender.join(30)
            assert isinstance(outcome[0], httpx.HTTPError)  # the connection died without an answer
        (pause / "arm-submit").unlink()

        server.start()
        with server.client() as client:
            listed = {v["id"]: v for v in client.get("/v1/videos", params={"limit": 100}).json()["data"]}
            assert set(answered) <= set(listed)
            (unanswered,) = [vid for vid, v in listed.items() if v["prompt"] == "unanswered"]
            for vid in [*answered, unanswered]:
                wait_until(
                    lambda vid=vid: client.get(f"/v1/videos/{vid}").json()["status"] == "completed",
                    timeout=30,
                    what=f"{vid} to complete",
                )
                assert complete_video(client.get(f"/v1/videos/{vid}/content").content)
    finally:
        server.stop()
    assert integrity(server) == "ok"


def test_kill_9_mid_webhook_delivery_delivers_it_after_the_restart(tmp_path, loopback):
    server, _pause = crash_server(tmp_path)
    loopback.hold = True
    server.start()
    try:
        with server.client() as client:
            hook = f"{loopback.url}/hook"
            rid = client.post(f"/{T2V}", params={"fal_webhook": hook}, json={"prompt": "x"}).json()["request_id"]
            assert loopback.holding.wait(30), server.log_tail()  # the POST is in flight
            result = wait_completed(client, rid)
        server.kill9()
        assert integrity(server) == "ok"
        loopback.hold = False
        loopback.released.set()

        server.start()
        wait_until(lambda: loopback.ok_deliveries(), timeout=30, what="the webhook after the restart")
        (delivered,) = loopback.ok_deliveries()
        assert delivered["request_id"] == rid and delivered["status"] == "OK" and delivered["payload"] == result
    finally:
        server.stop()
    db = sqlite3.connect(tmp_path / "data" / "jobs.sqlite3")
    try:
        assert db.execute("SELECT state FROM webhooks WHERE job_id = ?", (rid,)).fetchone() == ("delivered",)
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        db.close()


# -- callers that waited on the connection ---------------------------------------------------------

KINDS = ("onerouter", "fal-run", "fal-queue")  # each job's prompt names how it was sent


def send(server: ServerProcess, kind: str) -> threading.Thread | None:
    """Submit a 4-step job named `kind`. The synchronous ones wait on the connection in a thread
    (the caller that dies with the server); the queue submit answers at once."""
    if kind == "fal-queue":
        with server.client() as client:
            assert client.post(f"/{T2V}", json={"prompt": kind, "num_inference_steps": 4}).status_code == 200
        return None
    if kind == "onerouter":
        url = f"{server.url}/v1/videos/generations"
        body = {"model": "kandinsky5-text-to-video", "prompt": kind, "num_inference_steps": 4}
    else:
        url = f"http://{server.run_host}/{T2V}"
        body = {"prompt": kind, "num_inference_steps": 4}

    def wait_on_the_connection() -> None:
        with contextlib.suppress(httpx.HTTPError):  # the server is killed under it
            httpx.post(url, json=body, timeout=60)

    caller = threading.Thread(target=wait_on_the_connection, daemon=True)
    caller.start()
    return caller


def listed(client: httpx.Client) -> dict[str, dict]:
    """/api/jobs by prompt (the synchronous callers never heard their job's id)."""
    return {job["prompt"]: job for job in client.get("/api/jobs").json()["jobs"]}


def stored(server: ServerProcess, job_id: str) -> dict:
    db = sqlite3.connect(server.log_path.parent / "data" / "jobs.sqlite3")
    try:
        return json.loads(db.execute("SELECT data FROM jobs WHERE id = ?", (job_id,)).fetchone()[0])
    finally:
        db.close()


@pytest.mark.parametrize("running", KINDS)
def test_kill_9_cancels_jobs_whose_caller_waited_and_reruns_queue_jobs(tmp_path, running):
    """kill -9 with `running` paused mid-step and the other two queued behind it. After the restart
    the OneRouter and fal run-host jobs, whose callers' connections died with the process, are
    CANCELED with the reason and never run again; the fal queue job runs (again) to the end."""
    server, pause = crash_server(tmp_path, run_port=True, K5SERVE_FAKE_PAUSE_AT="step", K5SERVE_FAKE_PAUSE_CALLS="1")
    server.start()
    try:
        callers = [send(server, running)]
        wait_until(lambda: (pause / "paused-step").exists(), timeout=20, what=f"{running} to start")
        callers += [send(server, kind) for kind in KINDS if kind != running]
        with server.client() as client:
            wait_until(lambda: len(listed(client)) == 3, what="all three jobs accepted")
            ids = {prompt: job["id"] for prompt, job in listed(client).items()}
            assert listed(client)[running]["status"] == "running"
        kill_at(server, pause, "step")
        for caller in callers:
            if caller is not None:
                caller.join(30)

        server.start()
        with server.client() as client:
            wait_completed(client, ids["fal-queue"])  # the queue job runs again / runs
            wait_until(lambda: client.get("/readyz").json()["queued"] == 0, what="an empty queue")
            jobs = listed(client)
            for kind in ("onerouter", "fal-run"):
                job, record = jobs[kind], stored(server, ids[kind])
                assert job["status"] == "canceled" and job["video_url"] is None, job
                assert job["error"] == RESTARTED_WHILE_WAITING and "client disconnected" in job["error"]
                assert record["attempts"] == (1 if kind == running else 0)  # never started after the restart
                assert [line for line in record["logs"] if line["message"].startswith("step 4")] == []
                assert not (tmp_path / "data" / "files" / record["file_id"]).exists()
            status = status_after(client, ids["fal-run"])  # fal's own status route says why, too
            assert status["status"] == "COMPLETED" and status["error"] == RESTARTED_WHILE_WAITING
            queue_job = stored(server, ids["fal-queue"])
            assert jobs["fal-queue"]["status"] == "succeeded" and jobs["fal-queue"]["video_url"]
            assert queue_job["attempts"] == (2 if running == "fal-queue" else 1)
    finally:
        server.stop()
    assert integrity(server) == "ok"
