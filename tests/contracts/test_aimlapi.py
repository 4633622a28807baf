"""The AI/ML API contract (reference/api_contracts.md §3): translation and errors against fake
engines, then the real clients (the official SDK, unmodified, and the docs' plain-`requests` flow)
against the live demo-mode server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import fakes
import pytest
from server_fixtures import app_client, wait_until

PATH = "/v2/video/generations"
T2V, DISTILL = "sber-ai/kandinsky5-t2v", "sber-ai/kandinsky5-distill-t2v"


def create(client, body, **kw):
    return client.post(PATH, json=body, **kw)


def poll(client, generation_id, **kw):
    return client.get(PATH, params={"generation_id": generation_id}, **kw)


def wait_terminal(client, generation_id, timeout=10):
    def done():
        body = poll(client, generation_id).json()
        return body if body["status"] not in ("queued", "generating") else None

    return wait_until(done, timeout=timeout, what=f"{generation_id} to finish")


def assert_envelope(response, status, path=PATH):
    body = response.json()
    assert response.status_code == status
    assert set(body) == {"requestId", "statusCode", "timestamp", "path", "message"}, body
    assert body["statusCode"] == status and body["path"] == path
    assert body["timestamp"].endswith("Z") and len(body["requestId"]) == 21
    return body["message"]


# -- translation onto the job -----------------------------------------------------------------------


def test_create_poll_and_the_completed_body(tmp_path):
    with app_client(fakes.FakeEngine(), tmp_path) as client:
        response = create(client, {"model": DISTILL, "prompt": "a dragon", "num_inference_steps": 2})
        assert response.status_code == 201
        created = response.json()
        assert created["status"] == "queued"
        uuid_part, _, model = created["id"].partition(":")
        assert model == DISTILL and len(uuid_part) == 36
        done = wait_terminal(client, created["id"])
        assert done["status"] == "completed" and done["id"] == created["id"] and done["error"] is None
        video = done["video"]
        assert video["content_type"] == "video/mp4" and video["file_name"] == "output.mp4"
        assert video["url"].startswith("http://testserver/files/")
        download = client.get(video["url"])
        assert download.status_code == 200 and len(download.content) == video["file_size"]


def test_generation_id_raw_and_percent_encoded(tmp_path):
    with app_client(fakes.FakeEngine(), tmp_path) as client:
        gid = create(client, {"model": T2V, "prompt": "x", "num_inference_steps": 1}).json()["id"]
        wait_terminal(client, gid)
        raw = client.get(f"{PATH}?generation_id={gid}")  # the official SDK does not encode
        encoded = client.get(f"{PATH}?generation_id={quote(gid, safe='')}")  # requests/URLSearchParams do
        assert raw.status_code == encoded.status_code == 200
        assert raw.json()["id"] == encoded.json()["id"] == gid


@pytest.mark.parametrize(
    ("body", "variant", "steps", "guidance", "size", "seconds"),
    [
        ({"model": T2V}, "kandinsky5-lite-t2v-sft-5s", 30, None, (768, 512), 5),
        ({"model": DISTILL}, "kandinsky5-lite-t2v-distilled-5s", 30, 1.0, (768, 512), 5),
        (
            {"model": DISTILL, "duration": 10, "aspect_ratio": "2:3", "num_inference_steps": 8},
            "kandinsky5-lite-t2v-distilled-10s",
            8,
            1.0,
            (512, 768),
            10,
        ),
        ({"model": T2V, "aspect_ratio": "1:1", "seed": 7}, "kandinsky5-lite-t2v-sft-5s", 30, None, (512, 512), 5),
        # local variant names: the variant's own defaults
        (
            {"model": "kandinsky5-lite-t2v-nocfg-10s", "duration": 10},
            "kandinsky5-lite-t2v-nocfg-10s",
            None,
            None,
            (768, 512),
            10,
        ),
        ({"model": "kandinsky5-tiny-t2v", "num_inference_steps": 2}, "kandinsky5-tiny-t2v", 2, None, (256, 160), 5),
    ],
)
def test_fields_map_onto_the_generation_request(tmp_path, body, variant, steps, guidance, size, seconds):
    engine = fakes.FakeEngine()
    with app_client(engine, tmp_path) as client:
        response = create(client, {"prompt": "x", **body})
        assert response.status_code == 201, response.text
        wait_terminal(client, response.json()["id"])
    (req,) = engine.calls
    assert (req.variant, req.steps, req.guidance, (req.width, req.height), req.seconds) == (
        variant,
        steps,
        guidance,
        size,
        seconds,
    )
    assert req.seed == body["seed"] if "seed" in body else isinstance(req.seed, int)  # drawn at submit


def test_failed_generation_polls_200_with_status_error(tmp_path):
    with app_client(fakes.out_of_memory(), tmp_path) as client:
        gid = create(client, {"model": T2V, "prompt": "x", "num_inference_steps": 2}).json()["id"]
        done = wait_terminal(client, gid)
        assert done["status"] == "error" and done["video"] is None
        assert done["error"]["name"] == "OutOfMemoryError" and "out of GPU memory" in done["error"]["message"]
    with app_client(fakes.raising(), tmp_path / "b") as client:
        gid = create(client, {"model": T2V, "prompt": "x"}).json()["id"]
        error = wait_terminal(client, gid)["error"]
        assert error["name"] == "GenerationError" and "internal detail" not in error["message"]


# -- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"model": T2V}, 'Required at "prompt"'),
        ({"prompt": "x"}, 'Required at "model"'),
        ({"model": T2V, "prompt": ""}, 'at "prompt"'),
        ({"model": T2V, "prompt": 5}, 'Expected string, received number at "prompt"'),
        (
            {"model": "sber-ai/nope", "prompt": "x"},
            "Expected 'sber-ai/kandinsky5-t2v' | 'sber-ai/kandinsky5-distill-t2v'",
        ),
        (
            {"model": T2V, "prompt": "x", "aspect_ratio": "16:9"},
            "Invalid enum value. Expected '3:2' | '1:1' | '2:3', received '16:9' at \"aspect_ratio\"",
        ),
        ({"model": T2V, "prompt": "x", "duration": 7}, 'Invalid enum value. Expected 5 | 10, received 7 at "duration"'),
        ({"model": T2V, "prompt": "x", "duration": "5"}, 'Expected number, received string at "duration"'),
        ({"model": T2V, "prompt": "x", "duration": True}, 'Expected number, received boolean at "duration"'),
        ({"model": T2V, "prompt": "x", "num_inference_steps": 2.5}, "Expected integer, received float"),
        ({"model": T2V, "prompt": "x", "num_inference_steps": 0}, 'at "num_inference_steps"'),
        (
            {"model": T2V, "prompt": "x", "num_inference_steps": 500},
            'num_inference_steps must be an integer from 1 to 100, got 500 at "num_inference_steps"',
        ),
        ({"model": T2V, "prompt": "x", "seed": -1}, 'at "seed"'),
        ({"model": "kandinsky5-lite-i2v-5s", "prompt": "x"}, 'needs an image at "image"'),
        ({"model": "kandinsky5-pro-t2v-sft-5s", "prompt": "x", "duration": 10}, 'at "duration"'),
        ([1, 2], 'Expected object, received array at "body"'),
    ],
)
def test_body_validation_errors_name_the_field(tmp_path, body, expected):
    with app_client(fakes.FakeEngine(), tmp_path) as client:
        message = assert_envelope(create(client, body), 400)
    assert message.startswith("Body validation error\n") and expected in message, message


def test_invalid_json_unknown_id_and_missing_id(tmp_path):
    with app_client(fakes.FakeEngine(), tmp_path) as client:
        bad = client.post(PATH, content=b"{nope", headers={"content-type": "application/json"})
        assert "not valid JSON" in assert_envelope(bad, 400)
        assert "not found" in assert_envelope(poll(client, "0a3ca8ba-9af6-41d3-a938-41f762fcedc1:" + T2V), 404)
        assert "not found" in assert_envelope(poll(client, "garbage"), 404)
        assert 'Required at "generation_id"' in assert_envelope(client.get(PATH), 400)
        # a real id with another model suffix, or another contract's job, is not this generation
        gid = create(client, {"model": T2V, "prompt": "x", "num_inference_steps": 1}).json()["id"]
        assert_envelope(poll(client, gid.replace(T2V, DISTILL)), 404)
        fal_id = client.post("/fal-ai/kandinsky5/text-to-video", json={"prompt": "x"}).json()["request_id"]
        assert_envelope(poll(client, fal_id), 404)


def test_bad_key_is_401_in_the_gateway_envelope(tmp_path):
    with app_client(fakes.FakeEngine(), tmp_path, api_keys=["sk-local"]) as client:
        body = {"model": T2V, "prompt": "x", "num_inference_steps": 1}
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            assert "valid API key" in assert_envelope(create(client, body, headers=headers), 401)
            assert_envelope(poll(client, "x", headers=headers), 401)
        ok = create(client, body, headers={"Authorization": "Bearer sk-local"})
        assert ok.status_code == 201


def test_queue_full_is_429(tmp_path):
    # the first job is held at its first step (running, not queued): one queue slot is left, so
    # the second submit waits and the third is refused. No timing: a loaded machine once let the
    # worker take job 1 after job 2 arrived, and the old test saw [201, 429].
    engine = fakes.FakeEngine(pause_at="step", pause_calls=[1], pause_dir=tmp_path)
    with app_client(engine, tmp_path / "data", max_queue=1) as client:
        body = {"model": T2V, "prompt": "x", "num_inference_steps": 5}
        assert create(client, body).status_code == 201
        wait_until(lambda: (tmp_path / "paused-step").exists(), what="the first job running")
        codes = [create(client, body).status_code for _ in range(2)]
        (tmp_path / "release").touch()
    assert codes == [201, 429]


# -- real clients against the live server ------------------------------------------------------------


# aimlapi-sdk-python ships its own fork of the `openai` package (same import name), so it cannot
# share a site-packages with the official SDK: `make test` installs it, unmodified, into
# $(VENV)/aimlapi-sdk and it runs in a child process with that folder first on sys.path.
AIMLAPI_SDK = Path(sys.prefix) / "aimlapi-sdk"
SDK_SCRIPT = """
import json, sys
from aimlapi import AIMLAPI

client = AIMLAPI(api_key="local-key", base_url=sys.argv[1] + "/v1")  # the video helper drops /v1
seen = []
data = client.videos.generate_with_polling(
    model="sber-ai/kandinsky5-distill-t2v",
    prompt="a menacing dragon above the tallest mountain",
    aspect_ratio="3:2",
    duration=5,
    poll_interval=0.2,  # the helper's own parameter (default 10 s)
    poll_timeout=120,
    return_bytes=True,  # the helper downloads video.url itself
    extra_body={"num_inference_steps": 2},  # not among the helper's fields: extra_body
    status_callback=seen.append,
)
print(json.dumps({"seen": seen, "size": len(data), "head": data[:8].hex()}))
"""


@pytest.mark.slow
def test_official_sdk_generate_with_polling(live_server):
    # Not a skip: `make test` installs the SDK into its own folder (it vendors an `openai` package).
    assert (AIMLAPI_SDK / "aimlapi").is_dir(), "aimlapi SDK missing: run `make test` (it installs it)"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIML", "OPENAI", "K5SERVE_"))}
    env.update({"PYTHONPATH": str(AIMLAPI_SDK), "SSL_CERT_FILE": str(live_server.ca)})
    proc = subprocess.run(
        [sys.executable, "-c", SDK_SCRIPT, live_server.url], env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, f"{proc.stderr}\n--- server log ---\n{live_server.log_tail()}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert bytes.fromhex(out["head"])[4:8] == b"ftyp"
    statuses = [payload["status"] for payload in out["seen"]]
    assert statuses[0] == "queued" and statuses[-1] == "completed", statuses
    final = out["seen"][-1]
    assert final["id"] == out["seen"][0]["id"] and final["id"].endswith(":sber-ai/kandinsky5-distill-t2v")
    assert final["video"]["file_size"] == out["size"]


@pytest.mark.slow
def test_the_docs_requests_example_flow(live_server):
    """docs.aimlapi.com, Kandinsky 5 Distill: "Full Example" (requests, params=generation_id),
    with the 10 s sleep shortened."""
    import imageio.v3 as iio
    import requests

    base, key, verify = live_server.url, "local-key", str(live_server.ca)
    response = requests.post(
        f"{base}/v2/video/generations",
        json={"model": DISTILL, "prompt": "A menacing evil dragon appears", "duration": 5, "num_inference_steps": 2},
        headers={"Authorization": f"Bearer {key}"},
        verify=verify,
        timeout=30,
    )
    assert response.status_code < 400, response.text
    gen_id = response.json().get("id")
    assert gen_id
    start, statuses = time.time(), []
    while time.time() - start < 120:
        data = requests.get(
            f"{base}/v2/video/generations",
            params={"generation_id": gen_id},
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
            verify=verify,
            timeout=30,
        ).json()
        statuses.append(data.get("status"))
        if data.get("status") in ("waiting", "active", "queued", "generating"):
            time.sleep(0.2)
        else:
            break
    assert data["status"] == "completed", data
    assert set(statuses[:-1]) <= {"queued", "generating"}
    video = requests.get(data["video"]["url"], verify=verify, timeout=30)
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    assert len(video.content) == data["video"]["file_size"]
    frames = iio.imread(video.content, extension=".mp4")  # decodes: a valid mp4 with frames
    assert frames.ndim == 4 and frames.shape[0] >= 1 and frames.shape[-1] == 3
