"""Native routes: /healthz (liveness: the process answers) and /readyz (readiness).

/readyz answers 200 only while the worker can run jobs: 503 while warming up, and for good after a
failed warm-up or an unrecoverable device error (`detail` says why; a restart is needed). Its
body: status, demo, device, models, queued, detail (when not ready), last_error, the most recent
job that failed while running ({job_id, contract, kind, message, time} or null), and resident, the
models on the device ([{component, id, bytes, variants}], pipelines/residency.py).
"""

from __future__ import annotations

import logging

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from ..services import Services
from ..worker import Health

log = logging.getLogger("k5serve.readyz")


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
            # the models on the device, shared ones listing every variant that uses them (describe())
            "resident": _resident(engine),
        }
        if worker.health_detail:
            body["detail"] = worker.health_detail
        return JSONResponse(body, status_code=200 if worker.health is Health.READY else 503)

    return router


def _resident(engine) -> list[dict]:
    try:
        return list(engine.describe().get("resident") or [])
    except Exception:  # readiness must answer even when the engine cannot say what it holds
        log.warning("could not read what the engine holds", exc_info=True)
        return []
