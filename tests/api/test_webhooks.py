"""fal_webhook deliveries (§1.8): one OK per finished job, ERROR for failures, retries with
backoff, and durability across a `kill -9`."""

from __future__ import annotations

import json
import time

import fakes
import httpx
from server_fixtures import app_client, server_process, wait_until

T2V = "fal-ai/kandinsky5/text-to-video"
FAST = {"prompt": "a fox", "num_inference_steps": 2}
QUICK_RETRY = {"webhook_backoff": 0.05, "webhook_max_backoff": 0.2}
LOOPBACK_OK = {"url_allowlist": ["127.0.0.1"]}  # the receiver is on loopback, refused unless allow-listed


def test_ok_and_error_deliveries_with_the_fal_payload(tmp_path, loopback):
    with app_client(fakes.FakeEngine(), tmp_path, **QUICK_RETRY, **LOOPBACK_OK) as client:
        hook = f"{loopback.url}/hook"
        ok = client.post(f"/{T2V}", params={"fal_webhook": hook}, json=FAST).json()["request_id"]
        bad = client.post(f"/{T2V}", params={"fal_webhook": hook}, json={"prompt": ""}).json()["request_id"]
        plain = client.post(f"/{T2V}", json=FAST).json()["request_id"]
        wait_until(lambda: len(loopback.deliveries) >= 2, what="two deliveries")
        result = client.get(f"/fal-ai/kandinsky5/requests/{ok}").json()

    by_id = {d["request_id"]: d for d in loopback.ok_deliveries()}
    assert set(by_id) == {ok, bad} and plain not in by_id
    assert by_id[ok] == {"error": None, "gateway_request_id": ok, "payload": result, "request_id": ok, "status": "OK"}
    assert by_id[bad]["status"] == "ERROR" and by_id[bad]["error"] == "Invalid status code: 422"
    assert by_id[bad]["payload"]["detail"][0]["loc"] == ["body", "prompt"]
    raw = next(d for d in loopback.deliveries if json.loads(d["body"])["request_id"] == ok)
    assert raw["body"] == json.dumps(by_id[ok], sort_keys=True).encode()  # fal: sorted-keys json.dumps
    assert raw["headers"]["content-type"] == "application/json"
    assert raw["headers"]["x-fal-webhook-request-id"] == ok and raw["headers"]["x-fal-webhook-timestamp"]


def test_failed_deliveries_are_retried_with_backoff(tmp_path, loopback):
    loopback.failures = 3
    with app_client(fakes.FakeEngine(), tmp_path, **QUICK_RETRY, **LOOPBACK_OK) as client:
        rid = client.post(f"/{T2V}", params={"fal_webhook": f"{loopback.url}/hook"}, json=FAST).json()["request_id"]
        wait_until(lambda: loopback.ok_deliveries(), timeout=10, what="a successful delivery")
        services = client.app.state.services
        # the receiver answers 200 before the dispatcher records it: a loaded machine once read "pending" here
        wait_until(lambda: services.store.webhook(rid).state == "delivered", timeout=10, what="delivery recorded")
        delivery = services.store.webhook(rid)
    assert [d["answered"] for d in loopback.deliveries] == [500, 500, 500, 200]
    assert delivery.state == "delivered" and delivery.attempts == 4


def test_webhooks_never_block_the_worker(tmp_path, loopback):
    """A receiver that takes its time must not delay the next job."""
    loopback.delay = 3.0
    with app_client(fakes.FakeEngine(), tmp_path, webhook_timeout=10, **LOOPBACK_OK) as client:
        first = client.post(f"/{T2V}", params={"fal_webhook": f"{loopback.url}/hook"}, json=FAST).json()
        wait_until(lambda: client.get(f"/fal-ai/kandinsky5/requests/{first['request_id']}/status").status_code == 200)
        t0 = time.monotonic()
        second = client.post(f"/{T2V}", json=FAST).json()["request_id"]
        wait_until(lambda: client.get(f"/fal-ai/kandinsky5/requests/{second}/status").status_code == 200)
        assert time.monotonic() - t0 < 1.5  # while the first delivery is still waiting on the receiver
        assert not loopback.deliveries or loopback.deliveries[0]["body"]


def test_bad_webhook_url_is_rejected_at_submit(tmp_path):
    with app_client(fakes.FakeEngine(), tmp_path) as client:
        response = client.post(f"/{T2V}", params={"fal_webhook": "not a url"}, json=FAST)
        assert response.status_code == 422  # fal's validation error, at submit (more in test_netguard.py)
        [item] = response.json()["detail"]
        assert item["loc"] == ["query", "fal_webhook"] and "http(s)" in item["msg"]


def test_exactly_one_delivery_per_job_across_a_kill_9(tmp_path, loopback):
    server = server_process(
        tmp_path,
        fake=True,
        run_port=False,
        extra=["--max-queue", "10"],
        env={
            "K5SERVE_FAKE_STEP_TIME": "0.1",
            "K5SERVE_WEBHOOK_BACKOFF": "0.1",
            "K5SERVE_WEBHOOK_MAX_BACKOFF": "0.3",
            "K5SERVE_URL_ALLOWLIST": "127.0.0.1",
        },
    )
    hook = f"{loopback.url}/hook"
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=10) as client:

            def submit(steps):
                body = {"prompt": f"job {steps}", "num_inference_steps": steps}
                return client.post(f"/{T2V}", params={"fal_webhook": hook}, json=body).json()["request_id"]

            def state(rid):
                return client.get(f"/fal-ai/kandinsky5/requests/{rid}/status").json()["status"]

            done = submit(1)
            wait_until(lambda: loopback.ok_deliveries(), what="first delivery")
            loopback.failures = 1000  # the receiver goes down: the next delivery stays pending
            pending = submit(2)
            wait_until(lambda: state(pending) == "COMPLETED", what="second job")
            wait_until(lambda: len(loopback.deliveries) >= 2, what="a failed attempt")
            running = submit(30)
            queued = submit(1)
            wait_until(lambda: state(running) == "IN_PROGRESS", what="running job")
        server.kill9()
        loopback.failures = 0  # the receiver is back

        server.start()
        ids = [done, pending, running, queued]
        wait_until(
            lambda: {d["request_id"] for d in loopback.ok_deliveries()} == set(ids),
            timeout=30,
            what="every job delivered",
        )
        time.sleep(1.0)  # nothing more may arrive
        delivered = [d["request_id"] for d in loopback.ok_deliveries()]
        assert sorted(delivered) == sorted(ids), delivered  # exactly one OK each
        assert all(d["status"] == "OK" for d in loopback.ok_deliveries())
    finally:
        server.stop()
