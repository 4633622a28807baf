"""The OneRouter video contract (reference/api_contracts.md §4), translated onto the Job model.

One synchronous route, `POST /v1/videos/generations`: the call queues a job like any other and
holds the connection until it ends, answering `{data: [{url, revised_prompt}], created}`. A client
that hangs up while waiting cancels its job ("client disconnected"), so an abandoned request does
not hold the GPU; after a restart such a job is cancelled, not run again (`synchronous`, Job.waits).
Auth: `Authorization: <key>` (the documented form) or `Bearer <key>`. Errors:
`{error: {code, message, type, param}}` with the HTTP status equal to `code`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from pipelines.request import GenerationRequest
from pipelines.variants import VARIANTS

from ..admission import Draft
from ..contracts import Contract, lookup
from ..errors import BadInput, ModelUnavailable, QueueFull, Refused, TooLarge, Unauthorized, Unavailable
from ..jobs import ErrorKind, Job, JobError, JobStatus, short_value
from ..services import Services
from ..storage import file_url
from ..web import ResponseError, require_key
from .shared import hold_until_done, t2v_request

NAME = "onerouter"
PATH = "/v1/videos/generations"

# The OneRouter model name and its aliases (design.md); local variant names are accepted too.
MODELS = ("kandinsky5-text-to-video", "kandinsky5", "kandinsky-5-text-to-video", "kandinsky5-t2v")
RESOLUTIONS = ("768x512", "512x768", "512x512")
VIDEO_LENGTHS = ("5s", "10s")
OUTPUT_FORMATS = ("url",)

# ErrorKind -> (HTTP status = error.code, error.type) for a generation that did not succeed.
FAILURES: dict[ErrorKind, tuple[int, str]] = {
    ErrorKind.INVALID_INPUT: (400, "invalid_request_error"),
    ErrorKind.UNAVAILABLE: (503, "service_unavailable"),
    ErrorKind.OUT_OF_MEMORY: (502, "model_error"),
    ErrorKind.DEVICE_FAILURE: (502, "model_error"),
    ErrorKind.INTERNAL: (502, "model_error"),
    ErrorKind.CANCELED: (408, "timeout"),
}

ENGINE_FIELDS = {
    "steps": "num_inference_steps",
    "num_frames": "video_length",
    "duration": "video_length",
    "width": "resolution",
    "height": "resolution",
}


def error_response(code: int, message: str, type_: str = "invalid_request_error", param: str = "") -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "type": type_, "param": param}}, code)


class ParamInvalid(Exception):
    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param
        self.message = message


def _choice(body: dict, field: str, allowed: tuple[str, ...], default: str) -> str:
    value = body.get(field, default)
    if value not in allowed or not isinstance(value, str):
        raise ParamInvalid(field, f"{field} must be one of {', '.join(allowed)}; got {short_value(value)!r}")
    return value


def _int(body: dict, field: str) -> int | None:
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParamInvalid(field, f"{field} must be an integer; got {short_value(value)!r}")
    return value


def _bool(body: dict, field: str) -> bool | None:
    value = body.get(field)
    if value is not None and not isinstance(value, bool):
        raise ParamInvalid(field, f"{field} must be true or false; got {short_value(value)!r}")
    return value


def _text(body: dict, field: str, required: bool = False) -> str | None:
    value = body.get(field)
    if value is None or (required and isinstance(value, str) and not value.strip()):
        if required:
            raise ParamInvalid(field, f"{field} is required")
        return None
    if not isinstance(value, str):
        raise ParamInvalid(field, f"{field} must be a string; got {short_value(value)!r}")
    return value


def parse_body(body: Any, aliases: Mapping[str, str] | None = None) -> tuple[str, GenerationRequest]:
    """JSON body -> (model, GenerationRequest). Raises ParamInvalid."""
    if not isinstance(body, dict):
        raise ParamInvalid("", "the request body must be a JSON object")
    model = _text(body, "model", required=True)
    if model not in MODELS and model not in VARIANTS and model not in (aliases or {}):
        raise ParamInvalid(
            "model", f"model {short_value(model)!r} is not served here; use one of {', '.join(MODELS)} or a local name"
        )
    prompt = _text(body, "prompt", required=True)
    resolution = _choice(body, "resolution", RESOLUTIONS, "768x512")
    seconds = int(_choice(body, "video_length", VIDEO_LENGTHS, "5s").removesuffix("s"))
    _choice(body, "output_format", OUTPUT_FORMATS, "url")
    steps = _int(body, "num_inference_steps")
    seed = _int(body, "seed")  # extension: not in OneRouter's schema
    negative = _text(body, "negative_prompt")  # extension
    expand = _bool(body, "expand_prompt")  # extension: the official pipelines' prompt rewrite; None: server default
    width, height = (int(side) for side in resolution.split("x"))
    try:
        request = t2v_request(
            model,
            prompt=prompt,
            negative_prompt=negative,
            width=width,
            height=height,
            seconds=seconds,
            steps=steps,
            seed=seed,
            expand_prompt=expand,
            aliases=aliases,
        )
    except ValueError as exc:
        raise ParamInvalid("video_length", str(exc)) from exc
    return model, request


def success_body(job: Job, base: str) -> dict:
    out = job.output
    assert out is not None
    url = file_url(base, job.file_id, out.file_name)
    # revised_prompt: the prompt as encoded when it was expanded; "" otherwise, as OneRouter answers then.
    revised = out.revised_prompt or ""
    return {"data": [{"url": url, "revised_prompt": revised, "video_id": job.id}], "created": int(job.created_at)}


def failure_response(job: Job) -> JSONResponse:
    error = job.error or JobError(ErrorKind.INTERNAL, "the generation failed")
    code, type_ = FAILURES[error.kind]
    param = CONTRACT.wire_field(error.field) if error.kind is ErrorKind.INVALID_INPUT else ""
    return error_response(code, error.message, type_, param or "")


UNAUTHORIZED = "Invalid API key: send 'Authorization: <key>' or 'Authorization: Bearer <key>'"

# server.errors -> (HTTP status = error.code, message, error.type, error.param)
REFUSALS = {
    BadInput: lambda e: (
        400,
        e.message_for(CONTRACT.wire_field(e.field)),
        "invalid_request_error",
        CONTRACT.wire_field(e.field),
    ),
    ModelUnavailable: lambda e: (503, e.message, "service_unavailable", "model"),
    QueueFull: lambda e: (429, e.message, "rate_limit_exceeded", ""),
    Unavailable: lambda e: (503, e.message, "service_unavailable", ""),
    Unauthorized: lambda e: (401, UNAUTHORIZED, "invalid_request_error", ""),
    TooLarge: lambda e: (413, e.message, "invalid_request_error", ""),
}


def refusal(_request: Request, exc: Refused) -> JSONResponse:
    return error_response(*lookup(REFUSALS, exc)(exc))


def router(services: Services) -> APIRouter:
    api = APIRouter(dependencies=[Depends(require_key(services.keys))])
    manager = services.manager

    @api.post(PATH)
    async def generate(request: Request):
        try:
            body = json.loads(await request.body() or b"null")
        except (ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deep
            raise ResponseError(error_response(400, "the request body is not valid JSON")) from exc
        try:
            model, greq = parse_body(body, services.settings.aliases)
        except ParamInvalid as exc:
            raise ResponseError(error_response(400, exc.message, param=exc.param)) from exc
        job = await services.admission.admit(CONTRACT, Draft(model, greq), base_url=services.base_url(request))
        job = await hold_until_done(manager, job, request)  # synchronous: a hang-up cancels the job
        if job.status is JobStatus.SUCCEEDED:
            return JSONResponse(success_body(job, services.base_url(request)))
        return failure_response(job)

    return api


CONTRACT = Contract(name=NAME, prefixes=(PATH,), router=router, refusal=refusal, fields=ENGINE_FIELDS, synchronous=True)
