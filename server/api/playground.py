"""The studio at GET / (server/static/: index.html, studio.css, js/*.js) and its JSON routes.

Registered like a contract (`CONTRACT`, named "native") so its JSON routes word refusals (401, 404,
413) in its own plain shape, {"detail": message}. The page submits through the fal contract; these
routes are what fal has no words for: the model table (studio_models.py), every job of this server
whatever contract made it (list with paging, one job with its log, cancel, delete) and poster frames.

Poster frames are capability URLs like the videos themselves (`/api/posters/<file id>.webp`, no key:
an <img> cannot send one); the webp is made from the mp4 on first request and kept beside it, so it
goes when the video goes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse

from ..contracts import Contract
from ..errors import Refused, Unauthorized
from ..jobs import Job
from ..manager import CancelOutcome
from ..services import Services
from ..storage import OUTPUT_NAME, file_url
from ..web import require_key
from .studio_models import model_table

STATIC = Path(__file__).resolve().parent.parent / "static"
PAGE = STATIC / "index.html"
# what GET /static/<path> serves: the page's own files, nothing else (no directory walking)
STATIC_FILES = {p.relative_to(STATIC).as_posix() for p in STATIC.rglob("*") if p.is_file()}


def refusal(_request: Request, exc: Refused) -> JSONResponse:
    message = "missing or invalid API key" if isinstance(exc, Unauthorized) else exc.message
    return JSONResponse({"detail": message}, status_code=exc.status)


def _resolved(job: Job) -> dict | None:
    r = job.resolved
    if r is None:
        return None
    return {
        "variant": r.variant.name,
        "width": r.width,
        "height": r.height,
        "num_frames": r.num_frames,
        "steps": r.steps,
        "guidance": r.guidance,
        "seed": r.seed,
        "acceleration": r.acceleration,
        "expand_prompt": r.expand_prompt,
        "demo": r.demo,
        "nominal_size": list(r.nominal_size) if r.nominal_size else None,
    }


def _requested(job: Job) -> dict | None:
    """The request as asked, for "re-run": the image's local path is the server's business."""
    if job.request is None:
        return None
    data = job.request.to_dict()
    data["image"] = bool(data.get("image"))
    return data


def job_summary(job: Job, base: str, position: int | None) -> dict:
    """One job, whatever contract made it, as the studio's queue and gallery show it."""
    out = job.output
    return {
        "id": job.id,
        "contract": job.contract,
        "model": job.model,
        "status": job.status.value,
        "prompt": job.prompt,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "completed_at": job.completed_at,
        "queue_position": position,
        "progress": list(job.progress) if job.progress else None,  # (step, total)
        # loading, encoding, denoising, decoding, writing (the last one reached, once finished); the decode's chunks
        "phase": job.phase,
        "phase_progress": list(job.phase_progress) if job.phase_progress else None,
        "percent": job.percent,
        "error": job.error.message if job.error else None,
        "error_kind": job.error.kind.value if job.error else None,
        "video_url": file_url(base, job.file_id, out.file_name) if out else None,
        "poster_url": f"{base}/api/posters/{job.file_id}.webp" if out else None,
        "video_seconds": round(out.seconds, 3) if out else None,
        "size": f"{out.width}x{out.height}" if out else None,
        "inference_time": job.inference_time,
        "acceleration": out.acceleration if out else None,
        "revised_prompt": out.revised_prompt if out else None,  # the prompt as encoded, when expanded
        "approximations": out.approximations if out else None,  # opt-in 8-bit weights (pipelines/quant.py)
        "request": _requested(job),
        "resolved": _resolved(job),
    }


def _logs(job: Job) -> list[dict]:
    return [{"message": line.message, "level": line.level, "time": line.timestamp} for line in job.logs]


def _poster(services: Services, file_id: str) -> Path | None:
    """The poster frame of a stored video, made once (None: no such video, or not decodable)."""
    from ..thumbnails import POSTER_NAME, cached, poster_webp  # imageio-ffmpeg + Pillow: on first use

    video = services.storage.find(file_id, OUTPUT_NAME)
    if video is None:
        return None
    try:
        return cached(video, POSTER_NAME, lambda: poster_webp(video))
    except (ValueError, OSError):  # not a decodable video (the fake engine's bytes), or deleted meanwhile
        return None


def router(services: Services) -> APIRouter:
    r = APIRouter()
    manager = services.manager
    keyed = [Depends(require_key(services.keys))]

    @r.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(PAGE, media_type="text/html", headers={"Cache-Control": "no-cache"})

    @r.get("/static/{path:path}", include_in_schema=False)
    async def static(path: str) -> FileResponse:
        if path not in STATIC_FILES:
            raise HTTPException(404, "not found")
        return FileResponse(STATIC / path, headers={"Cache-Control": "no-cache"})

    @r.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> FileResponse:
        return FileResponse(STATIC / "favicon.ico", media_type="image/x-icon")

    @r.get("/api/config", include_in_schema=False)
    async def config() -> dict:
        """What the page needs before its first call: whether to ask for a key, the server's defaults."""
        demo, expand = bool(services.engine.demo), services.settings.expand_prompts
        return {"api_keys": services.keys.enabled, "demo": demo, "expand_prompts": expand}

    @r.get("/api/models", include_in_schema=False)
    async def models() -> dict:
        """Every model id the page can submit with each input's default and range (studio_models.py)."""
        engine = services.engine
        return model_table(
            demo=bool(engine.demo), available=engine.available(), expand=services.settings.expand_prompts
        )

    @r.get("/api/jobs", dependencies=keyed)
    async def jobs(
        request: Request, limit: int = Query(20, ge=1, le=200), offset: int = Query(0, ge=0, le=1_000_000)
    ) -> dict:
        base = services.base_url(request)
        every = manager.list()
        page_ = every[offset : offset + limit]
        found = [job_summary(j, base, manager.queue_position(j.id)) for j in page_]
        return {"jobs": found, "total": len(every), "offset": offset, "limit": limit}

    def find(job_id: str) -> Job:
        job = manager.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r}")
        return job

    @r.get("/api/jobs/{job_id}", dependencies=keyed)
    async def job(request: Request, job_id: str) -> dict:
        found = find(job_id)
        summary = job_summary(found, services.base_url(request), manager.queue_position(job_id))
        return {**summary, "logs": _logs(found), "queued": manager.queued_count()}

    @r.post("/api/jobs/{job_id}/cancel", dependencies=keyed)
    async def cancel(job_id: str) -> dict:
        outcome = await asyncio.to_thread(manager.cancel, job_id)
        if outcome is CancelOutcome.NOT_FOUND:
            raise HTTPException(404, f"no job {job_id!r}")
        if outcome is CancelOutcome.ALREADY_DONE:
            status = find(job_id).status.value
            raise HTTPException(409, f"job {job_id} already finished ({status}): nothing to cancel")
        return {"id": job_id, "outcome": outcome.value}

    @r.delete("/api/jobs/{job_id}", dependencies=keyed)
    async def delete(job_id: str) -> dict:
        if not await asyncio.to_thread(manager.delete, job_id):
            raise HTTPException(404, f"no job {job_id!r}")
        return {"id": job_id, "deleted": True}

    @r.get("/api/posters/{file_id}.webp", include_in_schema=False)
    async def poster(file_id: str) -> FileResponse:
        path = await asyncio.to_thread(_poster, services, file_id)
        if path is None:
            raise HTTPException(404, "no poster for this video")
        return FileResponse(path, media_type="image/webp", headers={"Cache-Control": "max-age=86400"})

    return r


CONTRACT = Contract(
    name="native",
    prefixes=("/api/jobs", "/api/config", "/api/models", "/api/posters", "/static", "/favicon.ico"),
    router=router,
    refusal=refusal,
)
