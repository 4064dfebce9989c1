"""The review page's order in headless Chromium: "least certain first" shows the pending frame with the lowest
margin, follows the margin order as frames are labelled, and is remembered by the browser."""

from __future__ import annotations

import sys
from pathlib import Path

from browser_support import text_of, wait
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

sys.path.append(str(Path(__file__).resolve().parents[1] / "central" / "loop"))
from loop_support import LABELS, real_frames, truth_of  # noqa: E402

from central.review.api import ReviewServer  # noqa: E402
from central.review.store import FrameStore  # noqa: E402


def test_least_certain_first_shows_the_lowest_margin_frame_and_is_remembered(browser, tmp_path):
    store = FrameStore(tmp_path / "store", labels=LABELS)
    records = real_frames(4)
    for r, (top, second) in zip(records, [(0.6, 0.1), (0.4, 0.38), (0.9, 0.05), (0.5, 0.4)]):
        body = dict(r.body, top_k=[{"label": k["label"], "p": p} for k, p in zip(r.body["top_k"], (top, second))])
        store.add(body, r.blob)
    server = ReviewServer(store, "127.0.0.1", 0).start()
    shown = lambda d: text_of(d.find_element(By.ID, "frame-id"))  # noqa: E731
    try:
        browser.get(server.page_url)     # the token rides in the URL fragment, as the CLI prints it
        wait(browser, lambda d: shown(d) == records[0].id, "the oldest frame (the default order)")
        Select(browser.find_element(By.ID, "order")).select_by_value("least-certain")
        wait(browser, lambda d: shown(d) == records[1].id, "the frame with the lowest margin (0.02)")
        browser.find_element(By.CSS_SELECTOR, f'#labels button[data-label="{truth_of(records[1])}"]').click()
        wait(browser, lambda d: store.get(records[1].id)["status"] == "labelled", "the label in the store")
        wait(browser, lambda d: shown(d) == records[3].id, "the next least certain frame (margin 0.10)")
        browser.refresh()                                   # the choice survives a reload
        wait(browser, lambda d: shown(d) == records[3].id, "least certain first after a reload")
        assert Select(browser.find_element(By.ID, "order")).first_selected_option.get_attribute("value") \
            == "least-certain"
    finally:
        server.stop()
        store.close()
