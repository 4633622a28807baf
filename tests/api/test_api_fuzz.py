"""Schema-driven fuzz of the HTTP API: whatever arrives, no answer is a 5xx.

Two layers, both in-process (ASGI transport, no network) around create_app with a fake engine
and API keys on:

1. schemathesis against the app's own OpenAPI document (create_app(...).openapi()): every
   operation, with generated path and query parameters and headers, positive and negative, checked
   with schemathesis' `not_a_server_error`.
2. What that document cannot describe: the contract routes read their bodies themselves (raw
   Request), and some routes and query parameters are outside the schema (/files, GET
   /v2/video/generations?generation_id, GET /v1/videos?limit/order/after, the fal proxy and run
   host). Hypothesis generates those bodies, multipart forms, query strings, headers and paths.

Counts (operations, examples, 5xx) are printed at the end of the module (`pytest -s`).
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter

import fakes
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from server_fixtures import wait_until

from server.app import create_app
from server.settings import Settings

KEY = "sk-fuzz"
AUTH = {"Authorization": f"Bearer {KEY}"}
EXAMPLES = 50  # per operation / per raw route; the whole module stays well under a minute on 2 cores
COUNTS: Counter = Counter()
OPERATIONS: set[str] = set()
FIVE_XX: list[str] = []


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory):
    """The app with its lifespan running (worker, webhooks): jobs that get through really run."""
    app = create_app(
        Settings(data_dir=tmp_path_factory.mktemp("fuzz"), api_keys=[KEY], max_queue=20), fakes.FakeEngine()
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_until(lambda: client.get("/readyz").status_code == 200, what="readyz")
        good = client.post("/v1/videos", json={"prompt": "seed job", "num_inference_steps": 1}, headers=AUTH)
        assert good.status_code == 200, good.text
        yield app, client
    print(
        f"\nAPI fuzz: {len(OPERATIONS)} OpenAPI operations, {COUNTS['openapi']} schema examples, "
        f"{COUNTS['raw']} raw-route examples, {len(FIVE_XX)} 5xx; statuses: "
        + ", ".join(f"{code}: {n}" for code, n in sorted((k, v) for k, v in COUNTS.items() if isinstance(k, int)))
    )


def _openapi() -> dict:
    """The app's OpenAPI document (built once at import, with a throw-away data dir)."""
    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(Settings(data_dir=tmp), fakes.FakeEngine())
        document = app.openapi()
        app.state.services.store.close()
    return document


# An eager schema: schemathesis' lazy `from_fixture` touches a pytest internal (Node._nodeid) that
# pytest 9 removed. The calls go to the fixture's TestClient (in-process, lifespan running).
schema = schemathesis.openapi.from_dict(_openapi())


def _record(label: str, kind: str, status: int, detail: str) -> None:
    COUNTS[kind] += 1
    COUNTS[status] += 1
    if status >= 500:
        FIVE_XX.append(f"{label}: {status} {detail[:300]}")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_openapi_operations_never_answer_5xx(fuzz_app, case):
    _app, client = fuzz_app
    OPERATIONS.add(case.operation.label)
    case.headers = {**(case.headers or {}), **AUTH}
    response = client.request(**case.as_transport_kwargs(base_url="http://testserver"))
    _record(case.operation.label, "openapi", response.status_code, response.text)
    case.validate_response(response, checks=[not_a_server_error])


def test_the_schema_covers_every_contract(fuzz_app):
    """Guards the layer above: if routes left the OpenAPI document, the fuzz would silently shrink."""
    app, _ = fuzz_app
    paths = set(app.openapi()["paths"])
    assert {"/v2/video/generations", "/v1/videos/generations", "/v1/videos", "/v1/videos/{video_id}"} <= paths
    assert "/{owner}/{alias}/requests/{request_id}/status" in paths and "/healthz" in paths


# -- what the OpenAPI document cannot describe: raw bodies, raw query strings, hidden routes --------

FIELDS = [
    "model",
    "prompt",
    "negative_prompt",
    "aspect_ratio",
    "duration",
    "num_inference_steps",
    "seed",
    "resolution",
    "video_length",
    "output_format",
    "seconds",
    "size",
    "input_reference",
    "image_url",
    "acceleration",
    "enhance_prompt",
    "expand_prompt",
    "enable_prompt_expansion",
]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**80), 2**80),
    st.floats(),  # NaN and infinities included: Python's json writes them as NaN/Infinity
    st.text(max_size=20),
    st.sampled_from(
        [
            "3:2",
            "16:9",
            "5s",
            "10",
            "768x512",
            "512P",
            "1024P",
            "sber-ai/kandinsky5-t2v",
            "kandinsky5-text-to-video",
            "kandinsky5-lite-i2v-5s",
            "data:image/png;base64,iVBORw0KGgo=",
            "data:image/svg+xml,<svg/>",
            "file:///etc/passwd",
            "http://127.0.0.1:1/x.png",
            "http://169.254.169.254/",
            "gopher://127.0.0.1/",
        ]
    ),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
BODIES = st.one_of(st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), VALUES, max_size=8), VALUES)
CONTENT_TYPES = st.sampled_from(
    [
        None,
        "application/json",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data",
        "multipart/form-data; boundary=zz",
        "application/json; charset=utf-16",
        "image/png",
    ]
)
AUTHS = st.sampled_from([AUTH["Authorization"], f"Key {KEY}", KEY, None, "Bearer wrong", "Basic Zm9vOmJhcg=="])

# (method, path) of the routes whose bodies the schema does not describe, fal's run host via the proxy
BODY_ROUTES = [
    ("POST", "/fal-ai/kandinsky5/text-to-video", {}),
    ("POST", "/fal-ai/kandinsky5/text-to-video/distill", {}),
    ("POST", "/fal-ai/kandinsky5-pro/text-to-video", {}),
    ("POST", "/fal-ai/kandinsky5-pro/image-to-video", {}),
    ("POST", "/k5serve/kandinsky5-lite-i2v-5s", {}),
    ("POST", "/v2/video/generations", {}),
    ("POST", "/v1/videos/generations", {}),
    ("POST", "/v1/videos", {}),
    ("POST", "/api/fal/proxy", {"x-fal-target-url": "https://fal.run/fal-ai/kandinsky5-pro/image-to-video"}),
    ("POST", "/api/fal/proxy", {"x-fal-target-url": "https://queue.fal.run/fal-ai/kandinsky5/text-to-video"}),
]


def _encode(body, content_type: str | None) -> bytes:
    if content_type and content_type.startswith("multipart") and isinstance(body, dict):
        parts = b"".join(
            b'--zz\r\nContent-Disposition: form-data; name="' + str(k).encode("utf-8", "replace")[:40] + b'"\r\n\r\n'
            + json.dumps(v).encode() + b"\r\n"
            for k, v in body.items()
        )  # fmt: skip
        return parts + b"--zz--\r\n"
    return json.dumps(body).encode()


@pytest.mark.parametrize(("method", "path", "extra"), BODY_ROUTES, ids=[f"{m} {p} {e}" for m, p, e in BODY_ROUTES])
def test_raw_bodies_never_answer_5xx(fuzz_app, method, path, extra):
    _app, client = fuzz_app

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(body=BODIES, content_type=CONTENT_TYPES, auth=AUTHS, junk=st.binary(max_size=40) | st.just(b""))
    def check(body, content_type, auth, junk):
        headers = dict(extra)
        if content_type:
            headers["content-type"] = content_type
        if auth:
            headers["authorization"] = auth
        content = _encode(body, content_type) + junk
        response = client.request(method, path, content=content, headers=headers)
        _record(f"{method} {path}", "raw", response.status_code, response.text)
        assert response.status_code < 500, (body, content_type, response.text)

    check()


QUERY_TEXT = st.text(max_size=60) | st.sampled_from(["", "0", "-1", "9" * 40, "..%2F..", "%00", "video_x", "a:b:c"])


def test_raw_query_strings_never_answer_5xx(fuzz_app):
    """Query parameters the routes read themselves (not in the OpenAPI document)."""
    _app, client = fuzz_app

    @settings(max_examples=EXAMPLES * 4, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(
        route=st.sampled_from(["/v2/video/generations", "/v1/videos", "/api/jobs", "/fal-ai/kandinsky5/text-to-video"]),
        params=st.dictionaries(
            st.sampled_from(["generation_id", "limit", "order", "after", "logs", "fal_webhook", "variant"])
            | st.text(max_size=6),
            QUERY_TEXT,
            max_size=4,
        ),
    )
    def check(route, params):
        method = "POST" if route.startswith("/fal-ai") else "GET"
        body = json.dumps({"prompt": "x", "num_inference_steps": 1}).encode() if method == "POST" else None
        response = client.request(method, route, params=params, content=body, headers=AUTH)
        _record(f"{method} {route}?", "raw", response.status_code, response.text)
        assert response.status_code < 500, (route, params, response.text)

    check()


def test_hidden_routes_and_paths_never_answer_5xx(fuzz_app):
    """/files, the playground page and config, and arbitrary paths (encoded or not)."""
    _app, client = fuzz_app
    segment = st.text(min_size=0, max_size=30) | st.sampled_from(["..", ".", "%2e%2e", "%2F", "%00", "output.mp4"])

    @settings(max_examples=EXAMPLES * 4, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(
        prefix=st.sampled_from(["/files", "", "/api", "/v1/videos", "/fal-ai/kandinsky5/requests"]),
        segments=st.lists(segment, min_size=0, max_size=4),
        method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"]),
    )
    def check(prefix, segments, method):
        from urllib.parse import quote

        path = "/" + (prefix + "/" + "/".join(quote(s, safe="%.") for s in segments)).lstrip("/")
        response = client.request(method, path, headers=AUTH)
        _record(f"{method} {prefix}/…", "raw", response.status_code, response.text)
        assert response.status_code < 500, (method, path, response.text)

    check()
