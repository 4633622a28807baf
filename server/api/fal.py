"""The fal.ai queue contract (reference/api_contracts.md §1), translated onto the Job model.

Routes: submit `POST /{owner}/{alias}[/{path}]`, `GET …/requests/{id}/status` (+ `/status/stream`),
`GET …/requests/{id}` (result), `PUT …/requests/{id}/cancel`; and, on the run host
(--fal-run-port), the synchronous `POST /{owner}/{alias}[/{path}]`. Status, result and cancel URLs
use only `{owner}/{alias}`: two endpoints share the `fal-ai/kandinsky5` namespace, so request ids
are global and each job records its own model id.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..admission import Draft
from ..contracts import Contract, lookup
from ..errors import BadInput, ModelUnavailable, QueueFull, Refused, TooLarge, Unauthorized, Unavailable
from ..jobs import ErrorKind, Job, JobError, JobStatus, LogLine, short_value
from ..manager import CancelOutcome
from ..netguard import UrlGuard, UrlRefused
from ..services import Services
from ..storage import file_url
from ..store import WebhookBody
from ..web import json_error, require_key, truthy
from .fal_inputs import ENGINE_FIELDS, InputInvalid, invalid, known_ids, parse, schema_for, to_generation_request
from .fal_storage import with_storage
from .shared import hold_until_done

NAME = "fal"

# fal: never report FAILED or CANCELLED — fal_client raises ValueError("Unknown status") on them.
# A failure is COMPLETED + error/error_type, with the real error on the result route.
FAL_STATUS: dict[JobStatus, str] = {
    JobStatus.QUEUED: "IN_QUEUE",
    JobStatus.RUNNING: "IN_PROGRESS",
    JobStatus.SUCCEEDED: "COMPLETED",
    JobStatus.FAILED: "COMPLETED",
    JobStatus.CANCELED: "COMPLETED",
}

# ErrorKind -> (result HTTP status, fal error_type). fal: JS retries 502/503/504 on the result
# route, so deterministic failures stay off those codes.
FAL_ERRORS: dict[ErrorKind, tuple[int, str]] = {
    ErrorKind.INVALID_INPUT: (422, "bad_request"),
    ErrorKind.CANCELED: (499, "client_cancelled"),
    ErrorKind.OUT_OF_MEMORY: (500, "runner_server_error"),
    ErrorKind.DEVICE_FAILURE: (500, "runner_server_error"),
    ErrorKind.UNAVAILABLE: (500, "runner_scheduling_failure"),
    ErrorKind.INTERNAL: (500, "internal_error"),
}

REQUEST_ID_HEADER = "x-fal-request-id"


def app_path(model_id: str) -> str:
    """'fal-ai/kandinsky5/text-to-video/distill' -> 'fal-ai/kandinsky5' (what status URLs use)."""
    return "/".join(model_id.split("/")[:2])


def request_urls(base: str, job: Job) -> dict[str, str]:
    root = f"{base}/{app_path(job.model)}/requests/{job.id}"
    return {"response_url": root, "status_url": f"{root}/status", "cancel_url": f"{root}/cancel"}


def log_entries(lines: list[LogLine]) -> list[dict]:
    return [
        {
            "message": line.message,
            "level": line.level,
            "source": "USER",
            # UTC with its offset: a bare ISO time is read as local time (JS `new Date`, Python
            # `fromisoformat`), hours off anywhere but UTC. "+00:00" parses in both, all versions.
            "timestamp": datetime.fromtimestamp(line.timestamp, tz=timezone.utc).isoformat(timespec="microseconds"),
        }
        for line in lines
    ]


def status_body(job: Job, base: str, position: int | None, logs: list[dict] | None) -> dict:
    """The status object shared by polling and the SSE stream (§1.3)."""
    body: dict = {"status": FAL_STATUS[job.status], "request_id": job.id, **request_urls(base, job)}
    if job.status is JobStatus.QUEUED:
        body["queue_position"] = position or 0
    body["logs"] = logs  # fal: null unless logs were asked for
    body["metrics"] = {}
    if job.status.terminal:
        body["metrics"] = {"inference_time": job.inference_time}
        if job.error is not None:
            body["error"] = job.error.message
            body["error_type"] = FAL_ERRORS[job.error.kind][1]
    return body


def file_object(job: Job, base: str) -> dict:
    out = job.output
    assert out is not None
    return {
        "url": file_url(base, job.file_id, out.file_name),
        "content_type": out.content_type,
        "file_name": out.file_name,
        "file_size": out.file_size,
    }


def result_payload(job: Job, base: str) -> tuple[int, dict, dict[str, str]]:
    """(HTTP status, body, headers) of the result route for a finished job (§1.5)."""
    headers = {REQUEST_ID_HEADER: job.id}
    if job.status is JobStatus.SUCCEEDED:
        return 200, {"video": file_object(job, base), "seed": job.output.seed}, headers
    error = job.error or JobError(ErrorKind.INTERNAL, "the request failed")
    status, error_type = FAL_ERRORS[error.kind]
    if error.kind is ErrorKind.INVALID_INPUT:
        detail = job.meta.get("fal_detail") or [
            {"loc": ["body", error.field or "body"], "msg": error.message, "type": "value_error", "input": error.value}
        ]
        return 422, {"detail": detail}, {**headers, "X-Fal-Retryable": "false"}
    message = "Request cancelled" if error.kind is ErrorKind.CANCELED else error.message
    return status, {"detail": message, "error_type": error_type}, {**headers, "X-Fal-Error-Type": error_type}


def webhook_body(job: Job) -> WebhookBody | None:
    """§1.8: json.dumps(sort_keys=True) of {error, gateway_request_id, payload, request_id, status}."""
    if not job.webhook_url:
        return None
    status, payload, _ = result_payload(job, job.base_url or "")
    ok = status == 200
    body = {
        "error": None if ok else f"Invalid status code: {status}",
        "gateway_request_id": job.id,
        "payload": payload,
        "request_id": job.id,
        "status": "OK" if ok else "ERROR",
    }
    headers = {
        "content-type": "application/json",
        "x-fal-webhook-request-id": job.id,
        "x-fal-webhook-user-id": "k5serve",
    }
    return WebhookBody(job.webhook_url, json.dumps(body, sort_keys=True).encode(), headers)


UNAUTHORIZED = "Invalid or missing API key: send 'Authorization: Key <key>'"
SCHEDULING_FAILURE = "runner_scheduling_failure"

# server.errors -> (HTTP status, body, headers). Invalid input never gets here from a submit (it is
# recorded as a failed job, see accept); fal: JS retries submit on 503.
REFUSALS = {
    BadInput: lambda e: (422, {"detail": _detail(e)}, {}),
    ModelUnavailable: lambda e: (404, {"detail": e.message}, {}),
    QueueFull: lambda e: (429, {"detail": e.message}, {}),
    Unavailable: lambda e: (
        503,
        {"detail": e.message, "error_type": SCHEDULING_FAILURE},
        {"X-Fal-Error-Type": SCHEDULING_FAILURE},
    ),
    Unauthorized: lambda e: (401, {"detail": UNAUTHORIZED}, {}),
    TooLarge: lambda e: (413, {"detail": e.message}, {}),
}


def refusal(_request: Request, exc: Refused) -> Response:
    status, body, headers = lookup(REFUSALS, exc)(exc)
    return JSONResponse(body, status_code=status, headers=headers or None)


def _detail(exc: BadInput) -> list[dict]:
    """fal's 422 detail list for an input the engine (or admission) refused."""
    return invalid(CONTRACT.wire_field(exc.field), exc.value, exc.message).detail


def _model_id(owner: str, alias: str, path: str, aliases: dict[str, str]) -> str:
    model_id = "/".join(part for part in (owner, alias, path.strip("/")) if part)
    if schema_for(model_id, aliases) is None:
        known = ", ".join(known_ids())
        raise json_error(404, {"detail": f'Application "{model_id}" not found; this server runs: {known}'})
    return model_id


def _check_webhook(url: str | None, guard: UrlGuard) -> str | None:
    """An obviously bad fal_webhook (not http(s), a literal private address, ...) is fal's 422 at submit;
    host names are checked when the delivery connects (webhooks.py)."""
    if url is None:
        return None
    try:
        guard.check_url(url)
    except UrlRefused as exc:
        msg = f"fal_webhook must be an absolute http(s) URL the server may reach: {exc.message}"
        detail = [{"loc": ["query", "fal_webhook"], "msg": msg, "type": "value_error", "input": short_value(url)}]
        raise json_error(422, {"detail": detail}) from exc
    return url


async def accept(
    services: Services, request: Request, model_id: str, webhook_url: str | None = None, waits: bool = False
) -> Job:
    """Submit path shared by the queue, the run host and the proxy: body -> job (maybe pre-failed).
    `waits`: the run host's caller holds the connection for the result (Job.waits)."""
    base = services.base_url(request)
    try:
        draft = _draft(model_id, await _json_body(request), services.settings.aliases)
        return await services.admission.admit(CONTRACT, draft, base_url=base, webhook_url=webhook_url, waits=waits)
    except BadInput as exc:
        detail = _detail(exc)
    except InputInvalid as exc:
        detail = exc.detail
    # fal: invalid input is accepted at submit and reported as a 422 on the result route.
    first = detail[0]
    error = BadInput(str(first["loc"][-1]), first.get("input"), first["msg"])
    meta = {"fal_detail": detail}
    return await services.admission.reject(CONTRACT, model_id, error, base_url=base, webhook_url=webhook_url, meta=meta)


def _draft(model_id: str, body: object, aliases: dict[str, str]) -> Draft:
    """fal input -> the draft to admit. Raises InputInvalid (fal's own schema checks)."""
    if isinstance(body, InputInvalid):
        raise body
    parsed = parse(model_id, body, aliases)
    return Draft(model_id, to_generation_request(parsed, aliases), image=parsed.image_url)


async def _json_body(request: Request) -> object:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: JSON nested too deep
        return invalid(
            "body", raw[:200].decode("utf-8", "replace"), "the request body is not valid JSON", "json_invalid"
        )


def queue_router(services: Services) -> APIRouter:
    """The queue host. Include it after every other contract: its POST routes are catch-alls."""
    router = APIRouter(dependencies=[Depends(require_key(services.keys))])
    manager = services.manager

    def find(owner: str, alias: str, request_id: str) -> Job:
        job = manager.get(request_id)
        if job is None or job.contract != NAME or app_path(job.model) != f"{owner}/{alias}":
            raise json_error(404, {"detail": "Request not found"})
        return job

    @router.get("/{owner}/{alias}/requests/{request_id}/status")
    async def status(request: Request, owner: str, alias: str, request_id: str, logs: str | None = None):
        job = find(owner, alias, request_id)
        entries = log_entries(job.logs) if truthy(logs) else None
        body = status_body(job, services.base_url(request), manager.queue_position(job.id), entries)
        code = 200 if job.status.terminal else 202  # fal: 202 while queued/running, 200 when done
        return JSONResponse(body, status_code=code, headers={REQUEST_ID_HEADER: job.id})

    @router.get("/{owner}/{alias}/requests/{request_id}/status/stream")
    async def status_stream(request: Request, owner: str, alias: str, request_id: str, logs: str | None = None):
        job = find(owner, alias, request_id)
        events = _sse(services, job.id, services.base_url(request), truthy(logs))
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", REQUEST_ID_HEADER: job.id}
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)

    @router.get("/{owner}/{alias}/requests/{request_id}")
    async def result(request: Request, owner: str, alias: str, request_id: str):
        job = find(owner, alias, request_id)
        if not job.status.terminal:
            return JSONResponse(
                {"detail": "Request is still in progress", "status": FAL_STATUS[job.status]},
                status_code=400,
                headers={REQUEST_ID_HEADER: job.id},
            )
        code, body, headers = result_payload(job, services.base_url(request))
        return JSONResponse(body, status_code=code, headers=headers)

    @router.put("/{owner}/{alias}/requests/{request_id}/cancel")
    async def cancel(owner: str, alias: str, request_id: str):
        job = manager.get(request_id)
        if job is None or job.contract != NAME or app_path(job.model) != f"{owner}/{alias}":
            return JSONResponse({"status": "NOT_FOUND"}, status_code=404)
        outcome = await asyncio.to_thread(manager.cancel, request_id)
        if outcome in (CancelOutcome.CANCELED, CancelOutcome.REQUESTED):
            return JSONResponse({"status": "CANCELLATION_REQUESTED"}, status_code=202)
        if outcome is CancelOutcome.ALREADY_DONE:
            return JSONResponse({"status": "ALREADY_COMPLETED"}, status_code=400)
        return JSONResponse({"status": "NOT_FOUND"}, status_code=404)

    async def submit(request: Request, owner: str, alias: str, path: str = "", fal_webhook: str | None = None):
        model_id = _model_id(owner, alias, path, services.settings.aliases)
        job = await accept(services, request, model_id, _check_webhook(fal_webhook, services.guard))
        base = services.base_url(request)
        body = {
            "status": FAL_STATUS[job.status],
            "request_id": job.id,
            "gateway_request_id": job.id,
            **request_urls(base, job),
            "queue_position": manager.queue_position(job.id) or 0,
        }
        return JSONResponse(body, headers={REQUEST_ID_HEADER: job.id})

    router.add_api_route("/{owner}/{alias}", submit, methods=["POST"])
    router.add_api_route("/{owner}/{alias}/{path:path}", submit, methods=["POST"])
    return router


def run_router(services: Services) -> APIRouter:
    """The run host (fal.run, served on --fal-run-port): submit, wait, answer with the result. Its
    jobs `wait`: a hang-up cancels one, and a restart does not run it again (manager.recover)."""
    router = APIRouter(dependencies=[Depends(require_key(services.keys))])
    manager = services.manager

    async def run(request: Request, owner: str, alias: str, path: str = ""):
        job = await accept(services, request, _model_id(owner, alias, path, services.settings.aliases), waits=True)
        job = await hold_until_done(manager, job, request)
        code, body, headers = result_payload(job, services.base_url(request))
        return JSONResponse(body, status_code=code, headers=headers)

    router.add_api_route("/{owner}/{alias}", run, methods=["POST"])
    router.add_api_route("/{owner}/{alias}/{path:path}", run, methods=["POST"])
    return router


async def _sse(services: Services, job_id: str, base: str, with_logs: bool) -> AsyncIterator[str]:
    """fal status stream (§1.4): a `data:` status object on every change, `: keep-alive` comments
    while nothing happens, and the stream closes right after COMPLETED. Logs are incremental:
    the JS client accumulates them itself."""
    manager = services.manager
    keepalive = services.settings.sse_keepalive
    yield ": keep-alive\n\n"
    sent_logs, last_key, quiet_since = 0, None, time.monotonic()
    while True:
        job = manager.get(job_id)
        if job is None:
            return
        position = manager.queue_position(job_id)
        key = (job.status, position, len(job.logs))
        if key != last_key:
            logs = log_entries(job.logs[sent_logs:]) if with_logs else None
            sent_logs, last_key, quiet_since = len(job.logs), key, time.monotonic()
            yield f"data: {json.dumps(status_body(job, base, position, logs))}\n\n"
            if job.status.terminal:
                return
        elif time.monotonic() - quiet_since >= keepalive:
            quiet_since = time.monotonic()
            yield ": keep-alive\n\n"
        # wake on any change of this job; re-check each second for queue-position moves
        await manager.wait_for_change(job_id, job.version, timeout=min(1.0, keepalive))
        await asyncio.sleep(0)


# fal owns every path no other contract claims: its submit route is POST /{owner}/{alias}[/{path}].
# Its main-port routes put fal's storage protocol (fal_storage.py) ahead of those catch-alls.
main_router = with_storage(queue_router)
CONTRACT = Contract(
    name=NAME, prefixes=(), router=main_router, refusal=refusal, webhook_body=webhook_body, fields=ENGINE_FIELDS
)
