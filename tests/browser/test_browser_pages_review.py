"""The review page as a reviewer meets it on a bad day, in headless Chromium over a real review server and store:
a frame whose image does not load never shows the frame before it; a page opened while the server did not answer
fills in its label buttons once it does; thousands of classes leave Skip and Undo in view under the frame."""

from __future__ import annotations

import sys
from pathlib import Path

from browser_support import key, text_of, wait
from selenium.webdriver.common.by import By

sys.path.append(str(Path(__file__).resolve().parents[1] / "central" / "loop"))
from loop_support import LABELS, real_frames  # noqa: E402

from central.review.api import ReviewServer  # noqa: E402
from central.review.store import FrameStore  # noqa: E402

IMAGE_LOADED = "const i = document.getElementById('frame-image'); return i.complete && i.naturalWidth === 64"


def served(tmp_path, n: int, labels=LABELS):
    store = FrameStore(tmp_path / "store", labels=labels)
    records = real_frames(n)
    for r in records:
        store.add(r.body, r.blob)
    return store, records, ReviewServer(store, "127.0.0.1", 0).start()


def test_a_frame_whose_image_fails_never_shows_the_frame_before(browser, tmp_path):
    store, records, server = served(tmp_path, 2)
    store.image_path(records[1].id).unlink()          # its JPEG is gone (a disk fault): the server answers 404
    try:
        browser.get(server.page_url)                  # with the token: images come as blobs
        wait(browser, lambda d: text_of(d.find_element(By.ID, "frame-id")) == records[0].id, "the oldest frame")
        wait(browser, lambda d: d.execute_script(IMAGE_LOADED), "the first frame's JPEG")
        first_src = browser.find_element(By.ID, "frame-image").get_attribute("src")
        key(browser, "1")
        wait(browser, lambda d: text_of(d.find_element(By.ID, "frame-id")) == records[1].id, "the next frame")
        # in the same step that names the next frame, the first frame's picture is gone
        assert browser.find_element(By.ID, "frame-image").get_attribute("src") in (None, "")
        assert browser.execute_script("return document.getElementById('frame-image').src") != first_src
        status = wait(browser, lambda d: d.find_element(By.ID, "status") if d.find_element(By.ID, "status")
                      .get_attribute("data-state") == "error" else None, "the image's error on the page")
        assert "did not load (HTTP 404)" in text_of(status)
        assert browser.find_element(By.ID, "frame-image").get_attribute("src") in (None, "")
    finally:
        server.stop()
        store.close()


def test_a_page_opened_while_the_server_failed_fills_in_when_it_answers(browser, tmp_path):
    store, records, server = served(tmp_path, 2)
    try:
        browser.execute_cdp_cmd("Network.enable", {})
        browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/api/labels*"]})   # the API does not answer
        browser.get(server.page_url)
        wait(browser, lambda d: d.find_element(By.ID, "status").get_attribute("data-state") == "error",
             "the failed load on the page")
        said = text_of(browser.find_element(By.ID, "status"))
        assert browser.find_elements(By.CSS_SELECTOR, "#labels button") == []
        browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": []})                  # it answers again
        wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#labels button")) == len(LABELS),
             "the label buttons once the server answers")
        wait(browser, lambda d: d.find_element(By.ID, "status").get_attribute("data-state") == "ok",
             "the error cleared")
        assert "cannot reach the review server" in said and "retrying" in said, said
        store.review(records[0].id, "new_class", label="Beanie", reviewer="someone else")   # another reviewer's class
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '#labels button.new[data-label="Beanie"]'),
             "another reviewer's new class among the buttons")
        wait(browser, lambda d: text_of(d.find_element(By.ID, "frame-id")) == records[1].id, "the frame left")
        key(browser, "1")                             # the keys work: the frame on screen is labelled
        wait(browser, lambda d: store.get(records[1].id)["status"] == "labelled", "the key's label in the store")
    finally:
        browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": []})
        browser.execute_cdp_cmd("Network.disable", {})
        server.stop()
        store.close()


def test_thousands_of_classes_leave_the_actions_in_view(browser, tmp_path):
    labels = [f"sku-{i:05d} carton, assorted" for i in range(3000)]
    store, records, server = served(tmp_path, 1, labels=labels)
    try:
        browser.get(server.page_url)
        wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#labels button")) == 3000, "3000 buttons")
        wait(browser, lambda d: d.execute_script(IMAGE_LOADED), "the frame's JPEG")
        top, bottom, view = browser.execute_script(
            "const img = document.getElementById('frame-image').getBoundingClientRect();"
            "const skip = document.getElementById('skip').getBoundingClientRect();"
            "return [img.top + scrollY, skip.bottom + scrollY, innerHeight];")
        assert bottom - top <= view, f"frame at {top}px and Skip ending at {bottom}px do not fit a {view}px window"
        last = browser.find_element(By.CSS_SELECTOR, '#labels button[data-label="sku-02999 carton, assorted"]')
        browser.execute_script("arguments[0].scrollIntoView()", last)      # the last class is still reachable
        last.click()
        wait(browser, lambda d: store.get(records[0].id)["status"] == "labelled", "the label in the store")
        assert store.get(records[0].id)["label"] == labels[-1]
    finally:
        server.stop()
        store.close()
