"""OpenAI Videos remix, edits and extensions: the official `openai` SDK (3.57, unmodified) against the
live demo-mode server (real engine, tiny models), and its refusals in-process with a fake engine.

What the SDK has: `videos.remix(video_id, prompt=...)` (JSON body), `videos.edit(prompt, video)` and
`videos.extend(prompt, seconds, video)` (multipart). Their typed `video={"id": ...}` raises on the
client (openai_videos.md §7.3), so a video by id goes through `extra_body={"video": {"id": ...}}`
with `video=openai.omit` (on the wire: the part `video[id]`); an uploaded mp4 is the `video` file
and its model comes through `extra_body={"model": ...}`. k5serve's extras (`strength`,
`num_inference_steps`) ride in `extra_body` too. No `client.post` is needed. The npm package sends
the typed `video: {id}` itself (tests/js/openai_edits_scenarios.js)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import fakes
import httpx2
import imageio.v3 as iio
import openai
import pytest
from server_fixtures import app_client

from server.api.openai_edits import REMIXED_FROM

FAST = {"num_inference_steps": 2}
TINY = "kandinsky5-tiny-t2v"  # the tiny model by name, at 64x48: the cheapest real videos (CPU)


@pytest.fixture(scope="module")
def live_sdk(live_server):
    http = httpx2.Client(verify=str(live_server.ca), timeout=60)
    yield openai.OpenAI(api_key="local-key", base_url=f"{live_server.url}/v1", http_client=http, max_retries=0)
    http.close()


@pytest.fixture(scope="module")
def source(live_sdk):
    """A finished video (the tiny model: 25 frames at 64x48) and its mp4."""
    video = live_sdk.videos.create_and_poll(
        prompt="a red fox in snow", model=TINY, size="64x48", poll_interval_ms=100, extra_body=FAST
    )
    assert (video.size, video.seconds) == ("64x48", "1")
    assert video.status == "completed", video
    return video, live_sdk.videos.download_content(video.id).content


def frames_of(data: bytes):
    return iio.imread(data, extension=".mp4")


def finished(sdk, video):
    done = sdk.videos.poll(video.id, poll_interval_ms=100)
    assert done.status == "completed", done
    return done, frames_of(sdk.videos.download_content(done.id).content)


@pytest.mark.slow
def test_remix_keeps_the_sources_size_and_length_and_names_it(live_sdk, source):
    src, data = source
    video = live_sdk.videos.remix(src.id, prompt="the same fox at night", extra_body={"strength": 0.5})
    assert getattr(video, REMIXED_FROM) == src.id and video.model == src.model
    done, frames = finished(live_sdk, video)
    assert frames.shape == frames_of(data).shape  # same size and length as the source
    assert (done.size, done.seconds, getattr(done, REMIXED_FROM)) == (src.size, src.seconds, src.id)
    assert live_sdk.videos.retrieve(done.id).remixed_from_video_id == src.id  # retrieve says it too


@pytest.mark.slow
def test_edit_by_id_through_extra_body_and_of_an_uploaded_mp4(live_sdk, source):
    src, data = source
    by_id = live_sdk.videos.edit(prompt="make it snow harder", video=openai.omit, extra_body={"video": {"id": src.id}})
    assert by_id.remixed_from_video_id == src.id
    done, frames = finished(live_sdk, by_id)
    assert frames.shape == frames_of(data).shape
    uploaded = live_sdk.videos.edit(
        prompt="make it snow harder",
        video=("clip.mp4", data, "video/mp4"),
        extra_body={"model": TINY, **FAST},
    )
    assert uploaded.remixed_from_video_id is None and uploaded.model == TINY
    done, frames = finished(live_sdk, uploaded)
    assert frames.shape == frames_of(data).shape and done.size == src.size


@pytest.mark.slow
def test_an_extension_is_the_stitched_total(live_sdk, source):
    src, data = source
    video = live_sdk.videos.extend(
        prompt="the fox runs on", seconds="1", video=openai.omit, extra_body={"video": {"id": src.id}, **FAST}
    )
    done, frames = finished(live_sdk, video)
    first = frames_of(data)
    # 1 s more: 24 frames after the 25 of the source, with no frame twice at the seam
    assert len(frames) == len(first) + 24 and frames.shape[1:] == first.shape[1:]
    assert done.seconds == str(round(len(frames) / 24)) and done.remixed_from_video_id == src.id
    kept = abs(frames[: len(first)].astype(int) - first.astype(int)).mean()  # the source leads (re-encoded)
    assert kept < 8 < abs(frames[len(first) :].astype(int) - first[-1].astype(int)).mean()


# -- refusals, in-process (fake engine) ---------------------------------------------------------------


def test_refusals_are_4xx_in_the_openai_envelope(tmp_path):
    with app_client(fakes.FakeEngine(), tmp_path, api_keys=["sk-local"]) as client:
        stranger = openai.OpenAI(api_key="k", base_url="http://testserver/v1", http_client=client, max_retries=0)
        with pytest.raises(openai.AuthenticationError):  # the contract's key check covers these routes
            stranger.videos.edit(prompt="x", video=openai.omit, extra_body={"video": {"id": "video_1"}})
        sdk = openai.OpenAI(api_key="sk-local", base_url="http://testserver/v1", http_client=client, max_retries=0)
        with pytest.raises(openai.NotFoundError):
            sdk.videos.remix("video_nope", prompt="x")
        with pytest.raises(openai.BadRequestError) as bad:
            sdk.videos.edit(prompt="x", video=openai.omit)
        assert bad.value.param == "video"
        src = sdk.videos.create_and_poll(prompt="x", poll_interval_ms=20, extra_body=FAST)
        with pytest.raises(openai.BadRequestError) as bad:
            sdk.videos.remix(src.id, prompt="x", extra_body={"strength": 2})
        assert bad.value.param == "strength"
        with pytest.raises(openai.BadRequestError) as bad:
            sdk.videos.extend(prompt="x", seconds="25", video=openai.omit, extra_body={"video": {"id": src.id}})
        assert bad.value.param == "seconds"
        with pytest.raises(openai.BadRequestError) as bad:  # the fake's "mp4" is no video: named, never a 500
            sdk.videos.remix(src.id, prompt="x")
        assert bad.value.param == "video" and "not a readable video" in bad.value.message
        with pytest.raises(openai.BadRequestError) as bad:
            sdk.videos.remix(src.id, prompt="")
        assert bad.value.param == "prompt"


@pytest.mark.slow
def test_node_sdk_edits_and_extends_by_id_natively(live_server, source):
    """openai (npm) sends `video: {id}` itself, as the part video[id]: no extra_body needed."""
    js = Path(__file__).parent.parent / "js"
    assert (js / "node_modules" / "openai").is_dir(), "run `make test` (npm install in tests/js)"
    src, data = source
    env = {**os.environ, "K5SERVE_URL": live_server.url, "NODE_EXTRA_CA_CERTS": str(live_server.ca)}
    proc = subprocess.run(
        ["node", "openai_edits_scenarios.js", src.id], cwd=js, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"{proc.stderr}\n--- server log ---\n{live_server.log_tail()}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    edited, extended = out["edited"], out["extended"]
    assert edited["status"] == extended["status"] == "completed", out
    assert (edited["size"], edited["seconds"], edited["remixed_from_video_id"]) == (src.size, src.seconds, src.id)
    assert extended["seconds"] == "2" and extended["remixed_from_video_id"] == src.id  # 25 + 24 frames
    assert len(frames_of(data)) == 25
