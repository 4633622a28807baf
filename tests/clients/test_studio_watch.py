"""Watching and stopping jobs in the studio, in a real headless Chromium against ONE `k5serve serve`
whose engine is the fake (tests/fakes.py) with a slow decode phase: queue position, "loading model"
and "encoding prompt" (the page's first job stops at the fake's load and encode pause points), step
i/N then decoding before the end, Cancel (queued and running, from the job panel and from the history), the
table's failure reasons, a phone-width layout and a label on every control; and "copy as code": the
curl and OpenAI SDK snippets, run as the page shows them, each get their video."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from browser import choose_model, chromium, control, give_image, open_studio, set_value, text, wait_finished
from server_fixtures import ServerProcess, server_process, wait_until

FAKE = {"K5SERVE_FAKE_STEP_TIME": "0.2", "K5SERVE_FAKE_DECODE_CHUNKS": "3", "K5SERVE_FAKE_DECODE_TIME": "0.5"}
TINY = "k5serve/kandinsky5-tiny-t2v"
# `make test` installs @fal-ai/client there (tests/clients/test_fal_js_client.py needs it too)
JS_MODULES = Path(__file__).resolve().parent.parent / "js" / "node_modules"


WATCH_TEST = "test_queue_position_then_loading_encoding_steps_then_decoding"


@pytest.fixture(scope="module")
def pauses(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pauses")


@pytest.fixture(scope="module")
def server(tmp_path_factory, pauses) -> Iterator[ServerProcess]:
    # the server's 2nd run (the page's job in WATCH_TEST, the module's first test) stops at load and encode
    stops = {
        "K5SERVE_FAKE_PAUSE_DIR": str(pauses),
        "K5SERVE_FAKE_PAUSE_AT": "load,encode",
        "K5SERVE_FAKE_PAUSE_CALLS": "2",
    }
    proc = server_process(tmp_path_factory.mktemp("studio-watch"), fake=True, run_port=False, env={**FAKE, **stops})
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(autouse=True)
def _pauses_only_in_the_watch_test(request, pauses):
    """Every other test (also one run alone with -k) finds the pause points open."""
    if request.node.name != WATCH_TEST:
        (pauses / "release").touch()
    yield
    (pauses / "release").touch()


@pytest.fixture(scope="module")
def browser():
    with chromium() as driver:
        yield driver


def submit_api(server: ServerProcess, steps: int) -> str:
    """A job from outside the page (another client of the same server)."""
    body = {"prompt": "someone else's job", "num_inference_steps": steps}
    with server.client() as client:
        return client.post(f"/{TINY}", json=body).json()["request_id"]


def state(server: ServerProcess, job_id: str) -> dict:
    with server.client() as client:
        return client.get(f"/api/jobs/{job_id}").json()


def test_queue_position_then_loading_encoding_steps_then_decoding(server, browser, pauses):
    from selenium.webdriver.common.by import By

    open_studio(browser, server.url)
    ahead = submit_api(server, steps=8)  # keeps the one worker busy: the page's job waits
    choose_model(browser, "t2v", TINY)
    set_value(browser, "Prompt", "watch me")
    set_value(browser, "Steps", "6")
    browser.find_element(By.ID, "submit").click()

    wait_until(lambda: text(browser, "status") == "queued", timeout=10, interval=0.05, what="queued")
    assert text(browser, "detail") == "next in the queue" and text(browser, "elapsed").startswith("waiting")
    indeterminate = "return !document.getElementById('progress').hasAttribute('value')"
    for words, point in (("loading model", "load"), ("encoding prompt", "encode")):  # the job stops in each
        wait_until(lambda w=words: text(browser, "detail") == w, timeout=20, interval=0.05, what=words)
        assert text(browser, "status") == "running" and browser.execute_script(indeterminate)
        (pauses / f"release-{point}").touch()
    wait_until(lambda: text(browser, "detail").startswith("step "), timeout=20, interval=0.05, what="steps")
    assert text(browser, "status") == "running" and text(browser, "detail").endswith("/6")
    wait_until(lambda: "left" in text(browser, "eta"), timeout=10, interval=0.05, what="an estimate of the time left")
    wait_until(lambda: text(browser, "detail").startswith("decoding"), timeout=20, interval=0.05, what="decoding")
    assert text(browser, "status") == "running"  # the decode is seen before the job ends
    progress = browser.execute_script("return document.getElementById('progress').value")
    assert 90 <= progress < 100  # the bar is not full while the video is still decoding
    assert wait_finished(browser) == "succeeded"
    assert "decoding 3/3" in text(browser, "logs") and state(server, ahead)["status"] == "succeeded"


def test_cancel_queued_from_the_panel_and_running_from_the_history(server, browser):
    from selenium.webdriver.common.by import By

    open_studio(browser, server.url)
    running = submit_api(server, steps=60)
    wait_until(lambda: state(server, running)["status"] == "running", what="the other job to start")
    choose_model(browser, "t2v", TINY)
    set_value(browser, "Prompt", "never mind")
    browser.find_element(By.ID, "submit").click()
    wait_until(lambda: text(browser, "status") == "queued", timeout=10, interval=0.05, what="queued")
    browser.find_element(By.ID, "cancel").click()
    assert wait_finished(browser, timeout=20) == "canceled"
    mine = text(browser, "jobid")
    assert state(server, mine)["status"] == "canceled"

    # the other client's running job, from the history (every job of the server shows there)
    button = f"article.tile[data-id='{running}'] button.cancel"
    wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, button), timeout=10, what="its Cancel button")
    # found and clicked in one step: the tile of a running job is redrawn as its progress moves
    browser.execute_script("document.querySelector(arguments[0]).click()", button)
    wait_until(lambda: state(server, running)["status"] == "canceled", timeout=20, what="the running job to stop")

    set_value(browser, "View", "table")  # the table shows the status and the failure reason
    row = f"return document.querySelector(\"#jobs tr[data-id='{running}']\")?.innerText ?? ''"
    wait_until(lambda: "canceled" in browser.execute_script(row), timeout=15, what="row update")
    assert state(server, running)["error"] in browser.execute_script(row)
    set_value(browser, "View", "gallery")


def test_phone_width_labels_and_keyboard(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.set_window_size(390, 844)
    try:
        open_studio(browser, server.url)
        fits = "return document.documentElement.scrollWidth <= document.documentElement.clientWidth"
        assert browser.execute_script(fits), "the page scrolls sideways at phone width"
        unlabelled = browser.execute_script(
            "return [...document.querySelectorAll('input, select, textarea')]"
            ".filter(c => c.type !== 'hidden' && !c.labels.length && !c.getAttribute('aria-label')).map(c => c.id)"
        )
        assert unlabelled == []
        with server.client() as client:
            ready = client.get("/readyz").json()
        if "workers" in ready:  # one card per worker the server lists
            cards = "return [...document.querySelectorAll('#workers [data-worker]')].map(c => c.dataset.worker)"
            wait_until(lambda: browser.execute_script(cards) == [w["id"] for w in ready["workers"]], what="cards")
        else:  # a server that lists none: said so, not an error
            wait_until(lambda: "does not list its workers" in text(browser, "workers"), what="the workers panel")
        choose_model(browser, "t2v", TINY)
        set_value(browser, "Steps", "2")
        control(browser, "Prompt").send_keys("typed, then Enter on Generate")
        browser.find_element(By.ID, "submit").send_keys(Keys.ENTER)
        assert wait_finished(browser) == "succeeded"
    finally:
        browser.set_window_size(1280, 1000)


def _code(browser, name: str) -> str:
    return text(browser, f"code-{name}")


def test_copy_as_code_snippets_run(server, browser, tmp_path):
    """Each snippet, exactly as the page shows it, makes its video through its own API: curl (fal's
    queue), the OpenAI SDK, AI/ML API's requests flow, OneRouter's curl and fal's JS client (fal's
    Python client wants https, which this server does not speak: its snippet says so)."""
    open_studio(browser, server.url)
    choose_model(browser, "t2v", "fal-ai/kandinsky5/text-to-video")
    set_value(browser, "Prompt", "a snippet's fox")
    set_value(browser, "Steps", "2")
    set_value(browser, "Seed", "9001")
    code = {
        name: text(browser, f"code-{name}") for name in ("curl", "openai", "aimlapi", "onerouter", "fal-js", "fal-py")
    }
    assert "Key local" in code["curl"] and '"seed": 9001' in code["curl"] and f"BASE={server.url}" in code["curl"]
    assert f'base_url="{server.url}/v1"' in code["openai"] and '"num_inference_steps": 2' in code["openai"]
    assert "speaks https only" in code["fal-py"] and f'"localhost:{server.port}"' in code["fal-py"]

    (tmp_path / "node_modules").symlink_to(JS_MODULES)
    (tmp_path / "run.mjs").write_text(code["fal-js"])
    commands = {
        "curl": ["bash", "-c", code["curl"]],
        "openai": [sys.executable, "-c", code["openai"]],
        "aimlapi": [sys.executable, "-c", code["aimlapi"]],
        "onerouter": ["bash", "-c", code["onerouter"]],
        "fal-js": ["node", str(tmp_path / "run.mjs")],
    }
    env = {**os.environ, "NO_PROXY": "localhost,127.0.0.1", "no_proxy": "localhost,127.0.0.1"}  # loopback only
    runs = {}
    for name, cmd in commands.items():  # all at once: the server queues their jobs
        (tmp_path / name).mkdir()
        runs[name] = subprocess.Popen(
            cmd, cwd=tmp_path / name, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    out = {name: run.communicate(timeout=120)[0] for name, run in runs.items()}
    for name, run in runs.items():
        assert run.returncode == 0, f"{name}: {out[name]}"
    for name in ("curl", "openai"):  # these two download the video
        assert (tmp_path / name / "k5serve.mp4").read_bytes()[4:8] == b"ftyp", name  # the fake engine's "mp4"
    for name in ("aimlapi", "onerouter", "fal-js"):  # these print its URL
        assert f"{server.url}/files/" in out[name] and ".mp4" in out[name], f"{name}: {out[name]}"

    with server.client() as client:
        jobs = client.get("/api/jobs", params={"limit": 5}).json()["jobs"]
    assert sorted(j["contract"] for j in jobs) == ["aimlapi", "fal", "fal", "onerouter", "openai"]
    assert all((j["resolved"]["steps"], j["resolved"]["seed"]) == (2, 9001) for j in jobs)  # as the page set it
    assert all(j["status"] == "succeeded" for j in jobs)


def test_image_by_drop_and_by_paste(server, browser, test_image):
    import base64
    import io

    from PIL import Image

    open_studio(browser, server.url)
    choose_model(browser, "i2v", TINY.replace("t2v", "i2v"))
    preview = "return document.getElementById('image-preview').getAttribute('src') || ''"
    other = io.BytesIO()
    Image.new("RGB", (32, 48), (200, 30, 30)).save(other, "PNG")
    for how, data in (("drop", test_image.read_bytes()), ("paste", other.getvalue())):
        b64 = base64.b64encode(data).decode()
        give_image(browser, how, data)
        wait_until(lambda b=b64: browser.execute_script(preview) == f"data:image/png;base64,{b}", what=f"{how} preview")
    assert "base64 -w0 image.png" in text(browser, "code-curl")  # the snippets read the image from a file
