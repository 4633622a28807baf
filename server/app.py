"""App factory and entry point.

`create_app(settings, engine)` builds the main ASGI app (tests call it with fake engines);
`run(settings)` builds the real engine and serves the main port and, with --fal-run-port, fal's
run host from ONE uvicorn server and event loop (two sockets, one job manager).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .api import aimlapi, fal, native, onerouter, openai, playground
from .api.fal_proxy import FalProxyMiddleware
from .contracts import Contract
from .engine_protocol import EngineLike
from .errors import Refused
from .intake import BodyLimit
from .logs import use_json_logs
from .metrics import metrics_router
from .services import Services
from .settings import Settings
from .storage import files_router
from .web import ResponseError

log = logging.getLogger("k5serve")

EXPOSED_HEADERS = ["x-fal-request-id", "x-fal-error-type", "x-fal-retryable"]


# The wire contracts this server speaks (one module each; order does not matter, see contracts.py)
# and the playground's own JSON routes.
CONTRACTS: tuple[Contract, ...] = (
    fal.CONTRACT,
    aimlapi.CONTRACT,
    onerouter.CONTRACT,
    openai.CONTRACT,
    playground.CONTRACT,
)


def create_app(settings: Settings, engine: EngineLike, contracts: tuple[Contract, ...] = CONTRACTS) -> FastAPI:
    """The main app. `app.state.services` holds the shared objects, `app.state.run_app` the fal
    run-host app (served on --fal-run-port, and reached through the proxy route)."""
    services = Services.build(settings, engine, list(contracts))
    app = FastAPI(title="k5serve", version="0.1.0", lifespan=_lifespan(services))
    _common(app, services)
    app.state.metrics = services.metrics
    app.include_router(metrics_router(services.metrics))
    for contract in services.contracts.in_routing_order():
        app.include_router(contract.router(services))

    run_app = create_run_app(services)
    app.state.services = services
    app.state.run_app = run_app
    app.add_middleware(FalProxyMiddleware, run_app=run_app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, contracts=services.contracts)
    _cors(app)  # added last = outermost: answers preflights for every route, the proxy included
    return app


def create_run_app(services: Services) -> FastAPI:
    """fal's run host: the same POST paths, answered synchronously (no CORS: see serve_run_app)."""
    run_app = FastAPI(title="k5serve fal run host", openapi_url=None, docs_url=None, redoc_url=None)
    _common(run_app, services)
    run_app.include_router(fal.run_router(services))
    run_app.add_middleware(BodyLimit, max_bytes=services.settings.max_body_bytes, contracts=services.contracts)
    return run_app


def _common(app: FastAPI, services: Services) -> None:
    async def refused(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Refused)
        return services.contracts.refusal(request, exc)

    app.add_exception_handler(Refused, refused)
    app.add_exception_handler(ResponseError, _response_error)
    app.add_exception_handler(Exception, _internal_error)
    app.include_router(native.health_router(services))
    app.include_router(files_router(services.storage))


def _cors(app: FastAPI) -> None:
    app.add_middleware(
        CORSMiddleware,
        allow_origins=["*"],
        allow_methods=["*"],
        allow_headers=["*"],
        expose_headers=EXPOSED_HEADERS,
        max_age=600,
    )


async def _response_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ResponseError)
    return exc.response


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": "Internal server error", "error_type": "internal_error"}, status_code=500)


def _lifespan(services: Services):
    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        services.manager.attach_loop(asyncio.get_running_loop())
        counts = services.manager.recover()
        if counts:
            log.info("jobs on disk: %s", ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        services.worker.start()
        services.webhooks.start()
        retention = services.retention
        sweeper = asyncio.create_task(retention.run(), name="retention") if retention else None
        try:
            yield
        finally:
            if sweeper is not None:
                sweeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sweeper
            await services.webhooks.stop()
            await asyncio.to_thread(services.worker.stop)
            if not services.worker.alive:
                services.store.close()

    return lifespan


class PortDispatch:
    """One ASGI app for two listening sockets: requests that arrived on a run port go to the run
    host, everything else (and the lifespan) to the main app."""

    def __init__(self, main: ASGIApp, run: ASGIApp, run_ports: set[int]):
        self.main, self.run, self.run_ports = main, run, run_ports

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = scope.get("server") if scope["type"] != "lifespan" else None
        target = self.run if server and server[1] in self.run_ports else self.main
        await target(scope, receive, send)


def serve_run_app(app: FastAPI) -> ASGIApp:
    """The run host as served on its own port: with CORS (the proxy path gets it from the main app)."""
    return CORSMiddleware(
        app.state.run_app,
        allow_origins=["*"],
        allow_methods=["*"],
        allow_headers=["*"],
        expose_headers=EXPOSED_HEADERS,
        max_age=600,
    )


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def _build_engine(settings: Settings) -> EngineLike:
    from pipelines.engine import Engine  # torch comes in here, and only here

    return Engine(
        settings.weights_dir,
        settings.device,
        settings.models,
        settings.require_weights,
        memory_mode=settings.memory_mode,
        device_memory=None if settings.device_memory is None else int(settings.device_memory * 2**30),
        compile={"auto": None, "on": True, "off": False}[settings.compile],
    )


def run(settings: Settings, engine: EngineLike | None = None) -> int:
    """`k5serve serve`: returns the process exit code."""
    import uvicorn

    from pipelines.errors import WeightsMissing

    use_json_logs()  # one JSON object per line; uvicorn's access log keeps its own format
    try:
        engine = engine or _build_engine(settings)
    except (WeightsMissing, ValueError) as exc:
        print(f"k5serve: {exc}", file=sys.stderr)
        return 2
    if engine.demo:
        log.warning(_DEMO_BANNER, settings.weights_dir)
    app = create_app(settings, engine)
    try:
        sockets = [bind(settings.host, settings.port)]
        if settings.fal_run_port is not None:
            sockets.append(bind(settings.host, settings.fal_run_port))
    except OSError as exc:
        print(f"k5serve: cannot listen on {settings.host}: {exc}", file=sys.stderr)
        return 1
    ports = [s.getsockname()[1] for s in sockets]
    asgi: ASGIApp = app
    if len(sockets) > 1:
        asgi = PortDispatch(app, serve_run_app(app), {ports[1]})
    scheme = "https" if settings.tls else "http"
    log.info(
        "k5serve listening on %s://%s:%d%s",
        scheme,
        settings.host,
        ports[0],
        f" (fal run host on port {ports[1]})" if len(ports) > 1 else "",
    )
    config = uvicorn.Config(
        asgi,
        interface="asgi3",
        lifespan="on",
        log_level="info",
        timeout_graceful_shutdown=10,
        ssl_certfile=str(settings.ssl_certfile) if settings.ssl_certfile else None,
        ssl_keyfile=str(settings.ssl_keyfile) if settings.ssl_keyfile else None,
    )
    uvicorn.Server(config).run(sockets=sockets)
    return 0


_DEMO_BANNER = """
=====================================================================
  DEMO MODE: no Kandinsky 5 checkpoint under %s
  Every model id is served by a tiny random-weight model: videos are
  noise, at most 256 px and 25 frames. Get real weights with
  `k5serve weights download NAME`, or pass --require-weights.
====================================================================="""
