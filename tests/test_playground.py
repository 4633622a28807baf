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
