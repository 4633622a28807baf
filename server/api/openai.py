"""The OpenAI Videos API (the de-facto standard local video servers expose), onto the Job model.

Routes: `POST /v1/videos` (JSON, or multipart with `input_reference` for image-to-video),
`GET /v1/videos`, `GET /v1/videos/{id}`, `GET /v1/videos/{id}/content`, `DELETE /v1/videos/{id}`.
Bodies follow the `openai` SDK's types (openai/types/video*.py) so they parse there. `seconds`
and `size` map onto what the chosen Kandinsky 5 variant can do; anything else is a 400 in
OpenAI's envelope {error: {message, type, param, code}}, never a silent rounding.
Extensions beyond OpenAI's schema (send them through the SDK's `extra_body`):
`num_inference_steps`, `seed`, `negative_prompt`.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import uuid
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from pipelines.request import GenerationRequest, request_for_model
from pipelines.variants import PUBLIC_MODELS, VARIANTS

from ..admission import Draft
from ..contracts import Contract, lookup
from ..errors import BadInput, ModelUnavailable, QueueFull, Refused, TooLarge, Unauthorized, Unavailable
from ..jobs import ErrorKind, Job, JobStatus, short_value
from ..services import Services
from ..web import ResponseError, require_key
from . import openai_edits

NAME = "openai"
DEFAULT_T2V = "kandinsky5-lite-t2v-sft-{seconds}s"  # OpenAI's default is sora-2; ours is Lite sft
DEFAULT_I2V = "kandinsky5-lite-i2v-5s"
SECONDS = ("5", "10")
POLL_AFTER_MS = "500"

OPENAI_STATUS: dict[JobStatus, str] = {
    JobStatus.QUEUED: "queued",
    JobStatus.RUNNING: "in_progress",
    JobStatus.SUCCEEDED: "completed",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELED: "failed",  # openai: no canceled status; error.code says "cancelled"
}

ERROR_CODES: dict[ErrorKind, str] = {
    ErrorKind.INVALID_INPUT: "invalid_input",
    ErrorKind.UNAVAILABLE: "model_unavailable",
    ErrorKind.OUT_OF_MEMORY: "out_of_memory",
    ErrorKind.DEVICE_FAILURE: "device_failure",
    ErrorKind.CANCELED: "cancelled",
    ErrorKind.INTERNAL: "internal_error",
}

ENGINE_FIELDS = {
    "steps": "num_inference_steps",
    "num_frames": "seconds",
    "duration": "seconds",
    "width": "size",
    "height": "size",
    "resolution": "size",
    "image": "input_reference",
}

_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
_BRACKETED = re.compile(r"^(\w+)\[(\w+)\]$")


def openai_error(
    status: int, message: str, param: str | None = None, code: str | None = None, type_: str = "invalid_request_error"
) -> ResponseError:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return ResponseError(JSONResponse(body, status_code=status))


def invalid(param: str | None, message: str, code: str = "invalid_value") -> ResponseError:
    return openai_error(400, message, param, code)


# -- request parsing ------------------------------------------------------------------------------


async def read_fields(request: Request, max_image_bytes: int) -> dict[str, Any]:
    """The create body as a dict, from JSON or multipart; an uploaded image comes back as bytes."""
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        try:
            form = await request.form(max_files=1, max_fields=50)
        except HTTPException as exc:
            raise invalid(None, f"the multipart body could not be read ({exc.detail})", "invalid_request") from exc
        fields: dict[str, Any] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                data = await value.read(max_image_bytes + 1)
                if len(data) > max_image_bytes:
                    limit = f"the limit is {max_image_bytes} (K5SERVE_IMAGE_MAX_BYTES)"
                    raise invalid(key, f"{key} is larger than {max_image_bytes} bytes; {limit}")
                fields[key] = data
            elif match := _BRACKETED.match(key):  # the SDK sends {"image_url": …} as input_reference[image_url]
                nested = fields.setdefault(match[1], {})
                if isinstance(nested, dict):
                    nested[match[2]] = value
            else:
                fields[key] = value
        return fields
    try:
        body = json.loads(await request.body() or b"null")
    except (ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deep
        raise invalid(None, "We could not parse the JSON body of your request.", "invalid_json") from exc
    if not isinstance(body, dict):
        raise invalid(None, "The request body must be a JSON object.", "invalid_json")
    return body


def _int(fields: dict, name: str) -> int | None:
    """An integer field; multipart sends every value as text, so digit strings count too."""
    value = fields.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, str) and re.fullmatch(r"-?\d{1,19}", value.strip()):
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(name, f"Invalid type for '{name}': expected an integer, but got {short_value(value)!r}.")
    return value


def _text(fields: dict, name: str) -> str | None:
    value = fields.get(name)
    if value is not None and not isinstance(value, str):
        raise invalid(name, f"Invalid type for '{name}': expected a string, but got {short_value(value)!r}.")
    return value


def _seconds(fields: dict) -> int | None:
    value = fields.get("seconds")
    if value is None:
        return None
    text = str(value).strip() if isinstance(value, (str, int)) and not isinstance(value, bool) else None
    if text not in SECONDS:
        raise invalid(
            "seconds",
            f"Invalid value: {short_value(value)!r}. Supported values are: '5' and '10' "
            "(Kandinsky 5 makes 5 s and 10 s clips; 10 s only on the Lite text-to-video models).",
        )
    return int(text)


def _size(fields: dict) -> tuple[int, int] | None:
    value = _text(fields, "size")
    if value is None:
        return None
    match = _SIZE.match(value.strip())
    if not match:
        raise invalid("size", f"Invalid value: {short_value(value)!r}. size must be 'WIDTHxHEIGHT', e.g. '768x512'.")
    return int(match[1]), int(match[2])


def _image_source(fields: dict) -> str | bytes | None:
    """input_reference: an uploaded file's bytes, or a data: URI or URL (a string or {"image_url": ...})."""
    value = fields.get("input_reference")
    if isinstance(value, dict):
        if not value.get("image_url"):
            raise invalid("input_reference", "input_reference needs an image_url; uploaded file ids are not supported.")
        value = value["image_url"]
    if value is None or value == "":
        return None
    if isinstance(value, bytes):
        return value  # fetch_image checks it like a fetched image (size, format, pixels)
    if not isinstance(value, str):
        raise invalid("input_reference", "input_reference must be an image file, an image URL or a data: URI.")
    return value


def _request(fields: dict, seconds: int | None, has_image: bool, **values) -> tuple[str, GenerationRequest]:
    """-> (model id to report, the request for that model with `values`)."""
    model = _text(fields, "model")
    if model is None:
        model = DEFAULT_I2V if has_image else DEFAULT_T2V.format(seconds=seconds or 5)
    if model not in PUBLIC_MODELS and model not in VARIANTS:
        raise invalid(
            "model",
            f"Invalid value: {short_value(model)!r}. k5serve serves Kandinsky 5: a local name such as "
            f"'kandinsky5-lite-t2v-sft-5s' or a public id such as 'kandinsky5-text-to-video' (GET /readyz lists them).",
        )
    try:
        return model, request_for_model(model, seconds=seconds, **values)
    except ValueError as exc:
        raise invalid("seconds", f"Invalid value: '{seconds}'. {exc}.") from exc


# -- responses ------------------------------------------------------------------------------------


def progress(job: Job) -> int:
    """0-100 from the real run (Job.percent): the steps fill 0-90, the decode's chunks 90-99, the
    write sits at 99; 100 only once the video is written."""
    return job.percent


def _made(job: Job) -> dict:
    """`seconds` and `size` of the video this job makes: the file once it exists, before that what
    admission resolved to run (in demo mode the tiny model's size and length, not the ones asked
    for). The wire's seconds are whole-second strings ("4", "8"): the clip's length rounded (a 5 s
    variant writes 121 frames @ 24 fps, 5.04 s: "5"; demo's 25 frames: "1"). Only a job with
    neither (a record from before resolved requests were stored) shows what its meta recorded."""
    made = job.output or job.resolved
    if made is None:
        return {"seconds": job.meta.get("seconds"), "size": job.meta.get("size")}
    fps = made.fps if made is job.output else made.variant.fps
    return {"seconds": str(round(made.num_frames / fps)), "size": f"{made.width}x{made.height}"}


def video_object(job: Job) -> dict:
    error = None
    if job.status in (JobStatus.FAILED, JobStatus.CANCELED) and job.error is not None:
        error = {"code": ERROR_CODES[job.error.kind], "message": job.error.message}
    return {
        "id": job.id,
        "object": "video",
        "model": job.model,
        "status": OPENAI_STATUS[job.status],
        "progress": progress(job),
        "created_at": int(job.created_at),
        "completed_at": int(job.completed_at) if job.status.terminal and job.completed_at else None,
        "expires_at": None,
        "prompt": job.prompt,
        **_made(job),
        "remixed_from_video_id": job.meta.get("remixed_from_video_id"),  # openai_edits.py sets it
        "error": error,
    }


UNAUTHORIZED = "Incorrect API key provided. Send 'Authorization: Bearer <key>' with a key given to k5serve --api-key."

# server.errors -> (HTTP status, message, param, code, type)
REFUSALS = {
    BadInput: lambda e: (
        400,
        e.message_for(CONTRACT.wire_field(e.field)),
        CONTRACT.wire_field(e.field),
        "invalid_value",
        "invalid_request_error",
    ),
    ModelUnavailable: lambda e: (404, e.message, "model", "model_not_found", "invalid_request_error"),
    QueueFull: lambda e: (429, e.message, None, "rate_limit_exceeded", "requests"),
    Unavailable: lambda e: (503, e.message, None, "service_unavailable", "server_error"),
    Unauthorized: lambda e: (401, UNAUTHORIZED, None, "invalid_api_key", "invalid_request_error"),
    TooLarge: lambda e: (413, e.message, None, "request_too_large", "invalid_request_error"),
}


def refusal(_request: Request, exc: Refused) -> JSONResponse:
    return openai_error(*lookup(REFUSALS, exc)(exc)).response


def _new_video_id() -> str:
    return f"video_{uuid.uuid4().hex}"


# -- routes ---------------------------------------------------------------------------------------


def router(services: Services) -> APIRouter:
    api = APIRouter(dependencies=[Depends(require_key(services.keys))])
    api.include_router(openai_edits.router(services, sys.modules[__name__]))  # remix, edits, extensions
    manager, storage = services.manager, services.storage

    def find(video_id: str) -> Job:
        job = manager.get(video_id)
        if job is None or job.contract != NAME:
            raise openai_error(404, f"Video with id '{short_value(video_id, 100)}' not found.", "video_id", "not_found")
        return job

    def parse(fields: dict) -> Draft:
        """The create body -> the draft to admit."""
        prompt = _text(fields, "prompt")
        if prompt is None or not prompt.strip():
            raise invalid("prompt", "Missing required parameter: 'prompt'.", "missing_required_parameter")
        seconds, size, source = _seconds(fields), _size(fields), _image_source(fields)
        steps, seed = _int(fields, "num_inference_steps"), _int(fields, "seed")
        width, height = size if size is not None else (None, None)
        negative = _text(fields, "negative_prompt")
        model, greq = _request(
            fields, seconds, source is not None,
            prompt=prompt, negative_prompt=negative, width=width, height=height, steps=steps, seed=seed,
        )  # fmt: skip
        return Draft(model, greq, image=source)

    @api.post("/v1/videos")
    async def create(request: Request):
        fields = await read_fields(request, services.intake.max_bytes)
        draft = parse(fields)
        job = await services.admission.admit(CONTRACT, draft, base_url=services.base_url(request))
        return JSONResponse(video_object(job), headers={"openai-poll-after-ms": POLL_AFTER_MS})

    @api.get("/v1/videos")
    async def list_videos(request: Request):
        params = request.query_params
        limit = _int(dict(params), "limit")
        limit = 20 if limit is None else limit
        if not 1 <= limit <= 100:
            raise invalid("limit", f"Invalid value: {limit}. limit must be from 1 to 100.")
        order = params.get("order", "desc")
        if order not in ("asc", "desc"):
            raise invalid("order", f"Invalid value: {short_value(order)!r}. Supported values are: 'asc' and 'desc'.")
        jobs = manager.list(contract=NAME)  # newest first
        if order == "asc":
            jobs.reverse()
        after = params.get("after")
        if after:
            ids = [j.id for j in jobs]
            if after not in ids:
                raise invalid("after", f"Invalid value: {short_value(after, 100)!r}. No video with that id.")
            jobs = jobs[ids.index(after) + 1 :]
        page = jobs[:limit]
        return {
            "object": "list",
            "data": [video_object(j) for j in page],
            "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None,
            "has_more": len(jobs) > limit,
        }

    @api.get("/v1/videos/{video_id}")
    async def retrieve(video_id: str):
        job = find(video_id)
        headers = {} if job.status.terminal else {"openai-poll-after-ms": POLL_AFTER_MS}
        return JSONResponse(video_object(job), headers=headers)

    @api.get("/v1/videos/{video_id}/content")
    async def content(video_id: str, variant: str = "video"):
        job = find(video_id)
        if variant != "video":
            raise invalid("variant", f"Invalid value: {short_value(variant)!r}. k5serve only serves 'video'.")
        if job.status is not JobStatus.SUCCEEDED or job.output is None:
            raise openai_error(
                400,
                f"Video '{job.id}' is {OPENAI_STATUS[job.status]}, not completed; poll GET /v1/videos/{job.id}.",
                "video_id",
                "video_not_ready",
            )
        response = storage.response(
            job.file_id, job.output.file_name, media_type=job.output.content_type, filename=f"{job.id}.mp4"
        )
        if response is None:
            raise openai_error(404, f"The content of video '{job.id}' is no longer available.", "video_id", "not_found")
        return response

    @api.delete("/v1/videos/{video_id}")
    async def delete(video_id: str):
        job = find(video_id)
        # the record, then the file; an unfinished video's generation stops at its next step
        if not await asyncio.to_thread(manager.delete, job.id):
            raise openai_error(404, f"Video with id '{short_value(video_id, 100)}' not found.", "video_id", "not_found")
        return {"id": job.id, "object": "video.deleted", "deleted": True}

    @api.post("/v1/videos/{video_id}/remix")
    async def remix(video_id: str):
        find(video_id)
        raise invalid("video_id", "Remixing is not supported by k5serve: create a new video instead.", "unsupported")

    return api


CONTRACT = Contract(
    name=NAME, prefixes=("/v1",), router=router, refusal=refusal, new_job_id=_new_video_id, fields=ENGINE_FIELDS
)
