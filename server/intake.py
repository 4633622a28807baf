"""Image intake for image-to-video: `data:` URIs and http(s) URLs -> a checked local image file.

Shared by every contract. Fetches have a timeout and a size cap; stricter limits (allow-lists,
private-address guards) come with the hardening work.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote_to_bytes, urlsplit

import httpx

_SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp"}


class ImageInputError(ValueError):
    """The image could not be used; `message` names the value and what was wrong with it."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class IntakeLimits:
    timeout: float = 15.0
    max_bytes: int = 20 * 1024 * 1024


def describe(source: str, limit: int = 80) -> str:
    return source if len(source) <= limit else source[:limit] + "…"


async def fetch_image(source: str, dest_stem: Path, limits: IntakeLimits) -> tuple[Path, tuple[int, int]]:
    """Store the image named by `source` at dest_stem + suffix; returns (path, (width, height))."""
    if not isinstance(source, str) or not source:
        raise ImageInputError("image_url must be a non-empty string (an http(s) URL or a data: URI)")
    scheme = urlsplit(source).scheme.lower() if ":" in source else ""
    if scheme == "data":
        data = _decode_data_uri(source, limits.max_bytes)
    elif scheme in ("http", "https"):
        data = await _download(source, limits)
    else:
        raise ImageInputError(f"image_url {describe(source)!r} is not an http(s) URL or a data: URI")
    return await asyncio.to_thread(_check_and_store, data, dest_stem, source)


def _decode_data_uri(uri: str, max_bytes: int) -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep:
        raise ImageInputError(f"data URI {describe(uri)!r} has no ',' before its data")
    if len(payload) > max_bytes * 4 // 3 + 4:
        raise ImageInputError(f"data URI image is larger than {max_bytes} bytes")
    if header.lower().endswith(";base64"):
        try:
            data = base64.b64decode(payload, validate=False)
        except (binascii.Error, ValueError) as exc:
            raise ImageInputError(f"data URI {describe(uri)!r} is not valid base64 ({exc})") from exc
    else:
        data = unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise ImageInputError(f"data URI image is larger than {max_bytes} bytes")
    return data


async def _download(url: str, limits: IntakeLimits) -> bytes:
    try:
        async with (
            httpx.AsyncClient(timeout=limits.timeout, follow_redirects=True, max_redirects=3) as client,
            client.stream("GET", url) as response,
        ):
            return await _read_capped(url, response, limits.max_bytes)
    except httpx.TimeoutException as exc:
        raise ImageInputError(f"image_url {describe(url)!r} timed out after {limits.timeout:g} s") from exc
    except httpx.HTTPError as exc:
        raise ImageInputError(f"image_url {describe(url)!r} could not be fetched ({type(exc).__name__})") from exc


async def _read_capped(url: str, response: httpx.Response, max_bytes: int) -> bytes:
    if response.status_code != 200:
        raise ImageInputError(f"image_url {describe(url)!r} answered HTTP {response.status_code}")
    too_big = ImageInputError(f"image_url {describe(url)!r} is larger than {max_bytes} bytes")
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise too_big
    chunks, size = [], 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > max_bytes:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _check_and_store(data: bytes, dest_stem: Path, source: str) -> tuple[Path, tuple[int, int]]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, size = img.format, img.size
            img.verify()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageInputError(f"image_url {describe(source)!r} is not a readable image") from exc
    if fmt not in _SUFFIX:
        raise ImageInputError(f"image_url {describe(source)!r} is a {fmt} image; use JPEG, PNG or WEBP")
    path = dest_stem.with_name(dest_stem.name + _SUFFIX[fmt])
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path, size
