"""The fal JS-client proxy route, `/api/fal/proxy` (reference/api_contracts.md §2.2).

With `fal.config({proxyUrl: {url: ".../api/fal/proxy", when: "always"}})` the JS client sends
every call (submit, status, stream, result, cancel) to this one URL with the real target in
`x-fal-target-url`. We route on that header instead of forwarding anywhere: `queue.fal.run/...`
goes to the queue routes, `fal.run/...` to the run host, `rest.fal.ai/storage/...` to the storage
routes (fal_storage.py: the upload URL they answer is this server's, PUT to directly). The official
proxy's answers are kept: 400 for a missing header, 412 for a host that is not fal's.
"""

from __future__ import annotations

import json
from urllib.parse import unquote, urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

PROXY_PATH = "/api/fal/proxy"
TARGET_URL_HEADER = b"x-fal-target-url"
_FAL_HOSTS = ("fal.run", "fal.ai")
REST_HOST = "rest.fal.ai"  # the JS client's storage uploads (initiate); the PUT itself goes direct


class FalProxyMiddleware:
    def __init__(self, app: ASGIApp, run_app: ASGIApp, path: str = PROXY_PATH):
        self.app = app
        self.run_app = run_app
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].rstrip("/") != self.path or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        target = dict(scope["headers"]).get(TARGET_URL_HEADER)
        if not target:
            await _reply(send, 400, {"detail": "Missing the x-fal-target-url header"})
            return
        url = urlsplit(target.decode("latin-1"))
        host = (url.hostname or "").lower()
        if url.scheme not in ("http", "https") or not any(host == h or host.endswith("." + h) for h in _FAL_HOSTS):
            await _reply(send, 412, {"detail": f"Invalid x-fal-target-url: {host or target!r} is not a fal host"})
            return
        inner = dict(scope)
        inner["path"] = unquote(url.path) or "/"
        inner["raw_path"] = (url.path or "/").encode("latin-1")
        inner["query_string"] = url.query.encode("latin-1")
        storage = host == REST_HOST and url.path.startswith("/storage/")  # fal storage (fal_storage.py)
        if host.startswith("queue.") or storage:
            await self.app(inner, receive, send)
        elif host == "fal.run":
            await self.run_app(inner, receive, send)
        else:
            await _reply(
                send,
                404,
                {"detail": f"k5serve does not serve {host}{url.path}"},
            )


async def _reply(send: Send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
