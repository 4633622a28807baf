"""One scenario table, run against every contract (fake engines, in-process).

Rows are scenarios (create → progress → result, unknown id, invalid enum, missing prompt, bad
auth, cancel); columns are the contracts. Each contract's adapter only knows how to say things
on its wire; EXPECT holds what that contract must answer: exact status codes and error shapes.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, ClassVar

import fakes
import httpx
import pytest
from contract_fixtures import threaded_server
from server_fixtures import app_client, wait_until

KEY = "sk-scenario"
PENDING, RUNNING, DONE = "pending", "running", "done"


class Contract:
    name: ClassVar[str]
    auth: ClassVar[str] = "Bearer"
    states: ClassVar[dict[str, str]]  # wire status -> PENDING / RUNNING / DONE

    def body(self, prompt: str | None, steps: int, bad_enum: bool = False) -> dict: ...
    def submit(self, client, body: dict, headers: dict | None = None) -> httpx.Response: ...
    def handle(self, response) -> str:
        return response.json()["id"]

    def poll(self, client, handle: str) -> tuple[str, httpx.Response]: ...
    def result(self, client, handle: str) -> httpx.Response: ...
    def video_url(self, result: dict) -> str: ...
    def unknown(self, client) -> httpx.Response: ...
    def rejection(self, client, submitted: httpx.Response) -> httpx.Response:
        return submitted  # synchronous validation: the submit answer is the error

    def headers(self, key: str) -> dict:
        return {"Authorization": f"{self.auth} {key}".strip()}


def _prompted(body: dict, prompt: str | None) -> dict:
    return body if prompt is None else {"prompt": prompt, **body}


class Fal(Contract):
    name, auth, path = "fal", "Key", "/fal-ai/kandinsky5/text-to-video"
    states: ClassVar = {"IN_QUEUE": PENDING, "IN_PROGRESS": RUNNING, "COMPLETED": DONE}

    def body(self, prompt, steps, bad_enum=False):
        return _prompted({"num_inference_steps": steps, **({"aspect_ratio": "16:9"} if bad_enum else {})}, prompt)

    def submit(self, client, body, headers=None):
        return client.post(self.path, json=body, headers=headers)

    def handle(self, response):
        return response.json()["request_id"]

    def poll(self, client, handle):
        response = client.get(f"/fal-ai/kandinsky5/requests/{handle}/status")
        assert response.status_code == (200 if response.json()["status"] == "COMPLETED" else 202)
        return response.json()["status"], response

    def result(self, client, handle):
        return client.get(f"/fal-ai/kandinsky5/requests/{handle}")

    def video_url(self, result):
        return result["video"]["url"]

    def unknown(self, client):
        return client.get(f"/fal-ai/kandinsky5/requests/{uuid.uuid4()}/status")

    def rejection(self, client, submitted):
        # fal: invalid input is accepted (200), completes, and the result route answers 422
        assert submitted.status_code == 200, submitted.text
        handle = self.handle(submitted)
        wait_until(lambda: self.poll(client, handle)[0] == "COMPLETED", what="fal completion")
        return self.result(client, handle)

    def cancel(self, client, handle):
        response = client.put(f"/fal-ai/kandinsky5/requests/{handle}/cancel")
        assert (response.status_code, response.json()) == (202, {"status": "CANCELLATION_REQUESTED"})
        wait_until(lambda: self.poll(client, handle)[0] == "COMPLETED", what="cancel")
        status = self.poll(client, handle)[1].json()
        assert status["error_type"] == "client_cancelled"
        result = self.result(client, handle)
        assert result.status_code == 499 and result.json()["error_type"] == "client_cancelled"


class AimlApi(Contract):
    name, path = "aimlapi", "/v2/video/generations"
    states: ClassVar = {"queued": PENDING, "generating": RUNNING, "completed": DONE, "error": DONE}

    def body(self, prompt, steps, bad_enum=False):
        extra = {"aspect_ratio": "16:9"} if bad_enum else {}
        return _prompted({"model": "sber-ai/kandinsky5-t2v", "num_inference_steps": steps, **extra}, prompt)

    def submit(self, client, body, headers=None):
        return client.post(self.path, json=body, headers=headers)

    def poll(self, client, handle):
        response = client.get(self.path, params={"generation_id": handle})
        assert response.status_code == 200
        return response.json()["status"], response

    def result(self, client, handle):
        return self.poll(client, handle)[1]

    def video_url(self, result):
        return result["video"]["url"]

    def unknown(self, client):
        return client.get(self.path, params={"generation_id": f"{uuid.uuid4()}:sber-ai/kandinsky5-t2v"})


class OneRouter(Contract):
    name, auth, path = "onerouter", "", "/v1/videos/generations"  # the documented form: no scheme
    states: ClassVar = {}

    def body(self, prompt, steps, bad_enum=False):
        extra = {"resolution": "1280x720"} if bad_enum else {}
        return _prompted({"model": "kandinsky5-text-to-video", "num_inference_steps": steps, **extra}, prompt)

    def submit(self, client, body, headers=None):
        return client.post(self.path, json=body, headers=headers)

    def video_url(self, result):
        return result["data"][0]["url"]


class OpenAI(Contract):
    name, path = "openai", "/v1/videos"
    states: ClassVar = {"queued": PENDING, "in_progress": RUNNING, "completed": DONE, "failed": DONE}

    def body(self, prompt, steps, bad_enum=False):
        return _prompted({"num_inference_steps": steps, **({"seconds": "21"} if bad_enum else {})}, prompt)

    def submit(self, client, body, headers=None):
        return client.post(self.path, json=body, headers=headers)

    def poll(self, client, handle):
        response = client.get(f"{self.path}/{handle}")
        assert response.status_code == 200
        body = response.json()
        assert 0 <= body["progress"] <= 100
        return body["status"], response

    def result(self, client, handle):
        return self.poll(client, handle)[1]

    def video_url(self, result):
        return f"/v1/videos/{result['id']}/content"

    def unknown(self, client):
        return client.get(f"{self.path}/video_{uuid.uuid4().hex}")

    def cancel(self, client, handle):
        response = client.delete(f"{self.path}/{handle}")  # OpenAI: deleting an unfinished video stops it
        assert response.status_code == 200 and response.json() == {
            "id": handle,
            "object": "video.deleted",
            "deleted": True,
        }
        services = client.app.state.services
        assert services.manager.get(handle) is None  # a real delete: the record goes at once
        wait_until(lambda: services.worker.current_job_id is None, what="the generation to stop")
        assert client.get(f"{self.path}/{handle}").status_code == 404


CONTRACTS = [Fal(), AimlApi(), OneRouter(), OpenAI()]


# -- expected answers, per contract ---------------------------------------------------------------------


def fal_detail(field: str):
    def check(body: dict) -> None:
        assert body["detail"][0]["loc"] == ["body", field], body

    return check


def fal_message(body: dict) -> None:
    assert isinstance(body["detail"], str) and body["detail"], body


def gateway(text: str):
    def check(body: dict) -> None:
        assert set(body) == {"requestId", "statusCode", "timestamp", "path", "message"}, body
        assert text in body["message"], body

    return check


def openai_error(param: str | None, code: str):
    def check(body: dict) -> None:
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert (body["error"]["param"], body["error"]["code"]) == (param, code), body

    return check


def onerouter_error(code: int, param: str):
    def check(body: dict) -> None:
        assert set(body["error"]) == {"code", "message", "type", "param"}, body
        assert (body["error"]["code"], body["error"]["param"]) == (code, param), body

    return check


@dataclass(frozen=True)
class Expect:
    status: int
    shape: Any  # a checker of the JSON body


EXPECT: dict[str, dict[str, Expect | None]] = {
    "fal": {
        "create": Expect(200, lambda b: b["status"] == "IN_QUEUE"),
        "unknown": Expect(404, fal_message),
        "invalid_enum": Expect(422, fal_detail("aspect_ratio")),
        "missing_prompt": Expect(422, fal_detail("prompt")),
        "bad_auth": Expect(401, fal_message),
    },
    "aimlapi": {
        "create": Expect(201, lambda b: b["status"] == "queued" and b["id"].endswith(":sber-ai/kandinsky5-t2v")),
        "unknown": Expect(404, gateway("not found")),
        "invalid_enum": Expect(400, gateway("Expected '3:2' | '1:1' | '2:3', received '16:9' at \"aspect_ratio\"")),
        "missing_prompt": Expect(400, gateway('Body validation error\nRequired at "prompt"')),
        "bad_auth": Expect(401, gateway("valid API key")),
    },
    "onerouter": {
        "create": Expect(200, lambda b: set(b) == {"data", "created"}),
        "unknown": None,  # synchronous: there is no id to look up
        "invalid_enum": Expect(400, onerouter_error(400, "resolution")),
        "missing_prompt": Expect(400, onerouter_error(400, "prompt")),
        "bad_auth": Expect(401, onerouter_error(401, "")),
    },
    "openai": {
        "create": Expect(200, lambda b: b["object"] == "video" and b["status"] == "queued" and b["progress"] == 0),
        "unknown": Expect(404, openai_error("video_id", "not_found")),
        "invalid_enum": Expect(400, openai_error("seconds", "invalid_value")),
        "missing_prompt": Expect(400, openai_error("prompt", "missing_required_parameter")),
        "bad_auth": Expect(401, openai_error(None, "invalid_api_key")),
    },
}


def check(response: httpx.Response, expect: Expect) -> None:
    assert response.status_code == expect.status, response.text
    assert expect.shape(response.json()) is not False, response.text


# -- the scenarios ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("contract", CONTRACTS, ids=lambda c: c.name)
def test_create_progress_result(tmp_path, contract):
    with app_client(fakes.slow(0.05), tmp_path, api_keys=[KEY]) as client:
        client.headers.update(contract.headers(KEY))
        response = contract.submit(client, contract.body("a fox", steps=8))
        check(response, EXPECT[contract.name]["create"])
        if not contract.states:  # synchronous: the answer is the result
            final = response.json()
        else:
            handle, seen = contract.handle(response), []
            while not seen or contract.states[seen[-1]] != DONE:
                seen.append(contract.poll(client, handle)[0])
            states = list(dict.fromkeys(contract.states[s] for s in seen))
            assert states in ([PENDING, RUNNING, DONE], [RUNNING, DONE]), f"progress not seen in order: {seen}"
            final_response = contract.result(client, handle)
            assert final_response.status_code == 200
            final = final_response.json()
        download = client.get(contract.video_url(final))
        assert download.status_code == 200 and download.headers["content-type"] == "video/mp4"
        assert download.content[4:8] == b"ftyp"


ERROR_CASES = [
    (contract, scenario)
    for contract in CONTRACTS
    for scenario in ["unknown", "invalid_enum", "missing_prompt", "bad_auth"]
    if EXPECT[contract.name][scenario] is not None  # e.g. OneRouter is synchronous: no id to look up
]


@pytest.mark.parametrize(("contract", "scenario"), ERROR_CASES, ids=lambda v: getattr(v, "name", v))
def test_error_scenarios(tmp_path, contract, scenario):
    expect = EXPECT[contract.name][scenario]
    with app_client(fakes.FakeEngine(), tmp_path, api_keys=[KEY]) as client:
        client.headers.update(contract.headers(KEY))
        if scenario == "unknown":
            response = contract.unknown(client)
        elif scenario == "bad_auth":
            response = contract.submit(client, contract.body("x", 1), contract.headers("wrong-key"))
        else:
            prompt = None if scenario == "missing_prompt" else "x"
            body = contract.body(prompt, 1, bad_enum=scenario == "invalid_enum")
            response = contract.rejection(client, contract.submit(client, body))
        check(response, expect)


class NoWeights(fakes.FakeEngine):
    """An engine outside demo mode whose checkpoint for every variant is missing."""

    def prepare(self, req):
        from pipelines.errors import WeightsMissing

        raise WeightsMissing(req.variant, f"weights/{req.variant}", ["transformer/"])


UNAVAILABLE = {
    "fal": Expect(404, fal_message),
    "aimlapi": Expect(503, gateway("k5serve weights download kandinsky5-lite-t2v-sft-5s")),
    "onerouter": Expect(503, onerouter_error(503, "model")),
    "openai": Expect(404, openai_error("model", "model_not_found")),
}


@pytest.mark.parametrize("contract", CONTRACTS, ids=lambda c: c.name)
def test_missing_weights_answer_not_available_with_the_fix(tmp_path, contract):
    with app_client(NoWeights(), tmp_path) as client:
        response = contract.submit(client, contract.body("x", 1))
        check(response, UNAVAILABLE[contract.name])
    assert "k5serve weights download kandinsky5-lite-t2v-sft-5s" in response.text


@pytest.mark.parametrize("contract", [c for c in CONTRACTS if hasattr(c, "cancel")], ids=lambda c: c.name)
def test_cancel_a_running_job(tmp_path, contract):
    engine = fakes.slow(0.1)
    with app_client(engine, tmp_path) as client:
        handle = contract.handle(contract.submit(client, contract.body("x", 100)))
        wait_until(lambda: contract.states[contract.poll(client, handle)[0]] == RUNNING, what="running")
        contract.cancel(client, handle)
    assert engine.steps_run[0] < 100


def test_cancel_onerouter_by_hanging_up(tmp_path):
    """OneRouter's only cancel: the synchronous caller goes away (a TestClient cannot hang up)."""
    engine = fakes.slow(0.1)
    contract = OneRouter()
    with threaded_server(engine, tmp_path) as server:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + contract.path, json=contract.body("x", 100), timeout=httpx.Timeout(30, read=0.8))
        manager = server.services.manager
        (job,) = manager.list(contract="onerouter")
        wait_until(lambda: manager.get(job.id).status.terminal, timeout=5, what="cancel")
        assert manager.get(job.id).status.value == "canceled"
    assert engine.steps_run[0] < 100


def test_aimlapi_has_no_cancel_route(tmp_path):
    """AI/ML API documents no cancel: the row is empty for it, by design."""
    assert not hasattr(AimlApi(), "cancel")


# -- bad input never answers 500 ----------------------------------------------------------------------

FIELDS = [
    "model",
    "prompt",
    "aspect_ratio",
    "duration",
    "num_inference_steps",
    "seed",
    "negative_prompt",
    "resolution",
    "video_length",
    "output_format",
    "seconds",
    "size",
    "input_reference",
    "enhance_prompt",
    "expand_prompt",
    "enable_prompt_expansion",
    "image_url",
]
MODELS = ["sber-ai/kandinsky5-t2v", "kandinsky5-text-to-video", "kandinsky5-lite-i2v-5s", "kandinsky5-tiny-t2v"]


def json_bodies():
    from hypothesis import strategies as st

    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=12),
        st.sampled_from(["3:2", "5s", "10", "768x512", "url", "data:image/png;base64,AAAA", *MODELS]),
    )
    values = st.recursive(
        scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3), max_leaves=6
    )
    return st.one_of(st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), values, max_size=8), values)


@pytest.mark.parametrize("contract", CONTRACTS, ids=lambda c: c.name)
def test_random_bodies_never_answer_500(tmp_path, contract):
    from hypothesis import HealthCheck, given, settings

    with app_client(fakes.FakeEngine(), tmp_path, max_queue=10_000) as client:

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
        @given(body=json_bodies())
        def check_body(body):
            response = contract.submit(client, body)
            assert response.status_code < 500, (body, response.text)

        check_body()
        for raw in (b"", b"\xff\xfe", b"[", b'{"prompt": "x"', b"null", b"1e999999"):
            response = client.post(contract.path, content=raw, headers={"content-type": "application/json"})
            assert response.status_code < 500, (raw, response.text)
