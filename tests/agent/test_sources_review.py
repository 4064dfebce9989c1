"""Camera sources reviewed: a live read that never returns, credentials in camera URIs, frames that change shape
or type mid-stream, and what a stop leaves behind.

This OpenCV has no GStreamer (``cv2.getBuildInformation()``: ``GStreamer: NO``), so a Jetson CSI camera
(``nvarguscamerasrc``) cannot run here. Where one is needed a hand-written stand-in replaces ``cv2.VideoCapture``
for the GStreamer backend only (every other backend stays the real OpenCV): it refuses the timeout parameters,
as a GStreamer backend that predates them does, and its read blocks until released, as such a backend's read of
a stalled Argus pipeline does (it pulls from the appsink without a timeout).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.config import CameraConfig
from agent.health import Metrics
from agent.sources import open_source, redact_uri
from agent.sources import opencv as opencv_module
from agent.sources.base import SourceError
from agent.sources.camera import CameraWorker, FrameHub, Watchdog
from agent.sources.opencv import OpenCVSource

REAL_CAPTURE = cv2.VideoCapture


def wait_for(condition, timeout_s: float = 60.0, what: str = "the condition") -> None:
    """Poll ``condition``; a generous deadline, so a busy machine is only slower, never failing."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s}s"
        time.sleep(0.01)


def write_video(path: Path, n: int = 20, size: tuple[int, int] = (64, 48)) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, size)
    for i in range(n):
        writer.write(np.full((size[1], size[0], 3), 10 * i, np.uint8))
    writer.release()
    return path


class StandInGstCapture:
    """Stands in for a GStreamer VideoCapture (none runs here; see the module docstring). Opened with timeout
    parameters it is not opened (an older backend bails out on parameters it does not know); without them it
    opens, serves ``frames`` frames, then blocks in read until ``unblock`` is set."""

    made: list["StandInGstCapture"] = []
    unblock = threading.Event()
    frames = 3

    def __init__(self, target, api, params=None) -> None:
        self.target, self.params = target, params
        self.opened = not params
        self.n = 0
        self.released = threading.Event()
        self.reading = threading.Event()
        StandInGstCapture.made.append(self)

    def isOpened(self) -> bool:     # noqa: N802 (OpenCV's name)
        return self.opened and not self.released.is_set()

    def read(self):
        assert not self.released.is_set(), "read of a released capture (a crash with a real one)"
        self.n += 1
        if self.n > self.frames:
            self.reading.set()
            self.unblock.wait()
            return False, None
        return True, np.full((48, 64, 3), 7, np.uint8)

    def set(self, prop, value) -> bool:
        return True

    def get(self, prop) -> float:
        return 0.0

    def release(self) -> None:
        self.released.set()


@pytest.fixture
def stand_in_gstreamer(monkeypatch):
    StandInGstCapture.made = []
    StandInGstCapture.unblock = threading.Event()

    def capture(target, api=cv2.CAP_ANY, *rest):
        if api == cv2.CAP_GSTREAMER:
            return StandInGstCapture(target, api, *rest)
        return REAL_CAPTURE(target, api, *rest)

    monkeypatch.setattr(opencv_module.cv2, "VideoCapture", capture)
    yield StandInGstCapture
    StandInGstCapture.unblock.set()        # the stuck reads return; their threads release their captures


def test_a_gstreamer_backend_without_timeouts_is_opened_without_them_and_says_so(stand_in_gstreamer, caplog):
    """The timeout fallback: a CSI pipeline whose backend refuses CAP_PROP_*_TIMEOUT_MSEC is opened again
    without them (the first capture released), with a warning that its reads are not bounded."""
    src = open_source("csi://0", name="csi", width=1280, height=720, timeout_s=2.0)
    with caplog.at_level(logging.WARNING, logger="agent.sources.opencv"):
        src.open()
    first, second = stand_in_gstreamer.made
    assert first.params and first.released.is_set() and not second.params and not second.released.is_set()
    assert "nvarguscamerasrc sensor-id=0" in second.target
    assert "takes no read timeout" in caplog.text
    assert src.read()[0].shape == (48, 64, 3)
    src.close()
    assert second.released.is_set()


def test_a_csi_camera_whose_read_never_returns_is_reported_down_given_up_and_reopened(stand_in_gstreamer,
                                                                                     tmp_path):
    """Before: the camera thread stayed inside the read for good: the status kept the camera ``true``, the
    watchdog counted a new stall (and logged it) every stall_timeout_s, the camera was never opened again and
    its thread outlived the stop. Now the read runs on a thread of its own: the camera is reported down at
    the stall, given up stall_timeout_s + read_grace_s later and opened anew; the other camera (a real video)
    goes on throughout, and a stop ends the camera thread at once."""
    metrics, stop = Metrics(), threading.Event()
    hub = FrameHub(metrics)
    cfgs = [CameraConfig(id="csi", uri="csi://0", stall_timeout_s=0.3, reconnect={"initial_s": 0.05, "max_s": 0.05}),
            CameraConfig(id="belt", uri=str(write_video(tmp_path / "belt.avi")), loop=True, fps=50)]
    workers = []
    for cfg in cfgs:
        hub.add_camera(cfg.id, 2, "drop_oldest")
        workers.append(CameraWorker(cfg, hub, metrics, stop))
    csi, belt = workers
    csi.read_grace_s = 0.5
    dog = Watchdog(workers, stop, period_s=0.05)
    for thread in (*workers, dog):
        thread.start()
    try:
        wait_for(lambda: metrics.counter("camera_stalls_total", camera="csi") >= 1, what="a counted stall")
        wait_for(lambda: not csi.connected, what="the stalled camera reported down")
        status = {w.cfg.id: w.connected for w in workers}       # what Agent.status_body publishes
        assert status["csi"] is False
        wait_for(lambda: sum(1 for c in stand_in_gstreamer.made if not c.params) >= 2,
                 what="the camera opened anew")
        wait_for(lambda: metrics.counter("frames_captured_total", camera="csi") >= 2 * stand_in_gstreamer.frames,
                 what="frames of the camera opened anew")
        belt_then = metrics.counter("frames_captured_total", camera="belt")
        wait_for(lambda: metrics.counter("frames_captured_total", camera="belt") > belt_then + 10,
                 what="frames of the other camera")
        assert "did not return within 0.8s" in (csi.last_error or "")
    finally:
        stop.set()
        for thread in (*workers, dog):
            thread.join(10)
    assert not csi.is_alive(), "the camera thread outlived the stop"
    stand_in_gstreamer.unblock.set()
    wait_for(lambda: all(c.released.is_set() for c in stand_in_gstreamer.made), what="every capture released")
    wait_for(lambda: not [t for t in threading.enumerate() if t.name.startswith("camera-csi")],
             what="the read threads ended")


def test_a_stalled_camera_is_reported_down_while_its_read_is_waited_for(stand_in_gstreamer):
    """Before: ``connected`` (the status's ``cameras``) and the ``camera_connected`` gauge stayed 1 for a camera
    whose read never returned, however long; ``camera_stalls_total`` grew (and a warning was logged) every
    stall_timeout_s. Now the first stall reports it down, once."""
    metrics, stop = Metrics(), threading.Event()
    hub = FrameHub(metrics)
    hub.add_camera("csi", 2, "drop_oldest")
    worker = CameraWorker(CameraConfig(id="csi", uri="csi://0", stall_timeout_s=0.2), hub, metrics, stop)
    worker.read_grace_s = 600.0      # not given up during this test
    dog = Watchdog([worker], stop, period_s=0.05)
    worker.start()
    dog.start()
    try:
        wait_for(lambda: metrics.counter("camera_stalls_total", camera="csi") >= 1, what="a counted stall")
        wait_for(lambda: not worker.connected, what="the camera reported down")
        assert metrics.gauges_by("camera_connected", "camera") == {"csi": 0.0}
        time.sleep(1.0)         # five stall timeouts more: still one stall, still down
        assert metrics.counter("camera_stalls_total", camera="csi") == 1 and not worker.connected
    finally:
        stop.set()
        worker.join(10)
        dog.join(10)
    assert not worker.is_alive()


def test_a_stuck_read_is_given_up_only_once_at_a_time(stand_in_gstreamer):
    """A second source that sticks too, while the first given-up read still holds its thread (and the device),
    is waited for instead of given up: at most one stuck read per camera, so threads and captures stay bounded."""
    metrics, stop = Metrics(), threading.Event()
    hub = FrameHub(metrics)
    hub.add_camera("csi", 2, "drop_oldest")
    worker = CameraWorker(CameraConfig(id="csi", uri="csi://1", stall_timeout_s=0.2,
                                       reconnect={"initial_s": 0.01, "max_s": 0.01}), hub, metrics, stop)
    worker.read_grace_s = 0.2
    worker.start()
    try:
        wait_for(lambda: len([c for c in stand_in_gstreamer.made if c.reading.is_set()]) >= 2,
                 what="two stuck reads")
        time.sleep(1.0)         # ten times the limit: no third capture is opened
        assert len([c for c in stand_in_gstreamer.made if not c.params]) == 2
    finally:
        stop.set()
        worker.join(10)
    assert not worker.is_alive()


class NormalLiveCamera:
    """A live camera (a fake: none exists here) that delivers frames until closed."""

    finite = False

    def __init__(self) -> None:
        self.name = "cam"
        self.opens = 0
        self.closed = 0

    def open(self) -> None:
        self.opens += 1

    def read(self):
        time.sleep(0.005)
        return np.zeros((8, 8, 3), np.uint8), None

    def close(self) -> None:
        self.closed += 1


def test_a_stop_closes_the_live_source_and_leaves_no_thread():
    metrics, stop = Metrics(), threading.Event()
    hub = FrameHub(metrics)
    hub.add_camera("cam", 2, "drop_oldest")
    fake = NormalLiveCamera()
    worker = CameraWorker(CameraConfig(id="cam", uri="rtsp://cam/x"), hub, metrics, stop, lambda c: fake)
    worker.start()
    wait_for(lambda: metrics.counter("frames_captured_total", camera="cam") >= 5, what="frames")
    stop.set()
    worker.join(10)
    assert not worker.is_alive() and fake.closed == fake.opens == 1
    assert not [t for t in threading.enumerate() if t.name.startswith("camera-cam")]
    assert metrics.gauges_by("camera_connected", "camera") == {"cam": 0.0}


# ---------------------------------------------------------------- credentials in camera URIs


@pytest.mark.parametrize(("uri", "shown"), [
    ("rtsp://admin:S3cret@10.0.0.5:554/s1", "rtsp://admin:***@10.0.0.5:554/s1"),
    ("rtsp://admin:p@ss:w0rd@cam/x", "rtsp://admin:***@cam/x"),
    ("rtsps://T0ken@cam/x", "rtsps://***@cam/x"),
    ("rtsp://cam/live?user=op&password=S3cret&channel=1", "rtsp://cam/live?user=op&password=***&channel=1"),
    ("gst://rtspsrc location=rtsp://op:S3cret@cam/x user-pw=S3cret ! appsink",
     "gst://rtspsrc location=rtsp://op:***@cam/x user-pw=*** ! appsink"),
    ("rtsp://cam/stream", "rtsp://cam/stream"),
    ("file:///data/a@b/x.mp4", "file:///data/a@b/x.mp4"),
    ("csi://0", "csi://0"),
])
def test_redact_uri_hides_passwords_only(uri, shown):
    assert redact_uri(uri) == shown


def test_an_rtsp_password_never_reaches_the_log_or_the_camera_error(caplog):
    """Before: every reconnect of an RTSP camera that could not be opened logged its URI with the password
    (``cannot open rtsp source rtsp://admin:S3cret@...``), and an opened one logged it at INFO."""
    metrics, stop = Metrics(), threading.Event()
    hub = FrameHub(metrics)
    hub.add_camera("cam", 2, "drop_oldest")
    uri = "rtsp://admin:S3cret@127.0.0.1:1/stream"        # nothing listens on port 1: refused at once
    worker = CameraWorker(CameraConfig(id="cam", uri=uri, reconnect={"initial_s": 0.01, "max_s": 0.01}),
                          hub, metrics, stop)
    with caplog.at_level(logging.DEBUG):
        worker.start()
        wait_for(lambda: metrics.counter("camera_reconnects_total", camera="cam") >= 2, what="two reconnects")
        stop.set()
        worker.join(30)
        opened = CameraWorker(CameraConfig(id="ok", uri=uri), hub, metrics, threading.Event(),
                              lambda c: NormalLiveCamera())
        opened._open()
        opened._close()
    assert "cannot open rtsp source rtsp://admin:***@127.0.0.1:1/stream" in caplog.text
    assert "opened rtsp://admin:***@127.0.0.1:1/stream" in caplog.text
    assert "S3cret" not in caplog.text and "S3cret" not in (worker.last_error or "")


def test_a_bad_rtsp_uri_is_refused_without_its_password():
    with pytest.raises(SourceError) as refused:
        open_source("rtsp://admin:S3cret@/stream", name="c")
    assert "names no host" in str(refused.value) and "S3cret" not in str(refused.value)
    src = OpenCVSource("rtsp://admin:S3cret@127.0.0.1:1/x", kind="rtsp", name="c", timeout_s=1.0)
    with pytest.raises(SourceError, match=r"rtsp://admin:\*\*\*@127.0.0.1:1/x") as failed:
        src.open()
    assert "S3cret" not in str(failed.value)


# ---------------------------------------------------------------- frames that change mid-stream


class ChangingCamera:
    """A live camera (a fake: none exists here) whose frames change as a USB camera's do when it renegotiates:
    another size, then gray, 16-bit, float, None and empty frames, then good ones again."""

    finite = False

    def __init__(self) -> None:
        self.name = "cam"
        self.frames = [np.zeros((48, 64, 3), np.uint8), np.zeros((96, 128, 3), np.uint8),
                       np.zeros((48, 64), np.uint8), np.zeros((48, 64, 3), np.float32), None,
                       np.zeros((0, 64, 3), np.uint8), np.zeros((48, 64, 4), np.uint8),
                       np.zeros((48, 64, 3), np.uint8)]
        self.i = 0

    def open(self) -> None:
        pass

    def read(self):
        if self.i >= len(self.frames):
            time.sleep(0.01)
            return np.zeros((48, 64, 3), np.uint8), None
        self.i += 1
        return self.frames[self.i - 1], None

    def close(self) -> None:
        pass


def test_frames_that_change_shape_or_type_mid_stream_are_served_or_counted_never_a_reconnect():
    metrics, stop = Metrics(), threading.Event()
    hub = FrameHub(metrics)
    hub.add_camera("cam", 64, "block")
    worker = CameraWorker(CameraConfig(id="cam", uri="usb://0"), hub, metrics, stop, lambda c: ChangingCamera())
    worker.start()
    try:
        wait_for(lambda: metrics.counter("frames_captured_total", camera="cam") >= 6, what="frames")
    finally:
        stop.set()
        worker.join(10)
    shapes = [f.image.shape for f in hub.get_batch(6, 0.0)]
    assert shapes[:2] == [(48, 64, 3), (96, 128, 3)]
    assert metrics.counter("camera_errors_total", camera="cam", kind="frame") == 5      # 2-D, float, None, empty, 4ch
    assert metrics.counter("camera_reconnects_total", camera="cam") == 0
    seqs = [f.seq for f in hub.get_batch(64, 0.0)]
    assert seqs == sorted(seqs)


class LostCamera:
    """A live camera (a fake: none exists here) that opens, delivers one frame, then loses its stream."""

    finite = False

    def __init__(self) -> None:
        self.name = "cam"
        self.closed = threading.Event()
        self.n = 0

    def open(self) -> None:
        self.n = 0

    def read(self):
        self.n += 1
        if self.n > 1:
            raise SourceError("cam: read failed (camera lost)")
        return np.zeros((8, 8, 3), np.uint8), None

    def close(self) -> None:
        self.closed.set()


def test_a_lost_camera_is_released_and_reported_down_during_its_backoff_wait():
    """Before: the source was released, and the camera reported down, only after the backoff wait: a lost camera
    showed ``connected`` (status, camera_connected) for the whole first wait, its capture still held."""
    metrics, stop = Metrics(), threading.Event()
    hub = FrameHub(metrics)
    hub.add_camera("cam", 2, "drop_oldest")
    fake = LostCamera()
    worker = CameraWorker(CameraConfig(id="cam", uri="rtsp://cam/x", reconnect={"initial_s": 600, "max_s": 600}),
                          hub, metrics, stop, lambda c: fake)
    worker.start()
    try:
        wait_for(lambda: metrics.counter("camera_reconnects_total", camera="cam") == 1, what="the reconnect")
        assert fake.closed.wait(30), "the lost source is still held during the backoff wait"
        wait_for(lambda: not worker.connected, what="the camera reported down")
        assert metrics.gauges_by("camera_connected", "camera") == {"cam": 0.0}
    finally:
        stop.set()
        worker.join(10)


def test_validate_config_never_echoes_a_camera_uris_password(tmp_path):
    """The field error's "(got '...')" quoted the refused URI whole, password included, into a terminal or a log."""
    import subprocess
    import sys

    cfg = tmp_path / "station.yaml"
    cfg.write_text("site: s\nstation: st\nmodel: {bundle: /nonexistent}\n"
                   "cameras:\n  - {id: a, uri: 'rtsp://admin:S3cret@/x'}\n")
    done = subprocess.run([sys.executable, "-m", "agent", "validate-config", str(cfg)], capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "field cameras.0.uri" in out, out
    assert "S3cret" not in out and "admin:***@" in out, out
