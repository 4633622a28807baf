"""Contracts are registered values (server/contracts.py): routing that does not depend on the order
they are registered in, refusals worded by the contract owning the path, and a fifth contract added
as one value — here a toy one, defined in this test module."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import fakes
import pytest
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from server_fixtures import wait_until

from pipelines.request import GenerationRequest
from server.admission import Draft
from server.app import CONTRACTS, create_app
from server.contracts import Contract, Contracts, lookup
from server.errors import BadInput, Refused, TooLarge, Unauthorized
from server.settings import Settings
from server.web import require_key

ROOT = Path(__file__).resolve().parents[2]


# -- a fifth contract: one value --------------------------------------------------------------------

TOY_REFUSALS = {
    BadInput: lambda e: (418, f"toy: bad {e.field}"),
    Unauthorized: lambda e: (401, "toy: who are you"),
    TooLarge: lambda e: (413, "toy: too big"),
    Refused: lambda e: (503, f"toy: {e.message}"),
}


def toy_refusal(_request: Request, exc: Refused) -> JSONResponse:
    status, message = lookup(TOY_REFUSALS, exc)(exc)
    return JSONResponse({"toy_error": message}, status_code=status)


def toy_router(services) -> APIRouter:
    api = APIRouter(dependencies=[Depends(require_key(services.keys))])

    @api.post("/toy/videos")
    async def create(request: Request):
        body = await request.json()
        greq = GenerationRequest(variant="kandinsky5-tiny-t2v", prompt=body["prompt"], steps=body.get("steps", 2))
        job = await services.admission.admit(TOY, Draft("toy-model", greq), base_url=services.base_url(request))
        return {"toy_id": job.id}

    return api


TOY = Contract(name="toy", prefixes=("/toy",), router=toy_router, refusal=toy_refusal, new_job_id=lambda: "toy-1")


def client_for(tmp_path, contracts, **settings) -> TestClient:
    return TestClient(create_app(Settings(data_dir=tmp_path, **settings), fakes.FakeEngine(), contracts))


def test_a_fifth_contract_is_one_value(tmp_path):
    with client_for(tmp_path, (*CONTRACTS, TOY)) as client:
        created = client.post("/toy/videos", json={"prompt": "a fox"})
        assert created.json() == {"toy_id": "toy-1"}
        services = client.app.state.services
        wait_until(lambda: services.manager.get("toy-1").status.terminal)
        assert services.manager.get("toy-1").status.value == "succeeded"
        # admission's refusals come back in the toy's own shape
        assert client.post("/toy/videos", json={"prompt": "a fox", "steps": 0}).json() == {
            "toy_error": "toy: bad steps"
        }
    with client_for(tmp_path, (*CONTRACTS, TOY), api_keys=["k"], max_body_bytes=1024) as client:
        assert client.post("/toy/videos", json={"prompt": "x"}).json() == {"toy_error": "toy: who are you"}
        response = client.post(
            "/toy/videos", content=json.dumps({"prompt": "x" * 2000}), headers={"authorization": "Key k"}
        )
        assert (response.status_code, response.json()) == (413, {"toy_error": "toy: too big"})
        # every other contract keeps its own shape
        assert "error" in client.post("/v1/videos", json={"prompt": "x"}).json()  # OpenAI's envelope
        assert client.post("/fal-ai/kandinsky5/text-to-video", json={}).json()["detail"]


@pytest.mark.parametrize("order", [CONTRACTS, tuple(reversed(CONTRACTS))])
def test_routing_does_not_depend_on_registration_order(tmp_path, order):
    """fal's POST /{owner}/{alias} would also match /v1/videos; the catch-all is always routed last."""
    with client_for(tmp_path, order) as client:
        openai = client.post("/v1/videos", json={"prompt": "x", "model": "kandinsky5-tiny-t2v"})
        assert openai.json()["object"] == "video"
        onerouter = client.post("/v1/videos/generations", json={"prompt": "x", "model": "nope"})
        assert onerouter.json()["error"]["param"] == "model"
        aiml = client.post("/v2/video/generations", json={"prompt": "x", "model": "nope"})
        assert aiml.json()["statusCode"] == 400
        assert client.post("/fal-ai/kandinsky5/text-to-video/distill", json={"prompt": "x"}).json()["request_id"]


def test_a_path_belongs_to_its_longest_prefix_else_to_the_catch_all():
    def contract(name, prefixes):
        return Contract(name=name, prefixes=prefixes, router=toy_router, refusal=toy_refusal)

    registry = Contracts(
        [contract("catch", ()), contract("v1", ("/v1",)), contract("gen", ("/v1/videos/generations",))]
    )
    assert registry.for_path("/v1/videos/generations").name == "gen"
    assert registry.for_path("/v1/videos/generations/x").name == "gen"
    assert registry.for_path("/v1/videos").name == "v1"
    assert registry.for_path("/v10/x").name == "catch"  # a prefix is a whole path segment
    assert registry.for_path("/fal-ai/x").name == "catch"
    assert [c.name for c in registry.in_routing_order()] == ["v1", "gen", "catch"]
    with pytest.raises(ValueError, match="catch-all"):
        Contracts([contract("a", ()), contract("b", ())])
    with pytest.raises(ValueError, match="unique"):
        Contracts([contract("a", ("/a",)), contract("a", ("/b",))])


# -- the import graph ---------------------------------------------------------------------------------


def _imports(path: Path, package: str) -> set[str]:
    """Modules of server/ and pipelines/ that `path` imports (absolute names)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            names = [name] + [f"{name}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in ("server", "pipelines"))
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {}
    for folder in ("server", "pipelines"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            package = name if parts[-1] == "__init__" else ".".join(parts[:-1])
            modules[name] = (path, package)
    return {
        name: {i for i in _imports(path, package) if i in modules and i != name}
        for name, (path, package) in modules.items()
    }


def test_the_import_graph_has_no_cycles_and_shared_modules_import_no_contract():
    graph = import_graph()
    contracts = {m for m in graph if m.startswith("server.api.")}
    for module, imported in graph.items():
        if module.startswith("server.api") or module == "server.app":
            continue
        assert not imported & contracts, f"{module} imports contract module(s) {sorted(imported & contracts)}"
    # no cycles: depth-first search over the whole graph (TYPE_CHECKING-only imports count too)
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for nxt in graph[module]:
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])
