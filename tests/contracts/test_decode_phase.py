"""The decode and the write as a visible phase in every contract that has a place for it: fal log
lines on the SSE stream, AI/ML API's and the native /api/jobs `phase`. (OpenAI's progress through
the decode: test_openai.py; the real engine's chunks: tests/pipelines/test_decode.py.) A fake engine
with a slow decode (3 chunks) stands in for the VAE."""

from __future__ import annotations

import json

import fakes
from server_fixtures import app_client, wait_until

T2V = "/fal-ai/kandinsky5/text-to-video"


def slow_decode() -> fakes.FakeEngine:
    return fakes.FakeEngine(step_time=0.01, decode_chunks=3, decode_time=0.3)


def test_fal_stream_sends_each_decode_chunk_as_it_happens(tmp_path):
    with app_client(slow_decode(), tmp_path) as client:
        rid = client.post(T2V, json={"prompt": "x", "num_inference_steps": 2}).json()["request_id"]
        url = f"/fal-ai/kandinsky5/requests/{rid}/status/stream?logs=1"
        with client.stream("GET", url) as response:
            events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    logs = [log["message"] for event in events for log in event["logs"] or []]
    after_steps = logs[logs.index("step 2/2") + 1 :]
    assert after_steps == ["decoding 0/3", "decoding 1/3", "decoding 2/3", "decoding 3/3", "writing", "video written"]
    # pushed live: a chunk 0.3 s apart from the next arrives in an IN_PROGRESS update of its own
    middle = [e for e in events if any(log["message"] == "decoding 2/3" for log in e["logs"] or [])]
    assert len(middle) == 1 and middle[0]["status"] == "IN_PROGRESS"
    assert not any(log["message"] == "decoding 3/3" for log in middle[0]["logs"])


def test_aimlapi_and_native_status_show_the_phase(tmp_path):
    with app_client(slow_decode(), tmp_path) as client:
        body = {"model": "sber-ai/kandinsky5-t2v", "prompt": "x", "num_inference_steps": 2}
        gid = client.post("/v2/video/generations", json=body).json()["id"]
        poll = lambda: client.get("/v2/video/generations", params={"generation_id": gid}).json()  # noqa: E731
        native = lambda: client.get("/api/jobs").json()["jobs"][0]  # noqa: E731
        wait_until(lambda: poll()["phase"] == "decoding", timeout=10, what="the decode")
        assert poll()["status"] == "generating"
        job = native()
        assert job["status"] == "running" and job["phase"] == "decoding" and job["progress"] == [2, 2]
        assert job["phase_progress"][1] == 3
        wait_until(lambda: poll()["status"] == "completed", timeout=10, what="the video")
        assert poll()["phase"] is None  # only while generating
        job = native()
        assert (job["status"], job["phase"], job["phase_progress"]) == ("succeeded", "writing", [0, 1])
