"""GenerationRequest: what every contract translates into, and its validation.

Torch-free: the server validates at submit time with `resolve()` before anything is queued.
Validation names the bad value and never rounds silently.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .cancel import CancelToken  # noqa: F401 - re-exported: the server imports it from here
from .clips import MAX_TOTAL_FRAMES, MAX_TOTAL_SECONDS, MIN_PASS_ADDED, plan_passes
from .errors import InvalidRequest
from .request_video import SourcePlan, resolve_source
from .variants import (
    HD_SIZES,
    SD_SIZES,
    TINY_I2V,
    TINY_T2V,
    VARIANTS,
    Variant,
    continuation_variant,
    demo_frames,
    demo_size,
    family,
    for_frames,
    frames_for_seconds,
    nearest_size,
    resolve_model,
)

MAX_STEPS = 100
MIN_GUIDANCE, MAX_GUIDANCE = 1.0, 20.0
MAX_SEED = 2**63 - 1
# "none": exact. "regular": MagCache step caching (approximate; fal's default). See docs/performance.md.
ACCELERATIONS = ("none", "regular")


@dataclass(frozen=True)
class GenerationRequest:
    """One video to make. `None` fields take the variant's defaults in `resolve()`."""

    variant: str
    prompt: str
    negative_prompt: str | None = None
    image: str | None = None  # path of a local image file (I2V); contracts fetch URLs first
    width: int | None = None
    height: int | None = None
    num_frames: int | None = None
    seconds: int | None = None  # alternative to num_frames: 5 -> 121 frames
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    acceleration: str | None = None  # None -> "none"
    # image-to-video with no width/height: pick from the variant's HD sizes (fal's 1024P), not SD
    hd: bool = False
    # rewrite the prompt with Qwen2.5-VL first, as the official pipelines do (pipelines/expand.py);
    # None -> off here; the server fills in its default (K5SERVE_EXPAND_PROMPTS) at admission
    expand_prompt: bool | None = None
    # video-to-video (remix, edit): path of a local source video; size and length come from it, and
    # `strength` in (0, 1] is the share of the schedule that runs (None -> DEFAULT_STRENGTH)
    video: str | None = None
    strength: float | None = None
    # extension: path of a local video to continue; num_frames / seconds then count the frames added
    extend: str | None = None
    source_extensions: int = 0  # how many extensions the source already is (Sora: at most six in all)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> GenerationRequest:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass(frozen=True)
class ResolvedRequest:
    """A validated request with every value concrete. `demo` marks a tiny-model stand-in."""

    variant: Variant
    prompt: str
    negative_prompt: str | None
    image: str | None
    width: int
    height: int
    num_frames: int
    steps: int
    guidance: float
    seed: int
    requested: GenerationRequest = field(compare=False)
    demo: bool = False
    acceleration: str = "none"
    nominal_size: tuple[int, int] | None = None  # (width, height) asked for, when demo mode shrank it
    expand_prompt: bool = False  # stage 2 rewrites the prompt first (pipelines/expand.py)
    video: str | None = None  # video-to-video source (pipelines/video_to_video.py)
    strength: float = 1.0  # share of the schedule that runs from the noised source; 1.0 = from noise
    extend: str | None = None  # the video this one continues (pipelines/extension.py)
    source_frames: int = 0  # frames taken from `extend` (24 fps, fitted to width x height)
    extensions: int = 0  # extensions this clip is made of, this one included
    # more than one pass (an extension, or a clip longer than the variant makes at once): the I2V
    # variant of the continuation passes and their steps and guidance; None: one pass
    continuation: str | None = None
    continuation_steps: int | None = None
    continuation_guidance: float | None = None

    @property
    def passes(self) -> list[int]:
        """Frames per pass: [first, added, ...] (pipelines/clips.plan_passes); [num_frames]: one pass."""
        if self.continuation is None:
            return [self.num_frames]
        first = self.source_frames if self.extend else self.variant.max_frames
        return plan_passes(self.num_frames, first, VARIANTS[self.continuation].max_frames - 1)

    def to_dict(self) -> dict:
        """JSON-safe form, stored with the job at admission: the worker runs exactly this."""
        data = {name: getattr(self, name) for name in self.__dataclass_fields__ if name not in ("variant", "requested")}
        return {**data, "variant": self.variant.name, "requested": self.requested.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> ResolvedRequest:
        """Inverse of to_dict. Raises KeyError for a variant this version of k5serve does not know."""
        # a field added since the record was written (e.g. expand_prompt) takes its default
        names = [n for n in cls.__dataclass_fields__ if n not in ("variant", "requested") and n in data]
        values = {name: data[name] for name in names}
        values["nominal_size"] = tuple(data["nominal_size"]) if data.get("nominal_size") else None
        return cls(
            **values, variant=VARIANTS[data["variant"]], requested=GenerationRequest.from_dict(data["requested"])
        )

    def as_demo(self) -> ResolvedRequest:
        """The same request on the tiny model at demo size (design.md: demo mode). A clip longer
        than one tiny pass is cut to one; an extension adds one tiny pass (16 to 24 frames)."""
        if self.variant.demo:
            return self
        width, height = demo_size(self.width, self.height)
        tiny = VARIANTS[TINY_I2V if self.variant.task == "i2v" else TINY_T2V]
        continuation, frames = None, demo_frames(self.num_frames, tiny.task)
        if self.extend:
            continuation = VARIANTS[TINY_I2V]
            added = max(MIN_PASS_ADDED, min(self.num_frames - self.source_frames, continuation.max_frames - 1))
            frames = self.source_frames + added
        nominal = (self.width, self.height)
        return replace(
            self,
            variant=tiny,
            width=width,
            height=height,
            num_frames=frames,
            demo=True,
            nominal_size=nominal,
            continuation=continuation.name if continuation else None,
        )


def request_for_model(
    model: str,
    prompt: str,
    *,
    seconds: int | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    aliases: Mapping[str, str] | None = None,
    task: str | None = None,
    **fields: object,
) -> GenerationRequest:
    """The request for a public model id (fal's, AI/ML API's, ...), a local variant name or an alias
    (`aliases`, the server's K5SERVE_MODEL_ALIASES over variants.DEFAULT_ALIASES: every contract passes
    it): the public id's own steps and guidance where the client gave none. The variant's defaults are
    filled in later, by resolve(). A model family's name (a public id or an alias, not a variant's
    own name) moves to its member for `task` ("t2v" / "i2v") and `num_frames`: the shortest that makes
    them in one pass, else the longest (variants.family, variants.for_frames). Raises KeyError for an
    unknown id, ValueError for a clip length the model cannot make."""
    variant, public = resolve_model(model, seconds, aliases)
    frames = fields.get("num_frames")
    if model not in VARIANTS and (task is not None or isinstance(frames, int)):
        members = family(variant, task or variant.task)
        if isinstance(frames, int):
            variant = for_frames(members, frames)
        else:
            variant = next((m for m in members if m.seconds == variant.seconds), members[0])
    if public is not None:
        steps = public.steps if steps is None else steps
        guidance = public.guidance if guidance is None else guidance
    return GenerationRequest(
        variant=variant.name, prompt=prompt, seconds=seconds, steps=steps, guidance=guidance, **fields
    )


def _bad(field_name: str, value: object, message: str) -> InvalidRequest:
    return InvalidRequest(field_name, value, message)


def _image_size(path: str) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.size
    except FileNotFoundError as exc:
        raise _bad("image", path, f"image file {path!r} does not exist") from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise _bad("image", path, f"image {path!r} is not a readable image ({exc})") from exc


def resolve(req: GenerationRequest, default_seed: int | None = None) -> ResolvedRequest:
    """Validate `req` against its variant and fill in defaults. Raises InvalidRequest."""
    variant = VARIANTS.get(req.variant)
    if variant is None:
        raise _bad("model", req.variant, f"unknown model {req.variant!r}; known: {', '.join(sorted(VARIANTS))}")

    if not isinstance(req.prompt, str) or not req.prompt.strip():
        raise _bad("prompt", req.prompt, "prompt must be a non-empty string")

    steps = variant.steps if req.steps is None else req.steps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise _bad("steps", steps, f"steps must be an integer from 1 to {MAX_STEPS}, got {steps!r}")

    guidance = variant.guidance if req.guidance is None else req.guidance
    if (
        isinstance(guidance, bool)
        or not isinstance(guidance, (int, float))
        or not MIN_GUIDANCE <= guidance <= MAX_GUIDANCE
    ):
        raise _bad("guidance", guidance, f"guidance must be a number from 1 to 20, got {guidance!r}")

    source = resolve_source(req, variant)  # remix / edit / extension: size and length from the video
    frames = source.num_frames if source is not None else _resolve_frames(req, variant)
    first = frames if source is None else source.source_frames or frames
    cont = source.continuation if source is not None else None
    if cont is None and frames > variant.max_frames:  # longer than one pass: continued by I2V passes
        cont = continuation_variant(variant)
        first = plan_passes(frames, variant.max_frames, cont.max_frames - 1)[0]

    if variant.task == "i2v" and not req.extend:
        if not req.image:
            raise _bad("image", req.image, f"{variant.name} is image-to-video and needs an image")
        # normalize_first_frame uses latent frames >= 4 as reference: fewer than 17 frames gives NaN video.
        if first < 17:
            raise _bad("num_frames", frames, f"image-to-video needs at least 17 frames in its first pass, got {first}")
    elif req.image and not req.extend:
        raise _bad("image", req.image, f"{variant.name} is text-to-video and takes no image")

    width, height = (source.width, source.height) if source is not None else _resolve_size(req, variant)

    seed = req.seed if req.seed is not None else default_seed
    if seed is None:
        import secrets

        seed = secrets.randbelow(2**31)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise _bad("seed", seed, f"seed must be an integer from 0 to 2**63-1, got {seed!r}")

    negative = req.negative_prompt
    if negative is not None and not isinstance(negative, str):
        raise _bad("negative_prompt", negative, "negative_prompt must be a string")

    acceleration = "none" if req.acceleration is None else req.acceleration
    if acceleration not in ACCELERATIONS:
        allowed = ", ".join(ACCELERATIONS)
        raise _bad("acceleration", acceleration, f"acceleration must be one of {allowed}, got {acceleration!r}")

    expand = req.expand_prompt
    if expand is not None and not isinstance(expand, bool):
        raise _bad("expand_prompt", expand, f"expand_prompt must be true or false, got {expand!r}")

    return ResolvedRequest(
        variant=variant,
        prompt=req.prompt,
        negative_prompt=negative,
        image=req.image,
        width=width,
        height=height,
        num_frames=frames,
        steps=steps,
        guidance=float(guidance),
        seed=seed,
        requested=req,
        acceleration=acceleration,
        expand_prompt=bool(expand),
        **_source_fields(req, source, cont),
    )


def _resolve_frames(req: GenerationRequest, variant: Variant) -> int:
    """Frames of a request with no source: an explicit count, the clip length, or the variant's
    full clip. More than the variant makes in one pass is allowed (continued by I2V passes), up to
    MAX_TOTAL_FRAMES (120 s)."""
    if req.num_frames is not None and req.seconds is not None:
        raise _bad("num_frames", req.num_frames, "give num_frames or seconds, not both")
    if req.seconds is not None:
        if variant.demo:
            return variant.max_frames
        if req.seconds != variant.seconds:
            raise _bad(
                "duration",
                req.seconds,
                f"duration {req.seconds}s is not available for {variant.name} (it makes {variant.seconds}s clips)",
            )
        return frames_for_seconds(req.seconds)
    frames = variant.max_frames if req.num_frames is None else req.num_frames
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise _bad("num_frames", frames, f"num_frames must be a positive integer, got {frames!r}")
    if (frames - 1) % 4 != 0:
        raise _bad("num_frames", frames, f"num_frames must be 4k+1 (e.g. 17, 121, 241), got {frames}")
    if frames > MAX_TOTAL_FRAMES:
        raise _bad("num_frames", frames, f"num_frames {frames} exceeds {MAX_TOTAL_FRAMES} ({MAX_TOTAL_SECONDS} s)")
    return frames


def _source_fields(req: GenerationRequest, source: SourcePlan | None, cont: Variant | None) -> dict:
    """The ResolvedRequest fields of a remix / edit / extension / multi-pass clip."""
    fields: dict = {"video": req.video, "extend": req.extend}
    if source is not None:
        fields.update(strength=source.strength, source_frames=source.source_frames, extensions=source.extensions)
    if cont is not None:
        steps = cont.steps if req.steps is None else req.steps
        guidance = cont.guidance if req.guidance is None else req.guidance
        fields.update(continuation=cont.name, continuation_steps=steps, continuation_guidance=float(guidance))
    return fields


def _resolve_size(req: GenerationRequest, variant: Variant) -> tuple[int, int]:
    if (req.width is None) != (req.height is None):
        name = "height" if req.height is None else "width"
        raise _bad(name, None, "give both width and height, or neither")
    if req.width is None:
        if variant.task == "i2v" and variant.sizes and req.image:
            # The image's aspect picks the bucket; SD unless HD is asked for (req.hd or an explicit size).
            tier = HD_SIZES if req.hd else SD_SIZES
            buckets = tuple(s for s in variant.sizes if s in tier) or variant.sizes
            return nearest_size(buckets, *_image_size(req.image))
        if variant.task == "i2v" and req.image and variant.demo:
            iw, ih = _image_size(req.image)
            return demo_size(iw, ih)
        return variant.default_size
    width, height = req.width, req.height
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise _bad(name, value, f"{name} must be a positive integer, got {value!r}")
        if value % 16:
            raise _bad(name, value, f"{name} must be divisible by 16, got {value}")
    if variant.sizes is None:
        if max(width, height) > 256:
            raise _bad(
                "resolution", f"{width}x{height}", f"{variant.name} makes at most 256 px per side, got {width}x{height}"
            )
    elif (width, height) not in variant.sizes:
        allowed = ", ".join(f"{w}x{h}" for w, h in variant.sizes)
        raise _bad(
            "resolution",
            f"{width}x{height}",
            f"{width}x{height} is not available for {variant.name}; allowed: {allowed}",
        )
    if variant.attention == "nabla" and (width % 128 or height % 128):
        raise _bad(
            "resolution",
            f"{width}x{height}",
            f"{variant.name} uses sparse (nabla) attention, which needs sides divisible by 128",
        )
    return width, height


@dataclass(frozen=True)
class GenerationResult:
    path: Path
    variant: str  # the variant that actually ran (tiny in demo mode)
    width: int
    height: int
    num_frames: int
    fps: int
    steps: int
    seed: int
    file_size: int
    demo: bool
    timings: dict[str, float]  # seconds per stage: load, encode_prompt, denoise, decode, write
    step_times: list[float] = field(default_factory=list)  # seconds of each denoising step
    # What ran: "none" (exact) or "regular" (MagCache, approximate). A variant with no official
    # MagCache calibration runs exactly even when "regular" was asked for (acceleration says "none").
    acceleration: str = "none"
    cached_steps: int = 0  # transformer evaluations answered from the MagCache (cond and uncond count apart)
    memory_plan: dict = field(default_factory=dict)  # mode, cfg_batch, vae_tiling, estimated peak GiB
    revised_prompt: str | None = None  # the prompt as encoded when expansion rewrote it; None: not expanded
