"""fal's storage protocol, served locally (reference/api_contracts.md §1.9; docs/fal.md "Uploads").

The fal clients upload images before using them as `image_url`; these routes keep those files on
this server (server/uploads.py) and hand back URLs of this server:

  JS `fal.storage.upload` (and every Blob/File input), and Python's fallback repository "fal":
    POST /storage/upload/initiate[-multipart]  (API key) -> {upload_url, file_url}
    PUT  {upload_url}                          the raw bytes (no key: the URL carries a secret)
    PUT  {upload_url path}/{n}, POST …/complete  JS multipart (files over 90 MB)
  Python `upload_file / upload_image / upload` (repository "fal_v3"), through rest.fal.ai and
  v3.fal.media resolving to this server:
    POST /storage/auth/token                   (API key) -> {token, token_type, base_url, expires_at}
    POST /files/upload                         (that token) raw bytes -> {access_url}
    POST /files/upload/multipart, PUT {access_url}/multipart/{id}/{n}, POST …/complete
  GET /uploads/{token}/{name}                  the file, to whoever holds the URL

The JS proxy route sends rest.fal.ai targets here (fal_proxy.py). fal's answers are kept: URLs in
the same fields, `{partNumber, etag}` per JS part, the ETag header per Python part.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import datetime, timezone

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse

from ..errors import BadInput, Unauthorized
from ..intake import ImageInputError
from ..services import Services
from ..uploads import Slot, SlotNotFound, Uploads, content_type
from ..web import json_error, require_key

TOKEN_TTL = 3600.0
UPLOAD_ROUTE = "/uploads/{token}/{name}"


def storage_router(services: Services) -> APIRouter:
    router = APIRouter()
    uploads: Uploads = services.uploads
    keyed = [Depends(require_key(services.keys))]

    def slot_or_404(token: str, secret: str | None) -> Slot:
        try:
            return uploads.slot(token, secret or "")
        except SlotNotFound as exc:
            raise json_error(404, {"detail": "No upload is waiting at this URL (expired or already done)"}) from exc

    async def body(request: Request) -> bytes:
        """The raw body, refused as soon as it passes the upload limit (413) instead of read whole."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit():
            uploads.check_size(int(declared))
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            uploads.check_size(size)
            chunks.append(chunk)
        return b"".join(chunks)

    async def run(work: Callable, *args):
        """Blocking file work off the event loop; a refused image is fal's 422 naming the file."""
        try:
            return await asyncio.to_thread(work, *args)
        except ImageInputError as exc:
            raise BadInput("file", None, exc.message) from exc

    # -- JS client (and Python's "fal" repository): initiate, then PUT -----------------------------

    async def initiate(request: Request) -> JSONResponse:
        """One kind of slot for both: a multipart upload PUTs its parts under the same URL."""
        fields = await _json_object(request)
        slot = await asyncio.to_thread(uploads.reserve, fields.get("file_name"))
        base = services.base_url(request)
        return JSONResponse(
            {"upload_url": f"{base}/storage/upload/{slot.token}?secret={slot.secret}", "file_url": base + slot.path}
        )

    @router.post("/storage/upload/initiate", dependencies=keyed)
    async def initiate_single(request: Request) -> JSONResponse:
        return await initiate(request)

    @router.post("/storage/upload/initiate-multipart", dependencies=keyed)
    async def initiate_multipart(request: Request) -> JSONResponse:
        return await initiate(request)

    @router.put("/storage/upload/{token}")
    async def put_file(request: Request, token: str, secret: str | None = None) -> JSONResponse:
        slot = slot_or_404(token, secret)
        await run(uploads.fill, slot, await body(request))
        return JSONResponse({"file_url": services.base_url(request) + slot.path})

    @router.put("/storage/upload/{token}/{number}")
    async def put_js_part(request: Request, token: str, number: int, secret: str | None = None) -> JSONResponse:
        slot = slot_or_404(token, secret)
        etag = await run(uploads.put_part, slot, number, await body(request))
        return JSONResponse({"partNumber": number, "etag": etag}, headers={"ETag": etag})

    @router.post("/storage/upload/{token}/complete")
    async def complete_js(request: Request, token: str, secret: str | None = None) -> JSONResponse:
        slot = slot_or_404(token, secret)
        await run(uploads.complete_parts, slot, _parts(await _json_object(request)))
        return JSONResponse({"file_url": services.base_url(request) + slot.path})

    # -- Python client (repository "fal_v3"): a token, then the CDN upload -------------------------

    def cdn_auth(request: Request) -> None:
        """The Bearer token /storage/auth/token issued (or, as with every route, an API key)."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        issued = scheme.lower() == "bearer" and uploads.token_valid(token.strip())
        if services.keys.enabled and not issued and not services.keys.allows(request.headers.get("authorization")):
            raise Unauthorized()

    @router.post("/storage/auth/token", dependencies=keyed)
    async def token(request: Request) -> JSONResponse:
        value, expires = uploads.issue_token(TOKEN_TTL)
        return JSONResponse(
            {
                "token": value,
                "token_type": "Bearer",
                "base_url": services.base_url(request),  # multipart uploads go here
                "expires_at": datetime.fromtimestamp(expires, tz=timezone.utc).isoformat(),
            }
        )

    @router.post("/files/upload", dependencies=[Depends(cdn_auth)])
    async def cdn_upload(request: Request) -> JSONResponse:
        data = await body(request)
        slot = await run(uploads.store, data, request.headers.get("x-fal-file-name"))
        return JSONResponse({"access_url": services.base_url(request) + slot.path})

    @router.post("/files/upload/multipart", dependencies=[Depends(cdn_auth)])
    async def cdn_multipart(request: Request) -> JSONResponse:
        slot = await asyncio.to_thread(uploads.reserve, request.headers.get("x-fal-file-name"))
        return JSONResponse({"access_url": services.base_url(request) + slot.path, "uploadId": slot.secret})

    @router.put("/uploads/{token}/{name}/multipart/{upload_id}/{number}", dependencies=[Depends(cdn_auth)])
    async def cdn_part(request: Request, token: str, name: str, upload_id: str, number: int) -> JSONResponse:
        slot = slot_or_404(token, upload_id)
        etag = await run(uploads.put_part, slot, number, await body(request))
        return JSONResponse({"partNumber": number, "etag": etag}, headers={"ETag": etag})

    @router.post("/uploads/{token}/{name}/multipart/{upload_id}/complete", dependencies=[Depends(cdn_auth)])
    async def cdn_complete(request: Request, token: str, name: str, upload_id: str) -> JSONResponse:
        slot = slot_or_404(token, upload_id)
        await run(uploads.complete_parts, slot, _parts(await _json_object(request)))
        return JSONResponse({"access_url": services.base_url(request) + slot.path})

    # -- the files themselves ----------------------------------------------------------------------

    @router.get(UPLOAD_ROUTE, include_in_schema=False)
    async def get_upload(token: str, name: str) -> FileResponse:
        path = uploads.find(token, name)
        if path is None:
            raise json_error(404, {"detail": "File not found"})
        headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": "private, max-age=3600"}
        return FileResponse(path, media_type=content_type(path), headers=headers)

    return router


async def _json_object(request: Request) -> dict:
    raw = await request.body()
    try:
        value = json.loads(raw) if raw.strip() else {}
    except (ValueError, RecursionError) as exc:
        raise BadInput("body", raw[:200].decode("utf-8", "replace"), "the request body is not valid JSON") from exc
    if not isinstance(value, dict):
        raise BadInput("body", value, "the request body must be a JSON object")
    return value


def _parts(fields: dict) -> list[tuple[int, str]]:
    """{"parts": [{"partNumber": 1, "etag": "…"}, …]} -> [(1, "…"), …]."""
    parts = fields.get("parts")
    try:
        return [(int(p["partNumber"]), str(p["etag"])) for p in parts]
    except (TypeError, KeyError, ValueError) as exc:
        raise BadInput("parts", parts, 'parts must be a list of {"partNumber": n, "etag": "…"}') from exc


def with_storage(queue_router: Callable[[Services], APIRouter]) -> Callable[[Services], APIRouter]:
    """fal's main-port routes: the storage routes first, then the queue's catch-all POST routes
    (which would otherwise take POST /files/upload and /storage/... as model ids)."""

    def router(services: Services) -> APIRouter:
        combined = APIRouter()
        combined.include_router(storage_router(services))
        combined.include_router(queue_router(services))
        return combined

    return router
