"""Native routes: /healthz (liveness) and /readyz (503 until the engine is warmed up)."""

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
        available = getattr(engine, "available", None)
        body = {
            "status": worker.health.value,
            "demo": bool(engine.demo),
            "device": str(engine.device),
            "models": available() if callable(available) else (services.settings.models or []),
            "queued": services.manager.queued_count(),
        }
        if worker.health_detail:
            body["detail"] = worker.health_detail
        return JSONResponse(body, status_code=200 if worker.health is Health.READY else 503)

    return router
