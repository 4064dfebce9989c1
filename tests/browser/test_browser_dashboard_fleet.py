"""The dashboard with a fleet of 1,000 stations in headless Chromium: the overview renders, a station's URL opens its
card, a search finds one station, an update sent over the real broker arrives on the open page, and the page's
height stays bounded. Screenshots: test-artifacts/dashboard-fleet-overview.png, dashboard-fleet-search.png,
dashboard-fleet-card.png, dashboard-fleet-update.png.

The fleet is fed into the running dashboard's state with schema-valid messages (fleet_messages.FleetStation);
the updates travel through a real mosquitto and the dashboard's own MQTT subscription.
"""

from __future__ import annotations

import json
import time

import pytest
from browser_support import text_of, wait, wait_css
from dashboard_support import publish
from fleet_messages import FleetStation
from selenium.webdriver.common.by import By

from agent.decide import ItemDecision
from agent.receiving import Shipment, receipt_body
from central.dashboard.server import Dashboard
from contract.broker import BrokerSettings

pytestmark = pytest.mark.mqtt
SITES, PER_SITE = 5, 200
HEIGHT_BOUND = 4000          # px; one card per station made 36,000 px at 200 stations


def feed_fleet(dash: Dashboard, now: float) -> dict[str, FleetStation]:
    """1,000 stations: online with stats and decisions; a few offline, stale-free but degraded in named ways."""
    fleet = {}
    for i in range(SITES * PER_SITE):
        site = f"site-{i % SITES}"
        st = FleetStation(site, f"st-{i:04d}", role="receiving" if i % 4 else "sorting")
        fleet[st.key] = st
        messages = [("status", st.status(now - 300)), ("stats", st.stats(now - 60, frames=100, low=4)),
                    ("decision", st.decision(now - 50, "Coat")), ("decision", st.decision(now - 40, "Bag", review=i % 3 == 0)),
                    ("stats", st.stats(now - 5, frames=120, low=6))]
        if i in (7, 8, 9):
            messages.append(("status", st.status(now - 2, "offline")))
        if i in (11, 12):
            messages.append(("status", st.status(now - 2, update=st.refused_update(now - 3, "2"))))
        for kind, body in messages:
            assert dash.state.ingest(*st.message(kind, body), received_at=now) == "applied"
    return fleet


@pytest.fixture
def fleet_dashboard(broker):
    dash = Dashboard(BrokerSettings(port=broker.port), port=0, push_interval_s=0.1, no_auth=True)
    dash.start()
    try:
        fleet = feed_fleet(dash, time.time())
        yield dash, fleet
    finally:
        dash.stop()


def page_height(browser) -> int:
    return browser.execute_script("return Math.max(document.documentElement.scrollHeight, document.body.scrollHeight)")


def test_the_overview_of_1000_stations_renders_small(browser, artifacts, fleet_dashboard):
    dash, fleet = fleet_dashboard
    browser.get(dash.url)
    wait_css(browser, '#overview[data-ready="true"]', "the overview")
    wait(browser, lambda d: text_of(d.find_element(By.ID, "count-stations")) == "1000", "1,000 stations counted")
    assert text_of(browser.find_element(By.ID, "count-offline")) == "3"
    assert text_of(browser.find_element(By.ID, "count-degraded")) == "5"
    sites = browser.find_elements(By.CSS_SELECTOR, "#sites tbody tr[data-site]")
    assert sorted(s.get_attribute("data-site") for s in sites) == [f"site-{i}" for i in range(SITES)]
    # received today: the receiving stations' decisions per label (3 of 4 stations receive)
    coat = wait_css(browser, '#received-today tr[data-label="Coat"]', "Coat received today")
    assert coat.get_attribute("data-count") == "750"
    model = browser.find_element(By.CSS_SELECTOR, '#models li[data-version="1"]')
    assert model.get_attribute("data-stations") == "1000"
    # the station list: one page, degraded first (offline, then the refused updates), not 1,000 rows
    rows = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#stations tr.station-row") or None, "the list")
    assert len(rows) == 25 and browser.find_element(By.ID, "page-info").get_attribute("data-total") == "1000"
    degraded = [r.get_attribute("data-station") for r in rows if r.get_attribute("data-degraded") == "true"]
    assert degraded == ["site-2/st-0007", "site-3/st-0008", "site-4/st-0009", "site-1/st-0011", "site-2/st-0012"]
    assert "sha256" in text_of(rows[3].find_element(By.CSS_SELECTOR, '[data-field="reason"]'))
    assert page_height(browser) < HEIGHT_BOUND
    browser.save_screenshot(str(artifacts / "dashboard-fleet-overview.png"))


def test_a_search_finds_one_station_and_its_url_opens_its_card(browser, artifacts, fleet_dashboard):
    dash, fleet = fleet_dashboard
    browser.get(dash.url)
    wait_css(browser, '#overview[data-ready="true"]', "the overview")
    browser.execute_script("window.loadedOnce = 'yes'")
    # when the user types a station's name
    browser.find_element(By.ID, "filter-q").send_keys("st-0777")
    # then the list holds that one station
    wait(browser, lambda d: d.find_element(By.ID, "page-info").get_attribute("data-total") == "1", "one match")
    [row] = browser.find_elements(By.CSS_SELECTOR, "#stations tr.station-row")
    assert row.get_attribute("data-station") == "site-2/st-0777"
    browser.save_screenshot(str(artifacts / "dashboard-fleet-search.png"))
    # and a click opens its card, at its own URL, without a reload
    row.find_element(By.CSS_SELECTOR, '[data-field="name"] a').click()
    card = wait_css(browser, '#card .station[data-station="site-2/st-0777"]', "the station's card")
    assert browser.current_url.endswith("#/station/site-2/st-0777")
    assert text_of(card.find_element(By.CSS_SELECTOR, '[data-field="model-version"]')) == "1"
    assert "2 decided" in text_of(card.find_element(By.CSS_SELECTOR, '[data-field="hour"]'))
    assert browser.execute_script("return window.loadedOnce") == "yes"

    # a station's URL opened directly shows its card, with why it is degraded
    browser.get(dash.url + "#/station/site-1/st-0011")
    card = wait_css(browser, '#card .station[data-station="site-1/st-0011"]', "the card from its URL")
    assert card.get_attribute("data-degraded") == "true"
    reason = card.find_element(By.CSS_SELECTOR, '[data-field="reasons"] li[data-code="update-refused"]')
    assert "sha256" in text_of(reason)
    assert page_height(browser) < HEIGHT_BOUND
    browser.save_screenshot(str(artifacts / "dashboard-fleet-card.png"))
    # an unknown station's URL says so, naming it
    browser.get(dash.url + "#/station/site-9/nope")
    wait(browser, lambda d: "site-9/nope" in text_of(d.find_element(By.ID, "card-error")), "the missing station named")


def arriving_receipt(st: FleetStation, now: float, name: str) -> tuple[str, bytes]:
    """An open shipment's first receipt (agent/receiving.py): nothing in yet, every line still expected."""
    shipment = Shipment(name, {"Coat": 2, "Dress": 1}, opened_at=now - 1)
    body = {**receipt_body(shipment.receipt(), site=st.site, station=st.station, ts=now, final=False), "seq": 1}
    return f"inventory/{st.key}/receipt", json.dumps(body).encode()


def shipment_receipt(st: FleetStation, now: float, final: bool = False) -> tuple[str, bytes]:
    """A receipt.v1 as the agent builds it (agent/receiving.py): two Coats expected, three came (the first vouched
    for by the shipment), a Dress short; ``final``: the shipment closed like that."""
    shipment = Shipment("PO-7", {"Coat": 2, "Dress": 1}, opened_at=now - 60, closed_at=now if final else None)
    for n in range(1, 4):
        shipment.record(ItemDecision("cam-1", n, "Coat", 0, 0.9, 1.0, 3, now, now, "default", False, (),
                                     (("Coat", 0.9),), (n, n), vouched=n == 1),
                        f"00000000-0000-4000-8000-{n:012d}", 100)
    body = {**receipt_body(shipment.receipt(), site=st.site, station=st.station, ts=now, final=final),
            "seq": 2 if final else 1}
    return f"inventory/{st.key}/receipt", json.dumps(body).encode()


def test_an_update_over_the_broker_arrives_on_the_open_page(browser, artifacts, fleet_dashboard, broker):
    dash, fleet = fleet_dashboard
    browser.get(dash.url)
    wait_css(browser, '#overview[data-ready="true"]', "the overview")
    wait(browser, lambda d: text_of(d.find_element(By.ID, "count-offline")) == "3", "three offline")
    browser.execute_script("window.loadedOnce = 'yes'")
    # when a station goes offline and a receiving station decides a Sandal, over the real broker
    gone, dock = fleet["site-0/st-0500"], fleet["site-1/st-0501"]
    now = time.time()
    publish(broker.port, [gone.message("status", gone.status(now, "offline")),
                          dock.message("decision", dock.decision(now, "Sandal")), shipment_receipt(dock, now)])
    # then the open page shows both without a reload: the counts, the list (degraded first), received today
    wait(browser, lambda d: text_of(d.find_element(By.ID, "count-offline")) == "4", "four offline")
    row = wait_css(browser, '#stations tr.station-row[data-station="site-0/st-0500"]', "the station in the list")
    assert row.get_attribute("data-health") == "offline" and row.get_attribute("data-degraded") == "true"
    sandal = wait_css(browser, '#received-today tr[data-label="Sandal"]', "Sandal received today")
    assert sandal.get_attribute("data-count") == "1"
    # and the receiving station's open shipment, its discrepancies highlighted
    shipment = wait_css(browser, '#shipments li.shipment[data-shipment="PO-7"]', "the shipment in its panel")
    assert shipment.get_attribute("data-discrepant") == "true" and shipment.get_attribute("data-station") == dock.key
    assert [li.get_attribute("data-status") for li in shipment.find_elements(By.CSS_SELECTOR, ".lines li")] == \
        ["over", "short"]
    # open, its short Dress is still arriving: said apart, not a discrepancy yet (the extra Coat is one)
    assert text_of(shipment.find_element(By.CSS_SELECTOR, ".totals")) == "over 1; 1 still expected"
    vouched = shipment.find_element(By.CSS_SELECTOR, '[data-field="vouched"]')     # apart from the discrepancies
    assert vouched.get_attribute("data-count") == "1" and text_of(vouched) == "1 vouched for by the shipment"
    assert text_of(browser.find_element(By.ID, "count-shipments-discrepant")) == "1"
    # twelve other docks then open shipments (newer receipts, nothing wrong yet): the one that needs attention
    # stays first in the panel, the newest fill the other nine places, the rest are counted below
    docks = [fleet[f"site-{n % 5}/st-{n:04d}"] for n in range(600, 612)]
    publish(broker.port, [arriving_receipt(d, time.time(), f"PO-{100 + i}") for i, d in enumerate(docks)])
    wait(browser, lambda d: text_of(d.find_element(By.ID, "count-shipments-open")) == "13", "13 open shipments")
    listed = wait(browser, lambda d: [li.get_attribute("data-shipment") for li in
                                      d.find_elements(By.CSS_SELECTOR, "#shipments li.shipment")] or None, "the list")
    assert listed[0] == "PO-7" and len(listed) == 10, listed
    assert text_of(browser.find_element(By.ID, "count-shipments-discrepant")) == "1"
    assert text_of(browser.find_element(By.ID, "shipments-hidden")).startswith("3 more open shipments")
    # when the dock closes it short, it leaves the open list for the recently closed, where short counts now
    assert not browser.find_element(By.ID, "shipments-closed-title").is_displayed()
    publish(broker.port, [shipment_receipt(dock, time.time(), final=True)])
    closed = wait_css(browser, '#shipments-closed li.shipment[data-shipment="PO-7"]', "the closed shipment")
    assert closed.get_attribute("data-state") == "closed" and closed.get_attribute("data-discrepant") == "true"
    assert text_of(closed.find_element(By.CSS_SELECTOR, ".totals")) == "over 1, short 1"
    assert browser.find_element(By.ID, "shipments-closed-title").is_displayed()
    assert not browser.find_elements(By.CSS_SELECTOR, '#shipments li.shipment[data-shipment="PO-7"]')
    assert text_of(browser.find_element(By.ID, "count-shipments-discrepant")) == "0"
    assert browser.execute_script("return window.loadedOnce") == "yes"
    assert page_height(browser) < HEIGHT_BOUND
    browser.save_screenshot(str(artifacts / "dashboard-fleet-update.png"))


def test_a_page_turned_away_retries_until_it_is_let_in_and_a_mangled_link_still_loads(browser, fleet_dashboard,
                                                                                      monkeypatch):
    """The server answers 503 when too many pages are open; a browser's EventSource never retries after an HTTP
    error, so the page said "reconnecting" for good. It retries on its own now and goes live once let in. A
    mangled station link (#/station/s1/%E0) threw before the page connected; it opens the overview instead."""
    import central.dashboard.server as server

    dash, _ = fleet_dashboard
    monkeypatch.setattr(server, "MAX_LISTENERS", 0)
    browser.get(dash.url + "#/station/site-1/%E0")
    wait(browser, lambda d: "retrying in" in text_of(d.find_element(By.ID, "stream-status")), "the page retrying")
    assert browser.find_element(By.ID, "overview").get_attribute("data-ready") != "true"
    monkeypatch.setattr(server, "MAX_LISTENERS", 256)
    wait_css(browser, '#overview[data-ready="true"]', "the overview once a page may open", timeout=60)
    assert text_of(browser.find_element(By.ID, "stream-status")) == "live"


def test_a_search_being_typed_keeps_its_spaces(browser, fleet_dashboard):
    """A pause after a space (the list follows the search meanwhile) must not eat the space the user typed."""
    dash, _fleet = fleet_dashboard
    browser.get(dash.url)
    wait(browser, lambda d: d.find_element(By.ID, "page-info").get_attribute("data-total") == "1000", "the list")
    box = browser.find_element(By.ID, "filter-q")
    box.send_keys("site-1 ")
    wait(browser, lambda d: d.find_element(By.ID, "page-info").get_attribute("data-total") == "200",
         "the list to follow the search")
    assert box.get_attribute("value") == "site-1 "
    box.send_keys("st-0001")          # what the user goes on typing stays as typed
    assert box.get_attribute("value") == "site-1 st-0001"


def test_the_page_runs_under_a_strict_content_security_policy(browser, fleet_dashboard):
    """Only the page's own files run (no inline script, handler or style attribute), and the page still draws
    everything: the hour bars' heights, the search on Enter."""
    import urllib.request

    from selenium.webdriver.common.keys import Keys

    dash, _fleet = fleet_dashboard
    for path in ("", "static/app.js"):
        with urllib.request.urlopen(dash.url + path, timeout=30) as resp:
            policy = resp.headers["Content-Security-Policy"]
        assert "script-src 'self'" in policy and "style-src 'self'" in policy and "unsafe" not in policy, policy
        assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy, policy
    browser.get(dash.url)
    wait_css(browser, '#overview[data-ready="true"]', "the overview")
    bar = wait_css(browser, "#hours-today .bar", "an hour with decisions",
                   where=lambda e: int(e.get_attribute("data-decided")) > 0)
    assert bar.find_element(By.CSS_SELECTOR, ".fill").size["height"] > 10      # the busiest hour: a full bar
    box = browser.find_element(By.ID, "filter-q")
    box.send_keys("st-0777" + Keys.ENTER)
    wait(browser, lambda d: d.find_element(By.ID, "page-info").get_attribute("data-total") == "1", "the search")
    assert browser.execute_script("return location.pathname + location.search") == "/"
