"""Headless Chromium for the browser tests: Debian's /usr/bin/chromium driven through /usr/bin/chromedriver by
selenium (never a downloaded browser). Screenshots go to test-artifacts/ at the repository root, or to
$TEST_ARTIFACTS; a failing test leaves its screenshot and page source there too.

The dashboard's helpers and fixtures are reused from tests/central/dashboard (and through them tests/agent).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

TESTS = Path(__file__).resolve().parents[1]
for folder in (TESTS / "agent", TESTS / "deploy", TESTS / "central" / "dashboard", TESTS / "browser"):
    if str(folder) not in sys.path:
        sys.path.append(str(folder))

from dashboard_fixtures import (  # noqa: E402,F401
    broker,
    models,
    mosquitto_bin,
    recorded,
    tiny_bundle,
    video,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
REPO = TESTS.parent


def artifacts_dir() -> Path:
    folder = Path(os.environ.get("TEST_ARTIFACTS") or REPO / "test-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def artifacts() -> Path:
    return artifacts_dir()


@pytest.fixture(scope="session")
def chromium() -> Iterator[object]:
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is missing: apt-get install chromium chromium-driver (bin/setup --test does)")
    if not CHROMEDRIVER.exists():
        pytest.fail("/usr/bin/chromium is installed but /usr/bin/chromedriver is not: apt-get install chromium-driver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: pip install -e '.[test]'")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                "--disable-extensions", "--window-size=1500,1100", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(artifacts_dir() / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.browser_failed = report.failed
    return report


@pytest.fixture
def browser(chromium, request) -> Iterator[object]:
    """The shared Chromium, on a blank page after each test (which ends its EventSource streams)."""
    yield chromium
    if getattr(request.node, "browser_failed", False):
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)
        chromium.save_screenshot(str(artifacts_dir() / f"failed-{name}.png"))
        (artifacts_dir() / f"failed-{name}.html").write_text(chromium.page_source)
    try:
        chromium.execute_script("sessionStorage.clear(); localStorage.clear();")   # e.g. a review token
    except Exception:   # noqa: BLE001 - a page that is gone has nothing to clear
        pass
    chromium.delete_all_cookies()
    chromium.get("about:blank")
