"""The studio's model table (GET /api/models): every model id the page can submit, with each input
it takes, its default and its valid range.

The page submits through the fal contract, so a model here is a fal id (the four public endpoints
and `k5serve/<variant>` for every catalogue variant) and its inputs are that endpoint's own schema
(fal_inputs.py). Defaults and ranges come from the same data the server validates with
(pipelines/variants.py, pipelines/request.py), so the page never restates a number.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic.fields import FieldInfo

from pipelines.mag_ratios import calibrated
from pipelines.request import MAX_GUIDANCE, MAX_SEED, MAX_STEPS, MIN_GUIDANCE
from pipelines.variants import (
    ASPECT_RATIOS,
    DEFAULT_NEGATIVE_PROMPT,
    DEMO_MAX_FRAMES,
    DEMO_MAX_SIDE,
    PUBLIC_MODELS,
    SD_SIZES,
    TINY_I2V,
    TINY_T2V,
    VARIANTS,
    Variant,
    demo_size,
    size_for_aspect,
)

from .fal_inputs import LOCAL_OWNER, known_ids, schema_for

# wire field -> (label, help): the words the page shows; values come from the data below
LABELS: dict[str, tuple[str, str]] = {
    "prompt": ("Prompt", "what the video shows"),
    "image_url": ("Image", "the first frame: a file, a pasted image or one dropped here"),
    "negative_prompt": ("Negative prompt", "what to steer away from; empty: the official negative prompt"),
    "seed": ("Seed", "the same seed and settings make the same video; empty: random"),
    "enable_prompt_expansion": ("Prompt expansion", "rewrite the prompt with Qwen2.5-VL first (slower)"),
    "resolution": ("Resolution", "width x height of the video"),
    "aspect_ratio": ("Aspect ratio", "width : height"),
    "duration": ("Duration", "clip length"),
    "num_inference_steps": ("Steps", "denoising steps: more is slower"),
    "guidance_scale": ("Guidance", "classifier-free guidance scale; 1 turns it off (faster)"),
    "acceleration": ("Acceleration", "regular: MagCache step caching, faster but approximate; none: exact"),
}


# the order the page shows them in: what to make, its shape, how, then the finer controls
ORDER = [
    "image_url", "prompt", "resolution", "aspect_ratio", "duration", "num_inference_steps", "guidance_scale",
    "acceleration", "seed", "negative_prompt", "enable_prompt_expansion",
]  # fmt: skip


def _size(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def _options(annotation: Any) -> list[Any] | None:
    """The values of a Literal field (also inside `Literal[...] | None`), else None."""
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _options(arg)
            if found is not None:
                return found
    return None


def _variant_sizes(v: Variant) -> list[str]:
    """Allowed sizes; the tiny variants take any multiple of 16 up to 256: offered at the SD aspects."""
    return [_size(s) for s in (v.sizes or tuple(demo_size(*s) for s in SD_SIZES))]


def describe_variant(v: Variant, available: set[str]) -> dict:
    return {
        "name": v.name,
        "task": v.task,
        "family": v.family,
        "seconds": v.seconds,
        "frames": v.max_frames,
        "fps": v.fps,
        "sizes": _variant_sizes(v),
        "default_size": _size(v.default_size),
        "steps": v.steps,
        "guidance": v.guidance,
        "attention": v.attention,
        "accelerates": calibrated(v.name),  # "regular" is a no-op without a MagCache calibration
        "available": v.name in available,
        "download": None if v.demo else v.download_command,
        "notes": v.notes,
    }


def _field(name: str, info: FieldInfo, variant: Variant, by_seconds: dict[int, str], expand: bool, local: bool) -> dict:
    label, help_ = LABELS.get(name, (name, ""))
    default = None if info.is_required() else info.default
    out: dict[str, Any] = {"name": name, "label": label, "help": help_, "required": info.is_required()}
    options = _options(info.annotation)
    if name in ("prompt", "negative_prompt"):
        out["kind"] = "text"
        out["placeholder"] = DEFAULT_NEGATIVE_PROMPT if name == "negative_prompt" else None
    elif name == "image_url":
        out["kind"] = "image"
    elif name == "seed":
        out.update(kind="seed", min=0, max=MAX_SEED)
    elif name == "enable_prompt_expansion":
        out["kind"] = "bool"
        default = expand if default is None else default  # the server's --expand-prompts
    elif name == "num_inference_steps":
        out.update(kind="int", min=1, max=MAX_STEPS)
        default = variant.steps if default is None else default
    elif name == "guidance_scale":
        out.update(kind="float", min=MIN_GUIDANCE, max=MAX_GUIDANCE, step=0.5)
        default = variant.guidance if default is None else default
    elif name == "duration":
        out.update(kind="choice", options=options or [f"{s}s" for s in sorted(by_seconds)])
        default = default or f"{min(by_seconds)}s"
    elif name == "aspect_ratio":
        out.update(kind="choice", options=options or list(ASPECT_RATIOS))
    elif name == "resolution":
        out.update(kind="choice", options=options or _variant_sizes(variant))
        if default is None:  # what the server picks when the field is left out
            unset = _size(variant.default_size) if local else "from the aspect ratio"
            out["unset"] = "follows the image" if variant.task == "i2v" else unset
    elif name == "acceleration":
        out.update(kind="choice", options=options)
        out["noop_for"] = [n for n in by_seconds.values() if not calibrated(n)]
        default = "none" if default is None else default
    else:
        out["kind"] = "text"
    out["default"] = default
    return out


def describe_model(model_id: str, *, demo: bool, available: set[str], expand: bool) -> dict:
    owner, _, name = model_id.partition("/")
    local = owner == LOCAL_OWNER
    by_seconds = {VARIANTS[name].seconds: name} if local else PUBLIC_MODELS[model_id].by_seconds
    first = VARIANTS[by_seconds[min(by_seconds)]]
    schema = schema_for(model_id)
    # LocalInput is one schema for every variant: a text-to-video one takes no image, and `resolution`
    # says all `aspect_ratio` could (the tiny variants cannot make aspect_ratio's SD sizes at all)
    skip = {"image_url"} if first.task == "t2v" else set()
    if local:
        skip.add("aspect_ratio")
    fields = [
        _field(n, info, first, by_seconds, expand, local) for n, info in schema.model_fields.items() if n not in skip
    ]
    fields.sort(key=lambda f: ORDER.index(f["name"]) if f["name"] in ORDER else len(ORDER))
    model: dict[str, Any] = {
        "id": model_id,
        "task": first.task,
        "local": local,
        "label": name if local else model_id,
        "variants": {str(s): describe_variant(VARIANTS[v], available) for s, v in sorted(by_seconds.items())},
        "fields": fields,
    }
    if demo and not first.demo:  # demo mode: every model is served by the tiny one (noise)
        tiny = VARIANTS[TINY_I2V if first.task == "i2v" else TINY_T2V]
        model["runs"] = {"variant": tiny.name, "max_side": DEMO_MAX_SIDE, "max_frames": DEMO_MAX_FRAMES}
    return model


def model_table(*, demo: bool, available: list[str], expand: bool) -> dict:
    """Every fal id this server runs, public ids first, and the defaults the page starts from."""
    have = set(available)
    models = [describe_model(m, demo=demo, available=have, expand=expand) for m in known_ids()]
    models.sort(key=lambda m: m["local"])
    return {
        "models": models,
        # aspect ratio -> size at fal's 512P and 1024P (what the other contracts call size/resolution)
        "aspect_sizes": {
            tier: {a: _size(size_for_aspect(a, hd=tier == "1024P")) for a in ASPECT_RATIOS}
            for tier in ("512P", "1024P")
        },
        "defaults": {"t2v": "fal-ai/kandinsky5/text-to-video/distill", "i2v": "fal-ai/kandinsky5-pro/image-to-video"},
        "demo": demo,
    }
