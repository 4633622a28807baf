"""The studio at / in a real headless Chromium against ONE live demo-mode `k5serve serve` (tiny real
models, so the videos are real mp4s with real poster frames) started with an API key: the 401 path,
text and image to video with non-default settings honoured, the gallery's posters, re-run, delete,
the checks before submit and the server's own refusal shown verbatim ("copy as code" runs in
test_studio_watch.py, on the fake engine: its jobs are quicker)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from browser import choose_model, chromium, control, give_image, open_studio, set_value, text, wait_finished
from server_fixtures import ServerProcess, server_process, wait_until

KEY = "studio-secret"
AUTH = {"Authorization": f"Key {KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_weights_dir) -> Iterator[ServerProcess]:
    proc = server_process(
        tmp_path_factory.mktemp("studio"), fake=False, weights_dir=tiny_weights_dir, run_port=False,
        extra=["--api-key", KEY],
    )  # fmt: skip
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def browser():
    with chromium() as driver:
        yield driver


def _red_png() -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (32, 48), (200, 30, 30)).save(out, "PNG")
    return out.getvalue()


def job(server: ServerProcess, job_id: str) -> dict:
    with server.client() as client:
        return client.get(f"/api/jobs/{job_id}", headers=AUTH).json()


def generate(browser) -> str:
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, "submit").click()
    assert wait_finished(browser) == "succeeded", text(browser, "detail")
    return text(browser, "jobid")


def test_page_assets_and_favicon(server):
    with server.client() as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        for src in ("/static/studio.js", "/static/form.js", "/static/studio.css", "/favicon.ico"):
            assert client.get(src).status_code == 200, src
        assert client.get("/favicon.ico").headers["content-type"] == "image/x-icon"
        assert client.get("/static/nope.js").status_code == 404
        assert client.get("/api/models").json()["demo"] is True  # no key needed to draw the form


def test_missing_key_is_explained_then_the_key_works(server, browser):
    from selenium.webdriver.common.by import By

    open_studio(browser, server.url)  # no key stored
    assert browser.find_element(By.ID, "keybox").is_displayed()
    control(browser, "Prompt").send_keys("no key yet")
    browser.find_element(By.ID, "submit").click()
    assert wait_finished(browser) == "error"
    detail = text(browser, "detail")
    with server.client() as client:  # the server's own words, shown verbatim after the explanation
        said = client.post("/fal-ai/kandinsky5/text-to-video/distill", json={"prompt": "x"}).json()["detail"]
    assert detail.startswith("401") and "--api-key" in detail and detail.endswith(said)
    assert "401" in text(browser, "history-error")  # the history needs the key too

    control(browser, "API key").send_keys(KEY)
    control(browser, "Prompt").click()  # blur: the page stores the key
    assert browser.execute_script("return localStorage.getItem('k5serve-key')") == KEY
    wait_until(lambda: text(browser, "history-error") == "", what="history readable with the key")


def test_text_to_video_honours_seed_steps_and_aspect(server, browser):
    open_studio(browser, server.url, KEY)
    choose_model(browser, "t2v", "fal-ai/kandinsky5/text-to-video")
    set_value(browser, "Prompt", "a studio test fox")
    set_value(browser, "Aspect ratio", "2:3")
    set_value(browser, "Steps", "3")
    set_value(browser, "Seed", "4242")
    job_id = generate(browser)

    ran = job(server, job_id)
    assert ran["model"] == "fal-ai/kandinsky5/text-to-video" and ran["status"] == "succeeded"
    assert ran["resolved"]["steps"] == 3 and ran["resolved"]["seed"] == 4242
    assert ran["resolved"]["nominal_size"] == [512, 768]  # 2:3, shrunk by demo mode to what it runs
    assert ran["size"] == "160x256" and ran["progress"] == [3, 3]
    wait_until(lambda: browser.execute_script("return document.getElementById('video').readyState") >= 2)
    assert browser.execute_script("return document.getElementById('video').error") is None
    assert "step 3/3" in text(browser, "logs")


def test_image_to_video_upload(server, browser, test_image):
    from selenium.webdriver.common.by import By

    open_studio(browser, server.url, KEY)
    choose_model(browser, "i2v", "fal-ai/kandinsky5-pro/image-to-video")
    control(browser, "Image").send_keys(str(test_image))
    preview = browser.find_element(By.ID, "image-preview")
    wait_until(lambda: (preview.get_attribute("src") or "").startswith("data:image/png"), what="the preview")
    set_value(browser, "Prompt", "an image comes alive")
    set_value(browser, "Steps", "2")
    set_value(browser, "Seed", "77")
    set_value(browser, "Acceleration", "none")
    job_id = generate(browser)

    ran = job(server, job_id)
    assert ran["model"] == "fal-ai/kandinsky5-pro/image-to-video" and ran["request"]["image"] is True
    assert (ran["resolved"]["steps"], ran["resolved"]["seed"], ran["resolved"]["acceleration"]) == (2, 77, "none")

    # re-run from the gallery: the settings and, sent from this page, the image come back
    sent = browser.execute_script("return document.getElementById('image-preview').src")
    set_value(browser, "Seed", "1")
    give_image(browser, "drop", _red_png())  # another image meanwhile
    wait_until(lambda: browser.execute_script("return document.getElementById('image-preview').src") != sent)
    rerun = f"article.tile[data-id='{job_id}'] button.rerun"
    wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, rerun), what="the job in the gallery")
    browser.execute_script("document.querySelector(arguments[0]).click()", rerun)
    assert control(browser, "Seed").get_attribute("value") == "77" and text(browser, "form-error") == ""
    assert browser.execute_script("return document.getElementById('image-preview').src") == sent


def test_invalid_values_are_explained_before_submit(server, browser):
    from selenium.webdriver.common.by import By

    open_studio(browser, server.url, KEY)
    with server.client() as client:
        before = client.get("/api/jobs", headers=AUTH).json()["total"]
    choose_model(browser, "t2v", "k5serve/kandinsky5-tiny-t2v")
    set_value(browser, "Prompt", "too many steps")
    set_value(browser, "Steps", "500")
    set_value(browser, "Guidance", "0.5")
    browser.find_element(By.ID, "submit").click()
    assert "from 1 to 100, got 500" in text(browser, "err-num_inference_steps")
    assert "from 1 to 20, got 0.5" in text(browser, "err-guidance_scale")
    assert control(browser, "Steps").get_attribute("aria-invalid") == "true"
    with server.client() as client:
        assert client.get("/api/jobs", headers=AUTH).json()["total"] == before  # nothing was sent


def test_server_refusal_is_shown_verbatim(server, browser, tmp_path):
    """What the page cannot check (is this file an image?) the server refuses in its own words."""
    open_studio(browser, server.url, KEY)
    choose_model(browser, "i2v", "k5serve/kandinsky5-tiny-i2v")
    fake = tmp_path / "not-an-image.png"
    fake.write_bytes(b"plain text, not a picture")
    control(browser, "Image").send_keys(str(fake))
    set_value(browser, "Prompt", "a broken image")
    wait_until(lambda: browser.execute_script("return !!document.getElementById('image-preview').src"))
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, "submit").click()
    assert wait_finished(browser) == "failed"
    refused = job(server, text(browser, "jobid"))
    assert refused["error"] and text(browser, "detail") == refused["error"]


def test_gallery_posters_rerun_and_delete(server, browser):
    from selenium.webdriver.common.by import By

    open_studio(browser, server.url, KEY)
    with server.client() as client:
        listed = client.get("/api/jobs", headers=AUTH).json()["jobs"]
    done = [j for j in listed if j["status"] == "succeeded"]
    assert len(done) >= 2
    for finished in done:  # every finished video has a poster frame that loaded
        tile = f"article.tile[data-id='{finished['id']}'] img.poster"
        loaded = f'const i = document.querySelector("{tile}"); return !!i && i.complete && i.naturalWidth > 0'
        wait_until(lambda js=loaded: browser.execute_script(js), timeout=20, what=f"poster of {finished['id']}")
    with server.client() as client:
        poster = client.get(done[0]["poster_url"].removeprefix(server.url))
    assert poster.headers["content-type"] == "image/webp" and poster.content[8:12] == b"WEBP"

    # re-run: the form takes the job's model and settings (its seed too: the same video again)
    t2v = next(j for j in done if j["model"] == "fal-ai/kandinsky5/text-to-video")
    browser.find_element(By.CSS_SELECTOR, f"article.tile[data-id='{t2v['id']}'] button.rerun").click()
    assert control(browser, "Model").get_attribute("value") == t2v["model"]
    assert control(browser, "Seed").get_attribute("value") == "4242"
    assert control(browser, "Steps").get_attribute("value") == "3"
    assert control(browser, "Aspect ratio").get_attribute("value") == "2:3"

    victim = done[-1]["id"]
    browser.find_element(By.CSS_SELECTOR, f"article.tile[data-id='{victim}'] button.delete").click()
    wait_until(lambda: not browser.find_elements(By.CSS_SELECTOR, f"article.tile[data-id='{victim}']"))
    with server.client() as client:
        assert client.get(f"/api/jobs/{victim}", headers=AUTH).status_code == 404
