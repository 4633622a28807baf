"""Input intake shared by every contract: request-body limits, and images for image-to-video.

* `BodyLimit`: ASGI middleware answering 413, in the contract's own error shape, to a body over
  K5SERVE_MAX_BODY_BYTES (by Content-Length before reading, and while a chunked body streams in).
* `fetch_image`: a `data:` URI, an http(s) URL or uploaded bytes -> a checked local image file.
  URLs go through the SSRF guard (netguard.py); every limit names its setting in the error:
  fetched bytes (K5SERVE_IMAGE_MAX_BYTES), decoded data-URI bytes (K5SERVE_DATA_URI_MAX_BYTES),
  pixels read from the header before any decode (K5SERVE_IMAGE_MAX_PIXELS), the whole fetch's time
  (K5SERVE_IMAGE_FETCH_TIMEOUT, redirect hops included) and the format (JPEG, PNG or WEBP).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote_to_bytes, urlsplit

import anyio
import httpx
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .contracts import Contracts
from .errors import TooLarge
from .netguard import UrlGuard, UrlRefused
from .web import ResponseError

# PIL format -> file suffix. MPO is what PIL calls many camera JPEGs (a JPEG with extra frames).
_SUFFIX = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp"}
FORMATS = "JPEG, PNG or WEBP"
MAX_REDIRECTS = 3


class ImageInputError(ValueError):
    """The image could not be used; `message` names the value and what was wrong with it."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class IntakeLimits:
    timeout: float = 15.0  # the whole fetch, redirects included (K5SERVE_IMAGE_FETCH_TIMEOUT)
    max_bytes: int = 20 * 1024 * 1024  # a fetched or uploaded image (K5SERVE_IMAGE_MAX_BYTES)
    data_uri_max_bytes: int = 20 * 1024 * 1024  # decoded data: URI (K5SERVE_DATA_URI_MAX_BYTES)
    max_pixels: int = 40_000_000  # width x height (K5SERVE_IMAGE_MAX_PIXELS)
    max_redirects: int = MAX_REDIRECTS
    guard: UrlGuard = field(default_factory=UrlGuard)


def describe(source: str, limit: int = 80) -> str:
    return source if len(source) <= limit else source[:limit] + "…"


def allow_decoding(max_pixels: int) -> None:
    """Let PIL open what intake admitted: its own bomb guard (DecompressionBombError past twice
    Image.MAX_IMAGE_PIXELS) must not fail a checked image later in the engine."""
    from PIL import Image

    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels


async def fetch_image(
    source: str | bytes, dest_stem: Path, limits: IntakeLimits, field: str = "image_url"
) -> tuple[Path, tuple[int, int]]:
    """Store the image named by `source` at dest_stem + suffix; returns (path, (width, height)).

    `source` is an http(s) URL, a data: URI, or the bytes of an uploaded file; `field` is the
    client's name for it, used in every error message."""
    if isinstance(source, (bytes, bytearray)):
        label = f"{field} (uploaded file)"
        if len(source) > limits.max_bytes:
            raise ImageInputError(
                f"{label} is {len(source)} bytes; the limit is {limits.max_bytes} (K5SERVE_IMAGE_MAX_BYTES)"
            )
        data = bytes(source)
    elif not isinstance(source, str) or not source:
        raise ImageInputError(f"{field} must be a non-empty string (an http(s) URL or a data: URI)")
    else:
        label = f"{field} {describe(source)!r}"
        scheme = urlsplit(source).scheme.lower() if ":" in source else ""
        if scheme == "data":
            data = _decode_data_uri(source, limits.data_uri_max_bytes, field)
        elif scheme in ("http", "https"):
            data = await _download(source, limits, label)
        else:
            raise ImageInputError(f"{label} is not an http(s) URL or a data: URI")
    return await asyncio.to_thread(_check_and_store, data, dest_stem, label, limits.max_pixels)


def _decode_data_uri(uri: str, max_bytes: int, field: str) -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep:
        raise ImageInputError(f"{field} data URI {describe(uri)!r} has no ',' before its data")
    base64_encoded = header.lower().endswith(";base64")

    def too_big(size: int, about: str = "") -> ImageInputError:
        return ImageInputError(
            f"{field} data URI image is {about}{size} bytes; the limit is {max_bytes} (K5SERVE_DATA_URI_MAX_BYTES)"
        )

    if base64_encoded and len(payload) * 3 // 4 > max_bytes + 2:  # refuse before decoding
        raise too_big(len(payload) * 3 // 4, "about ")
    if base64_encoded:
        try:
            data = base64.b64decode(payload, validate=False)
        except (binascii.Error, ValueError) as exc:
            raise ImageInputError(f"{field} data URI {describe(uri)!r} is not valid base64 ({exc})") from exc
    else:
        data = unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise too_big(len(data))
    return data


async def _download(url: str, limits: IntakeLimits, label: str) -> bytes:
    guard = limits.guard
    try:
        guard.check_url(url)
        with anyio.fail_after(limits.timeout):  # the whole fetch: a slow drip cannot hold us forever
            async with (
                guard.client(
                    timeout=limits.timeout, follow_redirects=True, max_redirects=limits.max_redirects
                ) as client,
                client.stream("GET", url, headers={"accept-encoding": "identity"}) as response,
            ):
                return await _read_capped(label, response, limits.max_bytes)
    except UrlRefused as exc:
        raise ImageInputError(f"{label} was refused: {exc.message}") from exc
    except (TimeoutError, httpx.TimeoutException) as exc:
        raise ImageInputError(
            f"{label} timed out after {limits.timeout:g} s (the limit is K5SERVE_IMAGE_FETCH_TIMEOUT)"
        ) from exc
    except httpx.TooManyRedirects as exc:
        raise ImageInputError(f"{label} redirected more than {limits.max_redirects} times") from exc
    except httpx.HTTPError as exc:
        raise ImageInputError(f"{label} could not be fetched ({type(exc).__name__}: {exc})"[:400]) from exc


async def _read_capped(label: str, response: httpx.Response, max_bytes: int) -> bytes:
    if response.status_code != 200:
        raise ImageInputError(f"{label} answered HTTP {response.status_code}")
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise ImageInputError(f"{label} is {int(declared)} bytes; the limit is {max_bytes} (K5SERVE_IMAGE_MAX_BYTES)")
    chunks, size = [], 0
    async for chunk in response.aiter_raw():  # raw: a gzip bomb is capped on its wire size, and ...
        size += len(chunk)
        if size > max_bytes:
            raise ImageInputError(
                f"{label} is larger than {max_bytes} bytes, the limit (K5SERVE_IMAGE_MAX_BYTES); stopped reading"
            )
        chunks.append(chunk)
    raw = b"".join(chunks)
    encoding = response.headers.get("content-encoding", "").strip().lower()
    if encoding in ("", "identity"):
        return raw
    return _decompress(label, raw, encoding, max_bytes)  # ... on the decoded size


def _decompress(label: str, raw: bytes, encoding: str, max_bytes: int) -> bytes:
    import zlib

    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise ImageInputError(f"{label} is sent with Content-Encoding {encoding!r}; send it plain or gzip")
    wbits = 16 + zlib.MAX_WBITS if "gzip" in encoding else zlib.MAX_WBITS
    try:
        decoder = zlib.decompressobj(wbits)
        data = decoder.decompress(raw, max_bytes + 1)
    except zlib.error as exc:
        raise ImageInputError(f"{label} has a broken {encoding} body ({exc})") from exc
    if len(data) > max_bytes:
        raise ImageInputError(
            f"{label} decompresses to more than {max_bytes} bytes, the limit (K5SERVE_IMAGE_MAX_BYTES)"
        )
    return data


def _check_and_store(data: bytes, dest_stem: Path, label: str, max_pixels: int) -> tuple[Path, tuple[int, int]]:
    fmt, (width, height) = check_image(data, label, max_pixels)
    path = dest_stem.with_name(dest_stem.name + _SUFFIX[fmt])
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path, (width, height)


def check_image(data: bytes, label: str, max_pixels: int) -> tuple[str, tuple[int, int]]:
    """(PIL format, (width, height)) of an image intake accepts (blocking: a full decode), else
    ImageInputError naming `label` and what was wrong."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            fmt, (width, height) = img.format, img.size
            if fmt not in _SUFFIX:
                raise ImageInputError(f"{label} is a {fmt} image; send {FORMATS}")
            if width * height > max_pixels:
                raise ImageInputError(
                    f"{label} is {width}x{height} = {width * height} pixels; "
                    f"the limit is {max_pixels} (K5SERVE_IMAGE_MAX_PIXELS)"
                )
            img.load()  # the full decode, now that its size is known to be within the limit
    except Image.DecompressionBombError as exc:
        raise ImageInputError(
            f"{label} has more pixels than the image decoder allows ({exc}); "
            f"the limit is {max_pixels} (K5SERVE_IMAGE_MAX_PIXELS)"
        ) from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        if isinstance(exc, ImageInputError):
            raise
        raise ImageInputError(f"{label} is not a readable image; send {FORMATS}") from exc
    return fmt, (width, height)


# -- request bodies -------------------------------------------------------------------------------


class BodyTooLarge(ResponseError):
    """Raised from `receive` when a streamed body passes the limit; the app's ResponseError handler
    answers with the 413 it carries (the contract's own shape)."""


class BodyLimit:
    """Request bodies over `max_bytes` answer 413, worded by the contract owning the path: by
    Content-Length before anything is read, and while a chunked (or lying) body streams in."""

    def __init__(self, app: ASGIApp, max_bytes: int, contracts: Contracts):
        self.app = app
        self.max_bytes = max_bytes
        self.contracts = contracts

    def _too_large(self, scope: Scope, size: int | None) -> Response:
        return self.contracts.refusal(Request(scope), TooLarge(self._message(size)))

    def _message(self, size: int | None) -> str:
        what = f"is {size} bytes" if size is not None else f"is larger than {self.max_bytes} bytes"
        return f"the request body {what}; the limit is {self.max_bytes} (K5SERVE_MAX_BODY_BYTES)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"").strip()
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, int(declared))(scope, receive, send)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self._too_large(scope, None))
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, watched_send)
        except BodyTooLarge as exc:  # raised where no route's handler could answer it
            if not started:
                await exc.response(scope, receive, send)
