"""Bad input never gets a 5xx: a corpus of hostile requests against every contract.

One live server (uvicorn on 127.0.0.1 in a thread, a fake engine, API keys on) serves the whole
module. Before the corpus runs, one good job per contract runs to completion and its answers
are recorded byte for byte. Then every case of CORPUS is sent (each is its own test id) and must
get its contract's own 4xx with the contract's exact error shape, never a 5xx; after each case
the earlier results must still be served byte-identical, and every 25th case (and the last test)
also checks that the queue still takes a good job and runs it to the end.

The error shapes checked are the fields the real clients read (reference/api_contracts.md):
  fal        {"detail": [{loc, msg, type, ...}]} (422) or {"detail": "..."}; invalid input is
             accepted at submit (200) and reported as a 422 on the result route (`deferred`)
  AI/ML API  the gateway envelope {requestId, statusCode, timestamp, path, message}
  OneRouter  {"error": {code, message, type, param}} with HTTP status == code
  OpenAI     {"error": {message, type, param, code}}
  /files and the playground API: FastAPI's {"detail": ...}

Hostile image URLs name only loopback addresses or ones the suite's connect guard
(conftest.py) refuses before any packet leaves. Cases whose answer depends on the input limits
and SSRF guards (body size, prompt length, pixel caps, image formats, private addresses) are in
GUARDED, separately.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import fakes
import httpx
import pytest
from contract_fixtures import threaded_server
from server_fixtures import Loopback, wait_until

KEY = "sk-corpus-key"
AUTH = {"fal": f"Key {KEY}", "aimlapi": f"Bearer {KEY}", "onerouter": KEY, "openai": f"Bearer {KEY}"}
DEFAULT = object()  # Case.auth: the contract's right key

FAL_LITE = "/fal-ai/kandinsky5/text-to-video"
FAL_PRO_I2V = "/fal-ai/kandinsky5-pro/image-to-video"
AIML = "/v2/video/generations"
ONER = "/v1/videos/generations"
OAI = "/v1/videos"

# Good bodies, one per contract (tiny step counts: the fake engine is instant anyway).
GOOD = {
    "fal": (FAL_LITE, {"prompt": "a fox in the snow", "num_inference_steps": 2}),
    "aimlapi": (AIML, {"model": "sber-ai/kandinsky5-t2v", "prompt": "a fox in the snow", "num_inference_steps": 2}),
    "onerouter": (ONER, {"model": "kandinsky5-text-to-video", "prompt": "a fox in the snow", "num_inference_steps": 2}),
    "openai": (OAI, {"prompt": "a fox in the snow", "num_inference_steps": 2}),
}


# -- hostile images -------------------------------------------------------------------------------


def _png(size=(64, 48), mode="RGB") -> bytes:
    import numpy as np
    from PIL import Image

    if mode == "1":
        image = Image.new("1", size)
    else:
        rng = np.random.default_rng(1)
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _gif() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, "GIF")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb_header_png(width=100_000, height=100_000) -> bytes:
    """A PNG whose header claims 10^10 pixels (a decompression bomb's first bytes), no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IEND", b"")


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


PNG = _png()
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><script>alert(1)</script></svg>'

NOT_URL, LOOPBACK, UNREADABLE = (
    "is not an http(s) URL or a data: URI",
    "is a loopback address",
    "is not a readable image",
)
# name -> (image URL, what the answer must say). Only loopback hosts or ones refused before connecting.
HOSTILE_IMAGES: dict[str, tuple[str, str]] = {
    "file-url": ("file:///etc/passwd", NOT_URL),
    "ftp-url": ("ftp://127.0.0.1/image.png", NOT_URL),
    "gopher-url": ("gopher://127.0.0.1:70/_GET%20/", NOT_URL),
    "javascript-url": ("javascript:alert(1)", NOT_URL),
    "metadata-ip": ("http://169.254.169.254/latest/meta-data/iam/security-credentials/", "cloud metadata address"),
    "ipv6-loopback-closed-port": ("http://[::1]:1/image.png", LOOPBACK),
    "hex-ip": ("http://0x7f.1/image.png", LOOPBACK),
    "userinfo-host": ("http://user:secret@127.0.0.1:1/image.png", "user:password@ are refused"),
    "closed-port": ("http://127.0.0.1:1/image.png", LOOPBACK),
    "no-host": ("http:///image.png", "has no host"),
    "bad-port": ("http://127.0.0.1:99999/image.png", "refused"),
    "data-not-base64": ("data:image/png;base64,!!!not*base64!!!", "is not valid base64"),
    "data-text": ("data:text/plain,hello%20world", UNREADABLE),
    "data-svg": (data_uri(SVG, "image/svg+xml"), UNREADABLE),
    "data-truncated-png": (data_uri(PNG[:60]), UNREADABLE),
    "data-empty": ("data:image/png;base64,", UNREADABLE),
    "data-no-comma": ("data:image/png;base64" + "A" * 40, "has no ','"),
    "data-bomb-header": (data_uri(_bomb_header_png()), "more pixels than the image decoder allows"),
}


# -- the contracts' error shapes ------------------------------------------------------------------

Check = Callable[[httpx.Response], None]


def fal_422(field_name: str, type_: str | None = None, msg: str = "") -> Check:
    """fal's validation error, as both fal clients read it (JS ValidationError.fieldErrors)."""

    def check(r: httpx.Response) -> None:
        body = r.json()
        assert set(body) == {"detail"} and isinstance(body["detail"], list) and body["detail"], body
        first = body["detail"][0]
        assert {"loc", "msg", "type"} <= set(first) and isinstance(first["msg"], str) and first["msg"], body
        assert first["loc"] == ["body", field_name] and msg in first["msg"], body
        if type_ is not None:
            assert first["type"] == type_, body
        assert r.headers.get("x-fal-retryable") == "false"
        assert r.headers.get("x-fal-request-id")

    return check


def detail(text: str = "") -> Check:
    """{"detail": "<message>"} (fal's request errors, FastAPI's own 404/405, /files)."""

    def check(r: httpx.Response) -> None:
        body = r.json()
        assert set(body) <= {"detail", "error_type"} and isinstance(body["detail"], str) and body["detail"], body
        assert text in body["detail"], body

    return check


def fal_cancel(status: str) -> Check:
    def check(r: httpx.Response) -> None:
        assert r.json() == {"status": status}

    return check


def fastapi_422(loc: list) -> Check:
    def check(r: httpx.Response) -> None:
        body = r.json()
        assert set(body) == {"detail"} and body["detail"][0]["loc"] == loc, body

    return check


def gateway(text: str) -> Check:
    """AI/ML API's NestJS envelope; statusCode equals the HTTP status, path is the request's path."""

    def check(r: httpx.Response) -> None:
        body = r.json()
        assert set(body) == {"requestId", "statusCode", "timestamp", "path", "message"}, body
        assert body["statusCode"] == r.status_code and body["path"] == r.request.url.path, body
        assert isinstance(body["requestId"], str) and body["requestId"], body
        assert text in body["message"], body

    return check


def oner(param: str, code: int | None = None, msg: str = "") -> Check:
    def check(r: httpx.Response) -> None:
        body = r.json()
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "type", "param"}, body
        error = body["error"]
        assert error["code"] == r.status_code == (code or r.status_code), body
        assert error["param"] == param and isinstance(error["message"], str) and error["message"], body
        assert isinstance(error["type"], str) and error["type"] and msg in error["message"], body

    return check


def oai(param: str | None, code: str | None = None, msg: str = "") -> Check:
    def check(r: httpx.Response) -> None:
        body = r.json()
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        error = body["error"]
        assert error["type"] == "invalid_request_error" and error["message"], body
        assert error["param"] == param and msg in error["message"], body
        if code is not None:
            assert error["code"] == code, body

    return check


def fal_query_422(name: str, msg: str = "") -> Check:
    def check(r: httpx.Response) -> None:
        body = r.json()
        assert set(body) == {"detail"} and body["detail"][0]["loc"] == ["query", name], body
        assert isinstance(body["detail"][0]["msg"], str) and msg in body["detail"][0]["msg"], body

    return check


def route_miss(r: httpx.Response) -> None:
    """A GET path no route serves. fal's submit route `POST /{owner}/{alias}/{path:path}` matches
    every path of 3+ segments, so FastAPI answers 405 (not 404) to any other method there."""
    detail("Method Not Allowed")(r)
    assert b"SQLite format" not in r.content and b"ftyp" not in r.content


def not_a_file(r: httpx.Response) -> None:
    """A traversal attempt on /files is just an unknown file: 404 and nothing of what is stored."""
    detail()(r)
    assert b"SQLite format" not in r.content and b"ftyp" not in r.content


# -- the corpus -----------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    contract: str  # whose key and shape: fal, aimlapi, onerouter, openai, files, playground
    method: str
    path: str  # "{fal_id}", "{openai_id}", ... are filled with the good jobs' ids
    status: int
    check: Check
    json: Any = None
    body: bytes | None = None  # raw bytes instead of json
    headers: dict[str, str] = field(default_factory=dict)
    auth: Any = DEFAULT  # DEFAULT: the contract's right key; None: no header; str: that header
    deferred: bool = False  # fal: submit answers 200, the error comes on the result route
    raw: bool = False  # send the path byte for byte over a socket (no client-side normalisation)

    @property
    def id(self) -> str:
        return f"{self.contract}-{self.name}"


def _fal_body(
    name: str, body: dict | None = None, *, field_name: str, path: str = FAL_LITE, msg: str = "", **kw
) -> Case:
    check = fal_422(field_name, kw.pop("type_", None), msg)
    return Case(name, "fal", "POST", path, 422, check, json=body, deferred=True, **kw)


def _fal_raw(name: str, raw: bytes, *, field_name: str = "body", type_: str | None = None, **kw) -> Case:
    return Case(name, "fal", "POST", FAL_LITE, 422, fal_422(field_name, type_), body=raw, deferred=True, **kw)


def _i2v(name: str, image_url: Any, msg: str = "") -> Case:
    body = {"prompt": "x", "image_url": image_url}
    return _fal_body(f"i2v-{name}", body, field_name="image_url", path=FAL_PRO_I2V, msg=msg)


DEEP = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
HUGE_INT = b'{"prompt": "x", "num_inference_steps": ' + b"9" * 5000 + b"}"
NOT_UTF8 = b'{"prompt": "\xff\xfe\xfa"}'
XML = b"<?xml version='1.0'?><prompt>a fox</prompt>"

FAL_CASES = [
    Case("unknown-app", "fal", "POST", "/fal-ai/not-a-model", 404, detail("not found"), json={"prompt": "x"}),
    Case(
        "unknown-endpoint",
        "fal",
        "POST",
        "/fal-ai/kandinsky5/image-to-video",
        404,
        detail("not found"),
        json={"prompt": "x"},
    ),
    Case("unknown-local-variant", "fal", "POST", "/k5serve/kandinsky6", 404, detail("not found"), json={"prompt": "x"}),
    _fal_body("missing-prompt", {"num_inference_steps": 2}, field_name="prompt", type_="missing"),
    _fal_body("empty-prompt", {"prompt": ""}, field_name="prompt"),
    _fal_body("prompt-int", {"prompt": 123}, field_name="prompt", type_="string_type"),
    _fal_body("prompt-null", {"prompt": None}, field_name="prompt"),
    _fal_body("prompt-list", {"prompt": ["a", "b"]}, field_name="prompt"),
    _fal_body("prompt-object", {"prompt": {"$gt": ""}}, field_name="prompt"),
    _fal_body("aspect-ratio-unknown", {"prompt": "x", "aspect_ratio": "16:9"}, field_name="aspect_ratio"),
    _fal_body("duration-unknown", {"prompt": "x", "duration": "15s"}, field_name="duration"),
    _fal_body("duration-int", {"prompt": "x", "duration": 5}, field_name="duration"),
    _fal_body("steps-string", {"prompt": "x", "num_inference_steps": "many"}, field_name="num_inference_steps"),
    _fal_body("steps-huge", {"prompt": "x", "num_inference_steps": 10**30}, field_name="num_inference_steps"),
    _fal_body("steps-negative", {"prompt": "x", "num_inference_steps": -5}, field_name="num_inference_steps"),
    _fal_body("steps-zero", {"prompt": "x", "num_inference_steps": 0}, field_name="num_inference_steps"),
    _fal_body("steps-float-1e308", {"prompt": "x", "num_inference_steps": 1e308}, field_name="num_inference_steps"),
    _fal_body("steps-fraction", {"prompt": "x", "num_inference_steps": 2.5}, field_name="num_inference_steps"),
    _fal_body("seed-negative", {"prompt": "x", "seed": -1}, field_name="seed"),
    _fal_body("seed-2-70", {"prompt": "x", "seed": 2**70}, field_name="seed"),
    _fal_body("seed-string", {"prompt": "x", "seed": "lucky"}, field_name="seed"),
    _fal_body("negative-prompt-int", {"prompt": "x", "negative_prompt": 7}, field_name="negative_prompt"),
    _fal_body("resolution-unknown", {"prompt": "x", "resolution": "1920x1080"}, field_name="resolution"),
    _fal_body(
        "pro-resolution-unknown",
        {"prompt": "x", "resolution": "720P"},
        field_name="resolution",
        path="/fal-ai/kandinsky5-pro/text-to-video",
    ),
    _fal_body(
        "pro-acceleration-unknown",
        {"prompt": "x", "acceleration": "turbo"},
        field_name="acceleration",
        path="/fal-ai/kandinsky5-pro/text-to-video",
    ),
    _fal_body(
        "pro-duration-garbage",
        {"prompt": "x", "duration": "five seconds"},
        field_name="duration",
        path="/fal-ai/kandinsky5-pro/text-to-video",
    ),
    _fal_raw("malformed-json", b'{"prompt": "x"', type_="json_invalid"),
    _fal_raw("json-array", b'["prompt", "x"]'),
    _fal_raw("json-string", b'"a fox"'),
    _fal_raw("json-nan", b"NaN"),
    _fal_raw("steps-nan", b'{"prompt": "x", "num_inference_steps": NaN}', field_name="num_inference_steps"),
    _fal_raw("steps-infinity", b'{"prompt": "x", "num_inference_steps": Infinity}', field_name="num_inference_steps"),
    _fal_raw("steps-1e999", b'{"prompt": "x", "num_inference_steps": 1e999}', field_name="num_inference_steps"),
    _fal_raw("int-5000-digits", HUGE_INT),
    _fal_raw("not-utf8", NOT_UTF8),
    _fal_raw("nested-100k-deep", DEEP),
    _fal_raw("nul-bytes", b"\x00" * 64),
    _fal_raw("form-urlencoded", b"prompt=a+fox", headers={"content-type": "application/x-www-form-urlencoded"}),
    _fal_raw("xml", XML, headers={"content-type": "application/xml"}),
    _fal_raw(
        "multipart",
        b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx\r\n--b--\r\n',
        headers={"content-type": "multipart/form-data; boundary=b"},
    ),
    _i2v("missing-image", None),
    _i2v("image-int", 12345),
    _i2v("image-list", ["http://127.0.0.1:1/a.png"]),
    *[_i2v(name, url, msg) for name, (url, msg) in HOSTILE_IMAGES.items()],
    # ids: unknown, another contract's, another app's, hostile
    Case(
        "status-unknown-id",
        "fal",
        "GET",
        "/fal-ai/kandinsky5/requests/00000000-0000-0000-0000-000000000000/status",
        404,
        detail("Request not found"),
    ),
    Case("result-unknown-id", "fal", "GET", "/fal-ai/kandinsky5/requests/nope", 404, detail("Request not found")),
    Case(
        "stream-unknown-id",
        "fal",
        "GET",
        "/fal-ai/kandinsky5/requests/nope/status/stream",
        404,
        detail("Request not found"),
    ),
    Case("cancel-unknown-id", "fal", "PUT", "/fal-ai/kandinsky5/requests/nope/cancel", 404, fal_cancel("NOT_FOUND")),
    Case(
        "status-openai-id",
        "fal",
        "GET",
        "/fal-ai/kandinsky5/requests/{openai_id}/status",
        404,
        detail("Request not found"),
    ),
    Case(
        "result-aimlapi-id", "fal", "GET", "/fal-ai/kandinsky5/requests/{aimlapi_job}", 404, detail("Request not found")
    ),
    Case(
        "result-onerouter-id",
        "fal",
        "GET",
        "/fal-ai/kandinsky5/requests/{onerouter_id}",
        404,
        detail("Request not found"),
    ),
    Case(
        "cancel-openai-id", "fal", "PUT", "/fal-ai/kandinsky5/requests/{openai_id}/cancel", 404, fal_cancel("NOT_FOUND")
    ),
    Case(
        "status-other-app",
        "fal",
        "GET",
        "/fal-ai/kandinsky5-pro/requests/{fal_id}/status",
        404,
        detail("Request not found"),
    ),
    Case(
        "result-traversal-id",
        "fal",
        "GET",
        "/fal-ai/kandinsky5/requests/..%2F..%2Fjobs.sqlite3",
        405,
        route_miss,
    ),
    Case(
        "result-10k-id", "fal", "GET", "/fal-ai/kandinsky5/requests/" + "a" * 10_000, 404, detail("Request not found")
    ),
    Case(
        "cancel-finished",
        "fal",
        "PUT",
        "/fal-ai/kandinsky5/requests/{fal_id}/cancel",
        400,
        fal_cancel("ALREADY_COMPLETED"),
    ),
    # auth
    Case("no-key", "fal", "POST", FAL_LITE, 401, detail("API key"), json={"prompt": "x"}, auth=None),
    Case("wrong-key", "fal", "POST", FAL_LITE, 401, detail("API key"), json={"prompt": "x"}, auth="Key wrong"),
    Case(
        "basic-auth", "fal", "POST", FAL_LITE, 401, detail("API key"), json={"prompt": "x"}, auth="Basic dXNlcjpwYXNz"
    ),
    Case("scheme-only", "fal", "POST", FAL_LITE, 401, detail("API key"), json={"prompt": "x"}, auth="Key"),
    Case(
        "key-id-secret-wrong",
        "fal",
        "POST",
        FAL_LITE,
        401,
        detail("API key"),
        json={"prompt": "x"},
        auth=f"Key {KEY}:secret",
    ),
    Case(
        "status-no-key", "fal", "GET", "/fal-ai/kandinsky5/requests/{fal_id}/status", 401, detail("API key"), auth=None
    ),
    Case(
        "result-wrong-key",
        "fal",
        "GET",
        "/fal-ai/kandinsky5/requests/{fal_id}",
        401,
        detail("API key"),
        auth="Key " + KEY[:-1],
    ),
    # the JS client's proxy route
    Case("proxy-no-target", "fal", "POST", "/api/fal/proxy", 400, detail("x-fal-target-url"), json={"prompt": "x"}),
    Case(
        "proxy-foreign-host",
        "fal",
        "POST",
        "/api/fal/proxy",
        412,
        detail("not a fal host"),
        json={"prompt": "x"},
        headers={"x-fal-target-url": "https://evil.example.com/fal-ai/kandinsky5/text-to-video"},
    ),
    Case(
        "proxy-lookalike-host",
        "fal",
        "POST",
        "/api/fal/proxy",
        412,
        detail("not a fal host"),
        json={"prompt": "x"},
        headers={"x-fal-target-url": "https://queue.fal.run.evil.example/fal-ai/x"},
    ),
    Case(
        "proxy-file-target",
        "fal",
        "POST",
        "/api/fal/proxy",
        412,
        detail("not a fal host"),
        json={"prompt": "x"},
        headers={"x-fal-target-url": "file:///etc/passwd"},
    ),
    Case(
        "proxy-rest-host",
        "fal",
        "POST",
        "/api/fal/proxy",
        404,
        detail("does not serve"),
        json={"prompt": "x"},
        headers={"x-fal-target-url": "https://rest.fal.ai/billing/usage"},  # only /storage/ is served
    ),
    Case(
        "proxy-run-missing-prompt",
        "fal",
        "POST",
        "/api/fal/proxy",
        422,
        fal_422("prompt"),
        json={},
        headers={"x-fal-target-url": "https://fal.run/fal-ai/kandinsky5/text-to-video"},
    ),
    Case(
        "proxy-run-bad-image",
        "fal",
        "POST",
        "/api/fal/proxy",
        422,
        fal_422("image_url"),
        json={"prompt": "x", "image_url": "file:///etc/passwd"},
        headers={"x-fal-target-url": "https://fal.run/fal-ai/kandinsky5-pro/image-to-video"},
    ),
    Case(
        "proxy-status-unknown",
        "fal",
        "GET",
        "/api/fal/proxy",
        404,
        detail("Request not found"),
        headers={"x-fal-target-url": "https://queue.fal.run/fal-ai/kandinsky5/requests/nope/status"},
    ),
    Case(
        "proxy-no-key",
        "fal",
        "POST",
        "/api/fal/proxy",
        401,
        detail("API key"),
        json={"prompt": "x"},
        auth=None,
        headers={"x-fal-target-url": "https://queue.fal.run/fal-ai/kandinsky5/text-to-video"},
    ),
]


def _aiml(name: str, body: Any, text: str, status: int = 400, **kw) -> Case:
    if isinstance(body, bytes):
        return Case(name, "aimlapi", "POST", AIML, status, gateway(text), body=body, **kw)
    return Case(name, "aimlapi", "POST", AIML, status, gateway(text), json=body, **kw)


M = {"model": "sber-ai/kandinsky5-t2v"}
MP = {**M, "prompt": "x"}

AIML_CASES = [
    _aiml("missing-model", {"prompt": "x"}, 'Body validation error\nRequired at "model"'),
    _aiml("unknown-model", {"model": "sber-ai/kandinsky6-t2v", "prompt": "x"}, "Invalid enum value. Expected"),
    _aiml("model-int", {"model": 5, "prompt": "x"}, 'Expected string, received number at "model"'),
    _aiml("model-null", {"model": None, "prompt": "x"}, 'Required at "model"'),
    _aiml("missing-prompt", M, 'Required at "prompt"'),
    _aiml("blank-prompt", {**M, "prompt": "   "}, 'at "prompt"'),
    _aiml("prompt-object", {**M, "prompt": {"text": "x"}}, 'Expected string, received object at "prompt"'),
    _aiml("aspect-unknown", {**MP, "aspect_ratio": "16:9"}, "received '16:9' at \"aspect_ratio\""),
    _aiml("aspect-number", {**MP, "aspect_ratio": 1.5}, 'Expected string, received number at "aspect_ratio"'),
    _aiml("duration-string", {**MP, "duration": "5"}, 'Expected number, received string at "duration"'),
    _aiml("duration-unknown", {**MP, "duration": 7}, 'Invalid enum value. Expected 5 | 10, received 7 at "duration"'),
    _aiml("duration-bool", {**MP, "duration": True}, 'received boolean at "duration"'),
    _aiml("steps-zero", {**MP, "num_inference_steps": 0}, 'at "num_inference_steps"'),
    _aiml("steps-fraction", {**MP, "num_inference_steps": 2.5}, "Expected integer, received float"),
    _aiml("steps-huge", {**MP, "num_inference_steps": 10**30}, 'at "num_inference_steps"'),
    _aiml("steps-string", {**MP, "num_inference_steps": "30"}, "Expected number, received string"),
    _aiml(
        "steps-nan",
        b'{"model": "sber-ai/kandinsky5-t2v", "prompt": "x", "num_inference_steps": NaN}',
        'at "num_inference_steps"',
    ),
    _aiml(
        "steps-infinity",
        b'{"model": "sber-ai/kandinsky5-t2v", "prompt": "x", "num_inference_steps": -Infinity}',
        'at "num_inference_steps"',
    ),
    _aiml("seed-negative", {**MP, "seed": -1}, 'at "seed"'),
    _aiml("seed-2-64", {**MP, "seed": 2**64}, 'at "seed"'),
    _aiml("enhance-prompt-string", {**MP, "enhance_prompt": "yes"}, 'at "enhance_prompt"'),
    _aiml("negative-prompt-int", {**MP, "negative_prompt": 5}, 'at "negative_prompt"'),
    _aiml("malformed-json", b'{"model": "sber-ai/kandinsky5-t2v",', "not valid JSON"),
    _aiml("json-array", b"[]", "Expected object, received array"),
    _aiml("json-null", b"null", "Expected object, received null"),
    _aiml("empty-body", b"", "Expected object, received null"),
    _aiml("nested-100k-deep", DEEP, "Body validation error"),
    _aiml("int-5000-digits", HUGE_INT, "not valid JSON"),
    _aiml("not-utf8", NOT_UTF8, "Body validation error"),
    _aiml(
        "form-urlencoded",
        b"model=sber-ai%2Fkandinsky5-t2v&prompt=x",
        "not valid JSON",
        headers={"content-type": "application/x-www-form-urlencoded"},
    ),
    _aiml("xml", XML, "not valid JSON", headers={"content-type": "application/xml"}),
    Case("poll-missing-id", "aimlapi", "GET", AIML, 400, gateway('Required at "generation_id"')),
    Case("poll-empty-id", "aimlapi", "GET", AIML + "?generation_id=", 400, gateway("generation_id")),
    Case(
        "poll-unknown-id",
        "aimlapi",
        "GET",
        AIML + "?generation_id=00000000-0000-0000-0000-000000000000",
        404,
        gateway("not found"),
    ),
    Case("poll-fal-id", "aimlapi", "GET", AIML + "?generation_id={fal_id}", 404, gateway("not found")),
    Case("poll-openai-id", "aimlapi", "GET", AIML + "?generation_id={openai_id}", 404, gateway("not found")),
    Case(
        "poll-wrong-model-suffix",
        "aimlapi",
        "GET",
        AIML + "?generation_id={aimlapi_job}:sber-ai/kandinsky5-distill-t2v",
        404,
        gateway("not found"),
    ),
    Case("poll-10k-id", "aimlapi", "GET", AIML + "?generation_id=" + "x" * 10_000, 404, gateway("not found")),
    Case(
        "poll-traversal-id", "aimlapi", "GET", AIML + "?generation_id=..%2F..%2Fjobs.sqlite3", 404, gateway("not found")
    ),
    _aiml("no-key", MP, "valid API key", 401, auth=None),
    _aiml("wrong-key", MP, "valid API key", 401, auth="Bearer sk-wrong"),
    _aiml("latin1-key", MP, "valid API key", 401, auth="Bearer k\xe9y"),
    Case(
        "poll-no-key", "aimlapi", "GET", AIML + "?generation_id={aimlapi_id}", 401, gateway("valid API key"), auth=None
    ),
]


def _oner(name: str, body: Any, param: str, status: int = 400, msg: str = "", **kw) -> Case:
    if isinstance(body, bytes):
        return Case(name, "onerouter", "POST", ONER, status, oner(param, msg=msg), body=body, **kw)
    return Case(name, "onerouter", "POST", ONER, status, oner(param, msg=msg), json=body, **kw)


OM = {"model": "kandinsky5-text-to-video"}
OMP = {**OM, "prompt": "x"}

ONEROUTER_CASES = [
    _oner("missing-model", {"prompt": "x"}, "model"),
    _oner("unknown-model", {"model": "sora-3", "prompt": "x"}, "model"),
    _oner("model-list", {"model": ["kandinsky5"], "prompt": "x"}, "model"),
    _oner("missing-prompt", OM, "prompt"),
    _oner("empty-prompt", {**OM, "prompt": ""}, "prompt"),
    _oner("prompt-int", {**OM, "prompt": 7}, "prompt"),
    _oner("resolution-unknown", {**OMP, "resolution": "1920x1080"}, "resolution"),
    _oner("resolution-int", {**OMP, "resolution": 768}, "resolution"),
    _oner("resolution-object", {**OMP, "resolution": {"w": 768}}, "resolution"),
    _oner("video-length-unknown", {**OMP, "video_length": "7s"}, "video_length"),
    _oner("video-length-int", {**OMP, "video_length": 5}, "video_length"),
    _oner("output-format-unknown", {**OMP, "output_format": "b64_json"}, "output_format"),
    _oner("steps-string", {**OMP, "num_inference_steps": "30"}, "num_inference_steps"),
    _oner("steps-huge", {**OMP, "num_inference_steps": 10**30}, "num_inference_steps"),
    _oner("steps-zero", {**OMP, "num_inference_steps": 0}, "num_inference_steps"),
    _oner("steps-bool", {**OMP, "num_inference_steps": True}, "num_inference_steps"),
    _oner(
        "steps-nan",
        b'{"model": "kandinsky5-text-to-video", "prompt": "x", "num_inference_steps": NaN}',
        "num_inference_steps",
    ),
    _oner("seed-2-70", {**OMP, "seed": 2**70}, "seed"),
    _oner("seed-string", {**OMP, "seed": "x"}, "seed"),
    _oner("negative-prompt-int", {**OMP, "negative_prompt": 1}, "negative_prompt"),
    _oner("malformed-json", b'{"model": ', ""),
    _oner("json-array", b"[1, 2]", ""),
    _oner("empty-body", b"", ""),
    _oner("nested-100k-deep", DEEP, ""),
    _oner("int-5000-digits", HUGE_INT, ""),
    _oner("not-utf8", NOT_UTF8, ""),
    _oner(
        "form-urlencoded",
        b"model=kandinsky5&prompt=x",
        "",
        headers={"content-type": "application/x-www-form-urlencoded"},
    ),
    _oner("no-key", OMP, "", 401, auth=None),
    _oner("wrong-key", OMP, "", 401, auth="sk-wrong"),
    _oner("wrong-bearer", OMP, "", 401, auth="Bearer sk-wrong"),
]


def _oai(
    name: str, body: Any, param: str | None, code: str | None = None, status: int = 400, msg: str = "", **kw
) -> Case:
    if isinstance(body, bytes):
        return Case(name, "openai", "POST", OAI, status, oai(param, code, msg), body=body, **kw)
    return Case(name, "openai", "POST", OAI, status, oai(param, code, msg), json=body, **kw)


def _multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "k5b") -> bytes:
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


MULTIPART = {"content-type": "multipart/form-data; boundary=k5b"}
P = {"prompt": "x"}

OPENAI_CASES = [
    _oai("missing-prompt", {"seconds": "5"}, "prompt", "missing_required_parameter"),
    _oai("blank-prompt", {"prompt": " \n\t"}, "prompt", "missing_required_parameter"),
    _oai("prompt-int", {"prompt": 5}, "prompt", "invalid_value"),
    _oai("seconds-unknown", {**P, "seconds": "21"}, "seconds", "invalid_value"),
    _oai("seconds-float", {**P, "seconds": 5.0}, "seconds", "invalid_value"),
    _oai("seconds-bool", {**P, "seconds": True}, "seconds", "invalid_value"),
    _oai("seconds-huge", {**P, "seconds": 10**30}, "seconds", "invalid_value"),
    _oai("size-garbage", {**P, "size": "big"}, "size", "invalid_value"),
    _oai("size-huge", {**P, "size": "99999x99999"}, "size", "invalid_value"),
    _oai("size-zero", {**P, "size": "0x512"}, "size", "invalid_value"),
    _oai("size-int", {**P, "size": 768}, "size", "invalid_value"),
    _oai("model-unknown", {**P, "model": "sora-3"}, "model", "invalid_value"),
    _oai("model-int", {**P, "model": 12}, "model", "invalid_value"),
    _oai("steps-string", {**P, "num_inference_steps": "abc"}, "num_inference_steps", "invalid_value"),
    _oai("steps-huge", {**P, "num_inference_steps": 10**30}, "num_inference_steps", "invalid_value"),
    _oai("steps-1e400", b'{"prompt": "x", "num_inference_steps": 1e400}', "num_inference_steps", "invalid_value"),
    _oai("seed-negative", {**P, "seed": -1}, "seed", "invalid_value"),
    _oai("i2v-without-image", {**P, "model": "kandinsky5-lite-i2v-5s"}, "input_reference", "invalid_value"),
    _oai(
        "t2v-with-image",
        {**P, "model": "kandinsky5-lite-t2v-sft-5s", "input_reference": data_uri(PNG)},
        "input_reference",
        "invalid_value",
    ),
    _oai("input-reference-int", {**P, "input_reference": 7}, "input_reference", "invalid_value"),
    _oai(
        "input-reference-file-id", {**P, "input_reference": {"file_id": "file-abc"}}, "input_reference", "invalid_value"
    ),
    *[
        _oai(f"input-reference-{name}", {**P, "input_reference": url}, "input_reference", "invalid_value", msg=msg)
        for name, (url, msg) in HOSTILE_IMAGES.items()
        if name
        in (
            "file-url",
            "metadata-ip",
            "hex-ip",
            "data-svg",
            "data-not-base64",
            "data-bomb-header",
            "ipv6-loopback-closed-port",
            "gopher-url",
        )
    ],
    _oai(
        "multipart-text-as-image",
        _multipart([("prompt", None, b"x"), ("input_reference", "a.png", b"not an image")]),
        "input_reference",
        "invalid_value",
        headers=MULTIPART,
    ),
    _oai(
        "multipart-svg-upload",
        _multipart([("prompt", None, b"x"), ("input_reference", "a.svg", SVG)]),
        "input_reference",
        "invalid_value",
        headers=MULTIPART,
    ),
    _oai(
        "multipart-no-prompt",
        _multipart([("seconds", None, b"5")]),
        "prompt",
        "missing_required_parameter",
        headers=MULTIPART,
    ),
    _oai(
        "multipart-two-files",
        _multipart([("prompt", None, b"x"), ("input_reference", "a.png", PNG), ("extra", "b.png", PNG)]),
        None,
        "invalid_request",
        headers=MULTIPART,
    ),
    _oai("multipart-no-boundary", b"--x\r\n\r\n", None, None, headers={"content-type": "multipart/form-data"}),
    # python-multipart reads a truncated body as an empty form: the prompt is missing
    _oai(
        "multipart-truncated",
        _multipart([("prompt", None, b"x")])[:30],
        "prompt",
        "missing_required_parameter",
        headers=MULTIPART,
    ),
    _oai(
        "multipart-steps-text",
        _multipart([("prompt", None, b"x"), ("num_inference_steps", None, b"ten")]),
        "num_inference_steps",
        "invalid_value",
        headers=MULTIPART,
    ),
    _oai(
        "form-no-prompt",
        b"seconds=5",
        "prompt",
        "missing_required_parameter",
        headers={"content-type": "application/x-www-form-urlencoded"},
    ),
    _oai("malformed-json", b'{"prompt": "x",}', None, "invalid_json"),
    _oai("json-array", b'["x"]', None, "invalid_json"),
    _oai("empty-body", b"", None, "invalid_json"),
    _oai("nested-100k-deep", DEEP, None, "invalid_json"),
    _oai("int-5000-digits", HUGE_INT, None, "invalid_json"),
    _oai("xml", XML, None, "invalid_json", headers={"content-type": "application/xml"}),
    _oai("text-plain", b"a fox", None, "invalid_json", headers={"content-type": "text/plain"}),
    Case("retrieve-unknown", "openai", "GET", OAI + "/video_0123", 404, oai("video_id", "not_found")),
    Case("retrieve-fal-id", "openai", "GET", OAI + "/{fal_id}", 404, oai("video_id", "not_found")),
    Case("retrieve-aimlapi-id", "openai", "GET", OAI + "/{aimlapi_job}", 404, oai("video_id", "not_found")),
    Case("retrieve-10k-id", "openai", "GET", OAI + "/video_" + "f" * 10_000, 404, oai("video_id", "not_found")),
    Case("content-unknown", "openai", "GET", OAI + "/video_0123/content", 404, oai("video_id", "not_found")),
    Case("content-fal-id", "openai", "GET", OAI + "/{fal_id}/content", 404, oai("video_id", "not_found")),
    Case(
        "content-bad-variant",
        "openai",
        "GET",
        OAI + "/{openai_id}/content?variant=poster",
        400,
        oai("variant", "invalid_value"),
    ),
    Case("delete-unknown", "openai", "DELETE", OAI + "/video_0123", 404, oai("video_id", "not_found")),
    Case("delete-fal-id", "openai", "DELETE", OAI + "/{fal_id}", 404, oai("video_id", "not_found")),
    Case("delete-onerouter-id", "openai", "DELETE", OAI + "/{onerouter_id}", 404, oai("video_id", "not_found")),
    Case(
        "remix-unknown",
        "openai",
        "POST",
        OAI + "/video_0123/remix",
        404,
        oai("video_id", "not_found"),
        json={"prompt": "x"},
    ),
    # remix, edits, extensions (openai_edits.py): the fake engine's "mp4" is no video, and says so
    Case(
        "remix-source-not-a-video",
        "openai",
        "POST",
        OAI + "/{openai_id}/remix",
        400,
        oai("video", "invalid_value", "not a readable video"),
        json={"prompt": "x"},
    ),
    Case("remix-no-prompt", "openai", "POST", OAI + "/{openai_id}/remix", 400, oai("prompt"), json={}),
    Case(
        "remix-strength-2",
        "openai",
        "POST",
        OAI + "/{openai_id}/remix",
        400,
        oai("strength"),
        json={"prompt": "x", "strength": 2},
    ),
    Case("edits-no-video", "openai", "POST", OAI + "/edits", 400, oai("video"), json={"prompt": "x"}),
    Case(
        "edits-unknown-id",
        "openai",
        "POST",
        OAI + "/edits",
        404,
        oai("video_id", "not_found"),
        json={"prompt": "x", "video": {"id": "video_nope"}},
    ),
    Case(
        "edits-fal-id",
        "openai",
        "POST",
        OAI + "/edits",
        404,
        oai("video_id", "not_found"),
        json={"prompt": "x", "video": {"id": "{fal_id}"}},
    ),
    Case(
        "extensions-25-seconds",
        "openai",
        "POST",
        OAI + "/extensions",
        400,
        oai("seconds"),
        json={"prompt": "x", "seconds": "25", "video": {"id": "{openai_id}"}},
    ),
    Case(
        "extensions-not-an-mp4",
        "openai",
        "POST",
        OAI + "/extensions",
        400,
        oai("video", "invalid_value", "not a readable video"),
        body=_multipart([("prompt", None, b"x"), ("seconds", None, b"4"), ("video", "a.mp4", b"not a video")]),
        headers=MULTIPART,
    ),
    Case("list-limit-negative", "openai", "GET", OAI + "?limit=-1", 400, oai("limit", "invalid_value")),
    Case("list-limit-text", "openai", "GET", OAI + "?limit=abc", 400, oai("limit", "invalid_value")),
    Case("list-limit-huge", "openai", "GET", OAI + "?limit=" + "9" * 30, 400, oai("limit", "invalid_value")),
    Case("list-order-unknown", "openai", "GET", OAI + "?order=sideways", 400, oai("order", "invalid_value")),
    Case("list-after-unknown", "openai", "GET", OAI + "?after=video_nope", 400, oai("after", "invalid_value")),
    Case("list-after-fal-id", "openai", "GET", OAI + "?after={fal_id}", 400, oai("after", "invalid_value")),
    _oai("no-key", P, None, "invalid_api_key", 401, auth=None),
    _oai("wrong-key", P, None, "invalid_api_key", 401, auth="Bearer sk-wrong"),
    _oai("bearer-only", P, None, "invalid_api_key", 401, auth="Bearer"),
    Case("retrieve-no-key", "openai", "GET", OAI + "/{openai_id}", 401, oai(None, "invalid_api_key"), auth=None),
    Case(
        "content-wrong-key",
        "openai",
        "GET",
        OAI + "/{openai_id}/content",
        401,
        oai(None, "invalid_api_key"),
        auth="Bearer x",
    ),
    Case("delete-no-key", "openai", "DELETE", OAI + "/{openai_id}", 401, oai(None, "invalid_api_key"), auth=None),
]


def _files(name: str, path: str, raw: bool = False, miss: bool = False) -> Case:
    if miss:  # the path does not reach /files at all (see route_miss)
        return Case(name, "files", "GET", path, 405, route_miss, raw=raw, auth=None)
    return Case(name, "files", "GET", path, 404, not_a_file, raw=raw, auth=None)


FILES_CASES = [
    _files("dotdot-raw", "/files/{fal_file}/../../jobs.sqlite3", raw=True, miss=True),
    _files("dotdot-root-raw", "/files/../jobs.sqlite3", raw=True),
    _files("dotdot-encoded", "/files/%2e%2e/%2e%2e/jobs.sqlite3", miss=True),
    _files("dotdot-name-encoded-slash", "/files/{fal_file}/..%2F..%2Fjobs.sqlite3", miss=True),
    _files("dotdot-fully-encoded", "/files/{fal_file}/%2e%2e%2f%2e%2e%2fjobs.sqlite3", miss=True),
    _files("dotdot-double-encoded", "/files/{fal_file}/%252e%252e%252fjobs.sqlite3"),
    _files("dotdot-in-id", "/files/..%2F..%2Ffiles/output.mp4", miss=True),
    _files("dotdot-id-name", "/files/%2e%2e/jobs.sqlite3"),
    _files("backslashes", "/files/{fal_file}/..%5C..%5Cjobs.sqlite3"),
    _files("absolute-name", "/files/{fal_file}/%2Fetc%2Fpasswd", miss=True),
    _files("absolute-id", "/files/%2Fetc/passwd"),
    _files("empty-id-raw", "/files//etc/passwd", raw=True),
    _files("nul-in-name", "/files/{fal_file}/output.mp4%00.txt"),
    _files("nul-name", "/files/{fal_file}/%00"),
    _files("part-file", "/files/{fal_file}/output.mp4.part"),
    _files("unknown-id", "/files/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA/output.mp4"),
    _files("short-id", "/files/abc/output.mp4"),
    _files("no-name", "/files/{fal_file}", miss=True),
    _files("extra-segment", "/files/{fal_file}/output.mp4/x", miss=True),
    _files("long-name", "/files/{fal_file}/" + "a" * 5000 + ".mp4"),
    _files("dot-name", "/files/{fal_file}/.deleted"),
    _files("openai-file-other-name", "/files/{openai_file}/jobs.sqlite3"),
]

PLAYGROUND_CASES = [
    Case("jobs-no-key", "playground", "GET", "/api/jobs", 401, detail("API key"), auth=None),
    Case("jobs-wrong-key", "playground", "GET", "/api/jobs", 401, detail("API key"), auth="Bearer nope"),
    Case("jobs-limit-zero", "playground", "GET", "/api/jobs?limit=0", 422, fastapi_422(["query", "limit"])),
    Case("jobs-limit-text", "playground", "GET", "/api/jobs?limit=abc", 422, fastapi_422(["query", "limit"])),
    Case("jobs-limit-huge", "playground", "GET", "/api/jobs?limit=" + "9" * 40, 422, fastapi_422(["query", "limit"])),
    Case("jobs-offset-negative", "playground", "GET", "/api/jobs?offset=-1", 422, fastapi_422(["query", "offset"])),
    Case("job-unknown", "playground", "GET", "/api/jobs/nope", 404, detail("no job 'nope'")),
    Case("job-no-key", "playground", "GET", "/api/jobs/{fal_id}", 401, detail("API key"), auth=None),
    Case("cancel-unknown", "playground", "POST", "/api/jobs/nope/cancel", 404, detail("no job")),
    Case("cancel-no-key", "playground", "POST", "/api/jobs/{fal_id}/cancel", 401, detail("API key"), auth=None),
    Case("delete-no-key", "playground", "DELETE", "/api/jobs/{fal_id}", 401, detail("API key"), auth=None),
    Case("delete-unknown", "playground", "DELETE", "/api/jobs/nope", 404, detail("no job")),
    Case("poster-unknown", "playground", "GET", "/api/posters/aaaaaaaaaaaaaaaaaaaa.webp", 404, detail("no poster")),
    Case("static-unknown", "playground", "GET", "/static/secrets.txt", 404, detail("not found")),
    Case("healthz-post", "playground", "POST", "/healthz", 405, detail("Method Not Allowed"), json={}),
    Case("metrics-delete", "playground", "DELETE", "/metrics", 405, detail("Method Not Allowed")),
    Case("unknown-deep-path", "playground", "GET", "/no/such/route/here/at/all", 405, route_miss),
    Case("unknown-short-path", "playground", "GET", "/nothing", 404, detail("Not Found")),
]

CORPUS: list[Case] = [*FAL_CASES, *AIML_CASES, *ONEROUTER_CASES, *OPENAI_CASES, *FILES_CASES, *PLAYGROUND_CASES]


# -- cases answered by the input limits and the SSRF guard (server/netguard.py) ----------------------
# The module server runs with small limits: bodies over 256 KiB, prompts over 2000 characters and
# images over 1 megapixel are refused, as are GIFs and loopback/private image URLs and webhooks.

LIMITS = {"max_body_bytes": 256 * 1024, "max_prompt_chars": 2000, "image_max_pixels": 1_000_000}
BIG_BODY = json.dumps({"prompt": "x", "negative_prompt": "y" * 300_000}).encode()
LONG = "a fox " * 400  # 2400 characters
WIDE_PNG = _png((1600, 1000), mode="1")  # 1.6 megapixels, a few hundred bytes
GIF = _gif()


BODY, PROMPT, PIXELS = "K5SERVE_MAX_BODY_BYTES", "K5SERVE_MAX_PROMPT_CHARS", "K5SERVE_IMAGE_MAX_PIXELS"
REFUSED = "is a loopback address; loopback, private, link-local and metadata addresses are refused"


def _webhook(name: str, url: str, msg: str) -> Case:
    path = FAL_LITE + "?fal_webhook=" + quote(url, safe="")
    return Case(f"webhook-{name}", "fal", "POST", path, 422, fal_query_422("fal_webhook", msg), json={"prompt": "x"})


GUARDED: list[Case] = [
    Case("body-too-large", "fal", "POST", FAL_LITE, 413, detail(BODY), body=BIG_BODY),
    _aiml("body-too-large", BIG_BODY, BODY, 413),
    _oner("body-too-large", BIG_BODY, "", 413, msg=BODY),
    _oai("body-too-large", BIG_BODY, None, "request_too_large", 413, msg=BODY),
    _fal_body("prompt-too-long", {"prompt": LONG}, field_name="prompt", msg=PROMPT),
    _aiml("prompt-too-long", {**M, "prompt": LONG}, PROMPT),
    _oner("prompt-too-long", {**OM, "prompt": LONG}, "prompt", msg=PROMPT),
    _oai("prompt-too-long", {"prompt": LONG}, "prompt", "invalid_value", msg=PROMPT),
    _oai("negative-prompt-too-long", {**P, "negative_prompt": LONG}, "negative_prompt", "invalid_value", msg=PROMPT),
    _i2v("too-many-pixels", data_uri(WIDE_PNG), PIXELS),
    _oai(
        "input-reference-too-many-pixels", {**P, "input_reference": data_uri(WIDE_PNG)}, "input_reference", msg=PIXELS
    ),
    _i2v("gif", data_uri(GIF, "image/gif"), "is a GIF image"),
    _oai("input-reference-gif", {**P, "input_reference": data_uri(GIF, "image/gif")}, "input_reference", msg="GIF"),
    # a loopback server that really serves a valid PNG: refused all the same (a private address)
    _i2v("loopback-url", "{loopback}/ok.png", REFUSED),
    _oai("input-reference-loopback-url", {**P, "input_reference": "{loopback}/ok.png"}, "input_reference", msg=REFUSED),
    _i2v("localhost-url", "{loopback_name}/ok.png", "localhost resolves to 127.0.0.1"),
    _webhook("metadata-ip", "http://169.254.169.254/hook", "cloud metadata address"),
    _webhook("not-a-url", "not a url", "whitespace"),
    _webhook("file-url", "file:///etc/passwd", "only http and https"),
    _webhook("javascript", "javascript:alert(1)", "only http and https"),
    _webhook("loopback", "http://127.0.0.1:1/hook", REFUSED),
    _webhook("ipv6-loopback", "http://[::1]:1/hook", REFUSED),
]


# -- the server and its earlier results -----------------------------------------------------------


@dataclass
class Corpus:
    url: str
    client: httpx.Client
    services: Any
    ids: dict[str, str]
    baseline: dict[str, bytes]
    loopback: Loopback

    def auth_for(self, case: Case) -> dict[str, str]:
        header = AUTH.get(case.contract, AUTH["openai"]) if case.auth is DEFAULT else case.auth
        return {} if header is None else {"authorization": header}

    def fill(self, text: str) -> str:
        for key, value in self.ids.items():
            text = text.replace("{" + key + "}", value)
        return text

    def send(self, case: Case) -> httpx.Response:
        path = self.fill(case.path)
        headers = {**self.auth_for(case), **case.headers}
        if case.raw:
            return raw_request(self.url, case.method, path, headers)
        content = case.body
        if content is None and case.json is not None:
            content = self.fill(json.dumps(case.json)).encode()
            headers.setdefault("content-type", "application/json")
        if content is not None:
            headers.setdefault("content-type", "application/json")
        headers = {k: v.encode("latin-1") if not v.isascii() else v for k, v in headers.items()}
        response = self.client.request(case.method, path, content=content, headers=headers)
        if case.deferred:
            response = self.follow_fal(response, headers)
        return response

    def follow_fal(self, submitted: httpx.Response, headers: dict) -> httpx.Response:
        """fal: the submit is accepted; the error is on the result route once the job completed."""
        assert submitted.status_code == 200, submitted.text
        accepted = submitted.json()
        # a job whose input is invalid is born finished: IN_QUEUE or already COMPLETED
        assert accepted["status"] in ("IN_QUEUE", "COMPLETED") and accepted["request_id"], accepted
        auth = {"authorization": headers["authorization"]}
        status_url, result_url = accepted["status_url"], accepted["response_url"]

        def completed() -> dict | None:
            status = self.client.get(status_url, headers=auth)
            assert status.status_code in (200, 202), status.text
            return status.json() if status.json()["status"] == "COMPLETED" else None

        final = wait_until(completed, timeout=30, interval=0.01, what="the fal job to complete")
        assert final.get("error") and final.get("error_type") == "bad_request", final  # fal: COMPLETED + error
        return self.client.get(result_url, headers=auth)

    def snapshot(self) -> dict[str, bytes]:
        c, ids = self.client, self.ids
        fal_auth = {"authorization": AUTH["fal"]}
        aiml_auth = {"authorization": AUTH["aimlapi"]}
        oai_auth = {"authorization": AUTH["openai"]}
        got = {
            "fal-status": c.get(f"/fal-ai/kandinsky5/requests/{ids['fal_id']}/status", headers=fal_auth),
            "fal-result": c.get(f"/fal-ai/kandinsky5/requests/{ids['fal_id']}", headers=fal_auth),
            "aimlapi-poll": c.get(AIML, params={"generation_id": ids["aimlapi_id"]}, headers=aiml_auth),
            "openai-retrieve": c.get(f"{OAI}/{ids['openai_id']}", headers=oai_auth),
            "openai-content": c.get(f"{OAI}/{ids['openai_id']}/content", headers=oai_auth),
        }
        for name in ("fal", "aimlapi", "onerouter", "openai"):
            got[f"{name}-file"] = c.get(ids[f"{name}_url"], headers=oai_auth)  # /files ignores the key
        for name, response in got.items():
            assert response.status_code == 200, (name, response.text)
        return {name: response.content for name, response in got.items()}

    def assert_intact(self) -> None:
        now = self.snapshot()
        for name, content in self.baseline.items():
            assert now[name] == content, f"{name} changed after the bad input"

    def assert_queue_takes(self, contract: str) -> None:
        """A good job submitted now runs to the end, and its video is served."""
        video_url = run_good_job(self.client, contract)[1]
        video = self.client.get(video_url, headers={"authorization": AUTH["openai"]})
        assert video.status_code == 200 and video.content[4:8] == b"ftyp"


def run_good_job(client: httpx.Client, contract: str) -> tuple[dict, str]:
    """Submit one good job through `contract`, wait for it; -> (final answer, video URL)."""
    path, body = GOOD[contract]
    auth = {"authorization": AUTH[contract]}
    response = client.post(path, json=body, headers=auth)
    assert response.status_code in (200, 201), response.text
    if contract == "onerouter":  # synchronous
        final = response.json()
        return final, final["data"][0]["url"]
    if contract == "fal":
        handle = response.json()
        wait_until(
            lambda: client.get(handle["status_url"], headers=auth).json()["status"] == "COMPLETED", what="fal job"
        )
        final = client.get(handle["response_url"], headers=auth).json()
        return final, final["video"]["url"]
    if contract == "aimlapi":
        job_id = response.json()["id"]

        def done():
            body = client.get(AIML, params={"generation_id": job_id}, headers=auth).json()
            return body if body["status"] in ("completed", "error") else None

        final = wait_until(done, what="AI/ML API job")
        return final, final["video"]["url"]
    video_id = response.json()["id"]

    def finished():
        body = client.get(f"{OAI}/{video_id}", headers=auth).json()
        return body if body["status"] in ("completed", "failed") else None

    final = wait_until(finished, what="OpenAI job")
    return final, f"{OAI}/{video_id}/content"


def raw_request(base: str, method: str, target: str, headers: dict[str, str]) -> httpx.Response:
    """Send the request line byte for byte (httpx would normalise `..` segments away)."""
    parts = urlsplit(base)
    lines = [f"{method} {target} HTTP/1.1", f"Host: {parts.netloc}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    response_headers = [tuple(h.split(": ", 1)) for h in header_lines]
    request = httpx.Request(method, base + target)
    return httpx.Response(int(status_line.split()[1]), headers=response_headers, content=body, request=request)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    engine = fakes.FakeEngine()
    loopback = Loopback()  # serves a valid image on 127.0.0.1 (the private-address cases)
    loopback.files["/ok.png"] = ("image/png", PNG)
    data_dir = tmp_path_factory.mktemp("corpus")
    try:
        with (
            threaded_server(engine, data_dir, api_keys=[KEY], max_queue=10_000, **LIMITS) as server,
            httpx.Client(base_url=server.url, timeout=60) as client,
        ):
            ids = {"loopback": loopback.url, "loopback_name": loopback.url.replace("127.0.0.1", "localhost")}
            for contract in GOOD:
                _final, video_url = run_good_job(client, contract)
                ids[f"{contract}_url"] = video_url
                if contract == "fal":
                    ids["fal_id"] = video_url.split("/")[-2]  # file id; replaced below by the request id
            manager = server.services.manager
            for job in manager.list():
                ids[f"{job.contract}_job"] = job.id
                ids[f"{job.contract}_file"] = job.file_id
            ids["fal_id"] = ids["fal_job"]
            ids["openai_id"] = ids["openai_job"]
            ids["onerouter_id"] = ids["onerouter_job"]
            ids["aimlapi_id"] = f"{ids['aimlapi_job']}:sber-ai/kandinsky5-t2v"
            state = Corpus(server.url, client, server.services, ids, {}, loopback)
            state.baseline = state.snapshot()
            yield state
    finally:
        loopback.close()


def _params(cases: list[Case]) -> list:
    return [pytest.param(i, case, id=case.id) for i, case in enumerate(cases)]


def _assert_answer(response: httpx.Response, case: Case) -> None:
    assert response.status_code < 500, f"5xx on bad input: {response.status_code} {response.text[:500]}"
    assert response.status_code == case.status, response.text[:500]
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    case.check(response)


@pytest.mark.parametrize(("index", "case"), _params(CORPUS))
def test_bad_input_gets_the_contracts_4xx(corpus, index, case):
    _assert_answer(corpus.send(case), case)
    corpus.assert_intact()
    if index % 25 == 24:
        corpus.assert_queue_takes(list(GOOD)[index // 25 % 4])


@pytest.mark.parametrize(("index", "case"), _params(GUARDED))
def test_input_limits_and_guards(corpus, index, case):
    _assert_answer(corpus.send(case), case)
    corpus.assert_intact()


@pytest.mark.parametrize("contract", list(GOOD))
def test_after_the_corpus_earlier_results_stay_and_new_jobs_run(corpus, contract):
    corpus.assert_intact()
    corpus.assert_queue_takes(contract)
    # nothing stored was lost: the four good jobs are still there and still succeeded
    for name in GOOD:
        job = corpus.services.manager.get(corpus.ids[f"{name}_job"])
        assert job is not None and job.status.value == "succeeded", name


def test_the_corpus_is_big_enough():
    assert len(CORPUS) >= 80
    assert len({case.id for case in CORPUS + GUARDED}) == len(CORPUS) + len(GUARDED)  # unique ids
    assert {case.contract for case in CORPUS} >= {"fal", "aimlapi", "onerouter", "openai", "files", "playground"}
