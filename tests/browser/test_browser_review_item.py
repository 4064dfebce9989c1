"""The review page decides a whole item in headless Chromium: frames a station names as one item (frame.v1 track)
show how many of them are pending; with the box ticked (or 'i'), one label takes them all, a skip takes only the
frame on screen, and undo puts the item back."""

from __future__ import annotations

import sys
from pathlib import Path

from browser_support import key, text_of, wait
from selenium.webdriver.common.by import By

sys.path.append(str(Path(__file__).resolve().parents[1] / "central" / "loop"))
from loop_support import LABELS, real_frames  # noqa: E402

from central.review.api import ReviewServer  # noqa: E402
from central.review.store import FrameStore  # noqa: E402

ITEM = "6f1c0f8e-1d2b-4c3a-9e8f-0a1b2c3d4e5f"


def test_one_label_decides_every_pending_frame_of_the_item(browser, tmp_path):
    # given: a frame of no item, then four frames of one item, then one more frame of no item
    store = FrameStore(tmp_path / "store", labels=LABELS)
    records = real_frames(6)
    for i, r in enumerate(records):
        store.add({**r.body, "track": ITEM} if 1 <= i <= 4 else r.body, r.blob)
    item = [r.id for r in records[1:5]]
    server = ReviewServer(store, "127.0.0.1", 0).start()
    shown = lambda d: text_of(d.find_element(By.ID, "frame-id"))  # noqa: E731
    try:
        browser.get(server.page_url)
        wait(browser, lambda d: shown(d) == records[0].id, "the oldest frame")
        assert not browser.find_element(By.ID, "whole-item-wrap").is_displayed()     # no item: no choice
        key(browser, "s")                                                          # skip it
        wait(browser, lambda d: shown(d) == item[0], "the item's first frame")
        wait(browser, lambda d: d.find_element(By.ID, "whole-item-wrap").is_displayed(), "the item's choice")
        assert text_of(browser.find_element(By.ID, "item-pending")) == "4"
        assert "4 pending frame(s) of this item" in text_of(browser.find_element(By.ID, "meta"))

        # the box unticked (the default): a skip, then a label, decide one frame each
        assert not browser.find_element(By.ID, "whole-item").is_selected()
        key(browser, "s")
        wait(browser, lambda d: shown(d) == item[1], "the item's second frame")
        wait(browser, lambda d: text_of(d.find_element(By.ID, "item-pending")) == "3", "three of it pending")
        # ticked with 'i': a skip still decides only the frame on screen ...
        key(browser, "i")
        assert browser.find_element(By.ID, "whole-item").is_selected()
        key(browser, "s")
        wait(browser, lambda d: shown(d) == item[2], "the item's third frame")
        assert [store.get(i)["status"] for i in item] == ["skipped", "skipped", "pending", "pending"]
        # ... and a label decides its other pending frames with it; the next frame shown is of no item
        key(browser, "3")
        wait(browser, lambda d: shown(d) == records[5].id, "the frame after the item")
        assert [store.get(i)["status"] for i in item] == ["skipped", "skipped", "labelled", "labelled"]
        assert {store.get(i)["label"] for i in item[2:]} == {LABELS[2]}
        assert "and 1 more of its item" in text_of(browser.find_element(By.ID, "status"))
        # undo puts both back, not the skipped ones
        key(browser, "u")
        wait(browser, lambda d: store.get(item[3])["status"] == "pending", "the item back to pending")
        assert [store.get(i)["status"] for i in item] == ["skipped", "skipped", "pending", "pending"]
        # the choice is remembered for the next visit
        browser.refresh()
        wait(browser, lambda d: shown(d) == item[2], "the item's frame again")
        assert browser.find_element(By.ID, "whole-item").is_selected()
    finally:
        server.stop()
        store.close()
