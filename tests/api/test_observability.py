"""/metrics (Prometheus text) and the JSON log lines of `k5serve serve`."""

from __future__ import annotations

import json
import logging

from fakes import FakeEngine
from prometheus_client.parser import text_string_to_metric_families
from server_fixtures import app_client, server_process, wait_until

from server.logs import JsonFormatter

T2V = "/fal-ai/kandinsky5/text-to-video/distill"


def samples(client) -> dict[tuple, float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    found = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            found[(s.name, *sorted(s.labels.items()))] = s.value
    return found


def run_fal_job(client) -> str:
    job_id = client.post(T2V, json={"prompt": "a fox"}).json()["request_id"]
    url = f"/fal-ai/kandinsky5/requests/{job_id}/status"
    wait_until(lambda: client.get(url).json()["status"] == "COMPLETED", what="job done")
    return job_id


def test_metrics_count_jobs_and_time_them(tmp_path):
    with app_client(FakeEngine(step_time=0.01), tmp_path) as client:
        before = samples(client)
        assert before[("k5serve_queue_depth",)] == 0
        assert ("k5serve_gpu_memory_bytes",) not in before  # the fake, like the CPU, cannot say: no sample
        assert not any(key[0] == "k5serve_jobs" for key in before)
        run_fal_job(client)
        after = samples(client)
    assert after[("k5serve_jobs", ("contract", "fal"), ("status", "succeeded"))] == 1
    assert after[("k5serve_jobs_finished_total", ("contract", "fal"), ("status", "succeeded"))] == 1
    generation = {k: v for k, v in after.items() if k[0] == "k5serve_generation_seconds_count"}
    assert list(generation.values()) == [1]
    (variant,) = [dict(k[1:])["variant"] for k in generation]
    steps = after[("k5serve_step_seconds_count", ("variant", variant))]
    assert steps >= 1


def test_decode_chunks_are_not_timed_as_steps(tmp_path):
    """The decode's progress reports come through the same event as steps: only steps are steps."""
    engine = FakeEngine(step_time=0.01, decode_chunks=3, decode_time=0.01)
    with app_client(engine, tmp_path) as client:
        job_id = client.post(T2V, json={"prompt": "a fox"}).json()["request_id"]
        url = f"/fal-ai/kandinsky5/requests/{job_id}/status"
        wait_until(lambda: client.get(url).json()["status"] == "COMPLETED", what="job done")
        after = samples(client)
    assert engine.chunks_run == [3] and engine.steps_run[0] > 1
    counts = [v for k, v in after.items() if k[0] == "k5serve_step_seconds_count"]
    assert counts == [engine.steps_run[0]]  # not + the 5 decode and write reports


def test_metrics_count_queued_and_failed_jobs(tmp_path):
    engine = FakeEngine(fail=RuntimeError("boom"))
    with app_client(engine, tmp_path) as client:
        run_fal_job(client)
        found = samples(client)
    assert found[("k5serve_jobs_finished_total", ("contract", "fal"), ("status", "failed"))] == 1
    assert not any(k[0] == "k5serve_generation_seconds_count" for k in found)


def test_gpu_memory_comes_from_the_engine(tmp_path):
    engine = FakeEngine(memory_bytes=123456789)
    with app_client(engine, tmp_path) as client:
        assert samples(client)[("k5serve_gpu_memory_bytes",)] == 123456789


def test_each_app_has_its_own_registry(tmp_path):
    with app_client(FakeEngine(), tmp_path / "a") as a, app_client(FakeEngine(), tmp_path / "b") as b:
        run_fal_job(a)
        assert ("k5serve_jobs", ("contract", "fal"), ("status", "succeeded")) in samples(a)
        assert not any(k[0] == "k5serve_jobs" for k in samples(b))


def test_json_formatter_keeps_extras_and_tracebacks():
    record = logging.LogRecord("k5serve.x", logging.ERROR, __file__, 1, "job %s failed", ("abc",), None)
    record.job_id = "abc"
    try:
        raise ValueError("bad")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    assert "\n" not in line
    body = json.loads(line)
    assert body["message"] == "job abc failed" and body["job_id"] == "abc" and body["level"] == "ERROR"
    assert "ValueError: bad" in body["exc_info"]


def test_serve_logs_one_json_line_per_job_state_change(tmp_path):
    server = server_process(tmp_path, fake=True, run_port=False)
    server.start()
    try:
        with server.client() as client:
            job_id = run_fal_job(client)
    finally:
        server.stop()
    lines = server.log_path.read_text().splitlines()
    objects = [json.loads(line) for line in lines if line.startswith("{")]
    changes = [(o["previous"], o["status"]) for o in objects if o.get("job_id") == job_id and "previous" in o]
    assert changes == [("new", "queued"), ("queued", "running"), ("running", "succeeded")]
    assert all(o["contract"] == "fal" for o in objects if o.get("job_id") == job_id)
    # uvicorn's access log stays plain text
    access = [line for line in lines if f"/requests/{job_id}/status" in line and not line.startswith("{")]
    assert access and '" 200' in access[-1]


def test_deleting_a_running_job_leaves_no_step_timings_behind(tmp_path):
    """A job deleted mid-run sends no terminal event: the metrics drop its per-job step timings anyway."""
    engine = FakeEngine(step_time=0.05)
    with app_client(engine, tmp_path) as client:
        metrics = client.app.state.metrics
        vid = client.post("/v1/videos", json={"prompt": "a fox", "num_inference_steps": 50}).json()["id"]
        wait_until(lambda: metrics._steps.get(vid), what="a few steps timed")
        assert client.delete(f"/v1/videos/{vid}").status_code == 200
        wait_until(lambda: engine.steps_run, what="the worker to stop the deleted job")
        run_fal_job(client)  # the worker goes on
        assert metrics._steps == {} and metrics._last_step == {}
    assert engine.steps_run[0] < 50


# what a real engine holds after two variants shared their text encoder (tests/pipelines/test_residency.py)
HELD = {
    "variants": ["kandinsky5-lite-t2v-distilled-5s", "kandinsky5-lite-t2v-sft-5s"],
    "resident": [
        {"component": "transformer", "id": "sha256:aa", "bytes": 4000, "variants": ["kandinsky5-lite-t2v-sft-5s"]},
        {
            "component": "text_encoder",
            "id": "sha256:bb",
            "bytes": 16000,
            "variants": ["kandinsky5-lite-t2v-distilled-5s", "kandinsky5-lite-t2v-sft-5s"],
        },
    ],
    "counters": {"loads": 5, "evictions": 1, "drops": 0, "swaps": 1, "swap_seconds": 0.25},
    "memory_in_use": None,
}


class HoldingEngine(FakeEngine):
    """A fake that reports HELD as what it holds."""

    def describe(self) -> dict:
        return HELD


def test_metrics_and_readyz_show_what_the_engine_holds(tmp_path):
    with app_client(HoldingEngine(), tmp_path) as client:
        found = samples(client)
        wait_until(lambda: client.get("/readyz").status_code == 200, what="ready")
        ready = client.get("/readyz").json()
    (worker,) = ready["workers"]  # per worker: what its engine holds
    assert worker["resident"] == HELD["resident"]
    w = ("worker", worker["id"])
    assert found[("k5serve_component_loads_total", w)] == 5
    assert found[("k5serve_component_evictions_total", w)] == 1
    assert found[("k5serve_component_swap_seconds_total", w)] == 0.25
    assert found[("k5serve_resident_bytes", ("component", "transformer"), w)] == 4000
    assert found[("k5serve_resident_bytes", ("component", "text_encoder"), w)] == 16000


def test_an_engine_that_counts_nothing_has_no_residency_samples(tmp_path):
    with app_client(FakeEngine(), tmp_path) as client:
        found = samples(client)
        assert [w["resident"] for w in client.get("/readyz").json()["workers"]] == [[]]
    assert not any(key[0].startswith(("k5serve_component_", "k5serve_resident_")) for key in found)
