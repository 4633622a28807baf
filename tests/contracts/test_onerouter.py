"""The OneRouter contract (reference/api_contracts.md §4): the synchronous call against fake
engines, a client that hangs up, and a plain HTTP client as OneRouter's docs show (both
`Authorization` forms) against the live demo-mode server."""

from __future__ import annotations

import time

import fakes
import httpx
import pytest
from contract_fixtures import threaded_server
from server_fixtures import app_client, wait_until

PATH = "/v1/videos/generations"
MODEL = "kandinsky5-text-to-video"
FAST = {"model": MODEL, "prompt": "A cute baby sea otter", "num_inference_steps": 2}


def assert_error(response, code, param=None):
    assert response.status_code == code, response.text
    error = response.json()["error"]
    assert set(error) == {"code", "message", "type", "param"} and error["code"] == code and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def test_synchronous_generation_answers_with_the_url(tmp_path):
    with app_client(fakes.FakeEngine(), tmp_path) as client:
        before = int(time.time())
        response = client.post(PATH, json=FAST)
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {"data", "created"} and body["created"] >= before - 1
        (item,) = body["data"]
        assert item["revised_prompt"] == "" and item["url"].startswith("http://testserver/files/")
        download = client.get(item["url"])
        assert download.status_code == 200 and download.headers["content-type"] == "video/mp4"


@pytest.mark.parametrize(
    ("body", "variant", "steps", "size", "seconds"),
    [
        ({"model": MODEL}, "kandinsky5-lite-t2v-sft-5s", 30, (768, 512), 5),
        (
            {"model": "kandinsky5", "resolution": "512x768", "video_length": "10s"},
            "kandinsky5-lite-t2v-sft-10s",
            30,
            (512, 768),
            10,
        ),
        (
            {"model": "kandinsky-5-text-to-video", "resolution": "512x512"},
            "kandinsky5-lite-t2v-sft-5s",
            30,
            (512, 512),
            5,
        ),
        (
            {"model": "kandinsky5-t2v", "num_inference_steps": 12, "output_format": "url"},
            "kandinsky5-lite-t2v-sft-5s",
            12,
            (768, 512),
            5,
        ),
        (
            {"model": "kandinsky5-lite-t2v-distilled-10s", "video_length": "10s"},
            "kandinsky5-lite-t2v-distilled-10s",
            None,
            (768, 512),
            10,
        ),
    ],
)
def test_fields_map_onto_the_generation_request(tmp_path, body, variant, steps, size, seconds):
    engine = fakes.FakeEngine()
    with app_client(engine, tmp_path) as client:
        assert client.post(PATH, json={"prompt": "x", **body}).status_code == 200
    (req,) = engine.calls
    assert (req.variant, req.steps, (req.width, req.height), req.seconds) == (variant, steps, size, seconds)


@pytest.mark.parametrize(
    ("body", "param", "text"),
    [
        ({"prompt": "x"}, "model", "model is required"),
        ({"model": "sora-3", "prompt": "x"}, "model", "not served"),
        ({"model": MODEL}, "prompt", "prompt is required"),
        ({"model": MODEL, "prompt": ""}, "prompt", "prompt is required"),
        ({"model": MODEL, "prompt": "x", "resolution": "1280x720"}, "resolution", "768x512, 512x768, 512x512"),
        ({"model": MODEL, "prompt": "x", "video_length": "7s"}, "video_length", "5s, 10s"),
        ({"model": MODEL, "prompt": "x", "video_length": 5}, "video_length", "5s, 10s"),
        ({"model": MODEL, "prompt": "x", "output_format": "b64_json"}, "output_format", "url"),
        ({"model": MODEL, "prompt": "x", "num_inference_steps": "30"}, "num_inference_steps", "integer"),
        ({"model": MODEL, "prompt": "x", "num_inference_steps": 1000}, "num_inference_steps", "from 1 to 100"),
        ({"model": "kandinsky5-pro-t2v-sft-5s", "prompt": "x", "video_length": "10s"}, "video_length", "5s"),
        ({"model": "kandinsky5-lite-i2v-5s", "prompt": "x"}, "image", "needs an image"),
    ],
)
def test_bad_params_are_400_naming_the_param(tmp_path, body, param, text):
    with app_client(fakes.FakeEngine(), tmp_path) as client:
        error = assert_error(client.post(PATH, json=body), 400, param)
    assert error["type"] == "invalid_request_error" and text in error["message"], error


def test_bad_json_is_400(tmp_path):
    with app_client(fakes.FakeEngine(), tmp_path) as client:
        assert_error(client.post(PATH, content=b"{", headers={"content-type": "application/json"}), 400)
        assert_error(client.post(PATH, json=["a"]), 400)


@pytest.mark.parametrize(
    ("engine", "code", "type_", "leak"),
    [
        (fakes.out_of_memory, 502, "model_error", None),
        (fakes.raising, 502, "model_error", "internal detail"),
        (fakes.device_failure, 502, "model_error", None),
    ],
)
def test_generation_failures_are_http_errors(tmp_path, engine, code, type_, leak):
    with app_client(engine(), tmp_path) as client:
        error = assert_error(client.post(PATH, json=FAST), code)
    assert error["type"] == type_ and (leak is None or leak not in error["message"])


def test_both_authorization_forms_and_bad_keys(tmp_path):
    with app_client(fakes.FakeEngine(), tmp_path, api_keys=["or-key"]) as client:
        for header in ("or-key", "Bearer or-key"):
            assert client.post(PATH, json=FAST, headers={"Authorization": header}).status_code == 200
        for headers in ({}, {"Authorization": "wrong"}, {"Authorization": "Bearer wrong"}):
            assert_error(client.post(PATH, json=FAST, headers=headers), 401)


def test_a_client_that_hangs_up_cancels_its_job(tmp_path):
    engine = fakes.slow(0.1)
    with threaded_server(engine, tmp_path) as server:
        body = {**FAST, "num_inference_steps": 100}  # 10 s if nobody stops it
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}{PATH}", json=body, timeout=httpx.Timeout(30, read=0.8))
        manager = server.services.manager
        (job,) = manager.list(contract="onerouter")
        done = wait_until(lambda: (j := manager.get(job.id)).status.terminal and j, timeout=5, what="the cancel")
        assert done.status.value == "canceled" and done.error.message == "client disconnected"
        assert job.waits  # recorded at admission: a restart would cancel it too (tests/api/test_restart.py)
    assert engine.steps_run[0] < 100


# -- a plain HTTP client against the live server, as the docs show ---------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("authorization", ["local-key", "Bearer local-key"])
def test_live_plain_http_as_documented(live_server, authorization):
    import requests

    response = requests.post(
        f"{live_server.url}/v1/videos/generations",
        headers={"Authorization": authorization, "Content-Type": "application/json"},
        json={
            "model": "kandinsky5-text-to-video",
            "prompt": "A cute baby sea otter",
            "resolution": "768x512",
            "video_length": "5s",
            "num_inference_steps": 1,
            "output_format": "url",
        },
        verify=str(live_server.ca),
        timeout=300,  # synchronous: the call lasts as long as the generation
    )
    assert response.status_code == 200, response.text
    url = response.json()["data"][0]["url"]
    video = requests.get(url, verify=str(live_server.ca), timeout=30)
    assert video.status_code == 200 and video.content[4:8] == b"ftyp"
