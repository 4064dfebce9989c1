"""The review page's filters over many stations, in headless Chromium: a filter lists the values with the most
frames (at most the server's FACET_LIMIT, 2 here) and says how many more there are; a station chosen stays
chosen, and listed, when busier ones push it out of the list while the page is open."""

from __future__ import annotations

import sys
from pathlib import Path

from browser_support import text_of, wait
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

sys.path.append(str(Path(__file__).resolve().parents[1] / "central" / "loop"))
from loop_support import LABELS, real_frames  # noqa: E402

import central.review.store as store_module  # noqa: E402
from central.review.api import ReviewServer  # noqa: E402
from central.review.store import FrameStore  # noqa: E402


def options(driver, select_id: str) -> list[tuple[str, str, bool]]:
    """(value, text, enabled) of each entry of a filter."""
    return [(o.get_attribute("value"), text_of(o), o.is_enabled())
            for o in driver.find_elements(By.CSS_SELECTOR, f"#{select_id} option")]


def test_a_filter_lists_the_busiest_stations_and_says_how_many_more(browser, tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "FACET_LIMIT", 2)
    store = FrameStore(tmp_path / "store", labels=LABELS)
    records = iter(real_frames(14))
    for station, n in (("zz-busy", 3), ("yy-busy", 2), ("aa-0", 1), ("aa-1", 1), ("aa-2", 1)):
        for _ in range(n):
            record = next(records)
            store.add({**record.body, "station": station}, record.blob)
    server = ReviewServer(store, "127.0.0.1", 0).start()
    try:
        browser.get(server.page_url)
        wait(browser, lambda d: text_of(d.find_element(By.ID, "status")) == "ready", "the page to load")
        listed = options(browser, "filter-station")
        assert listed[:3] == [("", "all", True), ("yy-busy", "yy-busy", True), ("zz-busy", "zz-busy", True)]
        assert len(listed) == 4 and listed[3][2] is False and "3 more, not listed" in listed[3][1], listed
        Select(browser.find_element(By.ID, "filter-station")).select_by_value("yy-busy")
        wait(browser, lambda d: text_of(d.find_element(By.ID, "pending-count")) == "2", "yy-busy's two frames")

        # two other stations get busier than yy-busy: the list follows at its next refresh, the choice stays
        for station in ("aa-1", "aa-2"):
            for _ in range(2):
                record = next(records)
                store.add({**record.body, "station": station}, record.blob)
        wait(browser, lambda d: [v for v, _, _ in options(d, "filter-station")][1:3] == ["aa-1", "aa-2"],
             "the busier stations listed")
        listed = options(browser, "filter-station")
        assert [v for v, _, on in listed if on] == ["", "aa-1", "aa-2", "yy-busy"], listed   # still the choice
        assert "3 more, not listed" in listed[-1][1] and not listed[-1][2]
        assert browser.find_element(By.ID, "filter-station").get_attribute("value") == "yy-busy"
        assert text_of(browser.find_element(By.ID, "pending-count")) == "2"
    finally:
        server.stop()
        store.close()
