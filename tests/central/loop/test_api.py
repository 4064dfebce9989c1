"""The review server's HTTP API on a real localhost port, over a real store of real frames."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from loop_support import LABELS, REPO, real_frames, truth_of

from central.review.api import ReviewServer, labels_from
from central.review.store import FrameStore, StoreError

TOKEN = "t0ken-for-the-tests"


def call(url: str, body: dict | None = None, token: str | None = TOKEN) -> tuple[int, object]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST" if body is not None else "GET")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if resp.headers.get_content_type() == "application/json" else raw
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture
def server(tmp_path):
    store = FrameStore(tmp_path / "store", labels=LABELS)
    records = real_frames(6) + real_frames(3, station="qc-02", version="2", start=6)
    for r in records:
        store.add(r.body, r.blob)
    srv = ReviewServer(store, "127.0.0.1", 0, token=TOKEN).start()
    yield srv, store, records
    srv.stop()
    store.close()


def test_list_filter_show_and_label_through_http(server):
    srv, store, records = server
    status, body = call(srv.url + "api/frames?status=pending&station=qc-02")
    assert status == 200 and body["total"] == 3 and {f["station"] for f in body["frames"]} == {"qc-02"}
    status, body = call(srv.url + "api/frames?model_version=1&limit=2&offset=1")
    assert body["total"] == 6 and [f["id"] for f in body["frames"]] == [records[1].id, records[2].id]
    first = records[0]
    status, frame = call(srv.url + f"api/frames/{first.id}")
    assert frame["top_k"][0]["label"] == first.body["label"] and frame["selected_because"]
    status, image = call(srv.url + f"api/frames/{first.id}/image")
    assert status == 200 and image == first.blob
    status, done = call(srv.url + f"api/frames/{first.id}/review",
                        {"action": "label", "label": truth_of(first), "reviewer": "script"})
    assert status == 200 and done["status"] == "labelled"
    assert store.get(first.id)["label"] == truth_of(first) and store.get(first.id)["reviewer"] == "script"
    status, stats = call(srv.url + "api/stats")
    assert stats["by_status"]["labelled"] == 1 and stats["by_status"]["pending"] == 8
    assert call(srv.url + "api/facets")[1]["station"] == ["qc-02", "receiving-01"]
    assert call(srv.url + "api/labels")[1]["labels"] == LABELS
    page = urllib.request.urlopen(srv.url, timeout=10).read().decode()
    assert 'id="frame-image"' in page and "/static/review.js" in page


def test_relabel_undo_new_class_and_defect_through_http(server):
    srv, store, records = server
    post = lambda frame, body: call(srv.url + f"api/frames/{frame.id}/review", body)  # noqa: E731
    a, b, c = records[:3]
    assert post(a, {"action": "label", "label": "Bag", "reviewer": "ana"})[1]["label"] == "Bag"
    status, again = post(a, {"action": "label", "label": truth_of(a), "reviewer": "bo"})     # relabel
    assert status == 200 and again["label"] == truth_of(a) and again["reviewer"] == "bo"
    assert post(b, {"action": "new_class", "label": "Scarf", "reviewer": "ana"})[1]["status"] == "new_class"
    assert call(srv.url + "api/labels")[1]["new_classes"] == ["Scarf"]
    assert post(c, {"action": "label", "label": "Scarf"})[1]["label"] == "Scarf"    # now a class to pick
    status, bad = post(c, {"action": "defect", "label": "torn", "note": "seam open"})
    assert status == 200 and bad["status"] == "defect" and bad["defect"] == "torn" and bad["note"] == "seam open"
    status, back = post(c, {"action": "undo"})
    assert status == 200 and back["status"] == "pending" and back["label"] is None and back["reviewer"] is None
    stats = call(srv.url + "api/stats")[1]
    assert stats["by_status"] == {"pending": 7, "labelled": 1, "skipped": 0, "new_class": 1, "defect": 0}
    assert stats["by_label"] == {truth_of(a): 1, "Scarf": 1}
    assert stats["by_station"] == {"ber1/receiving-01": 6, "ber1/qc-02": 3}
    assert stats["by_model_version"] == {"1": 6, "2": 3}


def test_an_items_frames_are_labelled_in_one_request(tmp_path):
    # given: three frames of one item (one track) and one of another, as a station sends them
    store = FrameStore(tmp_path / "store", labels=LABELS)
    records = real_frames(4)
    tracks = ["6f1c0f8e-1d2b-4c3a-9e8f-0a1b2c3d4e5f"] * 3 + ["0d9e8f7a-6b5c-4d3e-8f1a-2b3c4d5e6f7a"]
    for r, track in zip(records, tracks):
        store.add({**r.body, "track": track}, r.blob)
    srv = ReviewServer(store, "127.0.0.1", 0, token=TOKEN).start()
    try:
        listed = call(srv.url + "api/frames?status=pending")[1]["frames"]
        assert [(f["track"], f["item_pending"]) for f in listed] == [(tracks[0], 3)] * 3 + [(tracks[3], 1)]
        # when: the first is labelled for its item
        status, done = call(srv.url + f"api/frames/{records[0].id}/review",
                            {"action": "label", "label": "Bag", "reviewer": "ana", "item": True})
        # then: its item's other frames are labelled with it, and the other item's frame is not
        assert status == 200 and done["item_frames"] == [records[1].id, records[2].id]
        assert [store.get(r.id)["status"] for r in records] == ["labelled"] * 3 + ["pending"]
        status, undone = call(srv.url + f"api/frames/{records[0].id}/review", {"action": "undo", "item": True})
        assert status == 200 and len(undone["item_frames"]) == 2
        assert call(srv.url + "api/frames?status=pending")[1]["total"] == 4
    finally:
        srv.stop()
        store.close()


def test_least_certain_by_class_over_http_shows_every_predicted_class_before_any_twice(server):
    srv, store, records = server
    predicted = [r.body["label"] for r in records]
    classes = list(dict.fromkeys(predicted))
    assert len(classes) < len(records)                      # some classes were predicted more than once
    status, page = call(srv.url + "api/frames?status=pending&order=least-certain-by-class&limit=50")
    assert status == 200 and page["total"] == len(records)
    got = [f["predicted"] for f in page["frames"]]
    assert sorted(got) == sorted(predicted)
    assert len(set(got[:len(classes)])) == len(classes)     # turn 1: one frame of every class
    oldest = [f["predicted"] for f in call(srv.url + "api/frames?status=pending&limit=50")[1]["frames"]]
    assert len(set(oldest[:len(classes)])) < len(classes)   # the order it replaces repeats a class earlier


def test_bad_requests_name_the_field_and_change_nothing(server):
    srv, store, records = server
    target = records[1].id
    cases = [({"action": "label", "label": "Hat"}, "field label: 'Hat' is not a known class"),
             ({"action": "approve"}, "field action: 'approve'"),
             ({"label": "Bag"}, "field action: missing"),
             ({"action": "label", "label": 3}, "field label: expected a string"),
             ({"action": "skip", "colour": "red"}, "unknown field(s) colour"),
             ({"action": "skip", "item": "yes"}, "field item")]
    for body, message in cases:
        status, err = call(srv.url + f"api/frames/{target}/review", body)
        assert status == 400 and message in err["error"], (body, err)
    assert call(srv.url + "api/frames/nope/review", {"action": "skip"})[0] == 404
    assert call(srv.url + "api/frames?status=done")[0] == 400
    assert call(srv.url + "api/frames?colour=red")[0] == 400
    status, err = call(srv.url + "api/frames?order=random")
    assert status == 400 and "field order" in err["error"], err
    assert store.get(target)["status"] == "pending"


def test_a_token_guards_the_api(tmp_path):
    store = FrameStore(tmp_path / "store", labels=LABELS)
    [record] = real_frames(1)
    store.add(record.body, record.blob)
    srv = ReviewServer(store, "127.0.0.1", 0, token="s3cret").start()
    try:
        assert call(srv.url + "api/frames")[0] == 401
        assert call(srv.url + f"api/frames/{record.id}/review", {"action": "skip"}, token="wrong")[0] == 401
        assert store.get(record.id)["status"] == "pending"
        assert call(srv.url + "api/frames", token="s3cret")[1]["total"] == 1
        assert call(srv.url + f"api/frames/{record.id}/image")[0] == 401
        assert call(srv.url + f"api/frames/{record.id}/image", token="s3cret")[1] == record.blob
        assert b'id="frame-image"' in urllib.request.urlopen(srv.url, timeout=10).read()   # the page itself is open
    finally:
        srv.stop()


def test_labels_come_from_a_bundle_manifest_or_a_labels_file(tmp_path, real_bundle):
    manifest = json.loads((real_bundle / "manifest.json").read_text())
    assert labels_from(real_bundle) == manifest["labels"] and sorted(manifest["labels"]) == sorted(LABELS)
    (tmp_path / "labels.json").write_text(json.dumps({"T-shirt_top": "T-shirt/top", "Trouser": "Trouser"}))
    assert labels_from(tmp_path / "labels.json") == ["T-shirt/top", "Trouser"]
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(StoreError, match="bad.json: not JSON"):
        labels_from(tmp_path / "bad.json")


def test_the_review_cli_serves_the_store(tmp_path, real_bundle):
    store = FrameStore(tmp_path / "store", max_bytes=10**9)      # as 'ingest --max-bytes' leaves it
    for r in real_frames(2):
        store.add(r.body, r.blob)
    store.close()
    from agent.demo import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "central", "review", "--store", str(tmp_path / "store"),
                             "--labels-from", str(real_bundle), "--port", str(port), "--token", "t0ken"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                status, body = call(f"http://127.0.0.1:{port}/api/frames", token="t0ken")
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline and proc.poll() is None, "review server did not start"
                time.sleep(0.2)
        assert status == 200 and body["total"] == 2
        assert sorted(call(f"http://127.0.0.1:{port}/api/labels", token="t0ken")[1]["labels"]) == sorted(LABELS)
        assert call(f"http://127.0.0.1:{port}/api/stats")[0] == 401
        assert call(f"http://127.0.0.1:{port}/api/stats", token="t0ken")[1]["quota"]["max_bytes"] == 10**9
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_store_failure_is_a_500_json_error_and_the_server_keeps_serving(server, caplog):
    """The store's database fails on one request (injected: a failing disk cannot be made here): the client gets
    a JSON 500 saying why instead of a dropped connection, and the next request is answered."""
    import sqlite3

    srv, store, records = server
    real_stats = store.stats

    def failing_stats():
        raise sqlite3.OperationalError("disk I/O error")

    store.stats = failing_stats
    status, body = call(srv.url + "api/stats")
    assert status == 500 and "disk I/O error" in body["error"]
    assert "GET /api/stats failed" in caplog.text
    store.stats = real_stats
    status, body = call(srv.url + "api/stats")
    assert status == 200 and body["frames"] == len(records)


def test_the_review_cli_names_a_port_it_cannot_listen_on(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "central", "review", "--store", str(tmp_path / "store"),
                               "--port", str(port)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"--host 127.0.0.1 --port {port}: cannot listen" in proc.stderr


def test_the_roi_context_is_served_beside_its_frame_and_the_page_shows_it(tmp_path):
    import base64

    from loop_support import empty_scene_records, with_context

    store = FrameStore(tmp_path / "store", labels=LABELS)
    plain, cropped = real_frames(2)
    cropped = with_context(cropped)
    for r in (plain, cropped, *empty_scene_records(2)):
        store.add(r.body, r.blob)
    srv = ReviewServer(store, "127.0.0.1", 0, token="t0k").start()
    try:
        status, context = call(srv.url + f"api/frames/{cropped.id}/context", token="t0k")
        assert status == 200 and context == base64.b64decode(cropped.body["context"]["roi_jpeg_b64"])
        status, frame = call(srv.url + f"api/frames/{cropped.id}", token="t0k")
        assert frame["context_image"] and frame["meta"]["context"]["crop_box"] == [40, 30, 104, 94]
        status, body = call(srv.url + f"api/frames/{plain.id}/context", token="t0k")
        assert status == 404 and "no ROI context" in body["error"]
        assert call(srv.url + f"api/frames/{cropped.id}/context")[0] == 401
        status, body = call(srv.url + "api/frames?status=pending", token="t0k")
        assert body["total"] == 2                                     # the empty scenes are not in the queue
        assert call(srv.url + "api/stats", token="t0k")[1]["empty_scenes"]["total"] == 2
        page = urllib.request.urlopen(srv.url, timeout=10).read().decode()
        assert 'id="context-image"' in page and 'id="context-box"' in page
    finally:
        srv.stop()
        store.close()


def test_hostile_requests_are_refused_and_the_api_describes_itself(server):
    """A negative or lying Content-Length, an oversized body, a browser POST from another site: each refused with
    a JSON error naming why, nothing changed, the next request served. The OpenAPI schema lists the API."""
    import http.client

    srv, store, records = server
    target = records[2].id

    def raw(method: str, path: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, dict | str]:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
        conn.putrequest(method, path, skip_accept_encoding=True)
        conn.putheader("Authorization", f"Bearer {TOKEN}")
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders()
        if body:
            conn.send(body)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, json.loads(data) if resp.getheader("Content-Type") == "application/json" else data.decode()

    review = f"/api/frames/{target}/review"
    status, err = raw("POST", review, {"Content-Length": "-1"})
    assert status == 400                          # refused by the HTTP server itself, nothing read
    status, err = raw("POST", review, {"Content-Length": str(1 << 20)})
    assert status == 413 and "larger than" in err["error"]
    big = json.dumps({"action": "skip", "note": "x" * 100_000}).encode()
    status, err = raw("POST", review, {"Transfer-Encoding": "chunked"},
                      f"{len(big):x}\r\n".encode() + big + b"\r\n0\r\n\r\n")
    assert status == 413
    body = json.dumps({"action": "skip"}).encode()
    status, err = raw("POST", review, {"Content-Length": str(len(body)), "Origin": "http://evil.example",
                                       "Content-Type": "application/json"}, body)
    assert status == 403 and "another origin" in err["error"]
    assert store.get(target)["status"] == "pending"
    status, done = raw("POST", review, {"Content-Length": str(len(body)), "Origin": f"http://127.0.0.1:{srv.port}",
                                        "Content-Type": "application/json"}, body)
    assert status == 200 and done["status"] == "skipped"
    status, schema = call(srv.url + "api/openapi.json")
    assert status == 200 and "/api/frames/{frame_id}/review" in schema["paths"]
    assert schema["paths"]["/api/frames/{frame_id}/review"]["post"]["requestBody"]["content"]["application/json"]
