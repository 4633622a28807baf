"""The web playground at GET / (server/static/index.html) and GET /api/jobs, the recent jobs it lists.

Registered like a contract (`CONTRACT`, named "native") so its JSON routes word refusals (401, 413)
in its own plain shape, {"detail": message}.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, JSONResponse

from ..contracts import Contract
from ..errors import Refused, Unauthorized
from ..jobs import Job
from ..services import Services
from ..storage import file_url
from ..web import require_key

PAGE = Path(__file__).resolve().parent.parent / "static" / "index.html"


def refusal(_request: Request, exc: Refused) -> JSONResponse:
    message = "missing or invalid API key" if isinstance(exc, Unauthorized) else exc.message
    return JSONResponse({"detail": message}, status_code=exc.status)


def job_summary(job: Job, base: str, position: int | None) -> dict:
    out = job.output
    return {
        "id": job.id,
        "contract": job.contract,
        "model": job.model,
        "status": job.status.value,
        "prompt": job.prompt,
        "created_at": job.created_at,
        "completed_at": job.completed_at,
        "queue_position": position,
        "progress": list(job.progress) if job.progress else None,  # (step, total)
        # denoising, decoding, writing (the last one reached, once finished); the decode's chunks
        "phase": job.phase,
        "phase_progress": list(job.phase_progress) if job.phase_progress else None,
        "error": job.error.message if job.error else None,
        "video_url": file_url(base, job.file_id, out.file_name) if out else None,
        "acceleration": out.acceleration if out else None,
        "revised_prompt": out.revised_prompt if out else None,  # the prompt as encoded, when expanded
        "approximations": out.approximations if out else None,  # opt-in 8-bit weights (pipelines/quant.py)
    }


def router(services: Services) -> APIRouter:
    r = APIRouter()
    manager = services.manager

    @r.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(PAGE, media_type="text/html", headers={"Cache-Control": "no-cache"})

    @r.get("/api/config", include_in_schema=False)
    async def config() -> dict:
        """What the page needs before its first call: whether to ask for a key, the server's defaults."""
        demo, expand = bool(services.engine.demo), services.settings.expand_prompts
        return {"api_keys": services.keys.enabled, "demo": demo, "expand_prompts": expand}

    @r.get("/api/jobs", dependencies=[Depends(require_key(services.keys))])
    async def jobs(request: Request, limit: int = Query(20, ge=1, le=200)) -> dict:
        base = services.base_url(request)
        found = manager.list(limit=limit)
        return {"jobs": [job_summary(j, base, manager.queue_position(j.id)) for j in found]}

    return r


CONTRACT = Contract(name="native", prefixes=("/api/jobs", "/api/config"), router=router, refusal=refusal)
