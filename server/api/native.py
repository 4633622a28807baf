"""Native routes: /healthz (liveness: the process answers) and /readyz (readiness).

/readyz answers 200 only while the worker can run jobs: 503 while warming up, and for good after a
failed warm-up or an unrecoverable device error (`detail` says why; a restart is needed). Its
body: status, demo, device, models, queued, detail (when not ready) and last_error, the most
recent job that failed while running ({job_id, contract, kind, message, time} or null).
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from ..services import Services
from ..worker import Health


def health_router(services: Services) -> APIRouter:
    router = APIRouter()

    @router.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @router.get("/readyz")
    async def readyz() -> JSONResponse:
        worker, engine = services.worker, services.engine
        body = {
            "status": worker.health.value,
            "demo": bool(engine.demo),
            "device": str(engine.device),
            "models": engine.available(),
            "queued": services.manager.queued_count(),
            "last_error": services.manager.last_error(),
        }
        if worker.health_detail:
            body["detail"] = worker.health_detail
        return JSONResponse(body, status_code=200 if worker.health is Health.READY else 503)

    return router
