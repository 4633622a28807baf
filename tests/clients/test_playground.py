"""The web playground at / in a real headless Chromium (Debian's chromium + chromedriver, driven by
selenium) against a live demo-mode `k5serve serve`: submit, watch progress, play the video."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator

import pytest
from server_fixtures import ServerProcess, server_process, wait_until

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Not a skip: `make test` installs Debian's chromium + chromium-driver, so a missing browser is a
# broken set-up and must fail loudly rather than pass as "skipped".
needs_chromium = pytest.mark.usefixtures("chromium_installed")


@pytest.fixture(scope="session")
def chromium_installed() -> None:
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.fail("chromium + chromium-driver are missing: run `make test` (it installs them)")


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory, tiny_weights_dir) -> Iterator[ServerProcess]:
    server = server_process(
        tmp_path_factory.mktemp("playground"), fake=False, weights_dir=tiny_weights_dir, run_port=False
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="k5serve-chromium-")
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--autoplay-policy=no-user-gesture-required", f"--user-data-dir={profile}",
    ):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_script_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@needs_chromium
def test_page_is_served_at_root(demo_server):
    with demo_server.client() as client:
        page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "fal-ai/kandinsky5/text-to-video/distill" in page.text and "<script src" not in page.text


@needs_chromium
def test_text_to_video_plays_in_the_browser(demo_server, browser):
    from selenium.webdriver.common.by import By

    browser.get(demo_server.url + "/")
    wait_until(lambda: browser.execute_script("return document.readyState") == "complete", what="page load")
    assert browser.find_element(By.ID, "demo").is_displayed()  # demo mode is announced
    browser.find_element(By.ID, "prompt").clear()
    browser.find_element(By.ID, "prompt").send_keys("a browser test fox")
    browser.find_element(By.ID, "submit").click()

    status = lambda: browser.find_element(By.ID, "status").text  # noqa: E731
    wait_until(lambda: status() in ("COMPLETED", "ERROR"), timeout=120, interval=0.2, what="job to finish")
    assert status() == "COMPLETED", browser.find_element(By.ID, "detail").text
    job_id = browser.find_element(By.ID, "jobid").text
    ready = "return document.getElementById('video').readyState"
    wait_until(lambda: browser.execute_script(ready) >= 2, timeout=30, what="video data")
    assert browser.execute_script("return document.getElementById('video').error") is None
    assert browser.find_element(By.ID, "download").get_attribute("href").endswith(".mp4")
    # the live step progress reached the end, and the recent-jobs list shows the job
    assert browser.execute_script("const p = document.getElementById('progress'); return p.value === p.max")
    row = f"#jobs tr[data-id='{job_id}']"
    wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, row), timeout=10, what="job in the list")
    assert browser.find_element(By.CSS_SELECTOR, row).text.startswith("succeeded")

    with demo_server.client() as client:
        listed = client.get("/api/jobs", params={"limit": 5}).json()["jobs"]
    assert listed[0]["id"] == job_id and listed[0]["video_url"].endswith(".mp4")


def _wait_finished(browser, timeout: float = 120) -> str:
    from selenium.webdriver.common.by import By

    status = lambda: browser.find_element(By.ID, "status").text  # noqa: E731
    wait_until(lambda: status() in ("COMPLETED", "ERROR"), timeout=timeout, interval=0.2, what="job to finish")
    return status()


@needs_chromium
def test_image_to_video_plays_in_the_browser(demo_server, browser, test_image):
    """I2V from the page: the chosen file goes up as a data: URI and the result plays."""
    from selenium.webdriver.common.by import By

    browser.get(demo_server.url + "/")
    wait_until(lambda: browser.execute_script("return document.readyState") == "complete", what="page load")
    assert not browser.find_element(By.ID, "image").is_displayed()
    browser.find_element(By.CSS_SELECTOR, "input[name=mode][value=i2v]").click()
    assert browser.find_element(By.ID, "image").is_displayed()
    browser.find_element(By.ID, "image").send_keys(str(test_image))
    steps = browser.find_element(By.ID, "steps")
    steps.clear()
    steps.send_keys("3")
    browser.find_element(By.ID, "prompt").clear()
    browser.find_element(By.ID, "prompt").send_keys("an image comes alive")
    browser.find_element(By.ID, "submit").click()

    assert _wait_finished(browser) == "COMPLETED", browser.find_element(By.ID, "detail").text
    ready = "return document.getElementById('video').readyState"
    wait_until(lambda: browser.execute_script(ready) >= 2, timeout=30, what="video data")
    assert browser.execute_script("return document.getElementById('video').error") is None
    job_id = browser.find_element(By.ID, "jobid").text

    with demo_server.client() as client:
        job = next(j for j in client.get("/api/jobs", params={"limit": 10}).json()["jobs"] if j["id"] == job_id)
        status = client.get(f"/fal-ai/kandinsky5-pro/requests/{job_id}/status").json()
    assert job["model"] == "fal-ai/kandinsky5-pro/image-to-video" and job["status"] == "succeeded"
    assert job["progress"] == [3, 3]  # the page's step count reached the engine
    assert status["status"] == "COMPLETED"


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory, tiny_weights_dir) -> Iterator[ServerProcess]:
    server = server_process(
        tmp_path_factory.mktemp("playground-keyed"),
        fake=False,
        weights_dir=tiny_weights_dir,
        run_port=False,
        extra=["--api-key", "pg-secret"],
    )
    server.start()
    yield server
    server.stop()


@needs_chromium
def test_api_key_path_in_the_browser(keyed_server, browser):
    """With --api-key the page asks for a key: without it the submit shows the 401, with it the job runs
    and the recent-jobs list (itself behind the key) shows it."""
    from selenium.webdriver.common.by import By

    browser.get(keyed_server.url + "/")
    browser.execute_script("localStorage.clear()")
    browser.get(keyed_server.url + "/")
    wait_until(lambda: browser.find_element(By.ID, "keybox").is_displayed(), what="the key field")
    browser.find_element(By.CSS_SELECTOR, "input[name=mode][value=t2v]").click()
    browser.find_element(By.ID, "submit").click()
    assert _wait_finished(browser) == "ERROR"
    assert "API key" in browser.find_element(By.ID, "detail").text
    assert browser.find_elements(By.CSS_SELECTOR, "#jobs tr") == []  # the list needs the key too

    key = browser.find_element(By.ID, "key")
    key.send_keys("pg-secret")
    browser.find_element(By.ID, "prompt").click()  # blur: the page stores the key and refreshes the list
    browser.find_element(By.ID, "submit").click()
    assert _wait_finished(browser) == "COMPLETED", browser.find_element(By.ID, "detail").text
    job_id = browser.find_element(By.ID, "jobid").text
    row = f"#jobs tr[data-id='{job_id}']"
    wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, row), timeout=10, what="job in the list")
    assert browser.execute_script("return localStorage.getItem('k5serve-key')") == "pg-secret"

    with keyed_server.client() as client:
        assert client.get("/api/jobs").status_code == 401
        listed = client.get("/api/jobs", headers={"Authorization": "Key pg-secret"}).json()["jobs"]
    assert [j["id"] for j in listed] == [job_id]  # the refused submit created nothing
