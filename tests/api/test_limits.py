"""Input limits end to end: body size, prompt length, image bytes, data-URI size, pixel count and
format, each answered with its contract's exact 4xx shape, its message naming the K5SERVE_* setting,
never a 5xx, and the results finished before still served afterwards."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import fakes
import httpx
import pytest
from contract_fixtures import threaded_server
from server_fixtures import ImageServer, app_client, wait_until

T2V = "fal-ai/kandinsky5/text-to-video"
PRO_I2V = "fal-ai/kandinsky5-pro/image-to-video"
AIML = "/v2/video/generations"
ONER = "/v1/videos/generations"
LIMITS = {
    "max_body_bytes": 32 * 1024,
    "max_prompt_chars": 100,
    "image_max_pixels": 64 * 64,
    "data_uri_max_bytes": 4096,
    "image_max_bytes": 2048,
    "url_allowlist": ["127.0.0.1"],
}


# -- images ---------------------------------------------------------------------------------------


def image(size=(32, 24), fmt="PNG", noise=False) -> bytes:
    import numpy as np
    from PIL import Image

    w, h = size
    pixels = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8) if noise else None
    img = Image.fromarray(pixels) if noise else Image.new("RGB", size, (10, 120, 200))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def header_only_png(width: int, height: int) -> bytes:
    """A valid PNG header announcing width x height, with a few bytes of data: a decompression bomb's
    calling card (PIL's own guard refuses 10^10 pixels at open)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


OK_PNG = image()
NOISE_PNG = image((40, 40), noise=True)  # ~4.8 KB: over both byte limits, 1600 pixels
assert len(NOISE_PNG) > 4096
WIDE_PNG = image((65, 64))  # 4160 pixels, a few hundred bytes
BOMB_PNG = header_only_png(100_000, 100_000)
GIF = image(fmt="GIF")
BMP = image(fmt="BMP")

# name -> (image bytes or None for a URL case, setting named in the message, extra words in the message)
IMAGE_CASES = {
    "data-uri-too-big": (NOISE_PNG, "K5SERVE_DATA_URI_MAX_BYTES", "data URI image is about"),
    "too-many-pixels": (WIDE_PNG, "K5SERVE_IMAGE_MAX_PIXELS", "65x64 = 4160 pixels; the limit is 4096"),
    "decompression-bomb": (BOMB_PNG, "K5SERVE_IMAGE_MAX_PIXELS", "more pixels than the image decoder allows"),
    "gif": (GIF, "JPEG, PNG or WEBP", "is a GIF image"),
    "bmp": (BMP, "JPEG, PNG or WEBP", "is a BMP image"),
    "fetched-too-big": (None, "K5SERVE_IMAGE_MAX_BYTES", "the limit is 2048"),
}


# -- the server, with one finished job per contract made before any bad input ---------------------


class State:
    def __init__(self, client, images: ImageServer):
        self.client = client
        self.images = images
        self.baseline: dict[str, bytes] = {}

    def fal_done(self, rid: str, app: str = "fal-ai/kandinsky5") -> httpx.Response:
        wait_until(lambda: self.client.get(f"/{app}/requests/{rid}/status").status_code == 200, what="fal job")
        return self.client.get(f"/{app}/requests/{rid}")

    def snapshot(self) -> dict[str, bytes]:
        fal = self.client.get(f"/fal-ai/kandinsky5/requests/{self.fal_id}")
        oai = self.client.get(f"/v1/videos/{self.oai_id}/content")
        assert fal.status_code == 200 and oai.status_code == 200
        video = self.client.get(fal.json()["video"]["url"])
        return {"fal": fal.content, "fal-video": video.content, "openai": oai.content}

    def assert_earlier_results_served(self) -> None:
        assert self.snapshot() == self.baseline


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    images = ImageServer()
    images.file("/big.png", NOISE_PNG)
    images.file("/ok.png", OK_PNG)
    try:
        with app_client(fakes.FakeEngine(), tmp_path_factory.mktemp("limits"), **LIMITS) as client:
            s = State(client, images)
            s.fal_id = client.post(f"/{T2V}", json={"prompt": "a fox", "num_inference_steps": 2}).json()["request_id"]
            assert s.fal_done(s.fal_id).status_code == 200
            s.oai_id = client.post("/v1/videos", json={"prompt": "a fox", "num_inference_steps": 2}).json()["id"]
            wait_until(lambda: client.get(f"/v1/videos/{s.oai_id}").json()["status"] == "completed", what="openai")
            s.baseline = s.snapshot()
            yield s
            s.assert_earlier_results_served()
    finally:
        images.close()


def fal_422(response: httpx.Response, field: str, *words: str) -> str:
    assert response.status_code == 422, response.text
    [item] = response.json()["detail"]
    assert set(item) == {"loc", "msg", "type", "input"} and item["loc"] == ["body", field], item
    assert item["type"] == "value_error"
    for word in words:
        assert word in item["msg"], item
    return item["msg"]


def openai_400(response: httpx.Response, param: str, *words: str, status: int = 400, code="invalid_value") -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code), error
    for word in words:
        assert word in error["message"], error
    return error["message"]


# -- prompt length --------------------------------------------------------------------------------

LONG = "a" * 101
PROMPT_MESSAGE = "is 101 characters; the limit is 100 (K5SERVE_MAX_PROMPT_CHARS)"


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_prompt_length_on_fal_queue_and_run_host(state, field):
    body = {"prompt": "x", field: LONG}
    submit = state.client.post(f"/{T2V}", json=body)
    assert submit.status_code == 200  # fal: accepted, the 422 comes on the result route
    msg = fal_422(state.fal_done(submit.json()["request_id"]), field, f"{field} {PROMPT_MESSAGE}")
    assert msg == f"{field} {PROMPT_MESSAGE}"
    run = state.client.post(
        "/api/fal/proxy", json=body, headers={"x-fal-target-url": f"https://fal.run/{T2V}"}
    )  # the run host answers at once
    fal_422(run, field, PROMPT_MESSAGE)
    state.assert_earlier_results_served()


def test_an_over_long_prompt_is_refused_before_any_image_is_fetched(state):
    before = state.images.connections
    url = state.images.url + "/ok.png"
    fal = state.client.post(f"/{PRO_I2V}", json={"prompt": LONG, "image_url": url})
    assert fal.status_code == 200  # fal: accepted, the 422 comes on the result route
    fal_422(state.fal_done(fal.json()["request_id"], "fal-ai/kandinsky5-pro"), "prompt", f"prompt {PROMPT_MESSAGE}")
    oai = state.client.post("/v1/videos", json={"prompt": "x", "negative_prompt": LONG, "input_reference": url})
    openai_400(oai, "negative_prompt", PROMPT_MESSAGE)
    assert state.images.connections == before  # neither contract fetched the image
    ok = state.client.post(f"/{PRO_I2V}", json={"prompt": "fine", "image_url": url, "num_inference_steps": 1})
    assert state.fal_done(ok.json()["request_id"], "fal-ai/kandinsky5-pro").status_code == 200
    assert state.images.connections > before  # the same URL is fetched once the prompt is fine


def test_prompt_at_the_limit_is_accepted(state):
    rid = state.client.post(f"/{T2V}", json={"prompt": "a" * 100, "num_inference_steps": 1}).json()["request_id"]
    assert state.fal_done(rid).status_code == 200


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_prompt_length_on_openai(state, field):
    response = state.client.post("/v1/videos", json={"prompt": "x", field: LONG})
    assert openai_400(response, field) == f"{field} {PROMPT_MESSAGE}"
    form = state.client.post("/v1/videos", data={"prompt": "x", field: LONG})  # multipart/form fields too
    openai_400(form, field, PROMPT_MESSAGE)
    state.assert_earlier_results_served()


def test_prompt_length_on_aimlapi_and_onerouter(state):
    aiml = state.client.post(AIML, json={"model": "sber-ai/kandinsky5-t2v", "prompt": LONG})
    assert aiml.status_code == 400
    body = aiml.json()
    assert set(body) == {"requestId", "statusCode", "timestamp", "path", "message"} and body["statusCode"] == 400
    assert body["message"] == f'Body validation error\nprompt {PROMPT_MESSAGE} at "prompt"'
    oner = state.client.post(ONER, json={"model": "kandinsky5-t2v", "prompt": "x", "negative_prompt": LONG})
    assert oner.status_code == 400
    assert oner.json() == {
        "error": {
            "code": 400,
            "message": f"negative_prompt {PROMPT_MESSAGE}",
            "type": "invalid_request_error",
            "param": "negative_prompt",
        }
    }
    state.assert_earlier_results_served()


# -- images ---------------------------------------------------------------------------------------


def _source(state: State, name: str) -> str:
    data, _, _ = IMAGE_CASES[name]
    return f"{state.images.url}/big.png" if data is None else data_uri(data)


@pytest.mark.parametrize("name", IMAGE_CASES)
def test_image_limits_on_fal(state, name):
    _, setting, words = IMAGE_CASES[name]
    submit = state.client.post(f"/{PRO_I2V}", json={"prompt": "x", "image_url": _source(state, name)})
    assert submit.status_code == 200
    fal_422(state.fal_done(submit.json()["request_id"], "fal-ai/kandinsky5-pro"), "image_url", setting, words)
    state.assert_earlier_results_served()


@pytest.mark.parametrize("name", IMAGE_CASES)
def test_image_limits_on_openai_json(state, name):
    _, setting, words = IMAGE_CASES[name]
    for reference in (_source(state, name), {"image_url": _source(state, name)}):
        response = state.client.post("/v1/videos", json={"prompt": "x", "input_reference": reference})
        openai_400(response, "input_reference", setting, words)
    state.assert_earlier_results_served()


@pytest.mark.parametrize(
    ("data", "setting", "words"),
    [
        (NOISE_PNG, "K5SERVE_IMAGE_MAX_BYTES", "input_reference is larger than 2048 bytes"),
        (WIDE_PNG, "K5SERVE_IMAGE_MAX_PIXELS", "input_reference (uploaded file) is 65x64 = 4160 pixels"),
        (BOMB_PNG, "K5SERVE_IMAGE_MAX_PIXELS", "more pixels than the image decoder allows"),
        (GIF, "JPEG, PNG or WEBP", "input_reference (uploaded file) is a GIF image"),
    ],
)
def test_image_limits_on_an_openai_upload(state, data, setting, words):
    files = {"input_reference": ("image.png", data, "image/png")}
    response = state.client.post("/v1/videos", data={"prompt": "x"}, files=files)
    openai_400(response, "input_reference", setting, words)
    state.assert_earlier_results_served()


def test_images_within_the_limits_are_accepted(state):
    rid = state.client.post(
        f"/{PRO_I2V}", json={"prompt": "x", "image_url": f"{state.images.url}/ok.png", "num_inference_steps": 1}
    ).json()["request_id"]
    assert state.fal_done(rid, "fal-ai/kandinsky5-pro").status_code == 200
    files = {"input_reference": ("ok.png", image((64, 64)), "image/png")}  # exactly at the pixel limit
    response = state.client.post("/v1/videos", data={"prompt": "x", "num_inference_steps": "1"}, files=files)
    assert response.status_code == 200, response.text


def test_jpeg_and_webp_are_accepted(tmp_path):
    with app_client(fakes.FakeEngine(), tmp_path) as client:
        for fmt in ("JPEG", "WEBP"):
            body = {
                "prompt": "x",
                "image_url": data_uri(image(fmt=fmt), f"image/{fmt.lower()}"),
                "num_inference_steps": 1,
            }
            rid = client.post(f"/{PRO_I2V}", json=body).json()["request_id"]
            wait_until(lambda rid=rid: client.get(f"/fal-ai/kandinsky5-pro/requests/{rid}/status").status_code == 200)
            assert client.get(f"/fal-ai/kandinsky5-pro/requests/{rid}").status_code == 200, fmt


def test_the_decoder_admits_what_the_pixel_limit_admits(tmp_path, monkeypatch):
    """PIL refuses images over twice Image.MAX_IMAGE_PIXELS wherever it opens them (the engine too);
    a larger K5SERVE_IMAGE_MAX_PIXELS raises that guard, so a checked image never fails later as a 500."""
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # as if the operator allowed more than PIL does
    with app_client(fakes.FakeEngine(), tmp_path, image_max_pixels=64 * 64) as client:
        assert Image.MAX_IMAGE_PIXELS == 64 * 64
        body = {"prompt": "x", "image_url": data_uri(image((64, 64))), "num_inference_steps": 1}
        rid = client.post(f"/{PRO_I2V}", json=body).json()["request_id"]
        wait_until(lambda: client.get(f"/fal-ai/kandinsky5-pro/requests/{rid}/status").status_code == 200)
        assert client.get(f"/fal-ai/kandinsky5-pro/requests/{rid}").status_code == 200


# -- request bodies -------------------------------------------------------------------------------

BIG = {"prompt": "x", "negative_prompt": "y" * 40_000}
BIG_SIZE = len(httpx.Request("POST", "http://x", json=BIG).content)
BODY_MESSAGE = "the limit is 32768 (K5SERVE_MAX_BODY_BYTES)"


def test_body_limit_on_fal_queue_run_host_and_proxy(state):
    jobs = len(state.client.app.state.services.manager.list())
    for response in (
        state.client.post(f"/{T2V}", json=BIG),
        state.client.post("/api/fal/proxy", json=BIG, headers={"x-fal-target-url": f"https://fal.run/{T2V}"}),
        state.client.post("/api/fal/proxy", json=BIG, headers={"x-fal-target-url": f"https://queue.fal.run/{T2V}"}),
    ):
        assert response.status_code == 413
        assert response.json() == {"detail": f"the request body is {BIG_SIZE} bytes; {BODY_MESSAGE}"}
    assert len(state.client.app.state.services.manager.list()) == jobs  # nothing was queued
    state.assert_earlier_results_served()


def test_body_limit_on_openai_json_and_multipart(state):
    json_body = state.client.post("/v1/videos", json=BIG)
    message = openai_400(json_body, None, BODY_MESSAGE, status=413, code="request_too_large")
    assert message == f"the request body is {BIG_SIZE} bytes; {BODY_MESSAGE}"
    files = {"input_reference": ("big.png", b"\0" * 40_000, "image/png")}
    upload = state.client.post("/v1/videos", data={"prompt": "x"}, files=files)
    openai_400(upload, None, BODY_MESSAGE, status=413, code="request_too_large")
    state.assert_earlier_results_served()


def test_body_limit_on_aimlapi_and_onerouter(state):
    aiml = state.client.post(AIML, json={"model": "sber-ai/kandinsky5-t2v", **BIG})
    assert aiml.status_code == 413
    body = aiml.json()
    assert set(body) == {"requestId", "statusCode", "timestamp", "path", "message"}
    assert (body["statusCode"], body["path"]) == (413, AIML) and BODY_MESSAGE in body["message"]
    oner = state.client.post(ONER, json={"model": "kandinsky5-t2v", **BIG})
    assert oner.status_code == 413
    error = oner.json()["error"]
    assert set(error) == {"code", "message", "type", "param"}
    assert (error["code"], error["type"], error["param"]) == (413, "invalid_request_error", "")
    assert BODY_MESSAGE in error["message"]
    state.assert_earlier_results_served()


def test_a_body_at_the_limit_is_read(state):
    base = b'{"prompt": "x", "num_inference_steps": 1}'
    body = base + b" " * (32 * 1024 - len(base))  # JSON allows trailing whitespace
    response = state.client.post(f"/{T2V}", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200
    assert state.fal_done(response.json()["request_id"]).status_code == 200


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    with threaded_server(fakes.FakeEngine(), tmp_path_factory.mktemp("live-limits"), **LIMITS) as server:
        yield server


def chunked(total: int, size: int = 4096):
    """A body with no Content-Length (Transfer-Encoding: chunked): the limit is found while reading."""
    yield b'{"prompt": "x", "pad": "'
    sent = 0
    while sent < total:
        yield b"p" * size
        sent += size
    yield b'"}'


@pytest.mark.parametrize(
    ("path", "shape"),
    [(f"/{T2V}", "fal"), ("/v1/videos", "openai"), (AIML, "aimlapi"), (ONER, "onerouter")],
)
def test_a_chunked_body_over_the_limit_is_cut_off_while_streaming(live, path, shape):
    with httpx.Client(base_url=live.url, timeout=30) as client:
        response = client.post(path, content=chunked(40_000), headers={"content-type": "application/json"})
        assert "content-length" not in response.request.headers
        assert response.status_code == 413
        body = response.json()
        message = {
            "fal": lambda: body["detail"],
            "openai": lambda: body["error"]["message"],
            "aimlapi": lambda: body["message"],
            "onerouter": lambda: body["error"]["message"],
        }[shape]()
        assert message == "the request body is larger than 32768 bytes; the limit is 32768 (K5SERVE_MAX_BODY_BYTES)"
        # the server is fine afterwards, on a new connection
        ok = client.post(f"/{T2V}", content=chunked(1000), headers={"content-type": "application/json"})
        assert ok.status_code == 200
