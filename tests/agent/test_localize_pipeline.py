"""Localize, then classify, through the real inference stage: a real ONNX Runtime session, the real outbox,
synthetic belt views with real Fashion-MNIST items, frames prepared by the camera threads' own function.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from agent_support import as_config, station_config, validate_message
from scenes import Scene, make_sprite

from agent.backends import create_backend
from agent.health import Metrics
from agent.localize import cut
from agent.mqtt import frame_envelope
from agent.outbox import Outbox
from agent.pipeline import InferenceStage, ModelHolder, ModelRuntime
from agent.prepare import camera_preparer
from agent.sources.base import Frame
from contract.bundle import load_bundle
from contract.preprocess import Preprocessor

EMPTY, ITEM = "empty", "item"


class RecordingBackend:
    """The real backend, keeping every input it was given."""

    def __init__(self, backend) -> None:
        self.backend = backend
        self.name, self.precision = backend.name, backend.precision
        self.inputs: list[np.ndarray] = []

    def run(self, inputs: np.ndarray) -> np.ndarray:
        self.inputs.append(inputs.copy())
        return self.backend.run(inputs)


def crop_bundle(src: Path, dst: Path, mode: str) -> Path:
    """A copy of ``src`` whose manifest asks for this crop mode (only the manifest's input.crop changes)."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["input"]["crop"] = {"mode": mode, "margin": 0.1, "min_size": 16}
    manifest["version"] = f"{manifest['version']}-{mode}"
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def belt_frames(images: np.ndarray, items: int = 3) -> list[tuple[str, np.ndarray]]:
    """Six empty frames (the first is the warm-up), then each item for 3 frames with 3 empty frames after."""
    scene = Scene(seed=21)
    rng = np.random.default_rng(22)
    out, t = [], 0
    for _ in range(6):
        out.append((EMPTY, scene.render(t)[0]))
        t += 1
    for i in range(items):
        sprite = make_sprite(images[i], int(rng.integers(170, 231)), float(rng.uniform(-20, 20)), (0.9, 0.8, 0.7))
        for left in (10, 30, 50):
            out.append((ITEM, scene.render(t, [(sprite, left, 20)])[0]))
            t += 1
        for _ in range(3):
            out.append((EMPTY, scene.render(t)[0]))
            t += 1
    return out


def run_stage(tmp_path: Path, bundle_dir: Path, images: list[np.ndarray], prepared_for: Path | None = None,
              **sections):
    """The frames prepared by a camera thread's preparer (for ``prepared_for``'s model when given, i.e. just
    before a swap), then decided by the stage running ``bundle_dir``'s model."""
    cfg = as_config(station_config(tmp_path, bundle_dir, str(tmp_path), 1883, **sections))
    bundle = load_bundle(bundle_dir)
    backend = RecordingBackend(create_backend(bundle, cfg.model))
    runtime = ModelRuntime(bundle, backend, Preprocessor(bundle.input_spec))
    holder = ModelHolder(runtime)
    if prepared_for is not None:
        other = load_bundle(prepared_for)
        holder = ModelHolder(ModelRuntime(other, backend, Preprocessor(other.input_spec)))
    prepare = camera_preparer(holder, cfg.decisions.presence)
    batch = []
    for i, image in enumerate(images, start=1):
        prepared = prepare(image)
        batch.append(Frame("cam-a", i, 1000.0 + i, 0.0, image, None, None, prepared, prepared.located))
    holder.swap(runtime)
    outbox = Outbox(tmp_path / "outbox.sqlite", max_bytes=cfg.outbox.max_bytes, max_age_s=cfg.outbox.max_age_s)
    metrics = Metrics()
    stage = InferenceStage(cfg, hub=None, model=holder, outbox=outbox, metrics=metrics, cameras_done=lambda: True)
    for start in range(0, len(batch), 4):
        stage.process(batch[start : start + 4])
    stage._flush_items()
    records = outbox.pending(limit=10_000)
    outbox.close()
    return records, backend, metrics, batch


PRESENCE = {"presence": {"mode": "background", "min_frames": 2, "gap_frames": 2}}


@pytest.fixture(scope="module")
def frames(fmnist_test_images) -> list[tuple[str, np.ndarray]]:
    return belt_frames(fmnist_test_images[0])


def test_empty_frames_are_not_classified_published_or_uploaded(tmp_path, tiny_bundle, frames):
    # given: a station with presence from the localizer, uploading every low-confidence frame
    kinds = [k for k, _ in frames]
    records, backend, metrics, _ = run_stage(tmp_path, tiny_bundle, [f for _, f in frames], decisions=PRESENCE)

    # then: the model ran on the item frames only
    assert sum(len(x) for x in backend.inputs) == kinds.count(ITEM) == 9
    results = [r.body for r in records if r.kind == "result"]
    item_seqs = [i for i, k in enumerate(kinds, start=1) if k == ITEM]
    assert [r["frame_seq"] for r in results] == item_seqs
    for r in results:
        validate_message("result.v1", r)
        assert r["present"] is True and isinstance(r["label"], str) and len(r["crop_box"]) == 4
    uploads = [r for r in records if r.kind == "frame"]
    assert uploads and {u.body["frame_seq"] for u in uploads} <= set(item_seqs)
    assert metrics.counter("frames_empty_total", camera="cam-a") == kinds.count(EMPTY)
    assert metrics.counter("frames_classified_total", camera="cam-a") == 9
    assert metrics.snapshot()["frames_empty"] == kinds.count(EMPTY)
    # one decision per item, from the item frames
    decisions = [r.body for r in records if r.kind == "decision"]
    assert [d["frames"] for d in decisions] == [3, 3, 3]


def test_empty_frames_are_published_without_a_label_when_configured(tmp_path, tiny_bundle, frames):
    records, _, _, _ = run_stage(tmp_path, tiny_bundle, [f for _, f in frames],
                                 decisions={**PRESENCE, "empty_frames": "publish"}, frames={"enabled": False})
    results = [r.body for r in records if r.kind == "result"]
    assert [r["present"] for r in results] == [k == ITEM for k, _ in frames]
    for r in results:
        validate_message("result.v1", r)
        if not r["present"]:
            assert (r["label"], r["class_id"], r["confidence"], r["top_k"], r["low_confidence"]) == (
                None, None, None, [], False)
            assert r["crop_box"] is None and r["latency_ms"]["inference"] == 0.0
    # a present:false result that carries a label is not valid
    bad = dict(next(r for r in results if not r["present"]), label="Sneaker")
    with pytest.raises(Exception, match="not of type 'null'|None is not of type|'Sneaker'"):
        validate_message("result.v1", bad)


@pytest.mark.parametrize("prepared_for", [None, "roi"], ids=["prepared-for-this-model", "after-a-swap"])
def test_a_foreground_bundle_is_fed_the_item_crop(tmp_path, tiny_bundle, frames, prepared_for):
    # given: a bundle whose manifest asks for the item's crop (and, for the swap case, frames that the
    # camera thread prepared for a whole-ROI bundle just before the swap)
    fg = crop_bundle(tiny_bundle, tmp_path / "fg", "foreground")
    before = crop_bundle(tiny_bundle, tmp_path / "roi", "roi") if prepared_for else None
    records, backend, _, batch = run_stage(tmp_path, fg, [f for _, f in frames], prepared_for=before,
                                           decisions=PRESENCE)
    results = {r.body["frame_seq"]: r.body for r in records if r.kind == "result"}
    fed = np.concatenate(backend.inputs)
    # then: every model input is the station Preprocessor applied to the frame's crop box, nothing else
    pre = Preprocessor(load_bundle(fg).input_spec)
    expected = np.stack([pre(cut(f.image, tuple(results[f.seq]["crop_box"]))) for f in batch if f.seq in results])
    assert fed.shape == expected.shape and np.allclose(fed, expected, atol=1e-5)
    for body in results.values():
        x0, y0, x1, y1 = body["crop_box"]
        assert x1 - x0 == y1 - y0 < 300               # a square crop of the item, not the whole ROI


def test_an_uploaded_item_frame_carries_the_crop_and_the_roi_for_context(tmp_path, tiny_bundle, frames):
    from central.review.ingest import (
        parse_frame,  # read-only: the central ingest accepts what the station sends
    )

    fg = crop_bundle(tiny_bundle, tmp_path / "fg", "foreground")
    records, _, _, batch = run_stage(tmp_path, fg, [f for _, f in frames], decisions=PRESENCE)
    uploads = [r for r in records if r.kind == "frame"]
    assert uploads
    by_seq = {f.seq: f for f in batch}
    for record in uploads:
        body = record.body
        validate_message("frame.v1", body)
        x0, y0, x1, y1 = body["context"]["crop_box"]
        assert (body["jpeg"]["width"], body["jpeg"]["height"]) == (x1 - x0, y1 - y0)
        assert body["jpeg"]["item_crop"] is True and record.blob[:2] == b"\xff\xd8"
        assert (body["context"]["roi_width"], body["context"]["roi_height"]) == by_seq[body["frame_seq"]].image.shape[
            1::-1]
        meta, jpeg = parse_frame("inventory/test/st-01/frames", frame_envelope(record), None)
        assert meta["context"]["crop_box"] == [x0, y0, x1, y1] and jpeg == record.blob


def test_every_uploaded_frame_names_the_item_it_shows_as_its_decision_does(tmp_path, tiny_bundle, frames):
    from central.review.ingest import parse_frame

    # given: every frame unsure (min_confidence 1) and nothing held back (no rate limit, no duplicate check)
    fg = crop_bundle(tiny_bundle, tmp_path / "fg", "foreground")
    unsure = [{"id": "cam-a", "uri": str(tmp_path), "backpressure": "block", "queue_size": 8,
               "thresholds": {"min_confidence": 1.0}}]
    records, _, _, _ = run_stage(tmp_path, fg, [f for _, f in frames], decisions=PRESENCE, cameras=unsure,
                                 frames={"min_interval_s": 0.0, "dedupe_bits": 0, "item_views": False})
    decisions = [r.body for r in records if r.kind == "decision"]
    results = {r.body["frame_seq"]: r.body for r in records if r.kind == "result"}
    uploads = [r for r in records if r.kind == "frame"]
    # then: each of the 3 items has its own track, and each uploaded frame carries the track of the decision whose
    # frames it lies among, as the central ingest reads it
    assert len(decisions) == 3 and len({d["track"] for d in decisions}) == 3
    assert len(uploads) == len(results) == 9
    for record in uploads:
        validate_message("frame.v1", record.body)
        at = results[record.body["frame_seq"]]["captured_at"]
        owner = [d for d in decisions if d["first_seen"] <= at <= d["last_seen"]]
        assert len(owner) == 1 and record.body["track"] == owner[0]["track"]
        meta, _ = parse_frame("inventory/test/st-01/frames", frame_envelope(record), None)
        assert meta["track"] == owner[0]["track"]
    for d in decisions:
        validate_message("decision.v1", d)


def test_an_item_decided_unsure_sends_its_best_view_naming_its_decision(tmp_path, tiny_bundle, frames):
    from central.review.ingest import parse_frame

    # given: a bundle fed the item's crop, every item unsure (min_confidence 1), and the rate limit holding back
    # every low-confidence frame after the first
    fg = crop_bundle(tiny_bundle, tmp_path / "fg", "foreground")
    images = [f for _, f in frames]
    unsure = [{"id": "cam-a", "uri": str(tmp_path), "backpressure": "block", "queue_size": 8,
               "thresholds": {"min_confidence": 1.0}}]
    records, _, metrics, batch = run_stage(tmp_path / "on", fg, images, decisions=PRESENCE, cameras=unsure,
                                           frames={"min_interval_s": 3600.0})
    decisions = [r.body for r in records if r.kind == "decision"]
    views = [r for r in records if r.kind == "frame" and "item" in r.body]
    # then: one view per item, after its decision, naming it and carrying the item's verdict
    assert len(decisions) == 3 and all(d["low_confidence"] for d in decisions)
    kinds = [(r.kind, r.body.get("item", {}).get("decision") or r.body.get("id")) for r in records
             if r.kind == "decision" or "item" in r.body]
    assert kinds == [k for d in decisions for k in (("decision", d["id"]), ("frame", d["id"]))]
    results = {r.body["frame_seq"]: r.body for r in records if r.kind == "result"}
    height, width = batch[0].image.shape[:2]
    for view, d in zip(views, decisions):
        body = view.body
        validate_message("frame.v1", body)
        assert body["item"] == {"decision": d["id"], "item_seq": d["item_seq"], "frames": d["frames"]}
        assert (body["label"], body["confidence"], body["selected_because"]) == (d["label"], d["confidence"],
                                                                                 d["reasons"])
        # the item's frame showing it whole with the largest box
        seqs = [s for s, r in results.items() if d["first_seen"] <= r["captured_at"] <= d["last_seen"]]
        box = lambda s: results[s]["item_box"]  # noqa: E731
        rank = lambda s: (box(s)[0] > 0 and box(s)[1] > 0 and box(s)[2] < width and box(s)[3] < height,  # noqa: E731
                          (box(s)[2] - box(s)[0]) * (box(s)[3] - box(s)[1]))
        assert body["frame_seq"] == max(seqs, key=rank)
        x0, y0, x1, y1 = body["context"]["crop_box"]
        assert [x0, y0, x1, y1] == results[body["frame_seq"]]["crop_box"] and body["jpeg"]["item_crop"]
        assert (body["jpeg"]["width"], body["jpeg"]["height"]) == (x1 - x0, y1 - y0)
        meta, jpeg = parse_frame("inventory/test/st-01/frames", frame_envelope(view), None)
        assert meta["item"]["decision"] == d["id"] and jpeg == view.blob
    assert metrics.counter("item_views_uploaded_total", camera="cam-a") == 3
    per_frame = [r for r in records if r.kind == "frame" and "item" not in r.body]
    # the least certain frame of an interval may be the image an item view already sent: then held back as a duplicate
    duplicate = metrics.counter("frames_upload_suppressed_total", camera="cam-a", why="duplicate")
    assert len(per_frame) + duplicate == 1
    assert metrics.counter("frames_upload_suppressed_total", camera="cam-a", why="rate") > 0

    assert len({d["track"] for d in decisions}) == 3 and all(v.body["track"] == d["track"]
                                                             for v, d in zip(views, decisions))

    # with item_views off: the same per-frame upload, and no item's view
    records, _, metrics, _ = run_stage(tmp_path / "off", fg, images, decisions=PRESENCE, cameras=unsure,
                                       frames={"min_interval_s": 3600.0, "item_views": False})
    uploads = [r.body for r in records if r.kind == "frame"]
    assert len(uploads) == 1 and "item" not in uploads[0]
    assert len([r for r in records if r.kind == "decision"]) == 3


def test_an_item_resting_in_view_past_max_frames_is_one_decision(tmp_path, tiny_bundle, fmnist_test_images):
    # given: a belt stopped with an item under the camera for 12 frames (max_frames 5), then the belt runs: empty
    # frames, the next item for 3 frames, empty frames
    scene = Scene(seed=23)
    rest = make_sprite(fmnist_test_images[0][5], 200, 0.0, (0.9, 0.8, 0.7))
    after = make_sprite(fmnist_test_images[0][6], 190, 0.0, (0.7, 0.8, 0.9))
    images = [scene.render(t)[0] for t in range(6)] + [scene.render(6, [(rest, 50, 40)])[0]] * 12
    images += [scene.render(t)[0] for t in range(18, 21)] + [scene.render(t, [(after, 30 + 20 * (t - 21), 30)])[0]
                                                            for t in range(21, 24)]
    images += [scene.render(t)[0] for t in range(24, 27)]
    fg = crop_bundle(tiny_bundle, tmp_path / "fg", "foreground")
    records, _, _, _ = run_stage(tmp_path, fg, images,
                                 decisions={"presence": {**PRESENCE["presence"], "max_frames": 5}},
                                 frames={"enabled": False})
    # then: every frame of the resting item is published, and it is decided once, on its first max_frames frames
    # (before: once every max_frames frames, 3 decisions); the next item is the second decision
    results = [r.body for r in records if r.kind == "result"]
    assert [r["frame_seq"] for r in results] == list(range(7, 19)) + [22, 23, 24]
    decisions = [r.body for r in records if r.kind == "decision"]
    assert [(d["item_seq"], d["frames"]) for d in decisions] == [(1, 5), (2, 3)]
    assert decisions[0]["track"] != decisions[1]["track"]
    for d in decisions:
        validate_message("decision.v1", d)
