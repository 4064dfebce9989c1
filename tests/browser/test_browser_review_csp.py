"""The review page under its strict Content-Security-Policy (central/review/api.py PAGE_CSP), in headless Chromium:
every step a reviewer takes (load, a frame with its ROI context and the crop's box, a label by click and by key,
undo, a filter, the order, a whole item, a new class and a defect by prompt) breaks no rule of it, with the API
token (the JPEGs shown from blobs) and without one (the JPEGs straight from this server). Every violation is
recorded from the page's first byte on (browser_support.csp_violations); the test then breaks the policy on
purpose (a style attribute, an inline handler, an image from another origin) to show that it is in force and
that the recorder sees what it blocks. The enrolment panel runs under the same recorder in
test_browser_review_enrol.py (it needs the real bundle)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from browser_support import alert, csp_violations, key, text_of, wait, wait_css
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

sys.path.append(str(Path(__file__).resolve().parents[1] / "central" / "loop"))
from loop_support import LABELS, real_frames, truth_of, with_context  # noqa: E402

from central.review.api import ReviewServer  # noqa: E402
from central.review.store import FrameStore  # noqa: E402

ITEM = "6f1c0f8e-1d2b-4c3a-9e8f-0a1b2c3d4e5f"


def shown(driver) -> str:
    return text_of(driver.find_element(By.ID, "frame-id"))


def pending(driver) -> str:
    return text_of(driver.find_element(By.ID, "pending-count"))


def image_loaded(driver, element_id: str) -> bool:
    return driver.execute_script("const i = document.getElementById(arguments[0]); "
                                 "return i.complete && i.naturalWidth > 0", element_id)


@pytest.mark.parametrize("auth", ["token", "no-auth"])
def test_every_step_of_a_review_keeps_to_the_pages_policy(browser, tmp_path, auth):
    # given: a frame with its ROI context, two more, two frames of one item, and two of another station and model
    store = FrameStore(tmp_path / "store", labels=LABELS)
    records = [with_context(real_frames(1)[0]), *real_frames(4, start=1),
               *real_frames(2, station="qc-02", version="2", start=5)]
    for i, r in enumerate(records):
        store.add({**r.body, "track": ITEM} if i in (3, 4) else r.body, r.blob)
    server = ReviewServer(store, "127.0.0.1", 0, no_auth=auth == "no-auth").start()
    try:
        with csp_violations(browser) as violations:
            browser.get(server.page_url)
            wait(browser, lambda d: text_of(d.find_element(By.ID, "status")) == "ready", "the page to load")
            assert shown(browser) == records[0].id and pending(browser) == "7"
            # the frame, its context and the crop's box on it (a style set through the CSSOM), the top-k bars
            wait(browser, lambda d: image_loaded(d, "frame-image"), "the frame's JPEG")
            wait(browser, lambda d: d.find_element(By.ID, "context").is_displayed(), "the ROI context")
            wait(browser, lambda d: image_loaded(d, "context-image"), "the context's JPEG")
            box = browser.find_element(By.ID, "context-box").size
            assert box["width"] == pytest.approx(240 * 64 / 160, abs=2), box      # 64 of the ROI's 160 px
            bars = browser.find_elements(By.CSS_SELECTOR, "#topk .bar")
            assert bars and all(b.size["width"] > 0 for b in bars)
            src = browser.find_element(By.ID, "frame-image").get_attribute("src")
            assert src.startswith("blob:" if auth == "token" else server.url + "api/frames/"), src

            # a label by click, undone, then by key
            browser.find_element(By.CSS_SELECTOR, f'#labels button[data-label="{truth_of(records[0])}"]').click()
            wait(browser, lambda d: pending(d) == "6", "six pending after the click")
            browser.find_element(By.ID, "undo").click()
            wait(browser, lambda d: pending(d) == "7" and shown(d) == records[0].id, "the frame back after undo")
            key(browser, "1")
            wait(browser, lambda d: pending(d) == "6" and shown(d) == records[1].id, "the next frame after a key")
            assert store.get(records[0].id)["label"] == LABELS[0]

            # a filter and the order
            Select(browser.find_element(By.ID, "filter-station")).select_by_value("qc-02")
            wait(browser, lambda d: shown(d) == records[5].id and pending(d) == "2", "the other station's frames")
            Select(browser.find_element(By.ID, "order")).select_by_value("newest")
            wait(browser, lambda d: shown(d) == records[6].id, "its newest frame first")
            Select(browser.find_element(By.ID, "order")).select_by_value("oldest")
            Select(browser.find_element(By.ID, "filter-station")).select_by_value("")
            wait(browser, lambda d: shown(d) == records[1].id and pending(d) == "6", "every station again")

            # a new class and a defect by prompt, then the whole item with one key
            browser.find_element(By.ID, "new-class").click()
            prompt = wait(browser, alert, "the new class prompt")
            prompt.send_keys("Tote")
            prompt.accept()
            wait_css(browser, '#labels button.new[data-label="Tote"]', "the new class's button")
            wait(browser, lambda d: shown(d) == records[2].id, "the frame after the new class")
            browser.find_element(By.ID, "defect").click()
            prompt = wait(browser, alert, "the defect prompt")
            prompt.send_keys("torn")
            prompt.accept()
            wait(browser, lambda d: shown(d) == records[3].id, "the item's first frame")
            wait(browser, lambda d: d.find_element(By.ID, "whole-item-wrap").is_displayed(), "the item's choice")
            key(browser, "i")
            key(browser, "2")
            wait(browser, lambda d: shown(d) == records[5].id, "the frame after the item")
            assert [store.get(r.id)["status"] for r in records[1:5]] == ["new_class", "defect", "labelled", "labelled"]
            browser.find_element(By.ID, "next").click()
            wait(browser, lambda d: shown(d) == records[6].id, "the next frame by the arrow button")
            wait(browser, lambda d: image_loaded(d, "frame-image"), "its JPEG")

            assert violations() == [], violations()

            # the policy is in force, and the recorder sees what it blocks
            browser.execute_script("""
                document.body.insertAdjacentHTML('beforeend',
                  '<b id="probe-style" style="color: rgb(255, 0, 0)">x</b>' +
                  '<button id="probe-handler" onclick="window.probeRan = true">x</button>');
                document.getElementById('probe-handler').click();
                new Image().src = 'http://localhost:9/elsewhere.png';""")
            wait(browser, lambda d: len(violations()) >= 3, "the three probes' violations")
            assert {v["directive"] for v in violations()} == {"img-src", "script-src-attr", "style-src-attr"}
            assert browser.execute_script("return window.probeRan") is None
            color = browser.find_element(By.ID, "probe-style").value_of_css_property("color")
            assert color != "rgba(255, 0, 0, 1)", color
    finally:
        server.stop()
        store.close()
