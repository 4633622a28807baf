"""Durability: `kill -9` with jobs finished, running and queued; the restarted server finishes all
of them and still serves every earlier result URL, byte for byte."""

from __future__ import annotations

import httpx
import pytest
from server_fixtures import server_process, wait_until

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
