"""The video fields of a request, resolved: video-to-video (remix, edit) and extensions.

Called by request.resolve; torch-free (the source is probed with ffmpeg, clips.probe). What comes
out is plain values for the ResolvedRequest: size, frames and the passes' variant. Docs:
docs/sora.md, "Remix, edits and extensions".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .clips import MAX_EXTENSION_SECONDS, MAX_EXTENSIONS, MAX_TOTAL_FRAMES, MAX_TOTAL_SECONDS, MIN_PASS_ADDED, probe
from .errors import InvalidRequest
from .variants import FPS, Variant, continuation_variant, fit_size

# A remix or edit with no strength runs this share of the schedule from the noised source. The
# Kandinsky 5 schedule is shifted (shift 5: the noise level at strength s is 5s/(1+4s)), so 0.5
# starts at noise level 0.83 and keeps the source's layout and motion while the prompt changes it.
DEFAULT_STRENGTH = 0.5


@dataclass(frozen=True)
class SourcePlan:
    width: int
    height: int
    num_frames: int  # frames of the result (an extension: source + added)
    strength: float = 1.0
    source_frames: int = 0
    extensions: int = 0
    continuation: Variant | None = None


def steps_to_run(steps: int, strength: float) -> int:
    """Denoising steps a video-to-video runs: diffusers' img2img rule (`get_timesteps`), the last
    `int(steps * strength)` steps of the schedule (at least one, as strength > 0)."""
    start = int(max(steps - steps * strength, 0))
    return steps - start


def _given(req, *names: str) -> str | None:
    return next((n for n in names if getattr(req, n) not in (None, False)), None)


def resolve_source(req, variant: Variant) -> SourcePlan | None:
    """The plan for a request with `video` or `extend` (None for one without). Raises InvalidRequest."""
    if req.video and req.extend:
        raise InvalidRequest("video", Path(req.video).name, "give a video to remix or one to extend, not both")
    if req.video:
        return _video_to_video(req, variant)
    if req.extend:
        return _extension(req, variant)
    if req.strength is not None:
        raise InvalidRequest("strength", req.strength, "strength is for video-to-video (a remix or an edit)")
    return None


def _video_to_video(req, variant: Variant) -> SourcePlan:
    if variant.task != "t2v":
        raise InvalidRequest(
            "model", variant.name, f"video-to-video runs on text-to-video models; {variant.name} is I2V"
        )
    given = _given(req, "image", "width", "height", "num_frames", "seconds")
    if given:
        raise InvalidRequest(given, getattr(req, given), f"a remix keeps the source's size and length: drop {given}")
    strength = DEFAULT_STRENGTH if req.strength is None else req.strength
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise InvalidRequest("strength", strength, f"strength must be a number in (0, 1], got {strength!r}")
    info = probe(req.video)
    frames = (info.frames - 1) // 4 * 4 + 1  # 4k+1 frames: at most 3 trailing frames left out
    if frames > variant.max_frames:
        raise InvalidRequest(
            "video",
            Path(req.video).name,
            f"the video is {info.frames} frames ({info.frames / FPS:.1f} s at 24 fps); video-to-video on "
            f"{variant.name} makes at most {variant.max_frames} frames in one pass",
        )
    width, height = fit_size(variant, info.width, info.height)
    return SourcePlan(width, height, frames, strength=float(strength))


def _extension(req, variant: Variant) -> SourcePlan:
    given = _given(req, "image", "width", "height")
    if given:
        raise InvalidRequest(given, getattr(req, given), f"an extension keeps the source's size: drop {given}")
    if req.num_frames is not None and req.seconds is not None:
        raise InvalidRequest("num_frames", req.num_frames, "give num_frames or seconds, not both")
    cont = continuation_variant(variant)
    if req.seconds is not None:
        seconds = req.seconds
        if isinstance(seconds, bool) or not isinstance(seconds, int) or not 1 <= seconds <= MAX_EXTENSION_SECONDS:
            message = f"an extension adds 1 to {MAX_EXTENSION_SECONDS} seconds, got {seconds!r}"
            raise InvalidRequest("seconds", seconds, message)
        added = seconds * FPS
    else:
        added = cont.max_frames - 1 if req.num_frames is None else req.num_frames
    limit = MAX_EXTENSION_SECONDS * FPS
    if isinstance(added, bool) or not isinstance(added, int) or not MIN_PASS_ADDED <= added <= limit or added % 4:
        message = f"an extension adds a multiple of 4 frames from {MIN_PASS_ADDED} to {limit} (20 s), got {added!r}"
        raise InvalidRequest("num_frames", added, message)
    before = req.source_extensions
    if isinstance(before, bool) or not isinstance(before, int) or before < 0:
        raise InvalidRequest("source_extensions", before, "source_extensions must be a non-negative integer")
    if before >= MAX_EXTENSIONS:
        message = f"the video was extended {before} times already; the limit is six"
        raise InvalidRequest("video", Path(req.extend).name, message)
    info = probe(req.extend)
    total = info.frames + added
    if total > MAX_TOTAL_FRAMES:
        raise InvalidRequest(
            "seconds",
            added // FPS,
            f"the video is {info.frames / FPS:.1f} s; adding {added / FPS:g} s exceeds {MAX_TOTAL_SECONDS} s in all",
        )
    width, height = fit_size(cont, info.width, info.height)
    return SourcePlan(width, height, total, source_frames=info.frames, extensions=before + 1, continuation=cont)
