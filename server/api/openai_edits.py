"""OpenAI Videos: remix, edits and extensions, made for real on Kandinsky 5 (docs/sora.md has them).

    POST /v1/videos/{video_id}/remix   prompt                   video-to-video of a finished video
    POST /v1/videos/edits              prompt, video            the same, of a finished (id) or uploaded video
    POST /v1/videos/extensions         prompt, seconds, video   continues it: I2V from its last frame

A router that openai.py includes (one contract: its body reader, field parsers and error envelope,
openai_wire.py, and its ids, refusals and Video object, openai.py, are used here, not copied). The
source of a finished video is its stored mp4; an uploaded one comes in through the same body reader
and its limits (K5SERVE_IMAGE_MAX_BYTES). Both go through the one admission path as a Draft with a
`video`. The model of a video given by id is the source's (as Sora: "the API infers the model from the
source video"); an upload takes `model` like create does. The new video's `remixed_from_video_id`
names its source when it was given by id.
Extensions beyond OpenAI's schema (send them through the SDK's `extra_body`): `strength` (remix
and edits, (0, 1], default pipelines.request_video.DEFAULT_STRENGTH), `num_inference_steps`,
`seed`, `negative_prompt`.
"""

from __future__ import annotations

import re
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from pipelines.request import GenerationRequest, request_for_model
from pipelines.variants import PUBLIC_MODELS, VARIANTS, text_variant

from ..admission import Draft
from ..jobs import Job, JobStatus, short_value
from ..services import Services
from . import openai as oa
from .openai_wire import DEFAULT_T2V, integer, invalid, openai_error, prompt_of, read_fields, text

REMIXED_FROM = "remixed_from_video_id"  # Job.meta key: the id of the video this one was made from
_SECONDS = re.compile(r"^\d{1,2}$")


def _strength(fields: dict) -> float | None:
    value = fields.get("strength")
    if value is None or value == "":
        return None
    try:
        strength = float(value) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else None
    except ValueError:
        strength = None
    if strength is None or not 0 < strength <= 1:
        raise invalid("strength", f"Invalid value: {short_value(value)!r}. strength must be a number in (0, 1].")
    return strength


def _extension_seconds(fields: dict) -> int | None:
    """Sora's extension `seconds`: the length of the new segment, 1 to 20 (Sora: 4, 8, 12, 16, 20)."""
    value = fields.get("seconds")
    if value is None or value == "":
        return None
    word = str(value).strip() if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
    if not _SECONDS.match(word) or not 1 <= int(word) <= 20:
        raise invalid(
            "seconds", f"Invalid value: {short_value(value)!r}. An extension adds 1 to 20 seconds (Sora: 4 to 20)."
        )
    return int(word)


def _video_ref(fields: dict) -> str | bytes:
    """`video`: an uploaded file's bytes, or the id of a video ({"id": ...}, `video[id]`, or a string)."""
    value = fields.get("video")
    if isinstance(value, dict):
        value = value.get("id")
    if isinstance(value, bytes) and value:
        return value
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise invalid(
        "video",
        "Missing required parameter: 'video' (an mp4 file, or {'id': <video id>}).",
        "missing_required_parameter",
    )


def router(services: Services) -> APIRouter:
    api = APIRouter()  # openai.py's router includes it: its key check applies
    manager, storage, settings = services.manager, services.storage, services.settings

    def source_of(video_id: str) -> tuple[Job, Path]:
        """A finished video of this contract and its stored mp4."""
        job = manager.get(video_id)
        if job is None or job.contract != oa.NAME or job.request is None:
            raise openai_error(404, f"Video with id '{short_value(video_id, 100)}' not found.", "video_id", "not_found")
        if job.status is not JobStatus.SUCCEEDED or job.output is None:
            status = oa.OPENAI_STATUS[job.status]
            message = f"Video '{job.id}' is {status}, not completed; only a completed video is a source."
            raise invalid("video_id", message, "video_not_ready")
        path = storage.find(job.file_id, job.output.file_name)
        if path is None:
            raise openai_error(404, f"The content of video '{job.id}' is no longer available.", "video_id", "not_found")
        return job, path

    def request_for(
        fields: dict, source: Job | None, *, remix: bool, seconds: int | None
    ) -> tuple[str, GenerationRequest]:
        """(model to report, request): the source's model when given by id (a remix also takes its
        steps and guidance; an extension's I2V passes take their own model's), else the body's model
        (create's default when absent)."""
        prompt = prompt_of(fields)
        values = dict(
            prompt=prompt,
            negative_prompt=text(fields, "negative_prompt"),
            seed=integer(fields, "seed"),
            strength=_strength(fields) if remix else None,
            seconds=seconds,
        )
        steps = integer(fields, "num_inference_steps")
        if source is not None:
            asked = source.request
            if steps is None and remix:
                steps = asked.steps
            negative = values["negative_prompt"] or asked.negative_prompt
            guidance = asked.guidance if remix else None
            model, variant = source.model, VARIANTS[asked.variant]
            values.update(negative_prompt=negative, variant=variant.name, steps=steps, guidance=guidance)
        else:
            model, base = uploaded_model(fields, prompt, steps)
            steps, guidance = (base.steps, base.guidance) if remix else (steps, None)
            values.update(variant=base.variant, steps=steps, guidance=guidance)
        if remix:  # video-to-video runs on the family's text-to-video model
            values["variant"] = text_variant(VARIANTS[values["variant"]]).name
        return model, GenerationRequest(**values)

    def uploaded_model(fields: dict, prompt: str, steps: int | None) -> tuple[str, GenerationRequest]:
        """An upload's `model` (create's default when absent) -> its request: a variant, a public id
        or an alias (Sora's names, K5SERVE_MODEL_ALIASES), with the public id's steps and guidance."""
        model = text(fields, "model") or DEFAULT_T2V
        known = model in VARIANTS or model in PUBLIC_MODELS or model in settings.aliases
        if not known:
            message = f"Invalid value: {short_value(model)!r}. Give a Sora name, a Kandinsky 5 variant or a public id."
            raise invalid("model", message)
        return model, request_for_model(model, prompt, aliases=settings.aliases, steps=steps)

    async def admit(request: Request, fields: dict, ref: str | bytes, *, remix: bool) -> JSONResponse:
        source, video = None, ref
        if isinstance(ref, str):
            source, video = source_of(ref)
        seconds = None if remix else _extension_seconds(fields)
        model, greq = request_for(fields, source, remix=remix, seconds=seconds)
        if source is not None and not remix:  # Sora: six extensions at most, counted along the chain
            before = source.resolved.extensions if source.resolved is not None else 0
            greq = GenerationRequest(**{**greq.to_dict(), "source_extensions": before})
        meta = {REMIXED_FROM: source.id} if source is not None else {}
        draft = Draft(model, greq, video=video, extend=not remix)
        job = await services.admission.admit(oa.CONTRACT, draft, base_url=services.base_url(request), meta=meta)
        return JSONResponse(
            oa.video_object(job, settings.retention_hours), headers={"openai-poll-after-ms": oa.POLL_AFTER_MS}
        )

    @api.post("/v1/videos/{video_id}/remix")
    async def remix(video_id: str, request: Request):
        fields = await read_fields(request, services.intake.max_bytes)
        return await admit(request, fields, video_id, remix=True)

    @api.post("/v1/videos/edits")
    async def edits(request: Request):
        fields = await read_fields(request, services.intake.max_bytes)
        return await admit(request, fields, _video_ref(fields), remix=True)

    @api.post("/v1/videos/extensions")
    async def extensions(request: Request):
        fields = await read_fields(request, services.intake.max_bytes)
        return await admit(request, fields, _video_ref(fields), remix=False)

    return api
