"""The review page's keys in headless Chromium: a key held down (auto-repeat) or pressed while a filter has the
focus decides nothing; a plain key press decides the frame on screen once."""

from __future__ import annotations

import sys
from pathlib import Path

from browser_support import key, text_of, wait
from selenium.webdriver.common.by import By

sys.path.append(str(Path(__file__).resolve().parents[1] / "central" / "loop"))
from loop_support import LABELS, real_frames  # noqa: E402

from central.review.api import ReviewServer  # noqa: E402
from central.review.store import FrameStore  # noqa: E402


def test_held_keys_and_keys_in_a_filter_decide_nothing(browser, tmp_path):
    store = FrameStore(tmp_path / "store", labels=LABELS)
    records = real_frames(3)
    for r in records:
        store.add(r.body, r.blob)
    server = ReviewServer(store, "127.0.0.1", 0).start()
    try:
        browser.get(server.page_url)     # the token rides in the URL fragment, as the CLI prints it
        wait(browser, lambda d: text_of(d.find_element(By.ID, "frame-id")) == records[0].id, "the oldest frame")
        key(browser, "1", repeat=True)                       # auto-repeat of a held '1'
        key(browser, "s", on="filter-station")               # typing into a filter
        key(browser, "2", on="reviewer")                     # typing the reviewer's name
        key(browser, "3")                                    # a plain press: Pullover, once
        wait(browser, lambda d: store.get(records[0].id)["status"] == "labelled", "the key's label in the store")
        wait(browser, lambda d: text_of(d.find_element(By.ID, "pending-count")) == "2", "two pending")
        assert store.get(records[0].id)["label"] == LABELS[2]
        counters = store.stats()["counters"]
        assert counters.get("reviews:label") == 1 and "reviews:skip" not in counters
        assert store.stats()["by_status"]["pending"] == 2
    finally:
        server.stop()
        store.close()
