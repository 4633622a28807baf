"""Small HTTP helpers every contract module shares: API keys, absolute URLs, contract-shaped errors."""

from __future__ import annotations

import hmac
from collections.abc import Callable

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from .errors import Unauthorized


class ResponseError(Exception):
    """Raise from a route or dependency to answer with a ready-made response in a contract's shape.

    One exception handler (app.py) returns `response` as is, so each contract words its own errors
    while routes stay linear: `raise ResponseError(JSONResponse({"detail": ...}, 404))`.
    """

    def __init__(self, response: Response):
        super().__init__(getattr(response, "status_code", 500))
        self.response = response


def json_error(status: int, body: dict, headers: dict[str, str] | None = None) -> ResponseError:
    return ResponseError(JSONResponse(body, status_code=status, headers=headers))


def credential(authorization: str | None) -> str | None:
    """The key in `Authorization: Key <k>` / `Bearer <k>` / bare `<k>` (OneRouter's documented form)."""
    if not authorization:
        return None
    scheme, _, rest = authorization.strip().partition(" ")
    if rest and scheme.lower() in ("key", "bearer"):
        return rest.strip() or None
    return None if rest else scheme


class ApiKeys:
    """--api-key values. With none configured every request passes, with or without credentials
    (the fal clients always send one); with some, the key must match one of them."""

    def __init__(self, keys: list[str]):
        self._keys = [k.encode() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def allows(self, authorization: str | None) -> bool:
        if not self._keys:
            return True
        given = credential(authorization)
        if given is None:
            return False
        given_bytes = given.encode()
        # compare against every key (no early exit) so timing says nothing about which matched
        return sum(hmac.compare_digest(given_bytes, key) for key in self._keys) > 0


def require_key(keys: ApiKeys) -> Callable:
    """A FastAPI dependency raising Unauthorized on a bad key; the contract owning the path words
    the 401 (contracts.py)."""

    async def dependency(request: Request) -> None:
        if not keys.allows(request.headers.get("authorization")):
            raise Unauthorized()

    return dependency


def base_url(request: Request, public_url: str | None) -> str:
    """scheme://host[:port] for absolute URLs: --public-url, else what the client connected to."""
    if public_url:
        return public_url
    return str(request.base_url).rstrip("/")


def truthy(value: str | None) -> bool:
    """Query flags: JS sends logs=1/0, Python logs=true/false."""
    return (value or "").strip().lower() in ("1", "true", "yes", "on")
