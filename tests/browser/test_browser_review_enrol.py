"""Enrolling a new product from the review page, as docs/enrol.md runs it: ``python -m central review ...
--enrol-bundle <bundle> --enrol-max-drop 0.5 --enrol-max-drop-limit 2``, with the real bundle of tests/conftest.py
(trainer export, real ONNX Runtime) and real frames as the agent sends them, eight of them (Bag images) reviewed as
a new product "Tote". Enrol new class first shows the product's figures by allowance and writes nothing; the
reviewer then enrols it at 2 points with the button of that row, and the new version's manifest says 2. A
click refused before any figures (here: another reviewer undid frames meanwhile) writes nothing and gives the
buttons back.
Screenshot: test-artifacts/review-page-enrol.png."""

from __future__ import annotations

import json
import re
import shutil
import sys
import urllib.request
from pathlib import Path

import pytest
from browser_support import alert, csp_violations, review_server, text_of, wait
from selenium.webdriver.common.by import By

sys.path.append(str(Path(__file__).resolve().parents[1] / "central" / "loop"))
from loop_support import LABELS, real_frames, truth_of  # noqa: E402

from agent.demo import free_port  # noqa: E402
from contract.bundle import check_model_runs, load_bundle  # noqa: E402

TOKEN = "review-token-for-the-enrol-test"


def post(url: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


@pytest.fixture
def enrol_page(tmp_path, real_bundle, fmnist_dir):
    from central.review.store import FrameStore

    models = tmp_path / "models"
    shutil.copytree(real_bundle.parent.parent, models)
    source = models / real_bundle.parent.name / real_bundle.name
    store_dir = tmp_path / "store"
    records = real_frames(120)
    store = FrameStore(store_dir, labels=LABELS)
    for record in records:
        store.add(record.body, record.blob)
    store.close()
    (tmp_path / "token").write_text(TOKEN + "\n")
    args = ["--store", str(store_dir), "--labels-from", str(source), "--token-file", str(tmp_path / "token"),
            "--enrol-bundle", str(source), "--enrol-gate-data", str(fmnist_dir / "test"),
            "--enrol-max-drop", "0.5", "--enrol-max-drop-limit", "2"]
    with review_server(args, tmp_path / "review.log", free_port()) as url:
        bags = [r for r in records if truth_of(r) == "Bag"][:8]
        assert len(bags) == 8
        post(url, f"api/frames/{bags[0].id}/review", {"action": "new_class", "label": "Tote", "reviewer": "ana"})
        for r in bags[1:]:
            post(url, f"api/frames/{r.id}/review", {"action": "label", "label": "Tote", "reviewer": "ana"})
        yield url, source, bags


@pytest.fixture
def page_csp_violations(browser):
    """The enrolment panel (its table, its buttons) keeps to the page's Content-Security-Policy too."""
    with csp_violations(browser) as violations:
        yield violations


def _versions(source: Path) -> list[str]:
    return sorted(p.name for p in source.parent.iterdir() if p.is_dir())


def _rows(browser) -> dict[float, object]:
    return {float(tr.get_attribute("data-points")): tr
            for tr in browser.find_elements(By.CSS_SELECTOR, "#enrol-curve tbody tr")}


def test_the_page_shows_a_new_products_figures_then_enrols_it_at_the_allowance_chosen(browser, artifacts,
                                                                                       enrol_page, page_csp_violations):
    url, source, bags = enrol_page
    versions = _versions(source)
    browser.get(url + f"#token={TOKEN}")
    wait(browser, lambda d: text_of(d.find_element(By.ID, "status")) == "ready", "the page to load")
    assert not browser.find_element(By.ID, "enrol-panel").is_displayed()

    browser.find_element(By.ID, "enrol").click()
    prompt = wait(browser, alert, "the class prompt")
    prompt.send_keys("Tote")
    prompt.accept()
    wait(browser, lambda d: d.find_element(By.ID, "enrol-panel").is_displayed(), "the enrolment's figures")
    title = text_of(browser.find_element(By.ID, "enrol-title"))
    assert title == "Tote: 8 reviewed frames, not enrolled", title
    rows = _rows(browser)
    assert sorted(rows) == [0.5, 1.0, 2.0, 5.0]
    # a button for each allowance up to the server's limit (2 points), none beyond it
    offered = {points for points, tr in rows.items() if tr.find_elements(By.CSS_SELECTOR, "button.enrol-at")}
    assert offered == {0.5, 1.0, 2.0}
    cells = [text_of(td) for td in rows[2.0].find_elements(By.TAG_NAME, "td")]
    assert cells[0] == "2 points" and cells[1].endswith("%") and cells[2].endswith(" points"), cells
    assert "up to 2 points (default 0.5)" in text_of(browser.find_element(By.ID, "enrol-note"))
    # the trained product the model took the frames for (Bag, for this bundle: the Tote frames are Bag images)
    like = re.search(r"took most of its frames for (.+?); ", text_of(browser.find_element(By.ID, "enrol-like")))
    assert like and like.group(1) in LABELS
    assert _versions(source) == versions        # the figures wrote nothing
    browser.save_screenshot(str(artifacts / "review-page-enrol.png"))

    # meanwhile another reviewer sends four of the eight frames back to pending: the enrolment is refused before
    # any figures (too few frames), nothing is written, and the buttons come back for another try
    for r in bags[4:]:
        post(url, f"api/frames/{r.id}/review", {"action": "undo", "reviewer": "ben"})
    rows[2.0].find_element(By.CSS_SELECTOR, "button.enrol-at").click()
    wait(browser, lambda d: "at least" in text_of(d.find_element(By.ID, "status")), "the refusal")
    assert "'Tote' has 4 reviewed frame(s)" in text_of(browser.find_element(By.ID, "status"))
    wait(browser, lambda d: all(b.is_enabled() for b in d.find_elements(By.CSS_SELECTOR, "button.enrol-at")),
         "the buttons to come back")
    assert _versions(source) == versions
    for r in bags[4:]:
        post(url, f"api/frames/{r.id}/review", {"action": "label", "label": "Tote", "reviewer": "ana"})

    _rows(browser)[2.0].find_element(By.CSS_SELECTOR, "button.enrol-at").click()
    wait(browser, lambda d: text_of(d.find_element(By.ID, "enrol-title")).startswith("Tote enrolled at 2 points"),
         "the enrolment at 2 points")
    new = sorted(set(_versions(source)) - set(versions))
    assert len(new) == 1
    bundle = load_bundle(source.parent / new[0])
    check_model_runs(bundle)
    assert bundle.labels[-1] == "Tote"
    assert bundle.manifest["quality"]["enrolment"]["Tote"]["gate"]["max_drop_points"] == 2.0
    assert new[0] in text_of(browser.find_element(By.ID, "enrol-title"))
    used = [points for points, tr in _rows(browser).items() if "used" in tr.get_attribute("class")]
    assert used == [2.0]
    assert not browser.find_elements(By.CSS_SELECTOR, "#enrol-curve button.enrol-at")   # written: no more choices
    assert "Tote enrolled from 8 frames at 2 points" in text_of(browser.find_element(By.ID, "status"))
    assert page_csp_violations() == []
