"""Two reviewers on one queue: their pages list the same pending frames in the same order, so both show the same
frame. The first decision stands; the second, made on the frame as it was (pending), is refused with 409 naming
who decided it, changes nothing, and the second page goes on to the next frame. A script's relabel (no
``expect``) still replaces a decision, as docs/loop.md says.

The page's side runs in headless Chromium (Debian's /usr/bin/chromium through selenium, as tests/browser does);
it is skipped where that browser is not installed.
"""

from __future__ import annotations

import json
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from loop_support import LABELS, real_frames

from central.review.api import ReviewServer
from central.review.store import FrameStore, ReviewConflict

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


@pytest.fixture
def served(tmp_path):
    store = FrameStore(tmp_path / "store", labels=LABELS)
    records = real_frames(4)
    for r in records:
        store.add(r.body, r.blob)
    server = ReviewServer(store, "127.0.0.1", 0).start()
    yield server, store, records
    server.stop()
    store.close()


def post(server: ReviewServer, frame_id: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"{server.url}api/frames/{frame_id}/review", json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {server.token}"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_decision_made_on_a_pending_frame_that_another_reviewer_decided_is_refused(served):
    """Given ana's decision on a frame, when bo's decision made on it as pending arrives, then it is a 409 naming
    ana's decision, and the frame, its item's frames and the counters are as ana left them."""
    server, store, records = served
    first = records[0].id
    assert post(server, first, {"action": "label", "label": "Bag", "reviewer": "ana", "expect": "pending"})[0] == 200
    for late in ({"action": "label", "label": "Coat", "reviewer": "bo", "expect": "pending"},
                 {"action": "skip", "reviewer": "bo", "expect": "pending", "item": True},
                 {"action": "new_class", "label": "Tote", "reviewer": "bo", "expect": "pending"}):
        status, answer = post(server, first, late)
        assert status == 409, answer
        assert answer["error"] == (f"frame {first}: labelled 'Bag' by ana meanwhile, not pending as this "
                                   f"{late['action']} expected; nothing changed")
    frame = store.get(first)
    assert (frame["status"], frame["label"], frame["reviewer"]) == ("labelled", "Bag", "ana")
    assert store.labels()["new_classes"] == []                       # bo's refused new class was not added
    assert store.counters().get("reviews:label") == 1 and "reviews:skip" not in store.counters()
    status, again = post(server, first, {"action": "label", "label": "Coat", "reviewer": "script"})
    assert status == 200 and again["label"] == "Coat"                # a relabel without expect replaces it


def test_expect_is_checked_under_the_write_lock_across_connections(tmp_path):
    """Given two stores open on one folder (two review servers, or a server and a script), when each decides the
    same pending frame as pending, then the second is refused: the status is read again in the write
    transaction, not taken from what the process read before it."""
    records = real_frames(1)
    one, two = FrameStore(tmp_path / "s", labels=LABELS), FrameStore(tmp_path / "s", labels=LABELS)
    try:
        one.add(records[0].body, records[0].blob)
        assert two.get(records[0].id)["status"] == "pending"
        one.review(records[0].id, "label", label="Bag", reviewer="ana", expect="pending")
        with pytest.raises(ReviewConflict, match="labelled 'Bag' by ana meanwhile"):
            two.review(records[0].id, "label", label="Coat", reviewer="bo", expect="pending")
        assert two.get(records[0].id)["label"] == "Bag"
    finally:
        one.close()
        two.close()


@pytest.mark.parametrize("expect", ["done", "", "PENDING", 7, ["pending"]])
def test_an_expect_that_is_no_status_is_a_400_naming_the_field(served, expect):
    server, store, records = served
    status, answer = post(server, records[0].id, {"action": "skip", "expect": expect})
    assert status == 400 and "field expect" in answer["error"], answer
    assert store.get(records[0].id)["status"] == "pending"


@pytest.fixture(scope="module")
def chromium():
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.skip("/usr/bin/chromium and /usr/bin/chromedriver are needed: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                "--disable-extensions", "--window-size=1400,1000", f"--user-data-dir={tempfile.mkdtemp()}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


def test_the_page_keeps_another_reviewers_decision_and_goes_on_to_the_next_frame(chromium, served):
    """Given the page showing the oldest pending frame, when another reviewer decides that frame and then this
    reviewer presses a label's key on it, then the other's decision stands, the page says who decided it and
    shows the next frame; a quick second key on a frame this page decided itself still corrects it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server, store, records = served
    chromium.get(server.page_url)

    def shown(driver):
        return driver.find_element(By.ID, "frame-id").get_attribute("textContent")
    wait = WebDriverWait(chromium, 60, poll_frequency=0.2)
    wait.until(lambda d: shown(d) == records[0].id)
    # ana's decision (as her page sends it), then this page's key press, in one task of the page's event loop: no
    # refresh of the queue can come between them, so the key is pressed on the frame ana has just decided
    chromium.execute_script("""
        const request = new XMLHttpRequest();
        request.open("POST", `/api/frames/${arguments[0]}/review`, false);
        request.setRequestHeader("Authorization", `Bearer ${sessionStorage.getItem("reviewToken")}`);
        request.setRequestHeader("Content-Type", "application/json");
        request.send(JSON.stringify({action: "label", label: "Bag", reviewer: "ana", expect: "pending"}));
        if (request.status !== 200) throw new Error(request.responseText);
        document.dispatchEvent(new KeyboardEvent("keydown", {key: "3", bubbles: true}));
    """, records[0].id)
    status = wait.until(lambda d: (e := d.find_element(By.ID, "status")).get_attribute("data-state") == "error" and e)
    assert "labelled 'Bag' by ana" in status.get_attribute("textContent")
    wait.until(lambda d: shown(d) == records[1].id)
    frame = store.get(records[0].id)
    assert (frame["label"], frame["reviewer"]) == ("Bag", "ana")
    assert store.counters().get("reviews:label") == 1
    # this page's own quick correction: '1' then '2' on the same frame, both given before the first is answered
    chromium.execute_script("""
        for (const key of ["1", "2"]) document.dispatchEvent(new KeyboardEvent("keydown", {key, bubbles: true}));
    """)
    wait.until(lambda d: shown(d) == records[2].id and store.get(records[1].id)["label"] == LABELS[1])
    assert chromium.find_element(By.ID, "status").get_attribute("data-state") == "ok"
