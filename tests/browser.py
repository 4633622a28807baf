"""Headless Chromium (Debian's chromium + chromedriver, driven by selenium) for the studio tests, and
helpers that find the page's controls the way a person or a screen reader does: by their label."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from server_fixtures import wait_until

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def require_chromium() -> None:
    # Not a skip: `make test` installs Debian's chromium + chromium-driver, so a missing browser is a
    # broken set-up and must fail loudly rather than pass as "skipped".
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.fail("chromium + chromium-driver are missing: run `make test` (it installs them)")


@contextmanager
def chromium(width: int = 1280, height: int = 1000) -> Iterator:
    from selenium import webdriver

    require_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="k5serve-chromium-")
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--autoplay-policy=no-user-gesture-required", f"--user-data-dir={profile}", f"--window-size={width},{height}",
    ):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def open_studio(browser, url: str, key: str | None = None) -> None:
    """Load the studio (with `key` in localStorage, as if typed earlier) and wait until it is wired."""
    browser.get(url + "/")
    browser.execute_script("localStorage.clear()" if key is None else f"localStorage.setItem('k5serve-key', {key!r})")
    browser.get(url + "/")
    wait_until(lambda: browser.execute_script("return document.body.dataset.ready") == "1", what="studio ready")


def control(browser, label: str):
    """The control whose <label> says `label` (else: starts with it); label.control is what it labels."""
    found = browser.execute_script(
        "const all = [...document.querySelectorAll('label')], t = (l) => l.textContent.trim();"
        "const exact = all.find(l => t(l) === arguments[0]);"
        "return (exact ?? all.find(l => t(l).startsWith(arguments[0])))?.control ?? null",
        label,
    )
    assert found is not None, f"no control labelled {label!r}"
    return found


def set_value(browser, label: str, value: str) -> None:
    from selenium.webdriver.support.ui import Select

    element = control(browser, label)
    if element.tag_name == "select":
        Select(element).select_by_value(value)
    else:
        element.clear()
        element.send_keys(value)


def choose_model(browser, task: str, model_id: str) -> None:
    from selenium.webdriver.common.by import By

    browser.find_element(By.CSS_SELECTOR, f"input[name=mode][value={task}]").click()
    set_value(browser, "Model", model_id)


def text(browser, element_id: str) -> str:
    return browser.execute_script("return document.getElementById(arguments[0]).textContent", element_id)


def wait_finished(browser, timeout: float = 120) -> str:
    done = ("succeeded", "failed", "canceled", "error")
    wait_until(lambda: text(browser, "status") in done, timeout=timeout, interval=0.1, what="the job to end")
    return text(browser, "status")


_DROP_OR_PASTE = """
const [how, b64] = arguments;
const file = new File([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))], "x.png", { type: "image/png" });
const dt = new DataTransfer();
dt.items.add(file);
const init = { bubbles: true, cancelable: true };
if (how === "drop") document.getElementById("drop").dispatchEvent(new DragEvent("drop", { ...init, dataTransfer: dt }));
else document.dispatchEvent(new ClipboardEvent("paste", { ...init, clipboardData: dt }));
"""


def give_image(browser, how: str, png: bytes) -> None:
    """Hand the page an image as a person would: dropped on the drop zone ("drop") or pasted ("paste")."""
    import base64

    browser.execute_script(_DROP_OR_PASTE, how, base64.b64encode(png).decode())
