"""The review page in headless Chromium: frames arrive from a real broker through the real ingest service while
the page is open; a click and a key press label frames, and the labels land in the store.
Screenshot: test-artifacts/review-page.png."""

from __future__ import annotations

import dataclasses
import json
import sys
import uuid
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from browser_support import text_of, wait, wait_css
from selenium.webdriver.common.by import By

sys.path.append(str(Path(__file__).resolve().parents[1] / "central" / "loop"))
from loop_support import LABELS, real_frames, truth_of  # noqa: E402

from agent.mqtt import encode  # noqa: E402
from central.review.api import ReviewServer  # noqa: E402
from central.review.ingest import IngestService  # noqa: E402
from central.review.store import FrameStore  # noqa: E402
from contract.broker import BrokerSettings

pytestmark = pytest.mark.mqtt


def publish(broker, records) -> None:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="station-under-test", protocol=paho.MQTTv5)
    client.connect(broker.host, broker.port)
    client.loop_start()
    for record in records:
        payload, props = encode(record, True)
        client.publish(f"inventory/{record.body['site']}/{record.body['station']}/frames", payload, qos=1,
                       properties=props).wait_for_publish(10)
    client.loop_stop()
    client.disconnect()


def test_review_page_labels_live_frames_by_click_and_key(browser, artifacts, tmp_path, broker):
    store_dir = tmp_path / "store"
    ingest_store = FrameStore(store_dir)
    ingest = IngestService(ingest_store, BrokerSettings(host=broker.host, port=broker.port, client_id="ingest-browser-test"))
    ingest.start()
    review_store = FrameStore(store_dir, labels=LABELS)     # a second handle, as the two services are run
    server = ReviewServer(review_store, "127.0.0.1", 0).start()
    records = real_frames(3) + real_frames(2, station="qc-02", start=3)
    item_view = dict(records[1].body, item={"decision": str(uuid.uuid4()), "item_seq": 7, "frames": 12})
    records[1] = dataclasses.replace(records[1], text=json.dumps(item_view))     # an unsure item's best view
    try:
        assert ingest.connected.wait(20)
        browser.get(server.page_url)     # the token rides in the URL fragment, as the CLI prints it
        wait_css(browser, "#empty", "the empty queue", where=lambda e: e.is_displayed())
        assert text_of(browser.find_element(By.ID, "pending-count")) == "0"

        publish(broker, records)      # live: the page was already open
        wait(browser, lambda d: text_of(d.find_element(By.ID, "pending-count")) == "5", "five pending frames")
        first = records[0]
        wait(browser, lambda d: text_of(d.find_element(By.ID, "frame-id")) == first.id, "the oldest frame shown")
        wait(browser, lambda d: d.execute_script(
            "const i = document.getElementById('frame-image'); return i.complete && i.naturalWidth === 64"),
            "the frame's JPEG to load")
        top = browser.find_elements(By.CSS_SELECTOR, "#topk li[data-label]")
        assert [li.get_attribute("data-label") for li in top] == [k["label"] for k in first.body["top_k"]]
        assert text_of(browser.find_element(By.ID, "why")) == first.body["selected_because"][0]
        assert "ber1/receiving-01" in text_of(browser.find_element(By.ID, "meta"))
        browser.save_screenshot(str(artifacts / "review-page.png"))

        # a click assigns the true class
        browser.find_element(By.CSS_SELECTOR, f'#labels button[data-label="{truth_of(first)}"]').click()
        wait(browser, lambda d: text_of(d.find_element(By.ID, "pending-count")) == "4", "four pending")
        assert review_store.get(first.id)["status"] == "labelled"
        assert review_store.get(first.id)["label"] == truth_of(first)

        # a key press labels the next one (keys 1..9, 0 follow the label buttons' order)
        second = records[1]
        wait(browser, lambda d: text_of(d.find_element(By.ID, "frame-id")) == second.id, "the next frame")
        assert "#7: its best view of 12 frames, decided unsure" in text_of(browser.find_element(By.ID, "meta"))
        assert "best view" not in text_of(browser.find_element(By.ID, "why"))
        key = str((LABELS.index(truth_of(second)) + 1) % 10)
        browser.find_element(By.TAG_NAME, "body").send_keys(key)
        wait(browser, lambda d: review_store.get(second.id)["status"] == "labelled", "the key's label in the store")
        assert review_store.get(second.id)["label"] == truth_of(second)

        # the station filter, then skip with 's' and undo with 'u'
        from selenium.webdriver.support.ui import Select

        wait(browser, lambda d: "qc-02" in [o.get_attribute("value") for o in
                                            d.find_elements(By.CSS_SELECTOR, "#filter-station option")],
             "the station filter to list qc-02")
        Select(browser.find_element(By.ID, "filter-station")).select_by_value("qc-02")
        wait(browser, lambda d: text_of(d.find_element(By.ID, "pending-count")) == "2", "qc-02's two frames")
        wait(browser, lambda d: text_of(d.find_element(By.ID, "frame-id")) == records[3].id, "qc-02's first frame")
        browser.find_element(By.TAG_NAME, "body").send_keys("s")
        browser.find_element(By.TAG_NAME, "body").send_keys("u")      # at once: the undo waits for the skip
        wait(browser, lambda d: review_store.stats()["counters"].get("reviews:undo") == 1, "the undo in the store")
        assert review_store.get(records[3].id)["status"] == "pending"
        assert review_store.get(second.id)["status"] == "labelled"         # the earlier decision stands
        assert review_store.stats()["counters"]["reviews:skip"] == 1

        # a label the server refuses is shown as an error and changes nothing (once the undone frame is back
        # on the page: before that there is no frame to decide, and a busy machine got there first once)
        wait(browser, lambda d: text_of(d.find_element(By.ID, "frame-id")) == records[3].id, "the undone frame")
        browser.execute_script("""
            const b = document.createElement('button'); b.id = 'bogus'; b.dataset.label = 'Hat';
            b.onclick = () => decide('label', 'Hat'); document.getElementById('labels').append(b);""")
        browser.find_element(By.ID, "bogus").click()
        wait_css(browser, '#status[data-state="error"]', "the refusal")
        assert "'Hat' is not a known class" in text_of(browser.find_element(By.ID, "status"))
        assert review_store.get(records[3].id)["status"] == "pending"
    finally:
        server.stop()
        ingest.stop()
        review_store.close()
        ingest_store.close()
