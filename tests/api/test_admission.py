"""The one admission path (server/admission.py), tested for real: a real JobManager, store and
storage, the fake engine (tests/fakes.py) in place of torch."""

from __future__ import annotations

import asyncio
import base64
import io

import fakes
import pytest

from pipelines.request import GenerationRequest
from server.admission import Admission, Draft
from server.api import fal, openai
from server.errors import BadInput, ModelUnavailable, QueueFull
from server.intake import IntakeLimits
from server.manager import JobManager
from server.netguard import UrlGuard
from server.storage import Storage
from server.store import JobStore


def png_uri(size=(48, 32)) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture
def parts(tmp_path):
    storage = Storage(tmp_path)
    manager = JobManager(JobStore(storage.database), storage, max_queue=2)
    engine = fakes.FakeEngine()
    admission = Admission(engine, manager, storage, IntakeLimits(guard=UrlGuard([])), max_prompt_chars=50)
    yield admission, manager, storage, engine
    manager.store.close()


def admit(admission, draft, contract=fal.CONTRACT, **kwargs):
    return asyncio.run(admission.admit(contract, draft, **kwargs))


def t2v(prompt="a fox", **fields) -> GenerationRequest:
    return GenerationRequest(variant="kandinsky5-lite-t2v-sft-5s", prompt=prompt, steps=2, **fields)


def test_the_job_stores_the_resolved_request_with_a_seed(parts):
    admission, manager, _, _ = parts
    job = admit(admission, Draft("fal-ai/kandinsky5/text-to-video", t2v()))
    assert job.request.seed is not None and job.resolved.seed == job.request.seed
    assert job.resolved.demo and job.resolved.variant.name == "kandinsky5-tiny-t2v"  # the fake serves demo
    stored = manager.store.load_all()[0]
    assert stored.resolved == job.resolved and stored.request == job.request


def test_the_contract_names_the_job_id(parts):
    admission = parts[0]
    job = admit(admission, Draft("kandinsky5-lite-t2v-sft-5s", t2v()), contract=openai.CONTRACT)
    assert job.id.startswith("video_") and job.contract == "openai"


def test_an_over_long_prompt_is_refused_before_the_image_is_fetched(parts):
    admission, manager, _, _ = parts
    # fetching this URL would fail with an image error (the guard refuses loopback here)
    draft = Draft("fal-ai/kandinsky5-pro/image-to-video", t2v("x" * 51), image="http://127.0.0.1:9/a.png")
    with pytest.raises(BadInput, match="K5SERVE_MAX_PROMPT_CHARS") as refused:
        admit(admission, draft)
    assert refused.value.field == "prompt" and manager.list() == []


def test_a_refused_request_leaves_no_input_behind(parts):
    admission, manager, storage, _ = parts
    # the image is fetched and stored, then the engine refuses the request (t2v takes no image)
    with pytest.raises(BadInput, match="takes no image") as refused:
        admit(admission, Draft("x", t2v(), image=png_uri()))
    assert refused.value.field == "image"
    assert not list((storage.root / "inputs").iterdir()) and manager.list() == []


def test_a_bad_image_names_the_contracts_field(parts):
    admission = parts[0]
    with pytest.raises(BadInput, match=r"^image_url data URI") as refused:
        admit(admission, Draft("x", t2v(), image="data:image/png;base64"))
    assert refused.value.field == "image"  # each contract maps it: image_url, input_reference
    with pytest.raises(BadInput, match=r"^input_reference data URI"):
        admit(admission, Draft("x", t2v(), image="data:image/png;base64"), contract=openai.CONTRACT)


def test_missing_weights_and_a_full_queue_are_their_own_errors(parts):
    admission, manager, _storage, engine = parts

    def missing(req):
        from pipelines.errors import WeightsMissing

        raise WeightsMissing(req.variant, f"weights/{req.variant}", ["transformer/"])

    engine.prepare, prepare = missing, engine.prepare
    with pytest.raises(ModelUnavailable, match="k5serve weights download kandinsky5-lite-t2v-sft-5s"):
        admit(admission, Draft("x", t2v()))
    engine.prepare = prepare
    for _ in range(2):
        admit(admission, Draft("x", t2v()))
    with pytest.raises(QueueFull):
        admit(admission, Draft("x", t2v(), image=None))
    assert len(manager.list()) == 2


def test_the_worker_runs_exactly_what_was_admitted(tmp_path):
    """Resolved once, at admission: the engine is not asked again when the job runs."""
    from server_fixtures import app_client, wait_until

    engine = fakes.FakeEngine()
    with app_client(engine, tmp_path) as client:
        services = client.app.state.services
        services.worker.stop()  # hold the queue while the engine changes its mind
        job = asyncio.run(services.admission.admit(fal.CONTRACT, Draft("x", t2v(seed=5))))
    engine.prepare = lambda req: pytest.fail("the worker re-resolved an admitted request")
    assert job.resolved.seed == 5
    with app_client(engine, tmp_path) as client:  # the same data dir: the job runs after a restart
        wait_until(lambda: client.app.state.services.manager.get(job.id).status.terminal)
        done = client.app.state.services.manager.get(job.id)
    assert done.status.value == "succeeded", done.error
    assert engine.resolved == [job.resolved]


def test_reject_records_a_failed_job_without_a_request(parts):
    admission, manager, _, _ = parts
    bad = BadInput("duration", "7s", "duration 7s is not available")
    job = asyncio.run(admission.reject(fal.CONTRACT, "fal-ai/kandinsky5/text-to-video", bad, meta={"k": 1}))
    assert job.status.value == "failed" and job.request is None and job.resolved is None
    assert (job.error.field, job.error.value, job.error.message) == ("duration", "7s", bad.message)
    assert manager.store.load_all()[0].meta == {"k": 1}


@pytest.mark.parametrize(("default", "asked", "runs"), [(False, None, False), (True, None, True), (True, False, False)])
def test_prompt_expansion_takes_the_server_default_at_admission(tmp_path, default, asked, runs):
    storage = Storage(tmp_path)
    manager = JobManager(JobStore(storage.database), storage, max_queue=2)
    limits = IntakeLimits(guard=UrlGuard([]))
    admission = Admission(fakes.FakeEngine(), manager, storage, limits, max_prompt_chars=50, expand_prompts=default)
    try:
        job = admit(admission, Draft("fal-ai/kandinsky5/text-to-video", t2v(expand_prompt=asked)))
        assert job.resolved.expand_prompt is runs and job.request.expand_prompt is runs  # stored as it will run
        assert manager.store.load_all()[0].resolved.expand_prompt is runs
    finally:
        manager.store.close()
