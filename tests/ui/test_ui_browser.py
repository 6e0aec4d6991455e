"""The dashboard in a real headless Chromium (Debian's chromium + chromedriver,
driven by selenium) against a real `beacon run` watching the real Docker engine.

A labelled container appears, its Beacon HTTP check starts failing and it turns
red with the check's output as the reason, then it stops and leaves the page.
Screenshots of each step go to the test's tmp dir. All traffic goes to loopback
and to the test's own containers."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from docker.models.containers import Container
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import ROOT

pytestmark = pytest.mark.docker

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture
def beacon_api(tmp_path: Path) -> Iterator[str]:
    """`beacon run` in its own process, every listener on a free loopback port; the API's base URL."""
    log_path = tmp_path / "beacon.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "beacon", "run", "--explicit", "--node", "ui-test",
             "--api-listen", "127.0.0.1:0", "--dns-listen", "127.0.0.1:0", "--proxy-listen", "127.0.0.1:0",
             "--dns-recursors", "none"],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip
    try:
        api = proxy = None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (api is None or proxy is None):
            text = log_path.read_text(errors="replace")
            api = api or _listening(text, "api")
            proxy = proxy or _listening(text, "proxy")
            assert proc.poll() is None, text
            time.sleep(0.05)
        assert api and proxy, log_path.read_text(errors="replace")
        yield f"http://{api}|http://{proxy}"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _listening(log: str, what: str) -> str | None:
    m = re.search(rf"listening: {what} on (127\.0\.0\.1:\d+)", log)
    return m.group(1) if m else None


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    assert Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists(), (
        "Chromium is missing: make test-deps installs Debian's chromium and chromium-driver"
    )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000", "--no-first-run", "--disable-extensions"):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: WebDriver, css: str, timeout: float = 15, gone: bool = False) -> None:
    """Poll the page until `css` matches (or, with gone, matches nothing)."""
    try:
        WebDriverWait(driver, timeout, poll_frequency=0.1).until(
            lambda d: bool(d.find_elements(By.CSS_SELECTOR, css)) != gone
        )
    except TimeoutException:
        raise AssertionError(f"{css!r} {'still' if gone else 'never'} on the page after {timeout}s") from None


# The page re-renders on every change: read in one script call (atomic in the
# page's thread) rather than through element handles that a render makes stale.
def text_of(driver: WebDriver, css: str) -> str:
    text = driver.execute_script("const e = document.querySelector(arguments[0]); return e && e.innerText;", css)
    assert text is not None, f"{css!r} is not on the page"
    return str(text)


def attribute(driver: WebDriver, css: str, name: str) -> str:
    return str(driver.execute_script("return document.querySelector(arguments[0]).getAttribute(arguments[1]);", css, name))


def background(driver: WebDriver, css: str) -> str:
    return str(driver.execute_script("return getComputedStyle(document.querySelector(arguments[0])).backgroundColor;", css))


@pytest.mark.timeout(120)
def test_dashboard_shows_a_container_appear_turn_red_with_the_reason_and_go(
    beacon_api: str, browser: WebDriver, run_container: Callable[..., Container], tmp_path: Path
) -> None:
    api, proxy = beacon_api.split("|")
    browser.get(f"{api}/ui/")
    wait_for(browser, '#live[data-live="live"]')
    browser.save_screenshot(str(tmp_path / "0-empty.png"))

    service = f"ui{uuid.uuid4().hex[:8]}"
    app = run_container(
        labels={"beacon.enable": "true", "beacon.service": service, "beacon.tags": "v1,blue",
                "beacon.check.http": "/health", "beacon.check.interval": "1s"},
        ports={"80/tcp": ("127.0.0.1", None)},
    )  # fmt: skip
    card = f'[data-service="{service}"]'
    row = f'{card} tr[data-endpoint="{app.id[:12]}-80"]'
    # It appears; critical until its first check passes, then green.
    wait_for(browser, f'{row}[data-state="passing"]')
    assert f"{service}" in text_of(browser, card) and "1/1 passing" in text_of(browser, card)
    assert app.name in text_of(browser, row)
    assert attribute(browser, card, "data-health") == "ok"

    # Traffic through the proxy shows up as a request rate and a p99.
    for _ in range(30):
        req = urllib.request.Request(f"{proxy}/", headers={"Host": f"{service}.localhost"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.status == 200
    measured = re.compile(r"[1-9][0-9.]* req/s .* p99 [0-9.]+ m?s")  # not the "-" of "no data yet"
    WebDriverWait(browser, 15, poll_frequency=0.2).until(
        lambda d: measured.search(text_of(d, f"{card} .stats").replace("\n", " "))
    )
    assert "0.0% 5xx" in text_of(browser, f"{card} .stats")
    # The figures come from the server's compact per-service view, never from all of /metrics.
    fetched = browser.execute_script("return performance.getEntriesByType('resource').map((e) => e.name)")
    assert any(u.endswith("/v1/traffic") for u in fetched), fetched
    assert not any(u.split("?")[0].endswith("/metrics") for u in fetched), fetched
    browser.save_screenshot(str(tmp_path / "1-passing.png"))

    # Its check starts failing: the row and the card turn red, with the check's output.
    app.exec_run(["rm", "/www/health"])
    wait_for(browser, f'{row}[data-state="critical"]')
    reason = text_of(browser, f"{row} .reason")
    assert "404" in reason, reason
    assert attribute(browser, card, "data-health") == "down"
    problem = text_of(browser, f'#problems [data-problem="{app.id[:12]}-80"]')
    assert "critical" in problem and "404" in problem, problem
    assert background(browser, f"{row} .state") == "rgb(198, 40, 40)"  # --bad
    wait_for(browser, f'#history tr[data-history="{app.id[:12]}-80"][data-state="critical"]')
    browser.save_screenshot(str(tmp_path / "2-critical.png"))

    # Phone width: one column, nothing wider than the screen.
    browser.set_window_size(390, 844)
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")
    browser.save_screenshot(str(tmp_path / "3-phone.png"))
    browser.set_window_size(1280, 1000)

    # It stops: it leaves the services, and the history says so.
    app.stop(timeout=5)
    wait_for(browser, card, gone=True)
    wait_for(browser, f'#history tr[data-history="{app.id[:12]}-80"][data-state="gone"]')
    browser.save_screenshot(str(tmp_path / "4-gone.png"))

    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], errors
