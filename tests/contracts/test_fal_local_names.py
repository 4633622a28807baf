"""fal contract: local variant names are fal ids too ("k5serve/<variant>"), per design.md."""

from __future__ import annotations

import fakes
from server_fixtures import app_client, wait_until


def _finish(client, submit: dict) -> dict:
    wait_until(lambda: client.get(submit["status_url"]).json()["status"] == "COMPLETED", what="COMPLETED")
    return client.get(submit["response_url"]).json()


def test_local_variant_name_runs_that_variant_with_its_own_defaults(tmp_path):
    engine = fakes.FakeEngine()
    with app_client(engine, tmp_path) as client:
        response = client.post("/k5serve/kandinsky5-lite-t2v-nocfg-10s", json={"prompt": "a fox", "duration": "10s"})
        assert response.status_code == 200
        submit = response.json()
        assert "/k5serve/kandinsky5-lite-t2v-nocfg-10s/requests/" in submit["status_url"]
        assert _finish(client, submit)["video"]["content_type"] == "video/mp4"
    (req,) = engine.calls
    assert req.variant == "kandinsky5-lite-t2v-nocfg-10s"
    assert (req.steps, req.guidance, req.width, req.seconds) == (None, None, None, 10)  # the variant's own


def test_local_name_takes_explicit_size_steps_and_guidance(tmp_path):
    engine = fakes.FakeEngine()
    body = {"prompt": "a fox", "resolution": "512x768", "num_inference_steps": 3, "guidance_scale": 2.5}
    with app_client(engine, tmp_path) as client:
        _finish(client, client.post("/k5serve/kandinsky5-pro-t2v-sft-5s", json=body).json())
    (req,) = engine.calls
    assert (req.width, req.height, req.steps, req.guidance) == (512, 768, 3, 2.5)


def test_unknown_local_name_is_a_404_listing_the_ids(tmp_path):
    with app_client(fakes.FakeEngine(), tmp_path) as client:
        response = client.post("/k5serve/kandinsky5-huge", json={"prompt": "x"})
    assert response.status_code == 404
    assert "k5serve/kandinsky5-lite-t2v-distilled-5s" in response.json()["detail"]


def test_bad_local_duration_and_resolution_are_422_on_the_result(tmp_path):
    with app_client(fakes.FakeEngine(), tmp_path) as client:
        for body, field in (
            ({"prompt": "x", "duration": "10s"}, "duration"),
            ({"prompt": "x", "resolution": "big"}, "resolution"),
        ):
            submit = client.post("/k5serve/kandinsky5-lite-t2v-sft-5s", json=body).json()
            wait_until(lambda s=submit: client.get(s["status_url"]).json()["status"] == "COMPLETED", what="done")
            result = client.get(submit["response_url"])
            assert result.status_code == 422
            assert result.json()["detail"][0]["loc"] == ["body", field]
