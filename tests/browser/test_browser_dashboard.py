"""The dashboard page in headless Chromium, live from a real broker: ``python -m central dashboard`` serving, the real
agent process started after the page loaded with the station's card open at its URL (#/station/test/st-01), central rollout events, a refused model update, and the station
going offline, all without a reload. Screenshots: test-artifacts/dashboard-live.png, dashboard-offline.png."""

from __future__ import annotations

import json

import pytest
from browser_support import text_of, wait, wait_count, wait_css
from dashboard_support import (
    AgentProcess,
    DashboardProcess,
    failed_gate_event,
    publish,
    publish_event,
    retopic,
)
from selenium.webdriver.common.by import By

pytestmark = pytest.mark.mqtt
CARD = '.station[data-station="test/st-01"]'


def test_the_dashboard_shows_a_station_live_and_then_offline(browser, artifacts, tmp_path, broker, models, video,
                                                              recorded):
    dash = DashboardProcess(tmp_path, broker.port)
    agent = None
    try:
        # given the page loaded while no station has reported yet
        browser.get(dash.url)
        wait_css(browser, 'body[data-stream="open"]', "the live stream to open")
        wait_css(browser, '#broker-status[data-connected="true"]', "the dashboard's broker connection")
        assert browser.find_element(By.ID, "no-stations").is_displayed()
        browser.execute_script("window.loadedOnce = 'yes'")       # gone if the page ever reloads
        # and the station's card opened at its URL before the station exists: it says so
        browser.execute_script("location.hash = '#/station/test/st-01'")
        wait(browser, lambda d: "test/st-01" in text_of(d.find_element(By.ID, "card-error")), "no such station yet")

        # when a real station starts
        agent = AgentProcess(tmp_path, models / "tiny-1", video, broker.port)

        # then its card appears, online, with its model, live results, decisions, stats and the chart
        card = wait_css(browser, f'{CARD}[data-health="online"]', "the station online")
        assert text_of(card.find_element(By.CSS_SELECTOR, '[data-field="model-version"]')) == "tiny-1"
        assert text_of(card.find_element(By.CSS_SELECTOR, '[data-field="health"]')) == "online"
        wait_count(browser, f'{CARD} [data-field="results"] li[data-model-version="tiny-1"]', 3, "three results")
        wait_count(browser, f'{CARD} [data-field="decisions"] li[data-lane]', 1, "a per-item decision")
        wait_css(browser, f'{CARD} svg[data-field="lowconf-chart"] polyline[data-series="since-start"]',
                 "two points on the low-confidence chart", where=lambda e: int(e.get_attribute("data-points")) >= 2)
        wait_css(browser, f'{CARD} table[data-field="latency"] tr[data-stage="inference"]', "inference latency")
        fps = text_of(card.find_element(By.CSS_SELECTOR, '[data-field="fps"]'))
        assert float(fps) >= 0 and text_of(card.find_element(By.CSS_SELECTOR, '[data-field="outbox-depth"]')).isdigit()
        wait_css(browser, f'{CARD} [data-field="cameras"] [data-camera="dock-a"][data-connected="true"]', "camera up")
        assert text_of(browser.find_element(By.ID, "count-online")) == "1"

        # when central reports a failed gate and the station refuses an update with a wrong sha256
        gate = failed_gate_event()
        publish_event(broker.port, gate)
        publish(broker.port, [(f"{agent.cmd_topic}/model", json.dumps(
            {"bundle": str(models / "tiny-2"), "sha256": "e" * 64, "version": "tiny-2"}))])

        # then the page lists the gate with its reason, and the card says why the update was refused
        event = wait_css(browser, f'#rollout-events li[data-id="{gate["id"]}"]', "the gate event")
        assert event.get_attribute("data-action") == "gate" and event.get_attribute("data-ok") == "false"
        assert text_of(event.find_element(By.CSS_SELECTOR, ".reason")) == gate["reason"]
        update = wait_css(browser, f'{CARD} [data-field="last-model-update"][data-ok="false"]', "the refused update")
        assert "sha256" in text_of(update) and "still running tiny-1" in text_of(update)
        assert text_of(card.find_element(By.CSS_SELECTOR, '[data-field="model-version"]')) == "tiny-1"

        # station text is shown as text, never as markup
        result = retopic(next(m for m in recorded if m.kind == "result"), "test", "st-01",
                         label="<b id='injected'>x</b>")
        publish(broker.port, [(result.topic, result.payload)])
        item = wait_css(browser, f'{CARD} [data-field="results"] li[data-id="{result.json()["id"]}"]',
                        "the result with markup in its label")
        assert "<b id='injected'>x</b>" in text_of(item) and not browser.find_elements(By.ID, "injected")

        browser.save_screenshot(str(artifacts / "dashboard-live.png"))

        # when the station stops
        assert agent.stop() == 0, agent.log()[-3000:]
        # then the card turns offline in place, and the page never reloaded
        wait_css(browser, f'{CARD}[data-health="offline"]', "the station offline")
        assert text_of(card.find_element(By.CSS_SELECTOR, '[data-field="health"]')) == "offline"
        assert "offline since" in text_of(card.find_element(By.CSS_SELECTOR, '[data-field="uptime"]'))
        wait(browser, lambda d: text_of(d.find_element(By.ID, "count-offline")) == "1", "the offline count")
        assert browser.execute_script("return window.loadedOnce") == "yes"
        browser.save_screenshot(str(artifacts / "dashboard-offline.png"))
    finally:
        if agent is not None:
            agent.kill()
        dash.stop()

