"""Fault injection at the server layer: a failing job fails alone, in each contract's own shape.

Engine faults (out of memory, an engine exception, a failed or full disk while writing the video)
fail only that job and the next one runs; an unrecoverable device error or a failed warm-up makes
/readyz 503 with the reason, keeps queued jobs queued and refuses new ones with each contract's
503; a job store that cannot write answers 503 at submit and loses nothing; retention expires
records and files together. Fakes stand in for the engine (the layer below); everything from HTTP
down to SQLite and the data dir is real.
"""

from __future__ import annotations

import errno
import subprocess
import sys
import threading
import types
from dataclasses import dataclass

import httpx
import pytest
from fakes import FakeEngine
from fastapi import FastAPI
from fastapi.testclient import TestClient
from server_fixtures import ROOT, app_client, server_process, wait_until

from pipelines.errors import DeviceFailure, OutOfMemory
from pipelines.request import GenerationRequest
from server.app import create_app
from server.events import Succeeded
from server.jobs import JobOutput, JobStatus
from server.manager import JobManager
from server.retention import expire
from server.settings import Settings
from server.storage import Storage, files_router
from server.store import JobStore, WebhookBody

T2V = "/fal-ai/kandinsky5/text-to-video"
OUT = JobOutput("output.mp4", "video/mp4", 5, 64, 64, 5, 24, 1, 7, "kandinsky5-tiny-t2v", True)
CONTRACTS = ["fal", "aimlapi", "onerouter", "openai"]


# -- one job through each contract: (job id, what the client saw at the end) ------------------------


@dataclass
class Ending:
    job_id: str
    ok: bool
    body: dict  # the failure as the contract words it (or the success body)
    status: int = 200  # HTTP status of the answer that carries the result
    headers: httpx.Headers | None = None
    url: str | None = None  # the video's URL on success


def fal_job(client, prompt: str, steps: int = 2) -> Ending:
    rid = client.post(T2V, json={"prompt": prompt, "num_inference_steps": steps}).json()["request_id"]
    status_url = f"/fal-ai/kandinsky5/requests/{rid}/status"
    wait_until(lambda: client.get(status_url).json()["status"] == "COMPLETED", what="fal job")
    status = client.get(status_url).json()
    result = client.get(f"/fal-ai/kandinsky5/requests/{rid}")
    if result.status_code == 200:
        return Ending(rid, True, result.json(), url=result.json()["video"]["url"])
    assert status["error_type"] == result.json()["error_type"]  # status and result tell one story
    return Ending(rid, False, result.json(), result.status_code, result.headers)


def aimlapi_job(client, prompt: str, steps: int = 2) -> Ending:
    body = {"model": "sber-ai/kandinsky5-t2v", "prompt": prompt, "num_inference_steps": steps}
    created = client.post("/v2/video/generations", json=body)
    assert created.status_code == 201, created.text
    gid = created.json()["id"]

    def poll() -> dict:
        return client.get("/v2/video/generations", params={"generation_id": gid}).json()

    wait_until(lambda: poll()["status"] in ("completed", "error"), what="AI/ML API job")
    final = poll()
    ok = final["status"] == "completed"
    return Ending(gid.split(":")[0], ok, final, url=final["video"]["url"] if ok else None)


def onerouter_job(client, prompt: str, steps: int = 2) -> Ending:
    before = {j.id for j in client.app.state.services.manager.list(contract="onerouter")}
    body = {"model": "kandinsky5-text-to-video", "prompt": prompt, "num_inference_steps": steps}
    response = client.post("/v1/videos/generations", json=body)
    (job,) = [j for j in client.app.state.services.manager.list(contract="onerouter") if j.id not in before]
    ok = response.status_code == 200
    url = response.json()["data"][0]["url"] if ok else None
    return Ending(job.id, ok, response.json(), response.status_code, url=url)


def openai_job(client, prompt: str, steps: int = 2) -> Ending:
    created = client.post("/v1/videos", json={"prompt": prompt, "num_inference_steps": steps})
    assert created.status_code == 200, created.text
    vid = created.json()["id"]
    wait_until(lambda: client.get(f"/v1/videos/{vid}").json()["status"] in ("completed", "failed"), what="video")
    final = client.get(f"/v1/videos/{vid}").json()
    ok = final["status"] == "completed"
    return Ending(vid, ok, final, url=f"/v1/videos/{vid}/content" if ok else None)


RUN = {"fal": fal_job, "aimlapi": aimlapi_job, "onerouter": onerouter_job, "openai": openai_job}


def assert_failure(contract: str, ending: Ending, kind: str, text: str) -> None:
    """The failed job's error in the contract's own words (see each module's error table)."""
    assert not ending.ok
    if contract == "fal":
        error_type = {"out_of_memory": "runner_server_error", "internal": "internal_error"}[kind]
        assert ending.status == 500 and ending.headers["x-fal-error-type"] == error_type
        assert ending.body == {"detail": ending.body["detail"], "error_type": error_type}
        message = ending.body["detail"]
    elif contract == "aimlapi":
        name = {"out_of_memory": "OutOfMemoryError", "internal": "GenerationError"}[kind]
        assert ending.body["status"] == "error" and ending.body["video"] is None
        assert set(ending.body["error"]) == {"name", "message"} and ending.body["error"]["name"] == name
        message = ending.body["error"]["message"]
    elif contract == "onerouter":
        assert ending.status == 502
        assert ending.body["error"]["code"] == 502 and ending.body["error"]["type"] == "model_error"
        message = ending.body["error"]["message"]
    else:
        code = {"out_of_memory": "out_of_memory", "internal": "internal_error"}[kind]
        assert ending.body["status"] == "failed" and ending.body["error"]["code"] == code
        message = ending.body["error"]["message"]
    assert text in message, message


# -- engine faults ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    name: str
    kind: str  # ErrorKind value the job fails with
    text: str  # what the client's message must say
    hidden: str | None  # what it must not say (internals, paths)

    def engine(self) -> FakeEngine:
        exc = {
            "oom": OutOfMemory("out of GPU memory at 1280x768, 241 frames on cuda:0; try a smaller size"),
            "exception": RuntimeError("boom at /srv/secret/module.py"),
            "disk full": OSError(errno.ENOSPC, "No space left on device", "/srv/secret/data/files/x/output.mp4.part"),
            "disk error": OSError(errno.EIO, "Input/output error", "/srv/secret/data/files/x/output.mp4.part"),
        }[self.name]
        if isinstance(exc, OSError):  # raised half-way through writing the video
            return FakeEngine(write_error=exc, fail_times=1)
        return FakeEngine(fail=exc, fail_at_step=1, fail_times=1)


FAULTS = [
    Fault("oom", "out_of_memory", "out of GPU memory at 1280x768, 241 frames", None),
    Fault("exception", "internal", "generation failed (RuntimeError)", "/srv/secret"),
    Fault("disk full", "internal", "could not write the video: no space left", "/srv/secret"),
    Fault("disk error", "internal", "could not write the video: a disk I/O error", "/srv/secret"),
]


@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.name)
@pytest.mark.parametrize("contract", CONTRACTS)
def test_a_failing_job_fails_alone_and_the_next_one_runs(tmp_path, contract, fault):
    engine = fault.engine()
    with app_client(engine, tmp_path) as client:
        services = client.app.state.services
        failed = RUN[contract](client, "first")
        assert_failure(contract, failed, fault.kind, fault.text)
        assert fault.hidden is None or fault.hidden not in str(failed.body)
        # nothing of the failed run is left to serve: no output folder, no *.part
        job = services.manager.get(failed.job_id)
        assert job.status is JobStatus.FAILED and not (services.storage.files / job.file_id).exists()

        ready = client.get("/readyz")
        assert ready.status_code == 200  # a job's failure is not the server's
        last = ready.json()["last_error"]
        assert (last["job_id"], last["kind"], last["contract"]) == (failed.job_id, fault.kind, contract)
        assert fault.text in last["message"] and last["time"].endswith("Z")

        second = RUN[contract](client, "second")
        assert second.ok, second.body
        download = client.get(second.url)
        assert download.status_code == 200 and download.content[4:8] == b"ftyp"
    assert len(engine.calls) == 2


def test_readyz_has_no_last_error_until_a_job_fails_and_keeps_it_across_a_restart(tmp_path):
    with app_client(FakeEngine(), tmp_path) as client:
        body = client.get("/readyz").json()
        assert body["last_error"] is None and {"status", "demo", "device", "models", "queued"} <= set(body)
        fal_job(client, "fine")
        # input rejected at the edge is the client's error, not the server's
        client.post(T2V, json={"prompt": ""})
        assert client.get("/readyz").json()["last_error"] is None
    with app_client(FakeEngine(fail=RuntimeError("x"), fail_times=1), tmp_path) as client:
        failed = fal_job(client, "bad")
    with app_client(FakeEngine(), tmp_path) as client:
        last = client.get("/readyz").json()["last_error"]
        assert last["job_id"] == failed.job_id and last["kind"] == "internal"


def test_the_worker_empties_the_cuda_cache_after_an_oom(tmp_path, monkeypatch):
    """torch is the layer below: a stand-in module records what the worker asks of torch.cuda."""
    emptied = []
    cuda = types.SimpleNamespace(is_available=lambda: True, empty_cache=lambda: emptied.append(True))
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    with app_client(FakeEngine(fail=OutOfMemory("out of GPU memory"), fail_times=1), tmp_path) as client:
        assert not fal_job(client, "too big").ok
        assert emptied, "torch.cuda.empty_cache() was not called after the OOM"
        count = len(emptied)
        assert fal_job(client, "fits").ok
        assert len(emptied) == count  # a successful job leaves the cache alone


def test_the_server_never_imports_torch_itself(tmp_path):
    """Freeing memory after a failure must not pull torch in (a fresh process: this one may have it)."""
    script = f"""
import sys
sys.path[:0] = [{str(ROOT / "tests")!r}, {str(ROOT / "tests" / "api")!r}, {str(ROOT)!r}]
from fakes import FakeEngine
from pipelines.errors import OutOfMemory
from server_fixtures import app_client
from test_faults import fal_job
with app_client(FakeEngine(fail=OutOfMemory("oom")), {str(tmp_path)!r}) as client:
    assert not fal_job(client, "x").ok
assert "torch" not in sys.modules, "torch was imported"
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


# -- the server cannot run jobs: 503 at submit, queued jobs wait ---------------------------------------


def submit(client, contract: str, prompt: str = "x") -> httpx.Response:
    if contract == "fal":
        return client.post(T2V, json={"prompt": prompt, "num_inference_steps": 2})
    if contract == "aimlapi":
        body = {"model": "sber-ai/kandinsky5-t2v", "prompt": prompt, "num_inference_steps": 2}
        return client.post("/v2/video/generations", json=body)
    if contract == "onerouter":
        body = {"model": "kandinsky5-text-to-video", "prompt": prompt, "num_inference_steps": 2}
        return client.post("/v1/videos/generations", json=body)
    return client.post("/v1/videos", json={"prompt": prompt, "num_inference_steps": 2})


def assert_unavailable(contract: str, response: httpx.Response, text: str) -> None:
    """503 in the contract's own error shape, saying why."""
    assert response.status_code == 503, response.text
    body = response.json()
    if contract == "fal":
        assert body == {"detail": body["detail"], "error_type": "runner_scheduling_failure"}
        assert response.headers["x-fal-error-type"] == "runner_scheduling_failure"
        message = body["detail"]
    elif contract == "aimlapi":
        assert set(body) == {"requestId", "statusCode", "timestamp", "path", "message"} and body["statusCode"] == 503
        assert body["message"].startswith("Service unavailable: ")
        message = body["message"]
    elif contract == "onerouter":
        assert body["error"]["code"] == 503 and body["error"]["type"] == "service_unavailable"
        message = body["error"]["message"]
    else:
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert (body["error"]["type"], body["error"]["code"]) == ("server_error", "service_unavailable")
        message = body["error"]["message"]
    assert text in message, message


class Gated(FakeEngine):
    """Holds each run at its start until `gate` opens, so a test can queue work behind it."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.entered = threading.Event()
        self.gate = threading.Event()

    def generate(self, req, output, **kwargs):
        self.entered.set()
        assert self.gate.wait(10)
        return super().generate(req, output, **kwargs)


def test_an_unrecoverable_device_error_stops_the_server_not_the_queue(tmp_path):
    cuda_error = "unrecoverable device error on cuda:0: CUDA error: an illegal memory access was encountered"
    engine = Gated(fail=DeviceFailure(cuda_error), fail_times=1)
    with app_client(engine, tmp_path) as client:
        services = client.app.state.services
        first = submit(client, "fal").json()["request_id"]
        assert engine.entered.wait(10)
        waiting = [submit(client, "fal").json()["request_id"], submit(client, "openai").json()["id"]]
        engine.gate.set()
        wait_until(lambda: client.get("/readyz").status_code == 503, what="/readyz to go 503")

        ready = client.get("/readyz").json()
        assert ready["status"] == "defunct" and "illegal memory access" in ready["detail"]
        assert ready["queued"] == 2
        assert ready["last_error"]["job_id"] == first and ready["last_error"]["kind"] == "device_failure"
        assert client.get("/healthz").status_code == 200  # alive: a supervisor restarts it, not kills it

        result = client.get(f"/fal-ai/kandinsky5/requests/{first}")
        assert result.status_code == 500 and "illegal memory access" in result.json()["detail"]
        for job_id in waiting:  # queued jobs are not failed: they wait for the restart
            assert services.manager.get(job_id).status is JobStatus.QUEUED
        fal_status = client.get(f"/fal-ai/kandinsky5/requests/{waiting[0]}/status").json()
        assert fal_status["status"] == "IN_QUEUE" and fal_status["queue_position"] == 0
        for contract in CONTRACTS:
            assert_unavailable(contract, submit(client, contract), "restart k5serve")
        # bad input is still the client's error, not a 503
        assert client.post("/v1/videos", json={"prompt": ""}).status_code == 400
        assert services.manager.queued_count() == 2 and len(engine.calls) == 1

    with app_client(FakeEngine(), tmp_path) as client:  # the restart runs what was waiting
        assert fal_job_status(client, waiting[0]) == "COMPLETED"
        wait_until(lambda: client.get(f"/v1/videos/{waiting[1]}").json()["status"] == "completed", what="video")


def fal_job_status(client, rid: str) -> str:
    url = f"/fal-ai/kandinsky5/requests/{rid}/status"
    wait_until(lambda: client.get(url).json()["status"] == "COMPLETED", what=f"{rid} to complete")
    return client.get(url).json()["status"]


def test_a_failed_warmup_is_not_ready_and_refuses_jobs(tmp_path):
    app = create_app(Settings(data_dir=tmp_path), FakeEngine(warmup_error=RuntimeError("CUDA driver too old")))
    with TestClient(app) as client:
        wait_until(lambda: client.get("/readyz").json()["status"] == "setup_failed", what="setup_failed")
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "warm-up failed: CUDA driver too old" in ready.json()["detail"]
        assert client.get("/healthz").status_code == 200
        for contract in CONTRACTS:
            assert_unavailable(contract, submit(client, contract), "CUDA driver too old")


# -- the job store cannot write -------------------------------------------------------------------------


@pytest.mark.parametrize("contract", CONTRACTS)
def test_a_full_job_store_answers_503_and_loses_nothing(tmp_path, contract):
    """A real SQLITE_FULL: the database may not grow by another page (PRAGMA max_page_count)."""
    with app_client(FakeEngine(), tmp_path) as client:
        services = client.app.state.services
        earlier = fal_job(client, "kept")
        db = services.store._db
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count = {pages}")
        try:
            before = [j.id for j in services.manager.list()]
            response = submit(client, contract, prompt="a long prompt " * 280)  # a row that needs a new page
            assert_unavailable(contract, response, "database or disk is full")
            assert [j.id for j in services.manager.list()] == before and services.manager.queued_count() == 0
        finally:
            db.execute("PRAGMA max_page_count = 1073741823")
        assert client.get(earlier.url).status_code == 200  # what was stored is intact
        assert RUN[contract](client, "after").ok
        assert services.store.integrity() == "ok"


# -- the output write fails for real ----------------------------------------------------------------------


@pytest.mark.slow
def test_a_real_efbig_fails_the_job_cleanly_and_the_next_one_runs(tmp_path):
    """The child server may not write files over 2 MiB (RLIMIT_FSIZE, SIGXFSZ ignored): an 8 MiB
    video fails with a real EFBIG half-way through its write."""
    env = {
        "K5SERVE_FAKE_FSIZE_LIMIT": str(2 << 20),
        "K5SERVE_FAKE_BIG_BYTES": str(8 << 20),
        "K5SERVE_FAKE_BIG_CALLS": "1",  # the first job only
        "K5SERVE_FAKE_STEP_TIME": "0.01",
    }
    server = server_process(tmp_path, fake=True, run_port=False, env=env)
    server.start()
    try:
        with server.client() as client:
            rid = client.post(T2V, json={"prompt": "a long take", "num_inference_steps": 2}).json()["request_id"]
            status_url = f"/fal-ai/kandinsky5/requests/{rid}/status"
            wait_until(lambda: client.get(status_url).json()["status"] == "COMPLETED", what="the big job")
            result = client.get(f"/fal-ai/kandinsky5/requests/{rid}")
            assert result.status_code == 500 and result.json()["error_type"] == "internal_error"
            assert "the file is larger than the server allows" in result.json()["detail"]
            files = tmp_path / "data" / "files"
            assert list(files.iterdir()) == []  # not even the half-written .part

            ok = fal_job(client, "a short take")
            assert ok.ok and client.get(ok.url).content[4:8] == b"ftyp"
            assert client.get("/readyz").json()["last_error"]["job_id"] == rid
    finally:
        server.stop()


def test_part_files_are_never_served(tmp_path):
    storage = Storage(tmp_path)
    path = storage.output_path("A" * 32, "output.mp4.part")
    path.write_bytes(b"half a video")
    assert storage.find("A" * 32, "output.mp4.part") is None
    (path.parent / "output.mp4").write_bytes(b"a whole video")
    assert storage.find("A" * 32, "output.mp4") is not None


# -- retention and delete ---------------------------------------------------------------------------------


def test_retention_expires_records_and_files_together(tmp_path):
    """retention_hours=0.001 (3.6 s): each finished job disappears from every route, and at no
    moment is its file gone while its record still says completed."""
    with app_client(FakeEngine(), tmp_path, retention_hours=0.001) as client:
        services = client.app.state.services
        endings, file_ids = {}, {}
        for contract in CONTRACTS:
            endings[contract] = RUN[contract](client, f"kept briefly {contract}")
            file_ids[contract] = services.manager.get(endings[contract].job_id).file_id
        fal = endings["fal"]

        def gone() -> bool:
            for ending in endings.values():
                file_status = client.get(ending.url).status_code
                if file_status == 404:  # file gone => record gone (record first, then file)
                    assert services.store.get(ending.job_id) is None
                if services.manager.get(ending.job_id) is not None or file_status != 404:
                    return False
            return True

        wait_until(gone, timeout=20, interval=0.05, what="every job to expire")
        assert client.get(f"/fal-ai/kandinsky5/requests/{fal.job_id}").status_code == 404
        assert client.get(f"/fal-ai/kandinsky5/requests/{fal.job_id}/status").status_code == 404
        assert client.put(f"/fal-ai/kandinsky5/requests/{fal.job_id}/cancel").json() == {"status": "NOT_FOUND"}
        gid = endings["aimlapi"].job_id
        assert client.get("/v2/video/generations", params={"generation_id": gid}).status_code == 404
        oai = client.get(f"/v1/videos/{endings['openai'].job_id}")
        assert oai.status_code == 404 and oai.json()["error"]["code"] == "not_found"
        for file_id in file_ids.values():
            assert not (services.storage.files / file_id).exists()
        assert services.store.integrity() == "ok"


def test_retention_keeps_unfinished_jobs_and_pending_webhooks(tmp_path):
    now = [1000.0]
    storage = Storage(tmp_path)
    webhook = lambda job: WebhookBody(job.webhook_url, b"{}", {}) if job.webhook_url else None  # noqa: E731
    manager = JobManager(JobStore(storage.database), storage, clock=lambda: now[0], webhook_body=webhook)
    req = GenerationRequest(variant="kandinsky5-tiny-t2v", prompt="x", steps=1)
    done = manager.submit(contract="fal", model="m", request=req)
    hooked = manager.submit(contract="fal", model="m", request=req, webhook_url="http://127.0.0.1:9/hook")
    waiting = manager.submit(contract="fal", model="m", request=req)
    for job in (done, hooked):
        manager.cancel(job.id)
    now[0] += 7200
    assert expire(manager, manager.store, older_than=now[0] - 3600) == [done.id]
    assert manager.get(hooked.id) is not None and manager.get(waiting.id) is not None  # webhook pending; queued
    delivery = manager.store.webhook(hooked.id)
    manager.store.webhook_attempted(delivery.id, state="delivered", next_at=now[0], error=None)
    assert expire(manager, manager.store, older_than=now[0] - 3600) == [hooked.id]
    assert manager.store.webhook(hooked.id) is None and manager.queued_count() == 1


def test_a_crash_between_record_and_file_leaves_no_dead_url(tmp_path):
    """Delete order is record, then file: a crash in between leaves an orphan folder, which the next
    start-up sweeps; the reverse (a record whose file is gone) cannot happen."""
    with app_client(FakeEngine(), tmp_path) as client:
        services = client.app.state.services
        ending = fal_job(client, "x")
        file_id = services.manager.get(ending.job_id).file_id
        services.store.delete(ending.job_id)  # the crash: the record is gone, the file is not yet
    assert (tmp_path / "files" / file_id).exists()
    with app_client(FakeEngine(), tmp_path) as client:
        assert client.get(f"/fal-ai/kandinsky5/requests/{ending.job_id}").status_code == 404
        assert client.get(ending.url).status_code == 404
    assert not (tmp_path / "files" / file_id).exists()


def test_openai_delete_removes_the_record_and_the_file_for_good(tmp_path):
    engine = Gated()
    with app_client(engine, tmp_path) as client:
        services = client.app.state.services
        engine.gate.set()
        finished = openai_job(client, "finished")
        file_id = services.manager.get(finished.job_id).file_id
        engine.gate.clear()
        engine.entered.clear()
        running = client.post("/v1/videos", json={"prompt": "running", "num_inference_steps": 2}).json()["id"]
        assert engine.entered.wait(10)
        queued = client.post("/v1/videos", json={"prompt": "queued", "num_inference_steps": 2}).json()["id"]

        for vid in (finished.job_id, queued):
            deleted = client.delete(f"/v1/videos/{vid}")
            assert deleted.json() == {"id": vid, "object": "video.deleted", "deleted": True}
            assert client.delete(f"/v1/videos/{vid}").status_code == 404  # already deleted
            assert services.store.get(vid) is None
        assert services.manager.queued_count() == 0  # the queued one left the queue at once
        assert not (services.storage.files / file_id).exists()
        assert client.get(finished.url).status_code == 404
        ids = [v["id"] for v in client.get("/v1/videos").json()["data"]]
        assert ids == [running]
        engine.gate.set()
        wait_until(lambda: services.manager.get(running).status.terminal, what="the running one")
    assert [r.prompt for r in engine.calls] == ["finished", "running"]  # the queued one never ran
    with app_client(FakeEngine(), tmp_path) as client:  # deleted for good, across a restart
        assert client.get(f"/v1/videos/{finished.job_id}").status_code == 404
        assert [v["id"] for v in client.get("/v1/videos").json()["data"]] == [running]
    assert sorted(p.name for p in (tmp_path / "files").iterdir()) == [services.manager.get(running).file_id]


def test_start_up_sweeps_partial_files_orphans_and_unfinished_outputs(tmp_path):
    """What a kill -9 can leave in the data dir: a half-written `*.part` next to a finished video, an
    output folder no record names, a folder of a job that was running, an input of a finished job."""
    storage = Storage(tmp_path)
    manager = JobManager(JobStore(storage.database), storage)
    req = GenerationRequest(variant="kandinsky5-tiny-t2v", prompt="x", steps=1)
    finished = manager.submit(contract="fal", model="m", request=req)
    running = manager.submit(contract="fal", model="m", request=req)
    waiting = manager.submit(contract="fal", model="m", request=req)
    manager.next_job(threading.Event())
    storage.output_path(finished.file_id).write_bytes(b"whole")
    manager.handle(Succeeded(finished.id, OUT))
    manager.next_job(threading.Event())
    storage.output_path(running.file_id, "output.mp4.part").write_bytes(b"half")
    (storage.files / finished.file_id / ".output.x1y2.mp4.part").write_bytes(b"half")  # the real engine's name
    storage.output_path("O" * 32).write_bytes(b"orphan")
    storage.input_path(waiting.id, ".png").write_bytes(b"image")
    storage.input_path(finished.id, ".png").write_bytes(b"image")
    manager.store.close()

    again = JobManager(JobStore(storage.database), storage)
    assert again.recover() == {"requeued": 1, "queued": 2, "succeeded": 1}
    assert sorted(p.name for p in storage.files.iterdir()) == [finished.file_id]
    assert [p.name for p in (storage.files / finished.file_id).iterdir()] == ["output.mp4"]
    assert [p.name for p in storage.inputs.iterdir()] == [f"{waiting.id}.png"]
    assert [again.queue_position(j.id) for j in (running, waiting)] == [0, 1]


def test_a_store_that_cannot_record_a_finished_run_fails_it_in_memory_and_reruns_it_later(tmp_path):
    """The end of a run cannot be written (a real SQLite error: the connection turned read-only).
    Clients are told it failed rather than left waiting; the worker goes on; on disk the job is
    still RUNNING, so the next start runs it again instead of losing it."""
    engine = Gated()
    with app_client(engine, tmp_path) as client:
        services = client.app.state.services
        rid = submit(client, "fal").json()["request_id"]
        assert engine.entered.wait(10)
        services.store._db.execute("PRAGMA query_only = ON")
        try:
            engine.gate.set()
            wait_until(lambda: services.manager.get(rid).status.terminal, what="the run to end")
            result = client.get(f"/fal-ai/kandinsky5/requests/{rid}")
            assert result.status_code == 500 and "could not record the result" in result.json()["detail"]
            assert not (services.storage.files / services.manager.get(rid).file_id).exists()
            assert services.store.get(rid).status is JobStatus.RUNNING
        finally:
            services.store._db.execute("PRAGMA query_only = OFF")
        assert client.get("/readyz").status_code == 200
        assert fal_job(client, "next").ok  # the worker survived
    with app_client(FakeEngine(), tmp_path) as client:
        assert fal_job_status(client, rid) == "COMPLETED"
        assert client.get(f"/fal-ai/kandinsky5/requests/{rid}").status_code == 200


def test_a_download_racing_a_delete_finishes_or_is_a_clean_404(tmp_path):
    """The file is opened before the response starts: unlinking it meanwhile (a DELETE, an expiry)
    cannot cut the download short; once it is gone, the next request is a plain 404."""
    storage = Storage(tmp_path)
    data = bytes(range(256)) * 4096  # 1 MiB: several chunks
    storage.output_path("F" * 32).write_bytes(data)
    response = storage.response("F" * 32, "output.mp4", media_type="video/mp4", filename="output.mp4")
    storage.discard_output("F" * 32)  # gone from disk before a single byte is sent
    app = FastAPI()
    app.get("/pinned")(lambda: response)
    app.include_router(files_router(storage))
    with TestClient(app) as client:
        pinned = client.get("/pinned")
        assert pinned.status_code == 200 and pinned.content == data
        assert int(pinned.headers["content-length"]) == len(data)
        assert client.get(f"/files/{'F' * 32}/output.mp4").status_code == 404
        storage.output_path("G" * 32).write_bytes(data)
        ranged = client.get(f"/files/{'G' * 32}/output.mp4", headers={"range": "bytes=100-199"})
        assert ranged.status_code == 206 and ranged.content == data[100:200]
