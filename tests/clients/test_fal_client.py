"""The real PyPI `fal-client` (unmodified, in a subprocess) against a live k5serve over TLS.

One server process (tests/server_fixtures.py::live_server: real engine in demo mode, tiny
weights, a trustme certificate, the fal run host on a second port) serves every test here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

SCENARIOS = Path(__file__).parents[1] / "fal_py_scenarios.py"

pytestmark = pytest.mark.slow


def run_client(server, scenario: str, *args: str, timeout: float = 180, env: dict | None = None) -> dict:
    extra = env or {}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FAL_", "K5SERVE_"))}
    env.update(
        {
            "FAL_KEY": "local-key",
            "FAL_QUEUE_RUN_HOST": server.host,
            "FAL_RUN_HOST": server.run_host,
            "SSL_CERT_FILE": str(server.ca),
            **extra,
        }
    )
    proc = subprocess.run(
        [sys.executable, str(SCENARIOS), scenario, *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{proc.stderr}\n--- server log ---\n{server.log_tail()}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_video(server, video: dict) -> bytes:
    assert video["content_type"] == "video/mp4" and video["file_name"] == "output.mp4"
    assert video["url"].startswith(f"https://{server.host}/files/")
    data = httpx.get(video["url"], verify=str(server.ca), timeout=30).content
    assert len(data) == video["file_size"] and data[4:8] == b"ftyp"
    return data


def test_subscribe_with_queue_updates_and_logs(live_server):
    out = run_client(live_server, "subscribe")
    assert_video(live_server, out["result"]["video"])
    kinds = [u["type"] for u in out["updates"]]
    assert kinds[-1] == "Completed" and "InProgress" in kinds
    messages = [m for u in out["updates"] for m in u["logs"]]
    assert "step 3/3" in messages, messages
    # then the decode (the demo video's 25 frames: 3 chunks of the tiny VAE) and the write; each
    # update carries the logs so far, and the client sees the decode while the job is in progress
    final = max((u["logs"] for u in out["updates"]), key=len)
    after = final[final.index("step 3/3") + 1 :]
    assert after == ["decoding 0/3", "decoding 1/3", "decoding 2/3", "decoding 3/3", "writing", "video written"]
    decoding = [u for u in out["updates"] if u["type"] == "InProgress" and "decoding 0/3" in u["logs"]]
    assert decoding, out["updates"]


def test_submit_status_result(live_server):
    out = run_client(live_server, "submit_status_result")
    assert out["statuses"][-1]["type"] == "Completed" and out["handle_status"] == "Completed"
    assert out["metrics"]["inference_time"] > 0
    assert_video(live_server, out["result"]["video"])


def test_cancel_a_running_job(live_server):
    out = run_client(live_server, "cancel")
    assert out["status_error_type"] == "client_cancelled"
    assert out["error"]["status_code"] == 499 and out["error"]["error_type"] == "client_cancelled"


def test_run_on_the_run_port(live_server):
    out = run_client(live_server, "run")
    video = out["result"]["video"]
    # the run host answered, so the URL points at the run port; it serves /files too
    assert video["url"].startswith(f"https://{live_server.run_host}/files/")
    data = httpx.get(video["url"], verify=str(live_server.ca), timeout=30).content
    assert len(data) == video["file_size"] and data[4:8] == b"ftyp"


def test_image_to_video_with_a_data_uri(live_server, test_image):
    out = run_client(live_server, "image_to_video", str(test_image))
    assert_video(live_server, out["result"]["video"])


def test_invalid_input_raises_422_with_the_detail_list(live_server):
    out = run_client(live_server, "invalid")
    assert out["status_code"] == 422
    assert out["message"][0]["loc"] == ["body", "aspect_ratio"]


def test_a_missing_prompt_422_echoes_the_input_object_sent(live_server):
    out = run_client(live_server, "missing_prompt")
    assert out["status_code"] == 422
    (item,) = out["message"]
    assert item["loc"] == ["body", "prompt"] and item["type"] == "missing"
    assert item["input"] == {"num_inference_steps": 2}  # the object, as pydantic/fal echo it (not "{...}")


def test_log_timestamps_are_utc_with_their_offset(live_server):
    # A bare ISO time ("2025-11-20T10:15:02") parses as a naive (local) time: it must carry UTC.
    out = run_client(live_server, "log_times", env={"TZ": "Asia/Tokyo"})
    assert out["timestamps"] and set(out["offsets"]) == {0.0}, out["timestamps"]
    assert all(abs(out["now"] - epoch) < 300 for epoch in out["epochs"]), out


def test_no_weights_means_loud_demo_mode(live_server):
    with live_server.client() as client:
        ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["demo"] is True and ready["device"] == "cpu"
    assert "fal-ai" not in " ".join(ready["models"]) and "kandinsky5-tiny-t2v" in ready["models"]
    assert "DEMO MODE" in live_server.log_tail(200_000)


def test_python_uploads_with_fals_hosts_resolved_to_the_server(live_server, test_image):
    """rest.fal.ai and v3.fal.media resolve to the server inside the client's process only (tests
    never resolve other names here): the token, the CDN upload and the "fal" repository's
    initiate + PUT all land on k5serve, which tells them apart by Host in the URLs it answers."""
    out = run_client(live_server, "uploads", str(test_image), env={"K5SERVE_STORAGE_PORT": str(live_server.port)})
    urls = out["urls"]
    for name in ("upload_file", "upload_image", "upload"):  # repository fal_v3: the CDN host's URL
        assert urls[name].startswith("https://v3.fal.media/uploads/"), urls
    assert urls["fal_repository"].startswith("https://rest.fal.ai/uploads/"), urls
    assert urls["upload"].endswith("/raw.png") and urls["upload_file"].endswith("/noise.png")
    assert out["same_bytes"]["upload_file"] and out["same_bytes"]["upload"] and out["same_bytes"]["fal_repository"]
    assert all(out["png"].values())  # upload_image re-encodes the picture: a PNG again
    for result in out["results"]:  # admission read the uploads from disk: no fetch of fal's hosts
        assert_video(live_server, result["video"])
