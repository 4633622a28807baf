"""The fal queue contract over HTTP, against fake engines (TestClient, no torch)."""

from __future__ import annotations

import base64
import io
import json
import time
from datetime import datetime, timedelta

import fakes
import pytest
from server_fixtures import app_client, wait_until

T2V = "fal-ai/kandinsky5/text-to-video"
DISTILL = "fal-ai/kandinsky5/text-to-video/distill"
PRO_T2V = "fal-ai/kandinsky5-pro/text-to-video"
PRO_I2V = "fal-ai/kandinsky5-pro/image-to-video"
FAST = {"prompt": "a red fox in snow", "num_inference_steps": 3}


def submit(client, model=T2V, body=None, **kw):
    response = client.post(f"/{model}", json=FAST if body is None else body, **kw)
    assert response.status_code == 200, response.text
    return response.json()


def app_of(model):
    return "/".join(model.split("/")[:2])


def status(client, model, rid, logs=None):
    params = {} if logs is None else {"logs": logs}
    return client.get(f"/{app_of(model)}/requests/{rid}/status", params=params)


def wait_done(client, model, rid, timeout=10):
    return wait_until(
        lambda: status(client, model, rid).status_code == 200 and status(client, model, rid),
        timeout=timeout,
        what=f"{rid} to complete",
    ).json()


def result(client, model, rid):
    return client.get(f"/{app_of(model)}/requests/{rid}")


def png_data_uri(size=(48, 32)) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# -- the happy path -------------------------------------------------------------------------------


def test_submit_status_result_and_download(tmp_path):
    with app_client(fakes.FakeEngine(), tmp_path) as client:
        response = client.post(f"/{T2V}", json=FAST)
        sub = response.json()
        rid = sub["request_id"]
        assert response.headers["x-fal-request-id"] == rid
        assert sub["gateway_request_id"] == rid and isinstance(sub["queue_position"], int)
        root = f"http://testserver/fal-ai/kandinsky5/requests/{rid}"  # fal: owner/alias only
        assert (sub["response_url"], sub["status_url"], sub["cancel_url"]) == (root, root + "/status", root + "/cancel")
        done = wait_done(client, T2V, rid)
        assert done["status"] == "COMPLETED" and done["logs"] is None
        assert done["metrics"]["inference_time"] >= 0 and "error" not in done

        res = result(client, T2V, rid)
        assert res.status_code == 200 and res.headers["x-fal-request-id"] == rid
        video = res.json()["video"]
        assert video["content_type"] == "video/mp4" and video["file_name"] == "output.mp4"
        assert video["url"].startswith("http://testserver/files/")
        download = client.get(video["url"])
        assert download.status_code == 200 and download.headers["content-type"] == "video/mp4"
        assert len(download.content) == video["file_size"]


def test_contract_defaults_reach_the_engine(tmp_path):
    engine = fakes.FakeEngine()
    with app_client(engine, tmp_path) as client:
        for model, body in [
            (DISTILL, {"prompt": "x", "aspect_ratio": "2:3", "num_inference_steps": 99}),
            (PRO_T2V, {"prompt": "x", "resolution": "1024P", "aspect_ratio": "1:1"}),
            (T2V, {"prompt": "x", "duration": "10s", "resolution": "512x512"}),
        ]:
            wait_done(client, model, submit(client, model, body)["request_id"])
    distill, pro, lite = engine.calls
    assert (distill.variant, distill.steps, distill.guidance) == ("kandinsky5-lite-t2v-distilled-5s", 16, 1.0)
    assert (distill.width, distill.height) == (512, 768)  # steps are not an input of the distilled endpoint
    assert (pro.variant, pro.steps, pro.width, pro.height) == ("kandinsky5-pro-t2v-sft-5s", 28, 1024, 1024)
    assert (lite.variant, lite.seconds, lite.width, lite.height) == ("kandinsky5-lite-t2v-sft-10s", 10, 512, 512)


def test_status_table_queue_position_and_logs(tmp_path):
    with app_client(fakes.slow(0.05), tmp_path) as client:
        first = submit(client, body={"prompt": "one", "num_inference_steps": 6})["request_id"]
        second = submit(client, body={"prompt": "two", "num_inference_steps": 2})["request_id"]
        queued = status(client, T2V, second)
        assert queued.status_code == 202
        assert queued.json()["status"] == "IN_QUEUE" and queued.json()["queue_position"] == 0
        running = wait_until(
            lambda: (
                status(client, T2V, first, "1").json()["status"] == "IN_PROGRESS" and status(client, T2V, first, "1")
            ),
            what="IN_PROGRESS",
        )
        assert running.status_code == 202 and isinstance(running.json()["logs"], list)
        for flag in ("1", "true"):  # JS sends 1, Python true
            wait_done(client, T2V, second)
            logs = status(client, T2V, second, flag).json()["logs"]
            assert [entry["message"] for entry in logs][:2] == ["step 1/2", "step 2/2"]
            assert {"level", "source", "timestamp"} <= set(logs[0])
            stamp = datetime.fromisoformat(logs[0]["timestamp"])  # UTC, with its offset
            assert stamp.utcoffset() == timedelta(0) and abs(time.time() - stamp.timestamp()) < 60
        for flag in ("0", "false"):
            assert status(client, T2V, second, flag).json()["logs"] is None


@pytest.mark.parametrize("status_value", ["FAILED", "CANCELLED", "CANCELED"])
def test_fal_status_table_never_reports_failure_states(status_value):
    from server.api.fal import FAL_STATUS

    assert status_value not in FAL_STATUS.values()
    assert set(FAL_STATUS.values()) == {"IN_QUEUE", "IN_PROGRESS", "COMPLETED"}


def test_status_polls_stay_fast_while_generating(tmp_path):
    with app_client(fakes.slow(0.5), tmp_path) as client:
        rid = submit(client, body={"prompt": "slow", "num_inference_steps": 4})["request_id"]
        wait_until(lambda: status(client, T2V, rid).json()["status"] == "IN_PROGRESS", what="running")
        worst = 0.0
        for _ in range(20):
            t0 = time.perf_counter()
            assert status(client, T2V, rid).status_code == 202
            worst = max(worst, time.perf_counter() - t0)
        assert worst < 0.25, f"a status poll took {worst:.3f} s while the GPU was busy"


def test_one_worker_serializes_generation(tmp_path):
    engine = fakes.slow(0.02)
    with app_client(engine, tmp_path) as client:
        ids = [submit(client, body={"prompt": f"p{i}", "num_inference_steps": 2})["request_id"] for i in range(4)]
        for rid in ids:
            wait_done(client, T2V, rid)
    assert engine.max_parallel == 1 and len(engine.calls) == 4


# -- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "body", "field"),
    [
        (T2V, {"num_inference_steps": 3}, "prompt"),
        (T2V, {"prompt": "x", "aspect_ratio": "16:9"}, "aspect_ratio"),
        (T2V, {"prompt": "x", "num_inference_steps": 0}, "num_inference_steps"),
        (PRO_T2V, {"prompt": "x", "duration": "10s"}, "duration"),
        (PRO_I2V, {"prompt": "x"}, "image_url"),
        (PRO_I2V, {"prompt": "x", "image_url": "data:image/png;base64,bm90IGFuIGltYWdl"}, "image_url"),
        (PRO_I2V, {"prompt": "x", "image_url": "ftp://example.invalid/a.png"}, "image_url"),
    ],
)
def test_invalid_input_completes_then_result_is_422(tmp_path, model, body, field):
    engine = fakes.FakeEngine()
    with app_client(engine, tmp_path) as client:
        rid = submit(client, model, body)["request_id"]  # fal: accepted at submit
        done = wait_done(client, model, rid)
        assert done["status"] == "COMPLETED" and done["error"] and done["error_type"] == "bad_request"
        res = result(client, model, rid)
        assert res.status_code == 422 and res.headers["x-fal-retryable"] == "false"
        detail = res.json()["detail"]
        assert isinstance(detail, list) and detail[0]["loc"] == ["body", field] and detail[0]["msg"]
    assert engine.calls == []


def test_the_422_input_is_the_json_value_sent_bounded(tmp_path):
    # pydantic (and so fal) echoes a missing field's whole input object, as an object, not its repr.
    big = {"num_inference_steps": 3, **{f"extra{i}": "v" * 100 for i in range(200)}}
    with app_client(fakes.FakeEngine(), tmp_path) as client:
        sent = [{"num_inference_steps": 3}, {}, big]
        ids = [submit(client, T2V, body)["request_id"] for body in sent]
        details = [result(client, T2V, wait_done(client, T2V, rid)["request_id"]).json()["detail"] for rid in ids]
    assert [d[0]["loc"] for d in details] == [["body", "prompt"]] * 3
    assert details[0][0]["input"] == {"num_inference_steps": 3} and details[1][0]["input"] == {}
    echoed = details[2][0]["input"]
    assert isinstance(echoed, dict) and echoed["num_inference_steps"] == 3 and "…" in echoed
    assert len(json.dumps(echoed)) < 3000 < len(json.dumps(big))


def test_invalid_json_body_is_a_422_not_a_500(tmp_path):
    with app_client(fakes.FakeEngine(), tmp_path) as client:
        response = client.post(f"/{T2V}", content=b"{not json", headers={"content-type": "application/json"})
        rid = response.json()["request_id"]
        assert result(client, T2V, rid).status_code == 422


@pytest.mark.parametrize(
    ("engine", "code", "error_type", "text"),
    [
        (fakes.raising, 500, "internal_error", "generation failed"),
        (fakes.out_of_memory, 500, "runner_server_error", "out of GPU memory"),
    ],
)
def test_engine_failures_become_completed_with_error(tmp_path, engine, code, error_type, text):
    with app_client(engine(), tmp_path) as client:
        rid = submit(client)["request_id"]
        done = wait_done(client, T2V, rid)
        assert done["status"] == "COMPLETED" and done["error_type"] == error_type
        res = result(client, T2V, rid)
        assert res.status_code == code and res.headers["x-fal-error-type"] == error_type
        assert res.json()["error_type"] == error_type and text in res.json()["detail"]
        assert "internal detail" not in res.text  # the traceback goes to the log, not the client


def test_worker_survives_an_out_of_memory_job(tmp_path):
    with app_client(fakes.out_of_memory(times=1), tmp_path) as client:
        first, second = (submit(client)["request_id"] for _ in range(2))
        assert wait_done(client, T2V, first)["error_type"] == "runner_server_error"
        assert "error" not in wait_done(client, T2V, second)


def test_unknown_app_request_and_early_result(tmp_path):
    with app_client(fakes.slow(0.2), tmp_path) as client:
        assert client.post("/fal-ai/flux/dev", json=FAST).status_code == 404
        assert status(client, T2V, "nope").status_code == 404
        assert result(client, T2V, "nope").json() == {"detail": "Request not found"}
        rid = submit(client)["request_id"]
        assert status(client, PRO_T2V, rid).status_code == 404  # another app's namespace
        early = result(client, T2V, rid)
        assert early.status_code == 400 and "in progress" in early.json()["detail"]


def test_queue_full_is_429(tmp_path):
    with app_client(fakes.slow(0.5), tmp_path, max_queue=1) as client:
        submit(client)
        wait_until(lambda: client.get("/readyz").json()["queued"] == 0, what="first job to start")
        submit(client)
        assert client.post(f"/{T2V}", json=FAST).status_code == 429


# -- cancel ---------------------------------------------------------------------------------------


def test_cancel_queued_running_and_finished(tmp_path):
    engine = fakes.slow(0.1)
    with app_client(engine, tmp_path) as client:
        running = submit(client, body={"prompt": "long", "num_inference_steps": 50})["request_id"]
        queued = submit(client)["request_id"]
        wait_until(lambda: status(client, T2V, running).json()["status"] == "IN_PROGRESS", what="running")

        cancel = client.put(f"/fal-ai/kandinsky5/requests/{queued}/cancel")
        assert cancel.status_code == 202 and cancel.json() == {"status": "CANCELLATION_REQUESTED"}
        cancel = client.put(f"/fal-ai/kandinsky5/requests/{running}/cancel")
        assert cancel.status_code == 202
        for rid in (queued, running):
            done = wait_done(client, T2V, rid)
            assert done["status"] == "COMPLETED" and done["error_type"] == "client_cancelled"
            res = result(client, T2V, rid)
            assert res.status_code == 499 and res.json()["error_type"] == "client_cancelled"

        again = client.put(f"/fal-ai/kandinsky5/requests/{running}/cancel")  # a retried cancel: same answer
        assert again.status_code == 202 and again.json() == {"status": "CANCELLATION_REQUESTED"}
        missing = client.put("/fal-ai/kandinsky5/requests/nope/cancel")
        assert missing.status_code == 404 and missing.json() == {"status": "NOT_FOUND"}
    assert engine.steps_run[0] < 50  # stopped at a step boundary, long before the end


# -- SSE, proxy, run, CORS -------------------------------------------------------------------------


def test_status_stream_sends_events_and_closes_after_completed(tmp_path):
    with app_client(fakes.slow(0.02), tmp_path) as client:
        rid = submit(client)["request_id"]
        url = f"/fal-ai/kandinsky5/requests/{rid}/status/stream?logs=1"
        with client.stream("GET", url, headers={"accept": "text/event-stream"}) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            text = "".join(response.iter_text())
    assert text.startswith(": keep-alive")
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1]["status"] == "COMPLETED"
    steps = [log["message"] for event in events for log in event["logs"] or []]
    assert steps.count("step 3/3") == 1  # logs are incremental on the stream


def test_proxy_dispatches_on_target_url(tmp_path):
    with app_client(fakes.FakeEngine(), tmp_path) as client:

        def proxy(method, target, **kw):
            headers = {"x-fal-target-url": target, "authorization": "Key x", **kw.pop("headers", {})}
            return client.request(method, "/api/fal/proxy", headers=headers, **kw)

        sub = proxy("POST", f"https://queue.fal.run/{T2V}", json=FAST)
        rid = sub.json()["request_id"]
        wait_until(
            lambda: (
                proxy("GET", f"https://queue.fal.run/fal-ai/kandinsky5/requests/{rid}/status?logs=0").json()["status"]
                == "COMPLETED"
            ),
            what="proxied status",
        )
        res = proxy("GET", f"https://queue.fal.run/fal-ai/kandinsky5/requests/{rid}")
        assert res.status_code == 200 and res.json()["video"]["url"].startswith("http://testserver/files/")

        run = proxy("POST", f"https://fal.run/{T2V}", json=FAST)  # fal.run = synchronous run host
        assert run.status_code == 200 and run.headers["x-fal-request-id"] and "video" in run.json()
        assert proxy("POST", f"https://fal.run/{T2V}", json={"prompt": ""}).status_code == 422

        assert client.post("/api/fal/proxy", json=FAST).status_code == 400
        assert proxy("POST", "https://evil.example.com/x", json=FAST).status_code == 412
        # fal storage is served (tests/api/test_fal_storage.py); other rest.fal.ai paths are not
        assert proxy("POST", "https://rest.fal.ai/storage/upload/initiate", json={}).status_code == 200
        assert proxy("POST", "https://rest.fal.ai/billing/usage", json={}).status_code == 404


def test_cors_preflight_and_exposed_headers(tmp_path):
    with app_client(fakes.FakeEngine(), tmp_path) as client:
        pre = client.options(
            "/api/fal/proxy",
            headers={
                "origin": "http://localhost:3000",
                "access-control-request-method": "POST",
                "access-control-request-headers": "authorization,content-type,x-fal-target-url,x-fal-queue-priority",
            },
        )
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "*"
        assert "x-fal-target-url" in pre.headers["access-control-allow-headers"].lower()
        sub = client.post(f"/{T2V}", json=FAST, headers={"origin": "http://localhost:3000"})
        assert "x-fal-request-id" in sub.headers["access-control-expose-headers"].lower()


# -- images, auth, files, health --------------------------------------------------------------------


def test_image_to_video_accepts_a_data_uri(tmp_path):
    engine = fakes.FakeEngine()
    with app_client(engine, tmp_path) as client:
        rid = submit(client, PRO_I2V, {"prompt": "x", "image_url": png_data_uri(), "num_inference_steps": 2})
        done = wait_done(client, PRO_I2V, rid["request_id"])
        assert "error" not in done, done
    [call], [run] = engine.calls, engine.resolved
    assert call.variant == "kandinsky5-pro-i2v-sft-5s" and run.nominal_size == (768, 512)  # 3:2 image, 512P
    assert not list((tmp_path / "inputs").iterdir())  # the fetched image is removed when the job ends


def test_api_keys_guard_every_api_route_but_not_files_or_health(tmp_path):
    with app_client(fakes.FakeEngine(), tmp_path, api_keys=["s3cret", "other"]) as client:
        denied = client.post(f"/{T2V}", json=FAST)
        assert denied.status_code == 401 and "detail" in denied.json()
        assert client.post(f"/{T2V}", json=FAST, headers={"authorization": "Key wrong"}).status_code == 401
        ok = submit(client, headers={"authorization": "Key s3cret"})
        submit(client, headers={"authorization": "Bearer other"})
        rid = ok["request_id"]
        assert status(client, T2V, rid).status_code == 401
        assert client.put(f"/fal-ai/kandinsky5/requests/{rid}/cancel").status_code == 401
        auth = {"authorization": "Key s3cret"}
        wait_until(lambda: client.get(f"/fal-ai/kandinsky5/requests/{rid}/status", headers=auth).status_code == 200)
        url = client.get(f"/fal-ai/kandinsky5/requests/{rid}", headers=auth).json()["video"]["url"]
        assert client.get(url).status_code == 200  # capability URL: no key needed
        assert client.get("/healthz").status_code == 200
        assert (
            client.post(
                "/api/fal/proxy", headers={"x-fal-target-url": f"https://queue.fal.run/{T2V}"}, json=FAST
            ).status_code
            == 401
        )


def test_no_keys_accepts_any_or_no_credentials(tmp_path):
    with app_client(fakes.FakeEngine(), tmp_path) as client:
        submit(client)
        submit(client, headers={"authorization": "Key anything:at-all"})
        submit(client, headers={"authorization": "Bearer jwt"})


@pytest.mark.parametrize(
    "path",
    [
        "/files/../jobs.sqlite3",
        "/files/%2e%2e/%2e%2e/etc/passwd",
        "/files/short/output.mp4",
        "/files/" + "A" * 32 + "/..%2fjobs.sqlite3",
        "/files/" + "A" * 32 + "/output.mp4",
    ],
)
def test_files_route_rejects_traversal_and_unknown_ids(tmp_path, path):
    with app_client(fakes.FakeEngine(), tmp_path) as client:
        response = client.get(path)
        assert response.status_code in (404, 405) and b"SQLite" not in response.content


def test_readyz_is_503_until_warm_then_reports_the_engine(tmp_path):
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.settings import Settings

    app = create_app(Settings(data_dir=tmp_path), fakes.FakeEngine(warmup_time=0.5))
    with TestClient(app) as client:
        assert client.get("/readyz").status_code == 503
        assert client.get("/healthz").status_code == 200
        ready = wait_until(lambda: client.get("/readyz").status_code == 200 and client.get("/readyz"))
        body = ready.json()
        assert body["demo"] is True and body["device"] == "cpu" and "kandinsky5-tiny-t2v" in body["models"]


def test_failed_warmup_keeps_readyz_503_with_the_reason(tmp_path):
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.settings import Settings

    app = create_app(Settings(data_dir=tmp_path), fakes.FakeEngine(warmup_error=RuntimeError("no device")))
    with TestClient(app) as client:
        body = wait_until(lambda: client.get("/readyz").json().get("detail") and client.get("/readyz").json())
        assert body["status"] == "setup_failed" and "no device" in body["detail"]


def test_status_stream_sends_keep_alive_comments_while_quiet(tmp_path):
    with app_client(fakes.slow(0.8), tmp_path, sse_keepalive=0.2) as client:
        rid = submit(client, body={"prompt": "slow", "num_inference_steps": 2})["request_id"]
        with client.stream("GET", f"/fal-ai/kandinsky5/requests/{rid}/status/stream") as response:
            text = "".join(response.iter_text())
    assert text.count(": keep-alive") >= 3
    assert json.loads(text.strip().splitlines()[-1][6:])["status"] == "COMPLETED"


class MissingWeightsEngine(fakes.FakeEngine):
    """--require-weights with only the Lite distilled checkpoint present."""

    demo = False

    def prepare(self, req):
        from pipelines.errors import WeightsMissing

        if req.variant != "kandinsky5-lite-t2v-distilled-5s":
            raise WeightsMissing(req.variant, f"weights/{req.variant}", ["transformer/"])
        return super().prepare(req)


def test_missing_weights_answer_not_available_with_the_fix(tmp_path):
    with app_client(MissingWeightsEngine(), tmp_path) as client:
        response = client.post(f"/{PRO_T2V}", json={"prompt": "x"})
        assert response.status_code == 404
        assert "k5serve weights download kandinsky5-pro-t2v-sft-5s" in response.json()["detail"]
        assert client.post(f"/{DISTILL}", json={"prompt": "x"}).status_code == 200


def test_approximate_acceleration_is_labelled_in_logs_and_job_list(tmp_path):
    """fal's Pro endpoints default to acceleration "regular" (MagCache, approximate): the job's logs
    and the job list say so; "none" runs exact and says nothing."""
    with app_client(fakes.FakeEngine(), tmp_path) as client:
        fast = submit(client, PRO_T2V, {"prompt": "a fox", "num_inference_steps": 4})["request_id"]
        exact = submit(client, PRO_T2V, {"prompt": "a fox", "num_inference_steps": 4, "acceleration": "none"})
        for rid in (fast, exact["request_id"]):
            wait_done(client, PRO_T2V, rid)
        logs = status(client, PRO_T2V, fast, logs=1).json()["logs"]
        exact_logs = status(client, PRO_T2V, exact["request_id"], logs=1).json()["logs"]
        jobs = {j["id"]: j for j in client.get("/api/jobs").json()["jobs"]}
    labels = [line["message"] for line in logs if "approximate" in line["message"]]
    label = "acceleration regular (approximate): 2 transformer evaluations reused from earlier steps (MagCache)"
    assert labels == [label]
    assert not [line for line in exact_logs if "acceleration" in line["message"]]
    assert jobs[fast]["acceleration"] == "regular" and jobs[exact["request_id"]]["acceleration"] == "none"
