"""The OpenAI Videos API's request side: bodies as the SDKs send them, and the error envelope.

Bodies come as multipart (the openai SDKs, always, even with no file) or JSON (the spec, curl,
Batch). Multipart flattens objects into bracketed keys: `input_reference[image_url]`, `video[id]`,
`characters[][id]` (repeated per element); `read_fields` turns both into the same dict.

`create_request` maps a create body onto a GenerationRequest (docs/sora.md has the tables):
- `model`: a Kandinsky 5 variant by its name (exact), a public id or a model alias (Sora's names,
  K5SERVE_MODEL_ALIASES) resolved in pipelines.request.request_for_model, which moves a family name
  to its image-to-video member when there is an image and to the member that makes the length.
- `seconds`: whole seconds at 24 fps, `s * 24 + 1` frames (4 -> 97, 8 -> 193, ..., 20 -> 481).
- `size`: made exactly where the variant makes it, else at the nearest size it makes with the same
  orientation (variants.fit_size); the Video object reports the file's real size and length.
- `input_reference`: an uploaded file, `{image_url}` (http(s) or a data: URL) or `{file_id}` (an
  upload this server holds): the first frame, centre-cropped to the size's aspect (fit, not refuse).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from pipelines.request import GenerationRequest, request_for_model
from pipelines.variants import FPS, PUBLIC_MODELS, VARIANTS, fit_size

from ..jobs import short_value
from ..uploads import Uploads
from ..web import ResponseError

DEFAULT_T2V = "kandinsky5-lite-t2v-sft-5s"  # OpenAI's default is sora-2; with no model, ours is Lite sft
MAX_SECONDS = 20  # Sora's longest create; longer clips come from extensions
SORA_DEFAULT_SECONDS = 4  # OpenAI's defaults, for Sora's names (aliases): 4 s at 720x1280
SORA_DEFAULT_SIZE = (720, 1280)
CHARACTERS_REFUSED = (
    "Characters are not supported by k5serve: Kandinsky 5 cannot make a consistent character from a "
    "clip. Use input_reference instead: an image of the character (a file, {image_url} or {file_id}) "
    "becomes the video's first frame."
)

_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
_KEY = re.compile(r"^(\w+)((?:\[\w*\])+)$")


def openai_error(
    status: int, message: str, param: str | None = None, code: str | None = None, type_: str = "invalid_request_error"
) -> ResponseError:
    """OpenAI's envelope. Permanent refusals are 4xx other than 408/409/429: the SDK retries those."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return ResponseError(JSONResponse(body, status_code=status))


def invalid(param: str | None, message: str, code: str = "invalid_value") -> ResponseError:
    return openai_error(400, message, param, code)


# -- bodies ---------------------------------------------------------------------------------------


async def read_fields(request: Request, max_file_bytes: int, max_files: int = 1) -> dict[str, Any]:
    """The body as a dict, from JSON or multipart; an uploaded file comes back as bytes, bracketed
    multipart keys as the objects and lists they flatten."""
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        try:
            form = await request.form(max_files=max_files, max_fields=50)
        except HTTPException as exc:
            raise invalid(None, f"the multipart body could not be read ({exc.detail})", "invalid_request") from exc
        fields: dict[str, Any] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                data = await value.read(max_file_bytes + 1)
                if len(data) > max_file_bytes:
                    limit = f"the limit is {max_file_bytes} (K5SERVE_IMAGE_MAX_BYTES)"
                    raise invalid(key, f"{key} is larger than {max_file_bytes} bytes; {limit}")
                value = data
            _put(fields, key, value)
        return fields
    try:
        body = json.loads(await request.body() or b"null")
    except (ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deep
        raise invalid(None, "We could not parse the JSON body of your request.", "invalid_json") from exc
    if not isinstance(body, dict):
        raise invalid(None, "The request body must be a JSON object.", "invalid_json")
    return body


def _put(fields: dict[str, Any], key: str, value: Any) -> None:
    """One multipart part into `fields`: `a[b]` -> {"a": {"b": v}}, `a[]` -> {"a": [v, ...]},
    `a[][b]` -> {"a": [{"b": v}, ...]} (a repeated key starts the next element), as the SDKs'
    form encoders (qs brackets in Python, addFormValue in Node) write them."""
    match = _KEY.match(key)
    if match is None:
        fields[key] = value
        return
    name, path = match[1], re.findall(r"\[(\w*)\]", match[2])
    want: type = list if path[0] == "" else dict
    holder = fields.setdefault(name, want())
    if not isinstance(holder, want) or len(path) > 2 or (len(path) == 2 and path[0] != ""):
        raise invalid(name, f"Invalid multipart field {short_value(key)!r}: {name} is sent in two shapes.")
    if path == [""]:
        holder.append(value)
    elif len(path) == 1:
        holder[path[0]] = value
    else:
        if not holder or not isinstance(holder[-1], dict) or path[1] in holder[-1]:
            holder.append({})
        holder[-1][path[1]] = value


def integer(fields: dict, name: str) -> int | None:
    """An integer field; multipart sends every value as text, so digit strings count too."""
    value = fields.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, str) and re.fullmatch(r"-?\d{1,19}", value.strip()):
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(name, f"Invalid type for '{name}': expected an integer, but got {short_value(value)!r}.")
    return value


def text(fields: dict, name: str) -> str | None:
    value = fields.get(name)
    if value is not None and not isinstance(value, str):
        raise invalid(name, f"Invalid type for '{name}': expected a string, but got {short_value(value)!r}.")
    return value


def prompt_of(fields: dict) -> str:
    prompt = text(fields, "prompt")
    if prompt is None or not prompt.strip():
        raise invalid("prompt", "Missing required parameter: 'prompt'.", "missing_required_parameter")
    return prompt


# -- create ---------------------------------------------------------------------------------------


def seconds_of(fields: dict) -> int | None:
    value = fields.get("seconds")
    if value is None:
        return None
    word = str(value).strip() if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
    if not word.isdigit() or not 1 <= int(word) <= MAX_SECONDS:
        raise invalid(
            "seconds",
            f"Invalid value: {short_value(value)!r}. seconds is a whole number from 1 to {MAX_SECONDS} "
            "(Sora's '4', '8', '12', '16', '20'; Kandinsky 5's own clips are '5' and '10').",
        )
    return int(word)


def size_of(fields: dict) -> tuple[int, int] | None:
    value = text(fields, "size")
    if value is None:
        return None
    match = _SIZE.match(value.strip())
    if not match or not all(1 <= int(side) <= 8192 for side in match.groups()):
        raise invalid("size", f"Invalid value: {short_value(value)!r}. size must be 'WIDTHxHEIGHT', e.g. '1280x720'.")
    return int(match[1]), int(match[2])


def image_source(fields: dict, uploads: Uploads | None) -> str | bytes | None:
    """input_reference: an uploaded file's bytes, a URL or data: URL (a string or {"image_url"}), or
    the bytes of this server's upload named by {"file_id"}. Intake checks the bytes at admission."""
    value = fields.get("input_reference")
    if isinstance(value, dict):
        if bool(value.get("image_url")) == bool(value.get("file_id")):
            raise invalid("input_reference", "Provide exactly one of image_url or file_id in input_reference.")
        if value.get("file_id"):
            return _upload(text(value, "file_id") or "", uploads)
        value = value["image_url"]
    if value is None or value == "":
        return None
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        raise invalid("input_reference", "input_reference must be an image file, an image URL or a data: URL.")
    return value


def _upload(file_id: str, uploads: Uploads | None) -> bytes:
    path = uploads.by_id(file_id.strip()) if uploads is not None else None
    if path is None:
        raise invalid(
            "input_reference",
            f"No file with id {short_value(file_id, 80)!r} on this server. file_id names an upload this server "
            "holds (the token in its /uploads/<token>/<name> URL); or send the image itself or its image_url.",
        )
    return path.read_bytes()


def create_request(fields: dict, aliases: Mapping[str, str], has_image: bool) -> tuple[str, GenerationRequest]:
    """A create body -> (the model to report, the request). Raises ResponseError (400)."""
    for name, use in (("characters", None), ("remix_video_id", "POST /v1/videos/{video_id}/remix")):
        if fields.get(name) not in (None, "", []):
            message = CHARACTERS_REFUSED if use is None else f"{name} is not taken on create; use {use}."
            raise invalid(name, message, "unsupported_parameter")
    prompt = prompt_of(fields)
    model, seconds, size = text(fields, "model"), seconds_of(fields), size_of(fields)
    if model is not None and model not in VARIANTS and model not in PUBLIC_MODELS and model not in aliases:
        raise invalid(
            "model",
            f"Invalid value: {short_value(model)!r}. k5serve serves Kandinsky 5: Sora's names ('sora-2', "
            "'sora-2-pro'), a local name such as 'kandinsky5-lite-t2v-sft-5s' or a public id such as "
            "'kandinsky5-text-to-video' (GET /readyz lists what is loaded).",
        )
    if model is not None and model not in VARIANTS and model not in PUBLIC_MODELS:
        # a Sora name (an alias): OpenAI's own defaults, 4 s at 720x1280 unless an image sets the aspect
        seconds = SORA_DEFAULT_SECONDS if seconds is None else seconds
        size = size or (None if has_image else SORA_DEFAULT_SIZE)
    frames = None if seconds is None else seconds * FPS + 1
    task = "i2v" if has_image and (model is None or model not in VARIANTS) else None
    try:
        request = request_for_model(
            model if model is not None else _default_member(task, frames),
            prompt,
            aliases=aliases,
            task=task,
            num_frames=frames,
            negative_prompt=text(fields, "negative_prompt"),
            steps=integer(fields, "num_inference_steps"),
            seed=integer(fields, "seed"),
        )
    except ValueError as exc:  # a public id with no variant of that length
        raise invalid("seconds", f"Invalid value: '{seconds}'. {exc}.") from exc
    if size is not None:
        width, height = fit_size(VARIANTS[request.variant], *size)
        request = dataclasses.replace(request, width=width, height=height)
    return model or request.variant, request


def _default_member(task: str | None, frames: int | None) -> str:
    """With no model: the member of the Lite sft family (DEFAULT_T2V) for the task and length."""
    from pipelines.variants import family, for_frames

    members = family(VARIANTS[DEFAULT_T2V], task or "t2v")
    return for_frames(members, frames or members[0].max_frames).name
