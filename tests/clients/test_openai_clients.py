"""Sora code, unchanged but for the base URL: the real openai-python SDK and the real `openai` npm
package under node against the session's live `k5serve serve` (demo mode, tiny weights, TLS).

What the server reports (`size`, `seconds`) is checked against the files it serves, decoded: the mp4's
frames, the WebP thumbnail and the JPEG spritesheet (server/thumbnails.py's layout). Demo mode makes
every video on the tiny model at demo size, so a Sora 1280x720 becomes Lite's 768x512 made at 256x160.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx2
import imageio.v3 as iio
import openai
import pytest
from PIL import Image

from server.thumbnails import sprite_layout

JS = Path(__file__).parents[1] / "js"
FAST = {"num_inference_steps": 1}
RETRYABLE = {408, 409, 429} | set(range(500, 600))  # the SDKs retry these: never for a refusal

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def api(live_server):
    http = httpx2.Client(verify=str(live_server.ca), timeout=60)
    yield openai.OpenAI(api_key="local-key", base_url=f"{live_server.url}/v1", http_client=http)
    http.close()


def decoded_mp4(data: bytes) -> tuple[str, str]:
    """(size, seconds) of an mp4 as the Video object words them."""
    frames = iio.imread(data, extension=".mp4")
    return f"{frames.shape[2]}x{frames.shape[1]}", str(round(len(frames) / 24))


def test_python_sdk_create_and_poll_download_all_variants_delete(api):
    video = api.videos.create_and_poll(
        prompt="a lighthouse at dusk", model="sora-2", size="1280x720", seconds="8", extra_body=FAST
    )
    assert (video.status, video.progress, video.model, video.error) == ("completed", 100, "sora-2", None)
    # Lite's nearest landscape size (768x512), made at demo size; 8 s asked, the demo clip made
    assert (video.size, video.seconds) == ("256x160", "1")
    assert video.expires_at is None  # no K5SERVE_RETENTION_HOURS here (test_openai.py sets one)
    mp4 = api.videos.download_content(video.id)
    assert mp4.response.headers["content-type"] == "video/mp4"
    assert decoded_mp4(mp4.content) == (video.size, video.seconds)
    thumb = api.videos.download_content(video.id, variant="thumbnail")
    poster = Image.open(io.BytesIO(thumb.content))
    assert thumb.response.headers["content-type"] == "image/webp" and poster.format == "WEBP"
    assert f"{poster.width}x{poster.height}" == video.size
    sheet = api.videos.download_content(video.id, variant="spritesheet")
    grid = Image.open(io.BytesIO(sheet.content))
    assert sheet.response.headers["content-type"] == "image/jpeg" and grid.format == "JPEG"
    assert grid.size == sprite_layout(256, 160, 25).size == (1024, 640)  # 16 of the 25 frames, 4 x 4
    assert api.videos.delete(video.id).model_dump() == {"id": video.id, "object": "video.deleted", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        api.videos.retrieve(video.id)


def test_python_sdk_image_reference_in_a_json_body(api, live_server, test_image):
    """input_reference as {image_url: a data URL} in a JSON body (curl, Batch), polled by the SDK.
    (A file upload through the SDK: test_openai.py's test_live_sdk_image_to_video; an http(s)
    image_url fetched from an allowlisted host: its in-process tests; here the guard refuses one.)"""
    data_url = "data:image/png;base64," + base64.b64encode(test_image.read_bytes()).decode()
    with live_server.client() as raw:
        body = {"prompt": "d", "model": "sora-2-pro", "size": "1792x1024", "input_reference": {"image_url": data_url}}
        response = raw.post("/v1/videos", json={**body, **FAST}, headers={"authorization": "Bearer k"})
    assert response.status_code == 200, response.text
    video = api.videos.poll(response.json()["id"], poll_interval_ms=100)
    assert (video.status, video.model) == ("completed", "sora-2-pro"), video
    assert video.size == "256x144"  # Pro's 1280x768 (nearest to 1792x1024) at demo size
    assert decoded_mp4(api.videos.download_content(video.id).content) == (video.size, video.seconds)
    with pytest.raises(openai.BadRequestError) as refused:
        api.videos.create(prompt="x", extra_body={"input_reference": {"image_url": "http://127.0.0.1:9/a.png"}})
    assert refused.value.param == "input_reference"


def test_python_sdk_lists_in_pages_both_ways(api, live_server):
    while len(list(api.videos.list())) < 2:  # the videos the tests above left, else a new one
        api.videos.create(prompt="p", extra_body=FAST)
    newest_first = [v.id for v in api.videos.list(limit=1)]  # one per page: the SDK follows last_id
    assert len(newest_first) >= 2 and [v.id for v in api.videos.list(order="asc", limit=1)] == newest_first[::-1]
    with live_server.client() as raw:  # and back: the page just before the oldest, newest first
        back = raw.get("/v1/videos", params={"limit": 1, "before": newest_first[-1]}).json()
    assert [v["id"] for v in back["data"]] == newest_first[-2:-1] and back["has_more"] == (len(newest_first) > 2)


def test_refusals_are_4xx_the_sdk_does_not_retry(api):
    clip = ("mossy.mp4", b"\x00\x00\x00\x18ftypmp42", "video/mp4")
    calls = [
        lambda: api.videos.create_character(name="Mossy", video=clip),
        lambda: api.videos.get_character("char_123"),
        lambda: api.videos.create(prompt="x", extra_body={"characters": [{"id": "char_123"}]}),
        lambda: api.videos.create(prompt="x", model="sora-3"),
        lambda: api.videos.create(prompt="x", seconds="45"),
        lambda: api.videos.create(prompt="x", size="huge"),
        lambda: api.videos.create(prompt="x", extra_body={"input_reference": {"file_id": "file-123"}}),
        lambda: api.videos.retrieve("video_unknown"),
        lambda: api.videos.download_content("video_unknown", variant="spritesheet"),
    ]
    refused = []
    for call in calls:
        with pytest.raises(openai.APIStatusError) as error:
            call()
        refused.append((error.value.status_code, error.value.param))
    assert not {status for status, _ in refused} & RETRYABLE, refused
    assert refused[:4] == [(400, "video"), (404, "character_id"), (400, "characters"), (400, "model")], refused


@pytest.fixture(scope="module")
def node_openai() -> None:
    """Not a skip: `make test` installs the npm package; a missing one is a broken set-up."""
    assert shutil.which("node"), "node is not installed"
    assert (JS / "node_modules" / "openai").is_dir(), "run `make test` (npm install in tests/js)"


def test_node_sdk(node_openai, live_server, test_image, tmp_path):
    env = {**os.environ, "K5SERVE_URL": live_server.url, "K5SERVE_TEST_IMAGE": str(test_image)}
    env["NODE_EXTRA_CA_CERTS"] = str(live_server.ca)
    proc = subprocess.run(
        ["node", "openai_scenarios.js", str(tmp_path)], cwd=JS, env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, f"{proc.stderr}\n--- server log ---\n{live_server.log_tail()}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    (video,) = out["created"]
    assert (video["status"], video["progress"], video["model"]) == ("completed", 100, "sora-2-pro")
    assert (video["size"], video["seconds"]) == ("144x256", "1")  # Pro's 768x1280 (nearest 720x1280), demo size
    assert out["asc"] == out["desc"][::-1] and video["id"] in out["desc"]
    files = out["files"]
    assert [files[k]["type"] for k in ("video", "thumbnail", "spritesheet")] == [
        "video/mp4",
        "image/webp",
        "image/jpeg",
    ]
    assert decoded_mp4(Path(files["video"]["path"]).read_bytes()) == (video["size"], video["seconds"])
    assert Image.open(files["thumbnail"]["path"]).format == "WEBP"
    assert Image.open(files["spritesheet"]["path"]).size == sprite_layout(144, 256, 25).size == (576, 1024)
    refused = out["refused"]
    assert {k: v["status"] for k, v in refused.items()} == {
        "createCharacter": 400,
        "getCharacter": 404,
        "createWithCharacters": 400,
        "retrieveUnknown": 404,
    }
    assert "input_reference" in refused["createCharacter"]["message"]
    assert out["deleted"] == {"id": video["id"], "object": "video.deleted", "deleted": True}
    assert out["afterDelete"]["status"] == 404
