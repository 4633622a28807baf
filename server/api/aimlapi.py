"""The AI/ML API video contract (reference/api_contracts.md §3), translated onto the Job model.

Routes, at the host root (the official SDK strips any base path): `POST /v2/video/generations`
creates a job, `GET /v2/video/generations?generation_id=…` polls it. Ids on the wire are
`<uuid>:<model>` (the job id plus the model the client asked for). Errors use the gateway's
NestJS envelope {requestId, statusCode, timestamp, path, message}; a failed generation is not
an HTTP error: the poll answers 200 with status "error".
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from pipelines.request import GenerationRequest
from pipelines.variants import VARIANTS, size_for_aspect

from ..admission import Draft
from ..contracts import Contract, lookup
from ..errors import BadInput, ModelUnavailable, QueueFull, Refused, TooLarge, Unauthorized, Unavailable
from ..jobs import BEFORE_STEPS, ErrorKind, Job, JobStatus
from ..services import Services
from ..storage import file_url
from ..web import ResponseError, require_key
from .shared import t2v_request

NAME = "aimlapi"
PATH = "/v2/video/generations"

# The two ids AI/ML API lists for Kandinsky 5; local variant names are accepted as well.
MODELS = ("sber-ai/kandinsky5-t2v", "sber-ai/kandinsky5-distill-t2v")
ASPECT_RATIOS = ("3:2", "1:1", "2:3")
DURATIONS = (5, 10)

AIML_STATUS: dict[JobStatus, str] = {
    JobStatus.QUEUED: "queued",
    JobStatus.RUNNING: "generating",
    JobStatus.SUCCEEDED: "completed",
    JobStatus.FAILED: "error",  # aimlapi: there is no "failed"; "error" is terminal for every client
    JobStatus.CANCELED: "error",
}

ERROR_NAMES: dict[ErrorKind, str] = {
    ErrorKind.INVALID_INPUT: "ValidationError",
    ErrorKind.UNAVAILABLE: "ModelUnavailableError",
    ErrorKind.OUT_OF_MEMORY: "OutOfMemoryError",
    ErrorKind.DEVICE_FAILURE: "DeviceError",
    ErrorKind.CANCELED: "CancelledError",
    ErrorKind.INTERNAL: "GenerationError",
}

# engine field (InvalidRequest.field) -> the AI/ML API field the client sent
ENGINE_FIELDS = {
    "steps": "num_inference_steps",
    "num_frames": "duration",
    "duration": "duration",
    "width": "aspect_ratio",
    "height": "aspect_ratio",
    "resolution": "aspect_ratio",
    "expand_prompt": "enhance_prompt",
}

UNAUTHORIZED = (
    "This request requires a valid API key. Send 'Authorization: Bearer <key>' with a key given to k5serve --api-key."
)


# -- the gateway error envelope -------------------------------------------------------------------


def envelope(request: Request, status: int, message: str) -> JSONResponse:
    now = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    body = {
        "requestId": secrets.token_urlsafe(16)[:21],
        "statusCode": status,
        "timestamp": now,
        "path": request.url.path,
        "message": message,
    }
    return JSONResponse(body, status_code=status)


class BodyInvalid(Exception):
    """A 400 "Body validation error": zod-style detail naming the field and the allowed values."""

    def __init__(self, field: str, detail: str):
        super().__init__(f'{detail} at "{field}"')
        self.field = field

    @property
    def message(self) -> str:
        return f"Body validation error\n{self.args[0]}"


def _show(value: Any) -> str:
    return f"'{value}'" if isinstance(value, str) else json.dumps(value)


def _kind(value: Any) -> str:
    """zod's names for JSON types, as in "Expected string, received number"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _enum(body: dict, field: str, allowed: tuple, default: Any) -> Any:
    value = body.get(field, default)
    same_type = isinstance(value, str) if isinstance(allowed[0], str) else _kind(value) == "number"
    if not same_type:
        raise BodyInvalid(field, f"Expected {_kind(allowed[0])}, received {_kind(value)}")
    if value not in allowed:
        expected = " | ".join(_show(a) for a in allowed)
        raise BodyInvalid(field, f"Invalid enum value. Expected {expected}, received {_show(value)}")
    return type(allowed[0])(value)


def _integer(body: dict, field: str, minimum: int | None = None) -> int | None:
    value = body.get(field)
    if value is None:
        return None
    if _kind(value) != "number":
        raise BodyInvalid(field, f"Expected number, received {_kind(value)}")
    if isinstance(value, float) and not value.is_integer():
        raise BodyInvalid(field, "Expected integer, received float")
    if minimum is not None and value < minimum:
        raise BodyInvalid(field, f"Number must be greater than or equal to {minimum}")
    return int(value)


def _string(body: dict, field: str, required: bool = False) -> str | None:
    value = body.get(field)
    if value is None:
        if required:
            raise BodyInvalid(field, "Required")
        return None
    if not isinstance(value, str):
        raise BodyInvalid(field, f"Expected string, received {_kind(value)}")
    if required and not value.strip():
        raise BodyInvalid(field, "String must contain at least 1 character(s)")
    return value


def parse_body(body: Any, aliases: Mapping[str, str] | None = None) -> tuple[str, GenerationRequest]:
    """JSON body -> (model id, GenerationRequest). Raises BodyInvalid."""
    if not isinstance(body, dict):
        raise BodyInvalid("body", f"Expected object, received {_kind(body)}")
    model = _string(body, "model", required=True)
    if model not in MODELS and model not in VARIANTS and model not in (aliases or {}):
        expected = " | ".join(_show(m) for m in MODELS)
        raise BodyInvalid(
            "model",
            f"Invalid enum value. Expected {expected}, received {_show(model)} "
            f"(local variant names such as 'kandinsky5-lite-t2v-distilled-5s' are accepted too)",
        )
    prompt = _string(body, "prompt", required=True)
    aspect = _enum(body, "aspect_ratio", ASPECT_RATIOS, "3:2")
    duration = _enum(body, "duration", DURATIONS, 5)
    steps = _integer(body, "num_inference_steps", minimum=1)
    seed = _integer(body, "seed", minimum=0)
    negative = _string(body, "negative_prompt")
    enhance = body.get("enhance_prompt")
    if enhance is not None and not isinstance(enhance, bool):
        raise BodyInvalid("enhance_prompt", f"Expected boolean, received {_kind(enhance)}")
    # enhance_prompt: the official pipelines' Qwen2.5-VL rewrite (pipelines/expand.py); absent: the server's default
    width, height = size_for_aspect(aspect)
    try:
        request = t2v_request(
            model,
            prompt=prompt,
            negative_prompt=negative,
            width=width,
            height=height,
            seconds=duration,
            steps=steps,
            seed=seed,
            expand_prompt=enhance,
            aliases=aliases,
        )
    except ValueError as exc:
        raise BodyInvalid("duration", str(exc)) from exc
    return model, request


# -- wire bodies ----------------------------------------------------------------------------------


def wire_id(job: Job) -> str:
    return f"{job.id}:{job.model}"


def wire_phase(job: Job) -> str | None:
    """k5serve's `phase` while generating: denoising, decoding, writing. Loading and encoding are
    null, as a run before its first step always was here (the wire keeps its three values)."""
    if job.status is not JobStatus.RUNNING or job.phase in BEFORE_STEPS:
        return None
    return job.phase


def poll_body(job: Job, base: str) -> dict:
    body: dict = {"id": wire_id(job), "status": AIML_STATUS[job.status], "model": job.model, "video": None}
    body["error"] = None
    body["phase"] = wire_phase(job)
    if job.status is JobStatus.SUCCEEDED and job.output is not None:
        out = job.output
        body["video"] = {
            "url": file_url(base, job.file_id, out.file_name),
            "content_type": out.content_type,
            "file_name": out.file_name,
            "file_size": out.file_size,
            "duration": round(out.seconds, 3),
        }
        body["duration"] = round(out.seconds, 3)
        if out.revised_prompt is not None:  # extension: the prompt as encoded after enhance_prompt
            body["meta"] = {"revised_prompt": out.revised_prompt}
    elif job.status.terminal and job.error is not None:
        body["error"] = {"name": ERROR_NAMES[job.error.kind], "message": job.error.message}
    return body


# -- routes ---------------------------------------------------------------------------------------


# server.errors -> (HTTP status, the envelope's message)
REFUSALS = {
    BadInput: lambda e: (
        400,
        BodyInvalid(CONTRACT.wire_field(e.field), e.message_for(CONTRACT.wire_field(e.field))).message,
    ),
    ModelUnavailable: lambda e: (503, f"Service unavailable: {e.message}"),
    QueueFull: lambda e: (429, f"Too Many Requests: {e.message}"),
    Unavailable: lambda e: (503, f"Service unavailable: {e.message}"),
    Unauthorized: lambda e: (401, UNAUTHORIZED),
    TooLarge: lambda e: (413, e.message),
}


def refusal(request: Request, exc: Refused) -> JSONResponse:
    status, message = lookup(REFUSALS, exc)(exc)
    return envelope(request, status, message)


def router(services: Services) -> APIRouter:
    api = APIRouter(dependencies=[Depends(require_key(services.keys))])
    manager = services.manager

    def fail(request: Request, status: int, message: str) -> ResponseError:
        return ResponseError(envelope(request, status, message))

    @api.post(PATH, status_code=201)
    async def create(request: Request):
        try:
            body = json.loads(await request.body() or b"null")
        except (ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deep
            raise fail(request, 400, "Body validation error\nThe request body is not valid JSON") from exc
        try:
            model, greq = parse_body(body, services.settings.aliases)
        except BodyInvalid as exc:
            raise fail(request, 400, exc.message) from exc
        job = await services.admission.admit(CONTRACT, Draft(model, greq), base_url=services.base_url(request))
        return JSONResponse({"id": wire_id(job), "status": AIML_STATUS[job.status]}, status_code=201)

    @api.get(PATH)
    async def poll(request: Request):
        generation_id = request.query_params.get("generation_id")  # decoded: %3A and ':' alike
        if not generation_id:
            raise fail(request, 400, 'Query validation error\nRequired at "generation_id"')
        job_id, _, model = generation_id.partition(":")
        job = manager.get(job_id)
        if job is None or job.contract != NAME or (model and model != job.model):
            raise fail(request, 404, f"Generation with id '{generation_id[:200]}' not found")
        return JSONResponse(poll_body(job, services.base_url(request)))

    return api


CONTRACT = Contract(name=NAME, prefixes=("/v2",), router=router, refusal=refusal, fields=ENGINE_FIELDS)
