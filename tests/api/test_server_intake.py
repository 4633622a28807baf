"""Image intake for image-to-video: data: URIs and http(s) URLs, with a timeout and a size cap.

The loopback image server is reached because these tests allow-list 127.0.0.1 (K5SERVE_URL_ALLOWLIST);
without it the guard refuses loopback (tests/unit/test_netguard.py)."""

from __future__ import annotations

import asyncio
import base64
import io

import fakes
import pytest
from server_fixtures import app_client, wait_until

from server.intake import ImageInputError, IntakeLimits, fetch_image
from server.netguard import UrlGuard

PRO_I2V = "fal-ai/kandinsky5-pro/image-to-video"
LOOPBACK_OK = UrlGuard(["127.0.0.1"])


def png(size=(64, 96)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 10)).save(buf, "PNG")
    return buf.getvalue()


def fetch(source, tmp_path, **limits):
    limits.setdefault("guard", LOOPBACK_OK)
    return asyncio.run(fetch_image(source, tmp_path / "img", IntakeLimits(**limits)))


def test_data_uri_and_http_url(tmp_path, loopback):
    loopback.files["/a.png"] = ("image/png", png())
    path, size = fetch("data:image/png;base64," + base64.b64encode(png()).decode(), tmp_path)
    assert path.suffix == ".png" and size == (64, 96)
    path, size = fetch(f"{loopback.url}/a.png", tmp_path)
    assert path.read_bytes() == png() and size == (64, 96)


@pytest.mark.parametrize(
    ("source", "limits", "message"),
    [
        ("data:image/png;base64,!!!", {}, "not a readable image"),
        ("data:image/png;base64" + "A" * 10, {}, "no ','"),
        ("file:///etc/passwd", {}, "not an http(s) URL"),
        ("/etc/passwd", {}, "not an http(s) URL"),
        ("{url}/missing.png", {}, "answered HTTP 404"),
        ("{url}/big.png", {"max_bytes": 2048}, "the limit is 2048 (K5SERVE_IMAGE_MAX_BYTES)"),
        ("http://127.0.0.1:1/x.png", {}, "could not be fetched"),
    ],
)
def test_bad_images_name_the_value(tmp_path, loopback, source, limits, message):
    loopback.files["/big.png"] = ("image/png", png((512, 512)) + b"\0" * 4096)
    with pytest.raises(ImageInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fetch(source.format(url=loopback.url), tmp_path, **limits)


def test_slow_image_server_times_out(tmp_path):
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # accepts the connection, never answers
    try:
        with pytest.raises(ImageInputError, match="timed out"):
            fetch(f"http://127.0.0.1:{listener.getsockname()[1]}/x.png", tmp_path, timeout=0.3)
    finally:
        listener.close()


def test_i2v_over_http_url_picks_the_size_from_the_image(tmp_path, loopback):
    loopback.files["/portrait.png"] = ("image/png", png((300, 450)))
    engine = fakes.FakeEngine()
    with app_client(engine, tmp_path, url_allowlist=["127.0.0.1"]) as client:
        body = {
            "prompt": "x",
            "image_url": f"{loopback.url}/portrait.png",
            "resolution": "512P",
            "num_inference_steps": 1,
        }
        rid = client.post(f"/{PRO_I2V}", json=body).json()["request_id"]
        wait_until(lambda: client.get(f"/fal-ai/kandinsky5-pro/requests/{rid}/status").status_code == 200)
        assert client.get(f"/fal-ai/kandinsky5-pro/requests/{rid}").status_code == 200
    [run] = engine.resolved
    assert run.nominal_size == (512, 768)  # 2:3 image -> the 2:3 SD bucket
