"""Camera sources on real files, the latest-frame hub, and the watchdog with hand-written fake cameras."""

from __future__ import annotations

import os
import threading
import time

import cv2
import numpy as np
import pytest
from agent_support import video_frames

from agent.config import CameraConfig, Roi
from agent.health import Metrics
from agent.sources import open_source
from agent.sources.base import EndOfStream, Frame, SourceError
from agent.sources.camera import CameraWorker, FrameHub, RoiError, Watchdog, crop_roi
from agent.sources.folder import ImageFolderSource
from agent.sources.opencv import OpenCVSource


def test_video_file_source_reads_every_frame_then_ends(fmnist_video):
    src = open_source(f"file://{fmnist_video}", name="v")
    src.open()
    frames = []
    with pytest.raises(EndOfStream):
        while True:
            frames.append(src.read()[0])
    assert len(frames) == 60 and frames[0].shape == (64, 64, 3) and frames[0].dtype == np.uint8
    assert np.array_equal(frames[5], video_frames(fmnist_video)[5])


def test_looping_video_restarts(fmnist_video):
    src = open_source(str(fmnist_video), name="v", loop=True)
    src.open()
    first = src.read()[0]
    for _ in range(59):
        src.read()
    assert np.array_equal(src.read()[0], first)


def test_image_folder_skips_corrupt_files(tmp_path, fmnist_test_images):
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"{i:02d}.png"), fmnist_test_images[0][i])
    (tmp_path / "01b.png").write_bytes(b"not a png")
    src = open_source(str(tmp_path), name="f")
    assert isinstance(src, ImageFolderSource)
    src.open()
    refs = [src.read()[1] for _ in range(3)]
    assert refs == ["00.png", "01.png", "02.png"]
    with pytest.raises(EndOfStream):
        src.read()


def test_a_looping_folder_with_no_readable_image_is_a_source_error_not_an_endless_loop(tmp_path,
                                                                                      fmnist_test_images):
    """Every file unreadable (or gone since open): the read ends with SourceError after one pass, so the camera
    worker backs off and reconnects (and sees stop), instead of spinning on the same files forever."""
    for i in range(3):
        (tmp_path / f"{i:02d}.jpg").write_bytes(b"not a jpeg")
    src = ImageFolderSource(tmp_path, name="f", loop=True)
    src.open()
    with pytest.raises(SourceError, match=f"{tmp_path}: none of its 3 image"):
        src.read()
    cv2.imwrite(str(tmp_path / "01.jpg"), fmnist_test_images[0][0])          # one readable again: served
    assert [src.read()[1] for _ in range(2)] == ["01.jpg", "01.jpg"]


def test_uri_forms_pick_the_right_backend(tmp_path):
    assert open_source("rtsp://cam/stream", name="r").kind == "rtsp"
    assert open_source("v4l2:///dev/video3", name="v").target == "/dev/video3"
    assert open_source("usb://1", name="u").target == 1 and open_source("2", name="n").target == 2
    csi = open_source("csi://1", name="c", width=1280, height=720)
    assert csi.kind == "gstreamer" and "nvarguscamerasrc sensor-id=1" in csi.target and "width=1280" in csi.target
    with pytest.raises(SourceError, match="unknown camera URI scheme"):
        open_source("ftp://x", name="x")
    with pytest.raises(SourceError, match="does not exist"):
        open_source(str(tmp_path / "nope.mp4"), name="x").open()


def test_rtsp_uses_tcp_transport(monkeypatch):
    monkeypatch.delenv("OPENCV_FFMPEG_CAPTURE_OPTIONS", raising=False)
    src = OpenCVSource("rtsp://127.0.0.1:1/none", kind="rtsp", name="r")
    with pytest.raises(SourceError):
        src.open()
    assert os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"].startswith("rtsp_transport;tcp")


def test_roi_inside_the_frame_is_cut_and_one_outside_it_is_refused():
    img = np.arange(10 * 20 * 3, dtype=np.uint8).reshape(10, 20, 3)
    assert np.array_equal(crop_roi(img, Roi(x=15, y=5, width=5, height=5)), img[5:10, 15:20])
    assert crop_roi(img, None) is img
    for roi in (Roi(x=15, y=5, width=10, height=10), Roi(x=30, y=0, width=5, height=5)):
        with pytest.raises(RoiError, match=r"does not fit the 20x10 frame"):
            crop_roi(img, roi)


def _frame(cam, seq):
    return Frame(cam, seq, time.time(), time.monotonic(), np.zeros((2, 2, 3), np.uint8))


def test_hub_drops_oldest_counts_and_batches_across_cameras():
    metrics = Metrics()
    hub = FrameHub(metrics)
    hub.add_camera("a", 2, "drop_oldest")
    hub.add_camera("b", 2, "drop_oldest")
    stop = threading.Event()
    for seq in range(1, 5):
        hub.put(_frame("a", seq), stop)
    hub.put(_frame("b", 1), stop)
    assert metrics.counter("frames_dropped_total", camera="a") == 2
    batch = hub.get_batch(8, 0.0)
    assert [(f.camera_id, f.seq) for f in batch] == [("a", 3), ("b", 1), ("a", 4)]
    assert hub.get_batch(8, 0.0, wait_s=0.01) == []


class FakeCamera:
    """A live camera that stalls after ``stall_after`` frames on its first connection (a fake: no camera that
    stalls exists on a test machine). A stalled read gives up after ``read_timeout_s``, as a capture opened
    with CAP_PROP_READ_TIMEOUT_MSEC does; it records which thread closes it."""

    finite = False

    def __init__(self, name, stall_after=None, read_timeout_s=0.5):
        self.name = name
        self.stall_after = stall_after
        self.read_timeout_s = read_timeout_s
        self.opens = 0
        self.closed = threading.Event()
        self.closed_by: list[int] = []
        self.n = 0

    def open(self):
        self.opens += 1
        self.closed.clear()

    def read(self):
        self.n += 1
        if self.stall_after is not None and self.opens == 1 and self.n > self.stall_after:
            self.closed.wait(self.read_timeout_s)
            raise SourceError(f"{self.name}: no frame within the read timeout")
        time.sleep(0.01)
        return np.zeros((4, 4, 3), np.uint8), None

    def close(self):
        self.closed_by.append(threading.get_ident())
        self.closed.set()


def wait_for(condition, timeout_s=30.0, what="the condition"):
    """Poll ``condition`` until it holds; a generous deadline, so a busy machine is only slower, never failing."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s}s"
        time.sleep(0.01)


def test_watchdog_reconnects_a_stalled_camera_while_the_other_keeps_running():
    metrics, stop = Metrics(), threading.Event()
    hub = FrameHub(metrics)
    fakes = {"stuck": FakeCamera("stuck", stall_after=3, read_timeout_s=1.0), "fine": FakeCamera("fine")}
    workers = []
    for cid in fakes:
        cfg = CameraConfig(id=cid, uri="fake", stall_timeout_s=0.3, reconnect={"initial_s": 0.05})
        hub.add_camera(cid, 2, "drop_oldest")
        workers.append(CameraWorker(cfg, hub, metrics, stop, lambda c: fakes[c.id]))
    dog = Watchdog(workers, stop, period_s=0.05)
    for t in (*workers, dog):
        t.start()
    try:
        wait_for(lambda: metrics.counter("camera_stalls_total", camera="stuck") >= 1, what="a counted stall")
        fine_at_stall = metrics.counter("frames_captured_total", camera="fine")
        wait_for(lambda: fakes["stuck"].opens >= 2 and metrics.counter("frames_captured_total", camera="stuck") > 3,
                 what="the stalled camera's reconnect")
        wait_for(lambda: metrics.counter("frames_captured_total", camera="fine") > fine_at_stall + 20,
                 what="frames of the other camera")
    finally:
        stop.set()
        for t in (*workers, dog):
            t.join(5)
    # the watchdog never closed a source itself: only the camera's own thread did (after its read returned)
    assert fakes["stuck"].closed_by and set(fakes["stuck"].closed_by) == {workers[0].ident}
