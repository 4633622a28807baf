"""The OpenAI Videos API, as Sora's SDK code calls it (docs/sora.md), onto the Job model.

Routes (the reference sheet's ten): `POST /v1/videos`, `GET /v1/videos` (cursor pages),
`GET|DELETE /v1/videos/{id}`, `GET /v1/videos/{id}/content?variant=video|thumbnail|spritesheet`,
`POST /v1/videos/characters` and `GET /v1/videos/characters/{id}` (refused: no characters here), and
remix, edits and extensions from openai_edits.py. Request parsing is openai_wire.py. Every Video
object carries the 13 keys of the SDK's type, `seconds` and `size` as the file really is (demo mode
too). Refusals are OpenAI's envelope {error: {message, type, param, code}}, and a permanent one is
never 408, 409, 429 or 5xx: the SDK retries those, submitting a bad request three times.
Extensions beyond OpenAI's schema (the SDK's `extra_body`): `num_inference_steps`, `seed`,
`negative_prompt`.
"""

from __future__ import annotations

import asyncio
import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from .. import thumbnails
from ..admission import Draft
from ..contracts import Contract, lookup
from ..errors import BadInput, ModelUnavailable, QueueFull, Refused, TooLarge, Unauthorized, Unavailable
from ..jobs import ErrorKind, Job, JobStatus, short_value
from ..services import Services
from ..storage import OUTPUT_NAME
from ..web import require_key
from .openai_wire import (  # noqa: F401 - re-exported: openai_edits (remix, edits, extensions) uses them
    CHARACTERS_REFUSED,
    create_request,
    image_source,
    integer,
    invalid,
    openai_error,
    prompt_of,
    read_fields,
    text,
)

NAME = "openai"
POLL_AFTER_MS = "500"  # openai-poll-after-ms: the SDK's poll helper reads it once (its default is 1 s)

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

# variant -> (file next to the video, content type); "video" is the mp4 itself (thumbnails.py: the layouts)
PREVIEWS = {
    "thumbnail": (thumbnails.POSTER_NAME, "image/webp", thumbnails.poster_webp),
    "spritesheet": (thumbnails.SPRITESHEET_NAME, "image/jpeg", thumbnails.spritesheet_jpg),
}


# -- responses ------------------------------------------------------------------------------------


def progress(job: Job) -> int:
    """0-100 from the real run (Job.percent): the steps fill 0-90, the decode's chunks 90-99, the
    write sits at 99; 100 only once the video is written."""
    return job.percent


def _made(job: Job) -> dict:
    """`seconds` and `size` of the video this job makes: the file once it exists, before that what
    admission resolved to run (in demo mode the tiny model's size and length, not the ones asked
    for). The wire's seconds are whole-second strings: the clip's length rounded (Sora's 4 s is 97
    frames @ 24 fps, 4.04 s: "4"; demo's 25 frames: "1"). Only a job with neither (a record from
    before resolved requests were stored) shows what its meta recorded."""
    made = job.output or job.resolved
    if made is None:
        return {"seconds": job.meta.get("seconds"), "size": job.meta.get("size")}
    fps = made.fps if made is job.output else made.variant.fps
    return {"seconds": str(round(made.num_frames / fps)), "size": f"{made.width}x{made.height}"}


def video_object(job: Job, retention_hours: float = 0.0) -> dict:
    """The SDK's Video, all 13 keys (nullable ones as null). `expires_at`: when retention
    (K5SERVE_RETENTION_HOURS, `retention_hours`) removes a finished job and its files."""
    error = None
    if job.status in (JobStatus.FAILED, JobStatus.CANCELED) and job.error is not None:
        error = {"code": ERROR_CODES[job.error.kind], "message": job.error.message}
    ended = int(job.completed_at) if job.status.terminal and job.completed_at else None
    return {
        "id": job.id,
        "object": "video",
        "model": job.model,
        "status": OPENAI_STATUS[job.status],
        "progress": progress(job),
        "created_at": int(job.created_at),
        "completed_at": ended,
        "expires_at": int(job.completed_at + retention_hours * 3600) if ended and retention_hours else None,
        "prompt": job.prompt,
        **_made(job),
        "remixed_from_video_id": job.meta.get("remixed_from_video_id"),
        "error": error,
    }


UNAUTHORIZED = "Incorrect API key provided. Send 'Authorization: Bearer <key>' with a key given to k5serve --api-key."

# server.errors -> (HTTP status, message, param, code, type). QueueFull and Unavailable are the only
# retryable answers (429, 503): they pass; everything else is permanent and 4xx.
REFUSALS = {
    BadInput: lambda e: (400, _worded(e), CONTRACT.wire_field(e.field), "invalid_value", "invalid_request_error"),
    ModelUnavailable: lambda e: (404, e.message, "model", "model_not_found", "invalid_request_error"),
    QueueFull: lambda e: (429, e.message, None, "rate_limit_exceeded", "requests"),
    Unavailable: lambda e: (503, e.message, None, "service_unavailable", "server_error"),
    Unauthorized: lambda e: (401, UNAUTHORIZED, None, "invalid_api_key", "invalid_request_error"),
    TooLarge: lambda e: (413, e.message, None, "request_too_large", "invalid_request_error"),
}


def _worded(exc: BadInput) -> str:
    """The engine's message in the client's words; a frame count stays one, said in seconds too."""
    if exc.field == "num_frames":
        return f"{exc.message} (seconds s make s x 24 + 1 frames)"
    return exc.message_for(CONTRACT.wire_field(exc.field))


def refusal(_request: Request, exc: Refused) -> JSONResponse:
    return openai_error(*lookup(REFUSALS, exc)(exc)).response


def _new_video_id() -> str:
    return f"video_{uuid.uuid4().hex}"


def page(jobs: list[Job], limit: int, after: str | None, before: str | None) -> tuple[list[Job], bool]:
    """One page of `jobs` (already in the order asked): the `limit` after the cursor `after`, or the
    `limit` just before `before`; and whether more lie beyond it in that direction. Raises
    ResponseError for a cursor that names no video here."""
    ids = [j.id for j in jobs]
    for name, cursor in (("after", after), ("before", before)):
        if cursor and cursor not in ids:
            raise invalid(name, f"Invalid value: {short_value(cursor, 100)!r}. No video with that id.")
    if before:
        earlier = jobs[: ids.index(before)]
        return earlier[max(0, len(earlier) - limit) :], len(earlier) > limit
    rest = jobs[ids.index(after) + 1 :] if after else jobs
    return rest[:limit], len(rest) > limit


# -- routes ---------------------------------------------------------------------------------------


def router(services: Services) -> APIRouter:
    api = APIRouter(dependencies=[Depends(require_key(services.keys))])
    manager, storage, settings = services.manager, services.storage, services.settings

    def render(job: Job) -> dict:
        return video_object(job, settings.retention_hours)

    def find(video_id: str) -> Job:
        job = manager.get(video_id)
        if job is None or job.contract != NAME:
            raise openai_error(404, f"Video with id '{short_value(video_id, 100)}' not found.", "video_id", "not_found")
        return job

    # characters: before /v1/videos/{video_id} routes, so "characters" is never taken for an id
    @api.post("/v1/videos/characters")
    async def create_character():
        raise invalid("video", CHARACTERS_REFUSED, "unsupported")

    @api.get("/v1/videos/characters/{character_id}")
    async def get_character(character_id: str):
        raise openai_error(404, CHARACTERS_REFUSED, "character_id", "not_found")

    @api.post("/v1/videos")
    async def create(request: Request):
        fields = await read_fields(request, services.intake.max_bytes)
        source = image_source(fields, services.uploads)
        model, greq = create_request(fields, settings.aliases, has_image=source is not None)
        draft = Draft(model, greq, image=source)
        job = await services.admission.admit(CONTRACT, draft, base_url=services.base_url(request))
        return JSONResponse(render(job), headers={"openai-poll-after-ms": POLL_AFTER_MS})

    @api.get("/v1/videos")
    async def list_videos(request: Request):
        params = request.query_params
        limit = integer(dict(params), "limit")
        limit = 20 if limit is None else limit
        if not 0 <= limit <= 100:
            raise invalid("limit", f"Invalid value: {limit}. limit must be from 0 to 100.")
        order = params.get("order", "desc")
        if order not in ("asc", "desc"):
            raise invalid("order", f"Invalid value: {short_value(order)!r}. Supported values are: 'asc' and 'desc'.")
        jobs = manager.list(contract=NAME)  # newest first
        if order == "asc":
            jobs.reverse()
        data, more = page(jobs, limit, params.get("after"), params.get("before"))
        return {
            "object": "list",
            "data": [render(j) for j in data],
            "first_id": data[0].id if data else None,
            "last_id": data[-1].id if data else None,
            "has_more": more,
        }

    @api.get("/v1/videos/{video_id}")
    async def retrieve(video_id: str):
        job = find(video_id)
        headers = {} if job.status.terminal else {"openai-poll-after-ms": POLL_AFTER_MS}
        return JSONResponse(render(job), headers=headers)

    @api.get("/v1/videos/{video_id}/content")
    async def content(video_id: str, variant: str = "video"):
        job = find(video_id)
        if variant != "video" and variant not in PREVIEWS:
            allowed = "'video', 'thumbnail' and 'spritesheet'"
            raise invalid("variant", f"Invalid value: {short_value(variant)!r}. Supported values are: {allowed}.")
        if job.status is not JobStatus.SUCCEEDED or job.output is None:
            raise openai_error(
                400,
                f"Video '{job.id}' is {OPENAI_STATUS[job.status]}, not completed; poll GET /v1/videos/{job.id}.",
                "video_id",
                "video_not_ready",
            )
        gone = openai_error(404, f"The content of video '{job.id}' is no longer available.", "video_id", "not_found")
        if variant == "video":
            name, media_type, filename = job.output.file_name, job.output.content_type, f"{job.id}.mp4"
        else:
            name, media_type, make = PREVIEWS[variant]
            filename = f"{job.id}.{name.rsplit('.', 1)[1]}"
            mp4 = storage.find(job.file_id, job.output.file_name or OUTPUT_NAME)
            if mp4 is None:
                raise gone
            try:  # made once, on first request, next to the video (deleted and expired with it)
                await asyncio.to_thread(thumbnails.cached, mp4, name, lambda: make(mp4))
            except (ValueError, OSError) as exc:  # not a 5xx: the SDK would ask twice more for the same
                message = f"The {variant} of video '{job.id}' could not be made from its file: {exc}"
                raise openai_error(404, message[:500], "variant", "not_found") from exc
        response = storage.response(job.file_id, name, media_type=media_type, filename=filename)
        if response is None:
            raise gone
        return response

    @api.delete("/v1/videos/{video_id}")
    async def delete(video_id: str):
        job = find(video_id)
        # the record, then the file; an unfinished video's generation stops at its next step
        if not await asyncio.to_thread(manager.delete, job.id):
            raise openai_error(404, f"Video with id '{short_value(video_id, 100)}' not found.", "video_id", "not_found")
        return {"id": job.id, "object": "video.deleted", "deleted": True}

    # remix, edits and extensions: openai_edits.py (issue 15 item 5); POST /v1/videos/edits and
    # /extensions match no route above, so the order does not matter
    edits = _edits_router(services)
    if edits is not None:
        api.include_router(edits)
    else:  # seam (issue 15): a build without openai_edits.py refuses the three, in this envelope

        @api.post("/v1/videos/{video_id}/remix")
        async def remix(video_id: str):
            find(video_id)
            raise invalid("video_id", "Remixing is not in this build of k5serve: create a new video.", "unsupported")

        @api.post("/v1/videos/edits")
        @api.post("/v1/videos/extensions")
        async def edit_or_extend(request: Request):
            kind = request.url.path.rsplit("/", 1)[1]  # never a path parameter: /v1/videos/generations is OneRouter's
            raise invalid(None, f"Video {kind} are not in this build of k5serve: create a new video.", "unsupported")

    return api


def _edits_router(services: Services) -> APIRouter | None:
    """openai_edits.router(services), the one include line; None in a build without that module
    (seam, issue 15: helper v2v adds it; remove this guard when it lands)."""
    import importlib

    try:
        edits = importlib.import_module(f"{__package__}.openai_edits")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.openai_edits":
            raise
        return None
    return edits.router(services)


CONTRACT = Contract(
    name=NAME, prefixes=("/v1",), router=router, refusal=refusal, new_job_id=_new_video_id, fields=ENGINE_FIELDS
)
