"""Native routes: /healthz (liveness: the process answers) and /readyz (readiness).

/readyz answers 200 while at least one worker can run jobs: 503 while they warm up or restart, and
for good once every worker failed to start or hit an unrecoverable device error (`detail` says
why; a restart is needed). Its body: status, demo, device, models, queued, detail (when a worker is
not ready) and last_error, the most recent job that failed while running ({job_id, contract, kind,
message, time} or null), and `workers`: one object per worker {id, devices, pid, node, state
(starting / ready / busy / restarting / failed), job, variants, resident, memory_in_use, restarts,
detail when there is one} (server/pool.py).
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from ..services import Services


def health_router(services: Services) -> APIRouter:
    router = APIRouter()

    @router.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @router.get("/readyz")
    async def readyz() -> JSONResponse:
        pool, engine = services.pool, services.engine
        body = {
            "status": pool.health.value,
            "demo": bool(engine.demo),
            "device": str(engine.device),
            "models": engine.available(),
            "queued": services.manager.queued_count(),
            "last_error": services.manager.last_error(),
            "workers": pool.describe(),
        }
        if pool.health_detail:
            body["detail"] = pool.health_detail
        return JSONResponse(body, status_code=200 if pool.ready else 503)

    return router
