"""The dashboard's page (static/app.js) in headless Chromium where a figure is missing or the fleet changes under
it: a station list page that empties as stations are taken out of service, a refused model update whose station
gave no reason nor its running version, and a rollout over more stations than the overview names.

Debian's /usr/bin/chromium through /usr/bin/chromedriver (as tests/browser; skipped without them). Messages are
fed into the running dashboard's state (fleet_messages.FleetStation, schema-checked) and the page gets them over
its real /events stream; the dashboard is connected to a real mosquitto.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from dashboard_support import rollout_event
from fleet_messages import FleetStation

from central.dashboard.server import Dashboard
from contract.broker import BrokerSettings

pytestmark = pytest.mark.mqtt
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("no /usr/bin/chromium and /usr/bin/chromedriver (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                "--disable-extensions", "--window-size=1400,1000",
                f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-profile-')}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture
def dashboard(broker, chromium) -> Iterator[Dashboard]:
    dash = Dashboard(BrokerSettings(port=broker.port), port=0, push_interval_s=0.1, no_auth=True)
    dash.start()
    yield dash
    chromium.get("about:blank")            # ends the page's stream before the server stops
    dash.stop()


def wait(check: Callable[[], Any], what: str) -> Any:
    deadline, last = time.monotonic() + TIMEOUT, None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as exc:   # noqa: BLE001 - an element not there yet
            last = exc
        else:
            if last:
                return last
        time.sleep(0.1)
    raise AssertionError(f"gave up after {TIMEOUT:.0f} s waiting for {what}; last: {last!r}")


def text(driver: Any, css: str) -> str:
    return driver.execute_script("const e = document.querySelector(arguments[0]); return e ? e.textContent : null;",
                                 css)


def feed(dash: Dashboard, stations: list[FleetStation], now: float) -> None:
    for st in stations:
        for kind, body in (("status", st.status(now - 60)), ("stats", st.stats(now - 1))):
            assert dash.state.ingest(*st.message(kind, body), received_at=now) == "applied"


def test_a_list_page_emptied_under_the_reader_moves_to_the_last_page(dashboard, chromium):
    """On page 2 of 30 stations, 6 are taken out of service: page 2 is empty. The page said "26–25 of 24" over an
    empty table; now it goes to page 1 and lists the 24."""
    now = time.time()
    fleet = [FleetStation("ber1", f"dock-{i:02d}") for i in range(30)]
    feed(dashboard, fleet, now)
    chromium.get(dashboard.url)
    wait(lambda: text(chromium, "#page-info") == "1–25 of 30", "the first page of 30")
    chromium.execute_script("document.querySelector('#page-next').click()")
    wait(lambda: text(chromium, "#page-info") == "26–30 of 30", "the second page")
    for st in fleet[:6]:
        assert dashboard.state.ingest(st.topic("status"), b"", received_at=now) == "applied"
    wait(lambda: text(chromium, "#page-info") == "1–24 of 24", "the page back on the list's only page")
    rows = chromium.execute_script("return document.querySelectorAll('#stations tr.station-row').length")
    assert rows == 24


def test_a_refused_update_without_reason_or_version_reads_as_such_on_the_card(dashboard, chromium):
    """status.v1 lets an agent send last_model_update.reason null and running {}: the card read "rejected at ...,
    still running undefined: null"."""
    now = time.time()
    st = FleetStation("ber1", "dock-01")
    feed(dashboard, [st], now)
    refused = {"ok": False, "reason": None, "ts": round(now, 3), "running": {}}
    assert dashboard.state.ingest(*st.message("status", st.status(now, update=refused)), received_at=now) == "applied"
    chromium.get(f"{dashboard.url}#/station/ber1/dock-01")
    update = wait(lambda: text(chromium, '#card [data-field="last-model-update"]'), "the card's last update")
    assert "still running ?: the station gave no reason" in update
    assert "undefined" not in update and "null" not in update
    reason = text(chromium, '#card [data-field="reasons"] li[data-code="update-refused"]')
    assert reason == "model update refused: the station gave no reason"


def test_a_rollout_over_more_stations_than_named_says_how_many_more(dashboard, chromium):
    now = time.time()
    fleet = [FleetStation("ber1", f"dock-{i:02d}") for i in range(3)]
    feed(dashboard, fleet, now)
    names = [f"site{i % 5}/dock-{i:04d}" for i in range(1000)]
    event = rollout_event("rollout", True, "1000 of 1000 station(s) run 2", names,
                          figures={"versions": dict.fromkeys(names, "2"), "stations_switched": 1000})
    assert dashboard.state.ingest("inventory/_central/rollout", json.dumps(event).encode(), now) == "applied"
    chromium.get(dashboard.url)
    shown = wait(lambda: text(chromium, f'#rollout-events li[data-id="{event["id"]}"] .stations'), "the event")
    assert shown.startswith(", ".join(event["stations"][:20])) and shown.endswith(" and 980 more")
    assert text(chromium, f'#rollout-events li[data-id="{event["id"]}"] .figures') == "stations_switched 1000"
