"""The live status page in a real headless Chromium (Debian's chromium and
chromium-driver, driven by Selenium): it shows a grant, a queue and a
release as they happen, without a reload. A screenshot is saved in
tests/artifacts/ for people to look at."""

import os
import shutil
import time

import pytest
from contract_helpers import get, queued, release, wait_for

pytestmark = pytest.mark.timeout(120)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "artifacts")


@pytest.fixture
def browser(tmp_path):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # The flags this machine needs: no sandbox as root, and no background
    # traffic to Google's hosts (the network is closed).
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--disable-quic", f"--user-data-dir={tmp_path / 'profile'}",
                 "--window-size=420,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def text_of(driver, css):
    # In one script: the page re-renders every second, and an element found
    # in one call may be gone by the next.
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).map(e => e.innerText).join(' ')", css)


def wait_text(driver, css, needle, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in text_of(driver, css):
            return
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} never appeared in {css}: {text_of(driver, css)!r}")


def test_the_page_shows_a_grant_a_queue_and_a_release_as_they_happen(start_server, browser):
    server = start_server([{"name": "backup", "expire": 300}, {"name": "deploy", "maxlocks": 2}])
    browser.get(f"{server.url}/")
    wait_text(browser, ".connection", "live")
    wait_text(browser, "[data-pool=backup]", "free")

    get(server, "web3", pool="backup", session="run-1", label="nightly backup")
    wait_text(browser, "[data-pool=backup]", "web3")
    wait_text(browser, "[data-pool=backup]", "nightly backup")
    wait_text(browser, "[data-pool=backup] .slots", "1/1")

    waiting = wait_for(server, pool="backup", host="web4")
    queued(server, ["web4"], pool="backup")
    wait_text(browser, "[data-pool=backup]", "wait 1")
    wait_text(browser, "#events", "queued backup web4")
    os.makedirs(ARTIFACTS, exist_ok=True)
    browser.save_screenshot(os.path.join(ARTIFACTS, "status-page.png"))

    release(server, "web3", pool="backup", session="run-1")
    waiting.answer()
    wait_text(browser, "#events", "released backup web3")
    wait_text(browser, "#events", "granted backup web4")
    wait_text(browser, "[data-pool=backup] .people", "holds web4")
    assert "web3" not in text_of(browser, "[data-pool=backup] .people")
    assert browser.execute_script("return performance.getEntriesByType('navigation').length") == 1


def test_the_page_loads_nothing_from_elsewhere_and_breaks_no_csp_rule(start_server, browser):
    server = start_server([{"name": "backup"}])
    browser.get(f"{server.url}/")
    wait_text(browser, ".connection", "live")
    origin = server.url
    urls = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert urls and all(u.startswith(origin) for u in urls), urls
    errors = [e for e in browser.get_log("browser") if "Content Security Policy" in e.get("message", "")]
    assert errors == []
