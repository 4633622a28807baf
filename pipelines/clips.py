"""Source videos and long clips, torch-free: what a remix, an edit or an extension starts from, and
how a clip longer than one pass is cut into passes.

A source video (a finished job's mp4 or an uploaded one) is read through ffmpeg at 24 fps (other
frame rates are resampled, keeping the duration) and fitted to the size that runs: centre-cropped to
its aspect, then scaled (the same fit as an I2V image, pipelines/images.py). When it already is
24 fps at that size (a k5serve output), the frames are the file's own, untouched.

Limits follow Sora's extensions (docs/sora.md, "Remix, edits and extensions"): an extension adds at most 20 s, a clip is
extended at most six times, and no clip is longer than 120 s.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InvalidRequest
from .variants import FPS

MAX_EXTENSION_SECONDS = 20
MAX_EXTENSIONS = 6
MAX_TOTAL_SECONDS = 120
MAX_TOTAL_FRAMES = MAX_TOTAL_SECONDS * FPS + 1  # 2881: what 120 s at 24 fps are as a 4k+1 clip
MAX_SOURCE_SIDE = 4096  # a source is decoded whole at admission to count its frames: bound the work
# An extension pass makes `added + 1` frames with the I2V model and drops its first (the conditioning
# frame): `added` is a multiple of 4 (4k+1 frames) and at least 16 (I2V needs >= 17 frames).
MIN_PASS_ADDED = 16


@dataclass(frozen=True)
class ClipInfo:
    """What a source video is: its size and how many frames it has at 24 fps."""

    width: int
    height: int
    fps: float
    frames: int  # at 24 fps (resampled when the file has another rate)


def probe(path: str, field: str = "video") -> ClipInfo:
    """Size, rate and frame count at 24 fps of the video at `path`; InvalidRequest naming `field`
    when it is missing, not a video, too large, or longer than MAX_TOTAL_SECONDS. The frames are
    counted by decoding them through read_frames' own rate filter (scaled down: cheap), so the count
    is the number read_frames yields."""
    import imageio_ffmpeg

    try:
        meta = _meta(path)
    except (OSError, RuntimeError, StopIteration) as exc:
        raise InvalidRequest(field, Path(path).name, f"{field} is not a readable video ({_first_line(exc)})") from exc
    width, height = _display_size(meta)
    fps = float(meta.get("fps") or 0.0)
    if not width or not height or max(width, height) > MAX_SOURCE_SIDE:
        message = f"{field} is {width}x{height}; sides up to {MAX_SOURCE_SIDE} px are read"
        raise InvalidRequest(field, f"{width}x{height}", message)
    reader = imageio_ffmpeg.read_frames(path, output_params=["-vf", ",".join([*_rate(meta), "scale=16:16"])])
    frames = 0
    try:
        next(reader)
        for _ in reader:
            frames += 1
            if frames > MAX_TOTAL_FRAMES:
                message = f"{field} is longer than {MAX_TOTAL_SECONDS} s, the longest clip"
                raise InvalidRequest(field, Path(path).name, message)
    except RuntimeError as exc:
        raise InvalidRequest(field, Path(path).name, f"{field} is not a readable video ({_first_line(exc)})") from exc
    finally:
        reader.close()
    if frames == 0:
        raise InvalidRequest(field, Path(path).name, f"{field} has no video frames")
    return ClipInfo(width, height, fps, frames)


def _rate(meta: dict) -> list[str]:
    """The filter that makes a clip 24 fps: none for a 24 fps clip (its frames are read as they are)."""
    return [] if abs(float(meta.get("fps") or 0.0) - FPS) <= 1e-3 else [f"fps={FPS}"]


def read_frames(path: str, width: int, height: int, limit: int | None = None) -> Iterator[np.ndarray]:
    """The frames of `path` as (height, width, 3) uint8, at 24 fps, fitted to width x height; at most
    `limit`. A 24 fps source of that size is read as it is (no filter: no resampling, no scaling)."""
    import imageio_ffmpeg

    info = _meta(path)
    filters = _rate(info)
    if _display_size(info) != (width, height):
        # centre crop to the target aspect, then scale: pipelines/images.crop_to_aspect's fit
        filters.append(f"crop='min(iw,ih*{width}/{height})':'min(ih,iw*{height}/{width})'")
        filters.append(f"scale={width}:{height}:flags=bicubic")
    params = ["-vf", ",".join(filters)] if filters else None
    reader = imageio_ffmpeg.read_frames(path, output_params=params)
    try:
        next(reader)
        for n, buf in enumerate(reader):
            if limit is not None and n >= limit:
                break
            yield np.frombuffer(buf, dtype=np.uint8).reshape(height, width, 3)
    finally:
        reader.close()


def _meta(path: str) -> dict:
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(path)
    try:
        return next(reader)
    finally:
        reader.close()


def _display_size(meta: dict) -> tuple[int, int]:
    """The frames' size as ffmpeg decodes them: the stream's, turned by its rotation tag (phones)."""
    width, height = (int(v) for v in meta.get("source_size") or meta["size"])
    return (height, width) if int(meta.get("rotate") or 0) % 180 == 90 else (width, height)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def plan_passes(total: int, first: int, per_pass: int) -> list[int]:
    """Cut a clip of `total` frames into passes: `first` frames made by the first pass (a full
    generation, or the source of an extension), then continuation passes, each adding a multiple
    of 4 frames, from MIN_PASS_ADDED up to `per_pass`. Returns [first, added, added, ...] with
    sum == total; `first` may be lowered (by 4s) so that the last pass adds at least
    MIN_PASS_ADDED. The continuation passes share the rest as evenly as 4-frame steps allow."""
    rest = total - first
    if rest <= 0:
        return [total]
    if rest < MIN_PASS_ADDED:  # too short for one I2V pass: the first pass gives up a few frames
        first, rest = first - (MIN_PASS_ADDED - rest), MIN_PASS_ADDED
    count = -(-rest // per_pass)
    quarters, extra = divmod(rest // 4, count)
    return [first] + [4 * (quarters + (1 if i < extra else 0)) for i in range(count)]
