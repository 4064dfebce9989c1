"""A dashboard started after the stations spoke: their cards read the broker's retained statuses as old as they say.

Statuses are published retained on a real mosquitto, then ``python -m central dashboard`` starts and the page opens
each card (docs/dashboard.md, the station card's uptime): an online station counts its uptime from its status's own
time, not from the dashboard's start; a retained offline status says "offline (last status ...)" with the day when it
is not today's; a station clock ahead is taken as sent no later than its status arrived; a live offline status after
the start says "offline since ...". Screenshot: test-artifacts/dashboard-retained.png.
"""

from __future__ import annotations

import re
import time

import pytest
from browser_support import text_of, wait, wait_css
from dashboard_support import DashboardProcess, publish
from fleet_messages import FleetStation
from selenium.webdriver.common.by import By

pytestmark = pytest.mark.mqtt
SLACK = 10     # s: the card's text is redrawn every second, on a loaded machine maybe later
DURATION = re.compile(r"^(?:(\d+)d )?(?:(\d+)h )?(\d+)m(?: (\d+)s)?$")


def seconds_of(shown: str) -> int:
    """The card's uptime text ("1h 10m 3s", "2d 1h 0m", "4m 12s") in seconds."""
    match = DURATION.match(shown)
    assert match, f"not an uptime: {shown!r}"
    days, hours, minutes, secs = (int(g or 0) for g in match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + secs


def open_card(browser, key: str):
    site, station = key.split("/")
    browser.execute_script("location.hash = arguments[0]", f"#/station/{site}/{station}")
    return wait_css(browser, f'#card .station[data-station="{key}"]', f"the card of {key}")


def field(card, name: str) -> str:
    return text_of(card.find_element(By.CSS_SELECTOR, f'[data-field="{name}"]'))


def local_time(browser, epoch: float, with_day: bool) -> str:
    """The time as the page's browser writes it (its locale and time zone)."""
    how = "toLocaleString" if with_day else "toLocaleTimeString"
    return browser.execute_script(f"return new Date(arguments[0] * 1000).{how}()", epoch)


def test_cards_of_a_dashboard_started_after_the_retained_statuses(browser, artifacts, tmp_path, broker):
    # given statuses retained on the broker before the dashboard starts: a station online for 600 s when it
    # connected an hour ago, one that said offline two hours ago, one that went offline three days ago, and one
    # whose clock runs an hour ahead
    now = time.time()
    up, down, gone, ahead = (FleetStation("site-a", name) for name in ("st-up", "st-down", "st-gone", "st-ahead"))
    up_status = up.status(now - 3600, uptime_s=600.0)
    down_status = down.status(now - 7200, "offline")
    gone_status = gone.status(now - 3 * 86400, "offline")
    ahead_status = ahead.status(now + 3600, uptime_s=60.0)
    publish(broker.port, [up.message("status", up_status), down.message("status", down_status),
                          gone.message("status", gone_status), ahead.message("status", ahead_status)], retain=True)
    published = time.time()

    # when the dashboard starts after them and the page opens
    dash = DashboardProcess(tmp_path, broker.port)
    try:
        dash.wait_state(lambda s: len(s["stations"]) == 4, "the four retained statuses")
        browser.get(dash.url)
        wait_css(browser, 'body[data-stream="open"]', "the live stream to open")
        wait(browser, lambda d: text_of(d.find_element(By.ID, "count-stations")) == "4", "four stations")

        # then the station up for an hour and ten minutes says so, not the minutes since the dashboard started
        card = open_card(browser, up.key)
        assert card.get_attribute("data-health") in ("online", "stale")
        assert field(card, "health") == card.get_attribute("data-health")
        assert card.get_attribute("data-model-version") == "1"
        before = time.time()
        shown = seconds_of(field(card, "uptime"))
        after = time.time()
        assert 600 + before - up_status["ts"] - SLACK <= shown <= 600 + after - up_status["ts"] + SLACK, shown

        # the one that said offline two hours ago: offline, at its status's own time (today's: no day shown)
        card = open_card(browser, down.key)
        wait(browser, lambda d: card.get_attribute("data-health") == "offline", "st-down offline")
        assert field(card, "health") == "offline"
        same_day = browser.execute_script(
            "return new Date(arguments[0] * 1000).toDateString() === new Date().toDateString()", down_status["ts"])
        assert field(card, "uptime") == f"offline (last status {local_time(browser, down_status['ts'], not same_day)})"

        # the one gone for three days: the day is shown too, not a bare time of day that reads as today's
        card = open_card(browser, gone.key)
        wait(browser, lambda d: card.get_attribute("data-health") == "offline", "st-gone offline")
        assert field(card, "uptime") == f"offline (last status {local_time(browser, gone_status['ts'], True)})"

        # the clock ahead is taken as sent when its status arrived (after it was published, before the page read
        # it): its own 60 s and the seconds since, not an hour less (which showed as 0m 0s)
        card = open_card(browser, ahead.key)
        assert card.get_attribute("data-health") in ("online", "stale")
        shown = seconds_of(field(card, "uptime"))
        after = time.time()
        assert 60 - SLACK <= shown <= 60 + after - published + SLACK, shown
        browser.save_screenshot(str(artifacts / "dashboard-retained.png"))

        # when the station up goes offline live, after the start
        card = open_card(browser, up.key)
        left = up.status(time.time(), "offline")
        publish(broker.port, [up.message("status", left)], retain=True)

        # then its card turns offline in place, since that status's arrival (today: a time of day)
        wait(browser, lambda d: card.get_attribute("data-health") == "offline", "st-up offline")
        arrived = dash.station(up.key)["status_at"]
        assert dash.station(up.key)["status_time_from"] == "arrival"
        assert field(card, "uptime") == f"offline since {local_time(browser, arrived, False)}"
    finally:
        dash.stop()
