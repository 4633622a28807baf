"""Contracts as registered values.

Each module under server/api/ that speaks a wire protocol exposes one `Contract`: its name (the
`Job.contract` it records), the path prefixes it owns, its routes, how it words a refusal, and its
webhook body if it has webhooks. `create_app` registers them; shared code (API keys, body limits,
admission errors, webhooks) dispatches through the `Contracts` registry and imports no contract
module. Adding a contract is one new module plus one line in app.py's CONTRACTS.

Routing does not depend on registration order: a catch-all contract (fal's `POST /{owner}/{alias}`
also matches `/v1/videos`) is always included after the others, and a path belongs to the contract
with the longest matching prefix, else to the catch-all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from .errors import Refused
from .jobs import Job, new_job_id

if TYPE_CHECKING:
    from fastapi import APIRouter

    from .store import WebhookBody


@dataclass(frozen=True)
class Contract:
    name: str
    # path prefixes owned (a request under one is answered in this contract's shape); () = catch-all
    prefixes: tuple[str, ...]
    router: Callable[[Any], APIRouter]  # services.Services -> its routes (not imported here: no cycle)
    # the contract's one table from server.errors to its wire: (request, refusal) -> response
    refusal: Callable[[Request, Refused], Response]
    webhook_body: Callable[[Job], WebhookBody | None] | None = None
    new_job_id: Callable[[], str] = new_job_id
    # engine field -> the field the client sent (steps -> num_inference_steps): names in errors
    fields: dict[str, str] = field(default_factory=dict)
    # its callers hold the connection until the job ends (OneRouter): admission marks each job
    # `waits`, so a job whose caller is gone is cancelled, also across a restart (manager.recover).
    # A contract with one synchronous route among asynchronous ones (fal's run host) says so per job.
    synchronous: bool = False

    @property
    def catch_all(self) -> bool:
        return not self.prefixes

    def wire_field(self, engine_field: str) -> str:
        return self.fields.get(engine_field, engine_field)


class Contracts:
    """The registered contracts: which one owns a path, a job's webhook body, refusals in shape."""

    def __init__(self, contracts: Iterable[Contract]):
        self.all = list(contracts)
        names = [c.name for c in self.all]
        if len(set(names)) != len(names):
            raise ValueError(f"contract names must be unique, got {names}")
        catch_alls = [c for c in self.all if c.catch_all]
        if len(catch_alls) > 1:
            raise ValueError(f"at most one catch-all contract, got {[c.name for c in catch_alls]}")
        self._fallback = catch_alls[0] if catch_alls else None
        self._by_name = {c.name: c for c in self.all}
        self._prefixes = sorted(((p, c) for c in self.all for p in c.prefixes), key=lambda pc: -len(pc[0]))

    def __getitem__(self, name: str) -> Contract:
        return self._by_name[name]

    def in_routing_order(self) -> list[Contract]:
        """Routers are included in this order: the catch-all last, whatever the registration order."""
        return sorted(self.all, key=lambda c: c.catch_all)

    def for_path(self, path: str) -> Contract | None:
        for prefix, contract in self._prefixes:
            if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
                return contract
        return self._fallback

    def refusal(self, request: Request, exc: Refused) -> Response:
        """`exc` answered in the shape of the contract owning the request's path."""
        contract = self.for_path(request.url.path)
        if contract is None:
            from fastapi.responses import JSONResponse

            return JSONResponse({"detail": exc.message}, status_code=exc.status)
        return contract.refusal(request, exc)

    def webhook_body(self, job: Job) -> WebhookBody | None:
        """The webhook delivery for a finished job, worded by its own contract (None: no webhook)."""
        contract = self._by_name.get(job.contract)
        if contract is None or contract.webhook_body is None or not job.webhook_url:
            return None
        return contract.webhook_body(job)


def lookup(table: dict[type[Refused], Callable], exc: Refused) -> Callable:
    """The entry of a contract's refusal table for `exc` (by class, most specific first)."""
    for cls in type(exc).__mro__:
        if cls in table:
            return table[cls]
    raise KeyError(f"no entry for {type(exc).__name__} in the refusal table")
