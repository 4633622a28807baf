"""The studio's JSON routes in-process (fake engine): the model table agrees with what the server
accepts, every job listed whatever its contract, paging, cancel, delete, posters and static files."""

from __future__ import annotations

import itertools

import pytest
from fakes import FakeEngine
from server_fixtures import app_client, wait_until

from pipelines.request import MAX_STEPS, resolve
from pipelines.variants import VARIANTS
from server.api.fal_inputs import parse, to_generation_request
from server.api.studio_models import model_table

TABLE = model_table(demo=False, available=sorted(VARIANTS), expand=False)


def _bodies(model: dict) -> list[dict]:
    """Every combination of the model's offered choices (and its defaults otherwise), as the page sends it."""
    choices = [f for f in model["fields"] if f["kind"] == "choice"]
    options = [[o for o in f["options"]] + ([] if f["default"] is not None else [None]) for f in choices]
    bodies = []
    for combo in itertools.product(*options):
        body = {"prompt": "a fox"} | {f["name"]: v for f, v in zip(choices, combo, strict=True) if v is not None}
        for f in model["fields"]:
            if f["kind"] in ("int", "float"):
                body[f["name"]] = f["default"]
        if model["task"] == "i2v":
            body["image_url"] = "http://example.invalid/cat.png"
        bodies.append(body)
    return bodies


@pytest.mark.parametrize("model", TABLE["models"], ids=lambda m: m["id"])
def test_every_offered_combination_is_accepted(model, test_image):
    """The page never offers a value the server refuses: each combination of offered choices (and
    each default) passes the fal schema and the engine's own validation."""
    for body in _bodies(model):
        request = to_generation_request(parse(model["id"], body))
        if model["task"] == "i2v":
            request = type(request)(**{**request.to_dict(), "image": str(test_image)})
        resolve(request)  # raises InvalidRequest on a value the server would refuse


def test_defaults_and_ranges_come_from_the_server_data():
    by_id = {m["id"]: m for m in TABLE["models"]}
    fields = lambda model_id: {f["name"]: f for f in by_id[model_id]["fields"]}  # noqa: E731
    lite = fields("fal-ai/kandinsky5/text-to-video")
    assert lite["num_inference_steps"]["default"] == 30 and lite["num_inference_steps"]["max"] == MAX_STEPS
    assert lite["duration"]["options"] == ["5s", "10s"] and "image_url" not in lite
    assert "num_inference_steps" not in fields("fal-ai/kandinsky5/text-to-video/distill")  # fal ignores it there
    pro = fields("fal-ai/kandinsky5-pro/text-to-video")
    assert pro["acceleration"]["default"] == "regular" and pro["resolution"]["options"] == ["512P", "1024P"]
    local = fields("k5serve/kandinsky5-pro-t2v-distilled-5s")
    assert local["guidance_scale"]["default"] == 1.0 and local["num_inference_steps"]["default"] == 16
    assert local["acceleration"]["noop_for"] == ["kandinsky5-pro-t2v-distilled-5s"]  # no MagCache calibration
    assert fields("k5serve/kandinsky5-pro-i2v-sft-5s")["image_url"]["required"] is False  # LocalInput: optional
    assert by_id["fal-ai/kandinsky5-pro/image-to-video"]["fields"][0]["name"] == "image_url"
    demo = model_table(demo=True, available=["kandinsky5-tiny-t2v"], expand=True)["models"]
    lite_demo = next(m for m in demo if m["id"] == "fal-ai/kandinsky5/text-to-video")
    assert lite_demo["runs"]["variant"] == "kandinsky5-tiny-t2v" and lite_demo["variants"]["5"]["available"] is False
    assert next(f for f in lite_demo["fields"] if f["name"] == "enable_prompt_expansion")["default"] is True


@pytest.fixture
def client(tmp_path):
    with app_client(FakeEngine(step_time=0.05), tmp_path) as c:
        yield c


def test_jobs_of_every_contract_page_cancel_and_delete(client):
    fal = client.post("/k5serve/kandinsky5-tiny-t2v", json={"prompt": "one", "num_inference_steps": 60}).json()
    openai = client.post("/v1/videos", json={"prompt": "two", "model": "kandinsky5-tiny-t2v"}).json()
    aiml = client.post("/v2/video/generations", json={"prompt": "three", "model": "kandinsky5-tiny-t2v"}).json()
    listed = client.get("/api/jobs", params={"limit": 2}).json()
    assert listed["total"] == 3 and [j["prompt"] for j in listed["jobs"]] == ["three", "two"]
    assert [j["prompt"] for j in client.get("/api/jobs", params={"limit": 2, "offset": 2}).json()["jobs"]] == ["one"]
    assert {j["contract"] for j in client.get("/api/jobs").json()["jobs"]} == {"fal", "openai", "aimlapi"}

    queued = client.post(f"/api/jobs/{openai['id']}/cancel")
    assert queued.json()["outcome"] == "canceled"
    assert client.get(f"/api/jobs/{openai['id']}").json()["queue_position"] is None
    wait_until(lambda: client.get(f"/api/jobs/{fal['request_id']}").json()["status"] == "running")
    assert client.post(f"/api/jobs/{fal['request_id']}/cancel").json()["outcome"] == "requested"
    wait_until(lambda: client.get(f"/api/jobs/{fal['request_id']}").json()["status"] == "canceled")
    again = client.post(f"/api/jobs/{openai['id']}/cancel")
    assert again.json()["outcome"] == "canceled"  # idempotent, like every cancel here
    aiml_id = aiml["id"].partition(":")[0]
    wait_until(lambda: client.get(f"/api/jobs/{aiml_id}").json()["status"] == "succeeded")
    done = client.post(f"/api/jobs/{aiml_id}/cancel")
    assert done.status_code == 409 and "already finished (succeeded)" in done.json()["detail"]

    detail = client.get(f"/api/jobs/{aiml_id}").json()
    assert detail["logs"] and detail["resolved"]["variant"] == "kandinsky5-tiny-t2v" and detail["video_url"]
    assert client.get(detail["poster_url"]).status_code == 404  # the fake's "mp4" has no frame to show
    assert client.delete(f"/api/jobs/{aiml_id}").json()["deleted"] is True
    assert client.get(f"/api/jobs/{aiml_id}").status_code == 404
    assert client.delete(f"/api/jobs/{aiml_id}").status_code == 404
    assert client.post("/api/jobs/nope/cancel").json() == {"detail": "no job 'nope'"}


def test_static_files_only_the_page_s_own(client):
    assert client.get("/static/history.js").headers["content-type"].startswith("text/javascript")
    for path in ("/static/../api/playground.py", "/static/%2e%2e/app.py", "/static/", "/static/nope.css"):
        answer = client.get(path)
        assert answer.status_code in (404, 405) and "import" not in answer.text, path
    assert client.get("/favicon.ico").content[:4] == b"\x00\x00\x01\x00"  # an ICO
    assert client.get("/api/posters/not-a-file-id.webp").status_code == 404
