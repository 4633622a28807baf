"""fal input schemas for the four Kandinsky 5 endpoints, and their translation to GenerationRequest.

Schemas follow @fal-ai/client 1.10.1 typings (reference/api_contracts.md §1.1). Unknown fields are
ignored, as fal does; `seed`, `negative_prompt` and `enable_prompt_expansion` (the name fal's own
video endpoints give this switch) are accepted as extensions.
Errors come out as fal's 422 `detail` list: [{loc: ["body", field], msg, type, input}].
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipelines.request import GenerationRequest, request_for_model
from pipelines.variants import VARIANTS, size_for_aspect

from ..jobs import json_echo, short_value

AspectRatio = Literal["3:2", "1:1", "2:3"]


class _Input(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1)
    seed: int | None = Field(None, ge=0)
    negative_prompt: str | None = None
    # rewrite the prompt with Qwen2.5-VL first (pipelines/expand.py); None: the server's default
    enable_prompt_expansion: bool | None = None


class ProT2VInput(_Input):
    resolution: Literal["512P", "1024P"] = "512P"
    aspect_ratio: AspectRatio = "3:2"
    duration: str | int = "5s"
    num_inference_steps: int = 28
    acceleration: Literal["none", "regular"] = "regular"  # regular = MagCache step caching (approximate)


class ProI2VInput(_Input):
    image_url: str = Field(min_length=1)
    resolution: Literal["512P", "1024P"] = "512P"
    duration: str | int = "5s"
    num_inference_steps: int = 28
    acceleration: Literal["none", "regular"] = "regular"


class LiteT2VInput(_Input):
    resolution: Literal["768x512", "512x512", "512x768"] | None = None  # fal: derived from aspect_ratio
    aspect_ratio: AspectRatio = "3:2"
    duration: Literal["5s", "10s"] = "5s"
    num_inference_steps: int = 30


class DistillT2VInput(_Input):
    # fal: no num_inference_steps on the distilled endpoint (it is ignored if sent)
    resolution: Literal["768x512", "512x512", "512x768"] | None = None
    aspect_ratio: AspectRatio = "3:2"
    duration: Literal["5s", "10s"] = "5s"


INPUT_SCHEMAS: dict[str, type[_Input]] = {
    "fal-ai/kandinsky5-pro/text-to-video": ProT2VInput,
    "fal-ai/kandinsky5-pro/image-to-video": ProI2VInput,
    "fal-ai/kandinsky5/text-to-video": LiteT2VInput,
    "fal-ai/kandinsky5/text-to-video/distill": DistillT2VInput,
}

LOCAL_OWNER = "k5serve"  # local variant names as fal ids: "k5serve/kandinsky5-lite-t2v-distilled-5s"


class LocalInput(_Input):
    """Any catalogue variant by its local name; unset fields take the variant's own defaults."""

    image_url: str | None = None
    resolution: str | None = None  # "WxH"
    aspect_ratio: AspectRatio | None = None
    duration: str | int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    acceleration: Literal["none", "regular"] | None = None  # None: "none" (exact), unlike fal's Pro default


def schema_for(model_id: str, aliases: Mapping[str, str] | None = None) -> type[_Input] | None:
    """The input schema of a fal id this server runs (a model alias takes a variant's), or None."""
    owner, _, name = model_id.partition("/")
    if (owner == LOCAL_OWNER and name in VARIANTS) or model_id in (aliases or {}):
        return LocalInput
    return INPUT_SCHEMAS.get(model_id)


def known_ids() -> list[str]:
    return sorted(INPUT_SCHEMAS) + [f"{LOCAL_OWNER}/{name}" for name in sorted(VARIANTS)]


# engine field (InvalidRequest.field) -> fal input field, so a 422 points at what the client sent
ENGINE_FIELDS = {
    "steps": "num_inference_steps",
    "image": "image_url",
    "width": "resolution",
    "height": "resolution",
    "num_frames": "duration",
    "model": "model",
    "expand_prompt": "enable_prompt_expansion",
}


class InputInvalid(Exception):
    """A fal 422: `detail` is the list the result endpoint returns."""

    def __init__(self, detail: list[dict]):
        super().__init__(detail[0]["msg"] if detail else "invalid input")
        self.detail = detail

    @property
    def field(self) -> str | None:
        loc = self.detail[0].get("loc", []) if self.detail else []
        return str(loc[-1]) if loc else None


def invalid(field: str, value: Any, message: str, kind: str = "value_error") -> InputInvalid:
    return InputInvalid([{"loc": ["body", field], "msg": message, "type": kind, "input": json_echo(value)}])


@dataclass(frozen=True)
class ParsedInput:
    model_id: str
    wire: _Input

    @property
    def image_url(self) -> str | None:
        return getattr(self.wire, "image_url", None)


def parse(model_id: str, body: Any, aliases: Mapping[str, str] | None = None) -> ParsedInput:
    """Validate the JSON body against the endpoint's schema. Raises InputInvalid."""
    schema = schema_for(model_id, aliases)
    if not isinstance(body, dict):
        raise invalid("body", body, "the request body must be a JSON object", "model_attributes_type")
    try:
        return ParsedInput(model_id, schema.model_validate(body))
    except ValidationError as exc:
        raise InputInvalid(_pydantic_detail(exc)) from exc


def _pydantic_detail(exc: ValidationError) -> list[dict]:
    detail = []
    for err in exc.errors(include_url=True):
        item = {
            "loc": ["body", *err["loc"]],
            "msg": err["msg"],
            "type": err["type"],
            "input": json_echo(err.get("input")),  # fal: the value sent, an object as an object
        }
        if err.get("url"):
            item["url"] = err["url"]
        if err.get("ctx"):
            item["ctx"] = {k: short_value(v) for k, v in err["ctx"].items()}
        detail.append(item)
    return detail


def _seconds(duration: str | int) -> int:
    text = str(duration).strip().lower().removesuffix("s")
    if not text.isdigit():
        raise invalid("duration", duration, f"duration must be like '5s', got {duration!r}")
    return int(text)


def to_generation_request(parsed: ParsedInput, aliases: Mapping[str, str] | None = None) -> GenerationRequest:
    """fal input -> GenerationRequest (variant picked by model id + duration), its image still to be
    fetched (admission fills in `image`). Raises InputInvalid."""
    wire = parsed.wire
    seconds = None if wire.duration is None else _seconds(wire.duration)
    local = isinstance(wire, LocalInput)
    name = parsed.model_id.removeprefix(f"{LOCAL_OWNER}/")  # a local variant by its name; an alias as it is
    width, height = _size(wire, image=parsed.image_url is not None)
    try:
        return request_for_model(
            name if local else parsed.model_id,
            wire.prompt,
            seconds=seconds,
            steps=getattr(wire, "num_inference_steps", None),
            guidance=wire.guidance_scale if local else None,
            negative_prompt=wire.negative_prompt,
            width=width,
            height=height,
            seed=wire.seed,
            expand_prompt=wire.enable_prompt_expansion,
            acceleration=getattr(wire, "acceleration", None),  # fal's Pro endpoints default to "regular"
            hd=getattr(wire, "resolution", None) == "1024P",
            aliases=aliases,
        )
    except ValueError as exc:
        raise invalid("duration", wire.duration, str(exc)) from exc


def _size(wire: _Input, image: bool) -> tuple[int | None, int | None]:
    resolution = getattr(wire, "resolution", None)
    if resolution in ("512P", "1024P"):
        if image:  # pro i2v: the size follows the image's aspect, among the SD or HD (`hd`) buckets
            return None, None
        return size_for_aspect(wire.aspect_ratio, hd=resolution == "1024P")
    if resolution:  # lite: an explicit "768x512" wins over aspect_ratio
        w, _, h = resolution.lower().partition("x")
        if not (w.isdigit() and h.isdigit()):
            raise invalid("resolution", resolution, f"resolution must be WxH like '768x512', got {resolution!r}")
        return int(w), int(h)
    if wire.aspect_ratio is None:  # local ids: the variant's default size (or the image's aspect)
        return None, None
    return size_for_aspect(wire.aspect_ratio)
