"""The review page as docs/loop.md runs it: ``python -m central review --store ... --labels-from <bundle>
--token-file ...`` on a store that already holds real frames. The page asks for the API token, shows the
oldest pending frame (its JPEG fetched with the token), and a click and a key press label frames; the labels
are read back through the HTTP API. Screenshot: test-artifacts/review-page-cli.png."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from browser_support import alert, review_server, text_of, wait, wait_css
from selenium.webdriver.common.by import By

sys.path.append(str(Path(__file__).resolve().parents[1] / "central" / "loop"))
from loop_support import LABELS, real_frames, truth_of  # noqa: E402

from agent.demo import free_port  # noqa: E402

TOKEN = "review-token-for-the-test"


def api(url: str, path: str, token: str | None = TOKEN) -> dict:
    request = urllib.request.Request(url + path.lstrip("/"),
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


@pytest.fixture
def review_cli(tmp_path, tiny_bundle):
    from central.review.store import FrameStore

    store_dir = tmp_path / "store"
    records = real_frames(4, station="receiving-07")
    store = FrameStore(store_dir)
    for record in records:                   # what ingest stored: the agent's frame.v1 metadata and JPEG
        store.add(record.body, record.blob)
    store.close()
    token_file = tmp_path / "review-token"
    token_file.write_text(TOKEN + "\n")
    with review_server(["--store", str(store_dir), "--labels-from", str(tiny_bundle), "--token-file", str(token_file)],
                       tmp_path / "review.log", free_port()) as url:
        yield url, records


def test_the_review_page_from_the_cli_labels_by_click_and_key_with_a_token(browser, artifacts, review_cli):
    url, records = review_cli
    # the API refuses a caller without the token
    with pytest.raises(urllib.error.HTTPError) as err:
        api(url, f"api/frames/{records[0].id}", token=None)
    assert err.value.code == 401

    # the page asks for the token once, then shows the oldest pending frame with its image and top-k
    browser.get(url)
    prompt = wait(browser, alert, "the token prompt")
    prompt.send_keys(TOKEN)
    prompt.accept()
    first, second = records[0], records[1]
    wait(browser, lambda d: text_of(d.find_element(By.ID, "frame-id")) == first.id, "the oldest frame")
    wait(browser, lambda d: text_of(d.find_element(By.ID, "pending-count")) == "4", "four pending frames")
    wait(browser, lambda d: d.execute_script(
        "const i = document.getElementById('frame-image'); return i.complete && i.naturalWidth === 64"),
        "the frame's JPEG, fetched with the token")
    assert [li.get_attribute("data-label") for li in browser.find_elements(By.CSS_SELECTOR, "#topk li[data-label]")] \
        == [k["label"] for k in first.body["top_k"]]
    assert "receiving-07" in text_of(browser.find_element(By.ID, "meta"))
    # the label buttons are the bundle's classes, in its order (the keys 1..9, 0 follow it)
    buttons = [b.get_attribute("data-label") for b in browser.find_elements(By.CSS_SELECTOR, "#labels button[data-label]")]
    assert buttons[:len(LABELS)] == LABELS
    assert not browser.find_element(By.ID, "enrol").is_displayed()     # started without --enrol-bundle
    browser.save_screenshot(str(artifacts / "review-page-cli.png"))

    # a click labels the shown frame; the API says so
    browser.find_element(By.CSS_SELECTOR, f'#labels button[data-label="{truth_of(first)}"]').click()
    wait(browser, lambda d: text_of(d.find_element(By.ID, "frame-id")) == second.id, "the next frame")
    review = api(url, f"api/frames/{first.id}")
    assert (review["status"], review["label"]) == ("labelled", truth_of(first)), review

    # a key press labels the next one
    browser.find_element(By.TAG_NAME, "body").send_keys(str((LABELS.index(truth_of(second)) + 1) % 10))
    wait_css(browser, "#pending-count", "two pending", where=lambda e: text_of(e) == "2")
    review = api(url, f"api/frames/{second.id}")
    assert (review["status"], review["label"]) == ("labelled", truth_of(second)), review
    assert api(url, f"api/frames/{records[2].id}")["status"] == "pending"
    assert api(url, "api/frames?status=labelled")["total"] == 2
