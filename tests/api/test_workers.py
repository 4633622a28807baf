"""Worker processes through the real HTTP contracts (issue 13): `--devices cpu,cpu` runs two fake
engines, each in its own spawned process (fakes.worker_engine), behind ONE server process.

Deterministic: every worker process pauses its first run at step 2 (in a folder named after its
pid) until the test releases it, so "two jobs at once" is seen in the jobs' states, never inferred
from timings, and the kill -9 lands mid-job in exactly the process the test chose.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
from pathlib import Path

import httpx
import pytest
from server_fixtures import ServerProcess, server_process, wait_until

T2V = "fal-ai/kandinsky5/text-to-video"
POISON = "poison: this prompt kills its worker process"


@pytest.fixture(scope="module")
def workers(tmp_path_factory) -> tuple[ServerProcess, Path]:
    tmp = tmp_path_factory.mktemp("workers")
    pause = tmp / "pause"
    pause.mkdir()
    env = {
        "K5SERVE_ENGINE_FACTORY": "fakes:worker_engine",
        "K5SERVE_FAKE_STEP_TIME": "0.01",
        "K5SERVE_FAKE_PAUSE_DIR": str(pause),
        "K5SERVE_FAKE_PAUSE_AT": "step",
        "K5SERVE_FAKE_PAUSE_CALLS": "1",
        "K5SERVE_FAKE_POISON": POISON,
        "K5SERVE_WORKER_MAX_DEATHS": "2",
    }
    server = server_process(tmp, fake=True, run_port=False, extra=["--devices", "cpu,cpu"], env=env)
    server.start()
    yield server, pause
    server.stop()


def submit(client: httpx.Client, prompt: str) -> str:
    return client.post(f"/{T2V}", json={"prompt": prompt, "num_inference_steps": 3}).json()["request_id"]


def status(client: httpx.Client, rid: str) -> str:
    return client.get(f"/{T2V.rsplit('/', 1)[0]}/requests/{rid}/status").json()["status"]


def workers_of(client: httpx.Client) -> dict[str, dict]:
    return {w["id"]: w for w in client.get("/readyz").json()["workers"]}


def paused(pause: Path) -> set[int]:
    """pids of worker processes waiting at their pause point (and not yet released)."""
    return {int(p.name) for p in pause.iterdir() if (p / "paused-step").exists() and not (p / "release").exists()}


def release(pause: Path, pid: int) -> None:
    (pause / str(pid) / "release").touch()


class Releaser:
    """Releases every worker process that pauses from now on (restarted ones pause on their first run)."""

    def __init__(self, pause: Path):
        self.pause, self.stop = pause, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.02):
            for pid in paused(self.pause):
                release(self.pause, pid)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


def test_two_jobs_run_at_once_and_a_killed_worker_loses_nothing(workers):
    server, pause = workers
    with server.client() as client:
        # /readyz is 200 once one worker is ready; this test wants both
        wait_until(lambda: all(w["state"] == "ready" for w in workers_of(client).values()), timeout=30)
        before = workers_of(client)
        assert [w["devices"] for w in before.values()] == [["cpu"], ["cpu"]]
        assert all(w["state"] == "ready" and w["pid"] and w["node"] is None for w in before.values())
        a, b = submit(client, "job a"), submit(client, "job b")
        wait_until(lambda: len(paused(pause)) == 2, timeout=20, what="both workers mid-job")
        # both jobs are running at the same time, each on its own worker process
        assert status(client, a) == status(client, b) == "IN_PROGRESS"
        busy = workers_of(client)
        assert {w["job"] for w in busy.values()} == {a, b} and {w["state"] for w in busy.values()} == {"busy"}
        assert {w["pid"] for w in busy.values()} == paused(pause)

        victim = next(w for w in busy.values() if w["job"] == a)
        os.kill(victim["pid"], signal.SIGKILL)  # kill -9 of the worker running a, mid-job
        survivor = next(w for w in busy.values() if w["job"] == b)
        release(pause, survivor["pid"])
        releaser = Releaser(pause)
        try:
            for rid in (a, b):
                wait_until(lambda rid=rid: status(client, rid) == "COMPLETED", timeout=30, what=f"{rid} done")
        finally:
            releaser.close()
        for rid in (a, b):  # nothing lost: both videos are there
            video = client.get(f"/{T2V.rsplit('/', 1)[0]}/requests/{rid}").json()["video"]
            assert httpx.get(video["url"]).status_code == 200
        jobs = {j["id"]: j for j in client.get("/api/jobs").json()["jobs"]}
        after = workers_of(client)
        assert after[victim["id"]]["restarts"] >= 1 and after[victim["id"]]["pid"] != victim["pid"]
        assert after[survivor["id"]]["pid"] == survivor["pid"] and after[survivor["id"]]["restarts"] == 0
        assert jobs[a]["status"] == jobs[b]["status"] == "succeeded"
        metrics = client.get("/metrics").text
        assert f'k5serve_worker_restarts_total{{worker="{victim["id"]}"}}' in metrics
        assert 'k5serve_worker_busy_seconds_total{worker="w1"}' in metrics


def test_a_poison_job_fails_after_killing_two_workers_and_others_keep_serving(workers):
    server, pause = workers
    releaser = Releaser(pause)
    try:
        with server.client() as client:
            wait_until(lambda: all(w["state"] == "ready" for w in workers_of(client).values()), timeout=30)
            deaths = sum(w["restarts"] for w in workers_of(client).values())
            rid = submit(client, POISON)
            wait_until(lambda: status(client, rid) == "COMPLETED", timeout=60, what="the poison job to end")
            result = client.get(f"/{T2V.rsplit('/', 1)[0]}/requests/{rid}")
            assert result.status_code >= 400
            assert "stopped 2 worker processes" in result.text and "K5SERVE_WORKER_MAX_DEATHS=2" in result.text
            wait_until(lambda: client.get("/readyz").status_code == 200, timeout=30, what="a worker back")
            assert sum(w["restarts"] for w in workers_of(client).values()) >= deaths + 2
            ok = submit(client, "after the poison")  # the server still serves
            wait_until(lambda: status(client, ok) == "COMPLETED", timeout=30, what="a job after the poison")
            assert client.get(f"/{T2V.rsplit('/', 1)[0]}/requests/{ok}").status_code == 200
    finally:
        releaser.close()


def test_workers_killed_while_idle_are_restarted_and_no_job_pays_for_it(workers):
    server, pause = workers
    releaser = Releaser(pause)
    try:
        with server.client() as client:
            wait_until(lambda: all(w["state"] == "ready" for w in workers_of(client).values()), timeout=30)
            idle = workers_of(client)
            for worker in idle.values():
                os.kill(worker["pid"], signal.SIGKILL)
            # both dead as the server sees them (pid null) before a job arrives
            wait_until(lambda: all(w["pid"] is None for w in workers_of(client).values()), timeout=10)
            rid = submit(client, "after both workers died idle")
            wait_until(lambda: status(client, rid) == "COMPLETED", timeout=60, what="the job to run on a fresh worker")
            assert client.get(f"/{T2V.rsplit('/', 1)[0]}/requests/{rid}").status_code == 200
            assert stored(server, rid)["worker_deaths"] == 0  # the job killed nobody
            ran = next(w for w in workers_of(client).values() if w["restarts"] > idle[w["id"]]["restarts"])
            assert ran["pid"] != idle[ran["id"]]["pid"]
    finally:
        releaser.close()


def stored(server: ServerProcess, job_id: str) -> dict:
    db = sqlite3.connect(server.log_path.parent / "data" / "jobs.sqlite3")
    try:
        return json.loads(db.execute("SELECT data FROM jobs WHERE id = ?", (job_id,)).fetchone()[0])
    finally:
        db.close()


def test_the_front_end_never_loaded_torch(workers):
    """The server process served jobs with worker processes; torch's library is not mapped in it."""
    server, _ = workers
    maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
    assert "python" in maps  # the check reads the right process
    assert "libtorch" not in maps and "torch/_C" not in maps
