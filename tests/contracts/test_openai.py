"""The OpenAI Videos API contract: the official `openai` SDK (unmodified, `base_url` set) against
fake engines in-process and against the live demo-mode server, plus raw-HTTP checks of the
mapping of `seconds`/`size` and of the error envelope."""

from __future__ import annotations

import base64
import io
import time

import fakes
import httpx2
import openai
import pytest
from server_fixtures import app_client, wait_until

from pipelines.request import resolve

FAST = {"num_inference_steps": 2}


class FullSizeEngine(fakes.FakeEngine):
    """A fake engine with real weights: every request runs at the size and length asked for (the
    plain FakeEngine, like demo mode, runs every variant on the tiny model at demo size)."""

    demo = False

    def prepare(self, req):
        return resolve(req)


def sdk(client, api_key="sk-local") -> openai.OpenAI:
    """The SDK over a TestClient (fake engines, in-process; the SDK's HTTP library is the one
    TestClient is built on): the SDK's own request building and response parsing."""
    return openai.OpenAI(api_key=api_key, base_url="http://testserver/v1", http_client=client, max_retries=0)


def png_bytes(size=(48, 32)) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def assert_error(response, status, param, code=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and error["message"]
    if code is not None:
        assert error["code"] == code
    return error["message"]


# -- the SDK against fake engines --------------------------------------------------------------


def test_sdk_create_poll_download_list_delete(tmp_path):
    with app_client(fakes.FakeEngine(), tmp_path) as client:
        api = sdk(client)
        video = api.videos.create_and_poll(prompt="a fox in snow", poll_interval_ms=20, extra_body=FAST)
        assert isinstance(video, openai.types.Video) and video.object == "video"
        assert (video.status, video.progress, video.error) == ("completed", 100, None)
        # demo mode: what was made (the tiny stand-in, 25 frames @ 24 fps), not the 5 s, 768x512 asked for
        assert (video.model, video.seconds, video.size) == ("kandinsky5-lite-t2v-sft-5s", "1", "256x160")
        assert video.id.startswith("video_") and video.completed_at >= video.created_at
        content = api.videos.download_content(video.id)
        assert content.response.headers["content-type"] == "video/mp4" and content.content[4:8] == b"ftyp"
        assert [v.id for v in api.videos.list()] == [video.id]
        deleted = api.videos.delete(video.id)
        assert (deleted.id, deleted.deleted, deleted.object) == (video.id, True, "video.deleted")
        with pytest.raises(openai.NotFoundError):
            api.videos.retrieve(video.id)
        with pytest.raises(openai.NotFoundError):
            api.videos.download_content(video.id)
        assert list(api.videos.list()) == []


def test_sdk_errors_are_typed(tmp_path):
    with app_client(fakes.FakeEngine(), tmp_path, api_keys=["sk-local"]) as client:
        with pytest.raises(openai.AuthenticationError) as auth:
            sdk(client, api_key="wrong").videos.create(prompt="x")
        assert auth.value.code == "invalid_api_key"
        api = sdk(client)
        with pytest.raises(openai.BadRequestError) as bad:
            api.videos.create(prompt="x", seconds="30")
        assert bad.value.param == "seconds" and "from 1 to 20" in bad.value.message
        with pytest.raises(openai.BadRequestError) as bad:
            api.videos.create(prompt="x", size="wide")
        assert bad.value.param == "size" and "WIDTHxHEIGHT" in bad.value.message
        with pytest.raises(openai.NotFoundError):
            api.videos.retrieve("video_nope")


def test_progress_follows_the_real_step_count(tmp_path):
    with app_client(fakes.slow(0.15), tmp_path) as client:
        api, seen = sdk(client), set()
        video = api.videos.create(prompt="x", extra_body={"num_inference_steps": 4})
        assert (video.status, video.progress) == ("queued", 0)
        while video.status in ("queued", "in_progress"):
            video = api.videos.retrieve(video.id)
            seen.add((video.status, video.progress))
            time.sleep(0.02)
    # The steps fill 0-90 (Job.percent); this engine reports no decode, so after step 4/4 the job
    # stays at 90 until the file exists (a poll can land in that window).
    assert {p for s, p in seen if s == "in_progress"} <= {0, 22, 45, 67, 90} and ("completed", 100) in seen
    assert any(s == "in_progress" and 0 < p < 100 for s, p in seen), seen


def test_progress_rises_through_the_decode_and_the_write(tmp_path):
    """After the last step, the decode's chunks move progress from 90 to 99 and the write holds 99:
    it is not stuck while the VAE runs; 100 only once the video is there."""
    engine = fakes.FakeEngine(step_time=0.02, decode_chunks=3, decode_time=0.3)
    with app_client(engine, tmp_path) as client:
        api, seen = sdk(client), []
        video = api.videos.create(prompt="x", extra_body={"num_inference_steps": 2})
        while video.status in ("queued", "in_progress"):
            video = api.videos.retrieve(video.id)
            seen.append((video.status, video.progress))
            time.sleep(0.02)
    decoding = [p for s, p in seen if s == "in_progress" and 90 <= p < 100]
    assert {93, 96} <= set(decoding), seen  # the middle chunks, each held 0.3 s
    assert set(decoding) <= {90, 93, 96, 99}, seen
    progress = [p for _s, p in seen]
    assert progress == sorted(progress) and seen[-1] == ("completed", 100), seen


def test_failed_generation_is_failed_with_an_error(tmp_path):
    with app_client(fakes.out_of_memory(), tmp_path) as client:
        api = sdk(client)
        video = api.videos.create_and_poll(prompt="x", poll_interval_ms=20, extra_body=FAST)
        assert video.status == "failed" and video.error.code == "out_of_memory"
        response = client.get(f"/v1/videos/{video.id}/content")
        assert_error(response, 400, "video_id", "video_not_ready")


def test_delete_while_running_cancels_the_job(tmp_path):
    engine = fakes.slow(0.2)
    with app_client(engine, tmp_path) as client:
        api = sdk(client)
        video = api.videos.create(prompt="x", extra_body={"num_inference_steps": 50})
        wait_until(lambda: api.videos.retrieve(video.id).status == "in_progress", what="running")
        assert client.get(f"/v1/videos/{video.id}/content").status_code == 400
        assert api.videos.delete(video.id).deleted
        services = client.app.state.services
        assert services.manager.get(video.id) is None  # deleted at once: record first, then files
        wait_until(lambda: services.worker.current_job_id is None, what="the generation to stop")
        assert engine.steps_run[0] < 50 and services.manager.queued_count() == 0


def test_list_pagination_and_order(tmp_path):
    with app_client(fakes.FakeEngine(), tmp_path) as client:
        api = sdk(client)
        ids = [api.videos.create(prompt=f"p{i}", extra_body=FAST).id for i in range(3)]
        client.post("/v2/video/generations", json={"model": "sber-ai/kandinsky5-t2v", "prompt": "other contract"})
        page = client.get("/v1/videos", params={"limit": 2}).json()
        assert page["object"] == "list" and page["has_more"] is True
        assert [v["id"] for v in page["data"]] == ids[::-1][:2] and page["last_id"] == ids[1]
        rest = client.get("/v1/videos", params={"limit": 2, "after": page["last_id"]}).json()
        assert [v["id"] for v in rest["data"]] == [ids[0]] and rest["has_more"] is False
        assert [v.id for v in api.videos.list(limit=1)] == ids[::-1]  # the SDK follows last_id itself
        assert [v.id for v in api.videos.list(order="asc")] == ids
        # backwards: the page just before a cursor, in either order
        back = client.get("/v1/videos", params={"limit": 1, "before": ids[0]}).json()
        assert [v["id"] for v in back["data"]] == [ids[1]] and back["has_more"] is True
        back = client.get("/v1/videos", params={"order": "asc", "before": ids[2]}).json()
        assert [v["id"] for v in back["data"]] == ids[:2] and back["has_more"] is False
        empty = client.get("/v1/videos", params={"limit": 0}).json()  # the spec's minimum
        assert (empty["data"], empty["last_id"], empty["has_more"]) == ([], None, True)
        assert_error(client.get("/v1/videos", params={"limit": 101}), 400, "limit")
        assert_error(client.get("/v1/videos", params={"before": "video_x"}), 400, "before")
        assert_error(client.get("/v1/videos", params={"order": "up"}), 400, "order")
        assert_error(client.get("/v1/videos", params={"after": "video_x"}), 400, "after")


# -- seconds / size / model mapping --------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "variant", "size", "frames", "shown"),
    [
        ({}, "kandinsky5-lite-t2v-sft-5s", None, None, ("5", "768x512")),
        ({"seconds": "10", "size": "512x768"}, "kandinsky5-lite-t2v-sft-10s", (512, 768), 241, ("10", "512x768")),
        ({"seconds": 5, "size": "512x512"}, "kandinsky5-lite-t2v-sft-5s", (512, 512), 121, ("5", "512x512")),
        ({"seconds": "4"}, "kandinsky5-lite-t2v-sft-5s", None, 97, ("4", "768x512")),
        (
            {"model": "kandinsky5-lite-t2v-distilled-10s"},
            "kandinsky5-lite-t2v-distilled-10s",
            None,
            None,
            ("10", "768x512"),
        ),
        (
            {"model": "kandinsky5-pro-t2v-sft-5s", "size": "1024x1024"},
            "kandinsky5-pro-t2v-sft-5s",
            (1024, 1024),
            None,
            ("5", "1024x1024"),
        ),
        (
            {"model": "sber-ai/kandinsky5-distill-t2v", "seconds": "10"},
            "kandinsky5-lite-t2v-distilled-10s",
            None,
            241,
            ("10", "768x512"),
        ),
        ({"model": "fal-ai/kandinsky5/text-to-video"}, "kandinsky5-lite-t2v-sft-5s", None, None, ("5", "768x512")),
        ({"model": "kandinsky5-tiny-t2v", "size": "128x96"}, "kandinsky5-tiny-t2v", (128, 96), None, ("1", "128x96")),
        # Sora's names, sizes and seconds: OpenAI's defaults (4 s, 720x1280) and the nearest size
        # each variant makes with the same orientation (Lite: SD buckets; Pro: SD and HD)
        ({"model": "sora-2"}, "kandinsky5-lite-t2v-sft-5s", (512, 768), 97, ("4", "512x768")),
        (
            {"model": "sora-2", "size": "1280x720", "seconds": "8"},
            "kandinsky5-lite-t2v-sft-10s",
            (768, 512),
            193,
            ("8", "768x512"),
        ),
        (
            {"model": "sora-2-2025-12-08", "size": "1024x1792"},
            "kandinsky5-lite-t2v-sft-5s",
            (512, 768),
            97,
            ("4", "512x768"),
        ),
        ({"model": "sora-2-pro", "size": "1920x1080"}, "kandinsky5-pro-t2v-sft-5s", (1280, 768), 97, ("4", "1280x768")),
        (
            {"model": "sora-2-pro-2025-10-06", "size": "1080x1920"},
            "kandinsky5-pro-t2v-sft-5s",
            (768, 1280),
            97,
            ("4", "768x1280"),
        ),
        ({"model": "sora-2-pro", "size": "1792x1024"}, "kandinsky5-pro-t2v-sft-5s", (1280, 768), 97, ("4", "1280x768")),
        ({"model": "sora-2", "size": "768x512"}, "kandinsky5-lite-t2v-sft-5s", (768, 512), 97, ("4", "768x512")),
    ],
)
def test_seconds_size_and_model_map_onto_variants(tmp_path, fields, variant, size, frames, shown):
    engine = FullSizeEngine()
    with app_client(engine, tmp_path) as client:
        response = client.post("/v1/videos", json={"prompt": "x", **FAST, **fields})
        assert response.status_code == 200, response.text
        assert (response.json()["seconds"], response.json()["size"]) == shown
        assert response.json()["model"] == fields.get("model", variant)  # the name the client sent
        wait_until(lambda: client.get(f"/v1/videos/{response.json()['id']}").json()["status"] == "completed")
        assert (client.get(f"/v1/videos/{response.json()['id']}").json()["seconds"]) == shown[0]
    (req,) = engine.calls
    assert (req.variant, req.num_frames, req.steps) == (variant, frames, 2)
    assert (req.width, req.height) == (size or (None, None))


def test_sora_clips_longer_than_one_pass_ask_for_their_frames(tmp_path):
    """12 s on sora-2 is 289 frames: the longest Lite sft (10 s, 241 frames a pass) is asked for
    all 289 (chained extension makes the rest: pipelines, helper v2v's part of issue 15)."""
    engine = FullSizeEngine()
    with app_client(engine, tmp_path) as client:
        response = client.post("/v1/videos", json={"prompt": "x", "model": "sora-2", "seconds": "12", **FAST})
        assert response.status_code == 200, response.text  # the whole clip is made and reported
        assert response.json()["seconds"] == "12"
        wait_until(lambda: engine.calls, what="the run")
        assert engine.prepare(engine.calls[0]).passes == [241, 48]  # one Lite 10 s pass, one I2V pass


def test_model_aliases_setting_is_honoured_by_every_contract(tmp_path):
    aliases = {"sora-2": "kandinsky5-lite-t2v-distilled-5s", "acme/video": "kandinsky5-lite-t2v-nocfg-5s"}
    engine = FullSizeEngine()
    with app_client(engine, tmp_path, model_aliases=aliases) as client:
        created = [
            client.post("/v1/videos", json={"prompt": "x", "model": "sora-2", **FAST}),
            client.post("/v1/videos", json={"prompt": "x", "model": "acme/video", "seconds": "10", **FAST}),
            client.post("/v2/video/generations", json={"model": "acme/video", "prompt": "x", **FAST}),
            client.post("/v1/videos/generations", json={"model": "acme/video", "prompt": "x", **FAST}),
            client.post("/acme/video", json={"prompt": "x", **FAST}),
        ]
        assert [r.status_code for r in created] == [200, 200, 201, 200, 200], [r.text for r in created]
        wait_until(lambda: len(engine.calls) == 5)
    assert [r.variant for r in engine.calls] == [
        "kandinsky5-lite-t2v-distilled-5s",
        "kandinsky5-lite-t2v-nocfg-10s",  # the alias's 10 s sibling
        *["kandinsky5-lite-t2v-nocfg-5s"] * 3,
    ]
    with pytest.raises(ValueError, match="no variant"):
        from server.settings import Settings

        Settings(model_aliases="sora-2=kandinsky6")


def test_a_name_mapped_to_missing_weights_is_not_available(tmp_path):
    from pipelines.errors import WeightsMissing

    class NoPro(FullSizeEngine):
        def prepare(self, req):
            if req.variant.startswith("kandinsky5-pro"):
                raise WeightsMissing(req.variant, "weights/" + req.variant, ["transformer"])
            return super().prepare(req)

    with app_client(NoPro(), tmp_path) as client:
        response = client.post("/v1/videos", json={"prompt": "x", "model": "sora-2-pro"})
        message = assert_error(response, 404, "model", "model_not_found")
    assert "k5serve weights download kandinsky5-pro-t2v-sft-5s" in message


def test_demo_mode_reports_the_size_and_seconds_it_makes(tmp_path):
    # Demo mode shrinks a 5 s 768x512 request to the tiny model's 256x160, 25 frames @ 24 fps: the
    # video object says so from the create answer on (what will run), and after it (what was made).
    engine = fakes.FakeEngine()
    with app_client(engine, tmp_path) as client:
        created = client.post("/v1/videos", json={"prompt": "x", "seconds": "5", "size": "768x512", **FAST}).json()
        assert (created["status"], created["seconds"], created["size"]) == ("queued", "1", "256x160")
        wait_until(lambda: client.get(f"/v1/videos/{created['id']}").json()["status"] == "completed")
        done = client.get(f"/v1/videos/{created['id']}").json()
        (listed,) = client.get("/v1/videos").json()["data"]
        output = client.app.state.services.manager.get(created["id"]).output
    (ran,) = engine.resolved
    assert ran.nominal_size == (768, 512) and (ran.width, ran.height, ran.num_frames) == (256, 160, 25)
    assert (output.width, output.height, output.num_frames, output.fps) == (256, 160, 25, 24)
    assert (done["seconds"], done["size"]) == (listed["seconds"], listed["size"]) == ("1", "256x160")


@pytest.mark.parametrize(
    ("fields", "param", "text"),
    [
        ({"seconds": "0"}, "seconds", "whole number from 1 to 20"),
        ({"seconds": "21"}, "seconds", "from 1 to 20"),
        ({"seconds": "4.5"}, "seconds", "from 1 to 20"),
        ({"seconds": True}, "seconds", "from 1 to 20"),
        ({"size": "big"}, "size", "WIDTHxHEIGHT"),
        ({"size": "0x720"}, "size", "WIDTHxHEIGHT"),
        ({"size": 768}, "size", "expected a string"),
        ({"model": "sora-3"}, "model", "'sora-3'"),
        ({"characters": [{"id": "char_1"}]}, "characters", "Use input_reference instead"),
        ({"remix_video_id": "video_1"}, "remix_video_id", "/remix"),
        ({"model": "kandinsky5-lite-i2v-5s"}, "input_reference", "needs an image"),
        ({"num_inference_steps": 0}, "num_inference_steps", "num_inference_steps must be"),
        ({"num_inference_steps": "many"}, "num_inference_steps", "expected an integer"),
        ({"seed": -3}, "seed", "seed must be"),
        ({"input_reference": "ftp://x/y.png"}, "input_reference", "not an http(s) URL"),
        ({"input_reference": {"file_id": "file_1"}}, "input_reference", "No file with id 'file_1'"),
        ({"input_reference": {"file_id": "f", "image_url": "data:,"}}, "input_reference", "exactly one"),
    ],
)
def test_values_the_model_cannot_do_are_400(tmp_path, fields, param, text):
    with app_client(fakes.FakeEngine(), tmp_path) as client:
        message = assert_error(client.post("/v1/videos", json={"prompt": "x", **fields}), 400, param)
        assert client.get("/v1/videos").json()["data"] == []
    assert text is None or text in message, message


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({}, "prompt", "missing_required_parameter"),
        ({"prompt": "  "}, "prompt", "missing_required_parameter"),
        ({"prompt": 3}, "prompt", "invalid_value"),
    ],
)
def test_missing_or_bad_prompt(tmp_path, body, param, code):
    with app_client(fakes.FakeEngine(), tmp_path) as client:
        assert_error(client.post("/v1/videos", json=body), 400, param, code)
        assert_error(
            client.post("/v1/videos", content=b"{x", headers={"content-type": "application/json"}),
            400,
            None,
            "invalid_json",
        )


def test_unreadable_multipart_is_400_in_the_openai_envelope(tmp_path):
    with app_client(fakes.FakeEngine(), tmp_path) as client:
        two_files = {"input_reference": ("a.png", b"x"), "other": ("b.png", b"y")}
        assert "Too many files" in assert_error(
            client.post("/v1/videos", data={"prompt": "x"}, files=two_files), 400, None
        )
        no_boundary = client.post("/v1/videos", content=b"--xx\r\n", headers={"content-type": "multipart/form-data"})
        assert "boundary" in assert_error(no_boundary, 400, None)


# -- image-to-video ------------------------------------------------------------------------------


def test_multipart_input_reference_is_image_to_video(tmp_path):
    engine = FullSizeEngine()
    with app_client(engine, tmp_path) as client:
        video = sdk(client).videos.create_and_poll(
            prompt="the cat turns",
            input_reference=("cat.png", png_bytes((96, 48)), "image/png"),
            poll_interval_ms=20,
            extra_body=FAST,
        )
        assert video.status == "completed" and video.model == "kandinsky5-lite-i2v-5s"
        assert video.size == "768x512"  # the image's 2:1 aspect picks the nearest SD bucket
        bad = client.post("/v1/videos", data={"prompt": "x"}, files={"input_reference": ("a.png", b"nope")})
        assert_error(bad, 400, "input_reference")
        t2v = client.post(
            "/v1/videos",
            data={"prompt": "x", "model": "kandinsky5-lite-t2v-sft-5s"},
            files={"input_reference": ("a.png", png_bytes())},
        )
        assert "takes no image" in assert_error(t2v, 400, "input_reference")
    (req,) = engine.calls
    assert req.variant == "kandinsky5-lite-i2v-5s" and req.steps == 2 and req.image.endswith(".png")


def test_input_reference_as_a_data_uri_or_image_url_object(tmp_path):
    engine = fakes.FakeEngine()
    uri = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    with app_client(engine, tmp_path) as client:
        created = [
            client.post("/v1/videos", json={"prompt": "x", "input_reference": reference, **FAST})
            for reference in (uri, {"image_url": uri})  # raw JSON bodies
        ]
        # multipart, as Stainless clients encode a reference object: input_reference[image_url]
        form = {"prompt": "x", "input_reference[image_url]": uri, "num_inference_steps": "2"}
        created.append(client.post("/v1/videos", data=form, files={"unused": ("", b"")}))
        for response in created:
            assert response.status_code == 200 and response.json()["model"] == "kandinsky5-lite-i2v-5s"
            video_id = response.json()["id"]
            wait_until(lambda: client.get(f"/v1/videos/{video_id}").json()["status"] == "completed")  # noqa: B023
        bad = client.post("/v1/videos", data={"prompt": "x", "input_reference[file_id]": "file_1"}, files={})
        assert "No file with id 'file_1'" in assert_error(bad, 400, "input_reference")
    assert [req.variant for req in engine.calls] == ["kandinsky5-lite-i2v-5s"] * 3


def test_sdk_image_url_over_http_through_the_url_guard(tmp_path, loopback):
    """{image_url: http://...} as the Python SDK gets it out (extra_body: multipart
    input_reference[image_url]), fetched through the SSRF guard from an allowlisted host."""
    loopback.files["/cat.png"] = ("image/png", png_bytes())
    engine = FullSizeEngine()
    with app_client(engine, tmp_path, url_allowlist=["127.0.0.1"]) as client:
        body = {"input_reference": {"image_url": f"{loopback.url}/cat.png"}, **FAST}
        video = sdk(client).videos.create_and_poll(prompt="x", model="sora-2-pro", poll_interval_ms=20, extra_body=body)
    assert (video.status, video.model, video.size, video.seconds) == ("completed", "sora-2-pro", "768x512", "4")
    (req,) = engine.calls
    assert req.variant == "kandinsky5-pro-i2v-sft-5s" and req.num_frames == 97 and req.image.endswith(".png")


def test_content_variants_characters_and_file_ids(tmp_path):
    with app_client(fakes.FakeEngine(), tmp_path) as client:
        video = sdk(client).videos.create_and_poll(prompt="x", poll_interval_ms=20, extra_body=FAST)
        assert_error(client.get(f"/v1/videos/{video.id}/content", params={"variant": "poster"}), 400, "variant")
        # the fake engine's file is no mp4: no preview, said with a 404, not a retryable 5xx
        thumb = client.get(f"/v1/videos/{video.id}/content", params={"variant": "thumbnail"})
        assert "could not be made" in assert_error(thumb, 404, "variant", "not_found")
        # characters: both routes and a create naming them, as the SDKs send them (multipart brackets)
        made = client.post("/v1/videos/characters", data={"name": "Mossy"}, files={"video": ("m.mp4", b"x")})
        assert "Use input_reference instead" in assert_error(made, 400, "video")
        assert_error(client.get("/v1/videos/characters/char_1"), 404, "character_id")
        form = {"prompt": "x", "characters[][id]": ["char_1", "char_2"]}
        named = client.post("/v1/videos", data=form, files={"unused": ("", b"")})
        assert "Characters are not supported" in assert_error(named, 400, "characters")
        # {file_id}: an upload this server holds, by its token (fal's storage protocol stored it)
        slot = client.app.state.services.uploads.store(png_bytes(), "ref.png")
        for file_id in (slot.token, f"{slot.token}/ref.png"):
            form = {"prompt": "x", "input_reference[file_id]": file_id, "num_inference_steps": "2"}
            response = client.post("/v1/videos", data=form, files={"unused": ("", b"")})
            assert response.status_code == 200 and response.json()["model"] == "kandinsky5-lite-i2v-5s", response.text
        gone = client.post("/v1/videos", json={"prompt": "x", "input_reference": {"file_id": "A" * 32}})
        assert "No file with id" in assert_error(gone, 400, "input_reference")
        # another contract's job is not a video here
        gid = client.post("/v2/video/generations", json={"model": "sber-ai/kandinsky5-t2v", "prompt": "x"}).json()
        assert_error(client.get(f"/v1/videos/{gid['id'].split(':')[0]}"), 404, "video_id", "not_found")


def test_video_object_has_all_13_keys_and_expires_with_retention(tmp_path):
    keys = {"id", "object", "model", "status", "progress", "created_at", "completed_at", "expires_at", "prompt"}
    keys |= {"size", "seconds", "remixed_from_video_id", "error"}
    with app_client(fakes.FakeEngine(), tmp_path, retention_hours=2) as client:
        created = client.post("/v1/videos", json={"prompt": "x", **FAST})
        assert set(created.json()) == keys and created.json()["expires_at"] is None
        assert created.headers["openai-poll-after-ms"] == "500"
        video_id = created.json()["id"]
        wait_until(lambda: client.get(f"/v1/videos/{video_id}").json()["status"] == "completed")
        done = client.get(f"/v1/videos/{video_id}")
    body = done.json()
    assert set(body) == keys and "openai-poll-after-ms" not in done.headers
    assert body["expires_at"] == body["completed_at"] + 7200
    assert isinstance(body["progress"], int) and isinstance(body["seconds"], str)


# -- the SDK against the live demo-mode server (real engine) ---------------------------------------


@pytest.fixture()
def live_sdk(live_server):
    http = httpx2.Client(verify=str(live_server.ca), timeout=60)
    yield openai.OpenAI(api_key="local-key", base_url=f"{live_server.url}/v1", http_client=http)
    http.close()


@pytest.mark.slow
def test_live_sdk_text_to_video(live_sdk):
    import imageio.v3 as iio

    video = live_sdk.videos.create_and_poll(
        prompt="a red fox in snow",
        model="kandinsky5-lite-t2v-distilled-5s",
        seconds="5",
        size="768x512",
        poll_interval_ms=200,
        extra_body={"num_inference_steps": 2},
    )
    assert video.status == "completed" and video.progress == 100, video
    data = live_sdk.videos.download_content(video.id).content
    frames = iio.imread(data, extension=".mp4")
    assert frames.ndim == 4 and frames.shape[-1] == 3
    # demo mode: the size and length of the file served (25 frames @ 24 fps: "1"), not the ones asked for
    assert (video.size, video.seconds) == (f"{frames.shape[2]}x{frames.shape[1]}", str(round(len(frames) / 24)))
    assert (video.size, video.seconds) == ("256x160", "1")
    assert video.id in [v.id for v in live_sdk.videos.list()]
    assert live_sdk.videos.delete(video.id).deleted
    with pytest.raises(openai.NotFoundError):
        live_sdk.videos.retrieve(video.id)


@pytest.mark.slow
def test_live_sdk_progress_rises_through_the_real_decode(live_sdk):
    """The real engine's demo video (25 frames: 3 decode chunks of the tiny VAE) reports its decode:
    a poll lands inside the decode's band (90 < progress < 99, chunks 1/3 and 2/3 done) while the job
    is still in progress."""
    video = live_sdk.videos.create(prompt="a fox decodes slowly", extra_body={"num_inference_steps": 1})
    seen = []
    while video.status in ("queued", "in_progress"):
        video = live_sdk.videos.retrieve(video.id)
        seen.append((video.status, video.progress))
        time.sleep(0.02)
    assert video.status == "completed" and video.progress == 100, video
    assert any(s == "in_progress" and 90 < p < 99 for s, p in seen), seen
    assert [p for _s, p in seen] == sorted(p for _s, p in seen), seen


@pytest.mark.slow
def test_live_sdk_image_to_video(live_sdk, test_image):
    import imageio.v3 as iio

    video = live_sdk.videos.create_and_poll(
        prompt="the noise swirls",
        input_reference=test_image,
        poll_interval_ms=200,
        extra_body={"num_inference_steps": 2},
    )
    assert video.status == "completed", video
    data = live_sdk.videos.download_content(video.id).content
    assert data[4:8] == b"ftyp"
    frames = iio.imread(data, extension=".mp4")
    # the square test image picks 512x512, made at demo size: the object reports the file's size
    assert video.model == "kandinsky5-lite-i2v-5s" and video.size == f"{frames.shape[2]}x{frames.shape[1]}"
