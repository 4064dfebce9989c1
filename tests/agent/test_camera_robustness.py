"""Camera sources under the conditions that broke them: a capture released while it is read, a stream that
goes silent, folders holding images that are corrupt or declare huge sizes, a camera that opens and then fails,
and URI forms that dropped part of what they said. Real OpenCV on real files and real sockets throughout; a
hand-written fake only for a camera device (none exists on a test machine), said where it is used."""

from __future__ import annotations

import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.config import MAX_FRAME_SIDE, CameraConfig
from agent.health import Metrics
from agent.sources import open_source
from agent.sources.base import SourceError
from agent.sources.camera import CameraWorker, FrameHub
from agent.sources.folder import ImageFolderSource
from agent.sources.opencv import OpenCVSource, ffmpeg_socket_timeout_option
from contract.image_header import ImageHeaderError, image_size

ROOT = Path(__file__).resolve().parents[2]


def run_python(code: str, *args: str, timeout_s: float = 240) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter at the repository root: a segfault there fails the test (exit -11)
    instead of killing pytest."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout_s)


def write_video(path: Path, n: int = 30, size: tuple[int, int] = (640, 480)) -> Path:
    """A real MJPG video of random frames (decoding each takes the read a few milliseconds)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, size)
    rng = np.random.default_rng(0)
    for _ in range(n):
        writer.write(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    writer.release()
    return path


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int, idat: bytes = zlib.compress(b"\0" * 100)) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` RGB pixels, with the given image data."""
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b""))


def wait_for(condition, timeout_s: float = 60.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s}s"
        time.sleep(0.005)


def run_worker(cfg: CameraConfig, **kwargs) -> tuple[CameraWorker, Metrics, FrameHub]:
    metrics, stop = Metrics(), threading.Event()
    hub = FrameHub(metrics)
    hub.add_camera(cfg.id, cfg.queue_size, cfg.backpressure)
    worker = CameraWorker(cfg, hub, metrics, stop, **kwargs)
    worker.start()
    return worker, metrics, hub


# ---------------------------------------------------------------- finding 1: a capture released while read


def test_closing_a_capture_while_another_thread_reads_it_waits_for_the_read_and_never_crashes(tmp_path):
    """What the watchdog used to do: release the VideoCapture from its thread while the camera thread was inside
    cap.read() on it (a segfault, exit -11). close() now waits for the read in progress."""
    video = write_video(tmp_path / "v.avi")
    result = run_python("""
        import sys, threading, time
        from agent.sources.base import EndOfStream, SourceError
        from agent.sources.opencv import OpenCVSource
        for trial in range(60):
            src = OpenCVSource(sys.argv[1], kind="file", name="cam", loop=True)
            src.open()
            ended = []
            def reader():
                try:
                    while True:
                        src.read()
                except (SourceError, EndOfStream) as exc:
                    ended.append(exc)
            t = threading.Thread(target=reader)
            t.start()
            time.sleep(0.001 * (trial % 7))
            src.close()
            t.join(60)
            assert ended and "not open" in str(ended[0]), ended
        print("survived")
    """, str(video))
    assert result.returncode == 0 and "survived" in result.stdout, (result.returncode, result.stderr[-2000:])


def test_a_kicked_camera_reconnects_on_its_own_thread_and_goes_on_reading(tmp_path):
    """Watchdog kicks while the camera thread reads a real video: no crash, and every kick ends in a reconnect
    made by the camera thread (before, kick() released the capture from the kicking thread: a segfault, or the
    file source saw its end and the camera thread stopped)."""
    video = write_video(tmp_path / "v.avi")
    result = run_python("""
        import sys, threading, time
        from agent.config import CameraConfig
        from agent.health import Metrics
        from agent.sources.camera import CameraWorker, FrameHub
        metrics, stop = Metrics(), threading.Event()
        hub = FrameHub(metrics)
        hub.add_camera("cam", 4, "drop_oldest")
        cfg = CameraConfig(id="cam", uri=sys.argv[1], loop=True, reconnect={"initial_s": 0.001, "max_s": 0.001})
        worker = CameraWorker(cfg, hub, metrics, stop)
        worker.start()
        count = lambda name: metrics.counter(name, camera="cam")
        for i in range(40):
            deadline = time.monotonic() + 60
            seen = count("frames_captured_total")
            while count("frames_captured_total") == seen:       # a frame passed: the thread reads the next one
                assert not worker.ended.is_set(), "the camera thread ended"
                assert time.monotonic() < deadline, "no frame"
                time.sleep(0.0005)
            worker.kick()
            while count("camera_reconnects_total") < i + 1:
                assert not worker.ended.is_set(), f"the camera thread ended after kick {i + 1}"
                assert time.monotonic() < deadline, f"no reconnect after kick {i + 1}"
                time.sleep(0.0005)
        frames = count("frames_captured_total")
        deadline = time.monotonic() + 60
        while count("frames_captured_total") < frames + 5:
            assert time.monotonic() < deadline, "no frames after the last reconnect"
            time.sleep(0.001)
        stop.set()
        worker.join(10)
        print("reconnects", int(count("camera_reconnects_total")))
    """, str(video))
    assert result.returncode == 0, (result.returncode, result.stdout[-500:], result.stderr[-2000:])
    assert "reconnects 40" in result.stdout


class SilentMjpegServer:
    """An HTTP MJPEG stream (FFmpeg reads it as it reads RTSP) that sends ``frames`` JPEGs, then nothing while
    keeping the connection open: a stalled network camera."""

    def __init__(self, frames: int = 5) -> None:
        self.jpeg = cv2.imencode(".jpg", np.full((120, 160, 3), 90, np.uint8))[1].tobytes()
        self.frames = frames
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/stream.mjpg"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)
            conn.recv(4096)
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: multipart/x-mixed-replace; boundary=frame\r\n\r\n")
            for _ in range(self.frames):
                conn.sendall(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(self.jpeg)
                             + self.jpeg + b"\r\n")

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


def test_a_silent_stream_ends_its_read_within_the_capture_read_timeout():
    """The read of a stream that went silent returns after the source's timeout (the camera's stall_timeout_s),
    so its own thread can release it; before, FFmpeg's default kept it blocked for 30 s."""
    server = SilentMjpegServer(frames=5)
    src = OpenCVSource(server.url, kind="rtsp", name="cam", timeout_s=1.0)
    try:
        src.open()
        started = time.monotonic()
        with pytest.raises(SourceError, match="read failed"):
            for _ in range(50):
                src.read()
                started = time.monotonic()      # the last frame that came
        assert time.monotonic() - started < 20      # 1 s asked; FFmpeg's own default is 30 s
    finally:
        src.close()
        server.close()


# ---------------------------------------------------------------- finding 6: the RTSP socket timeout option


def test_the_rtsp_socket_timeout_option_is_the_one_the_linked_ffmpeg_knows():
    assert ffmpeg_socket_timeout_option("    avformat:  YES (59.27.100)") == "timeout"       # FFmpeg 5
    assert ffmpeg_socket_timeout_option("    avformat:  YES (63.1.102)") == "timeout"
    # FFmpeg 4: "timeout" there makes the RTSP client listen for a server; "stimeout" is the socket timeout
    assert ffmpeg_socket_timeout_option("    avformat:  YES (58.76.100)") == "stimeout"
    assert ffmpeg_socket_timeout_option("Video I/O: nothing") is None


def test_opening_an_rtsp_server_that_never_answers_gives_up_within_the_timeouts(monkeypatch):
    """Before: 'stimeout' (dropped by FFmpeg 5) was ignored and the open blocked for FFmpeg's 30 s."""
    monkeypatch.delenv("OPENCV_FFMPEG_CAPTURE_OPTIONS", raising=False)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    held = []
    threading.Thread(target=lambda: [held.append(server.accept()) for _ in range(5)], daemon=True).start()
    src = OpenCVSource(f"rtsp://127.0.0.1:{server.getsockname()[1]}/x", kind="rtsp", name="cam", timeout_s=1.0)
    started = time.monotonic()
    try:
        with pytest.raises(SourceError, match="cannot open rtsp source"):
            src.open()
        assert time.monotonic() - started < 20      # the 5 s open timeout; FFmpeg's own default is 30 s
        assert "timeout;5000000" in os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] or \
            "stimeout;5000000" in os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"]
    finally:
        server.close()
        for conn, _ in held:
            conn.close()


# ---------------------------------------------------------------- findings 2-4: hostile folder images


def test_a_png_declaring_60000_pixels_a_side_is_skipped_counted_and_the_folder_goes_on(tmp_path):
    """cv2.imdecode raises cv2.error (not ImageDecodeError) for it: that escaped the folder source, the camera
    thread reconnected, and a new source started at the first file again: the folder replayed forever."""
    for name in ("a", "b"):
        cv2.imwrite(str(tmp_path / f"{name}.png"), np.full((32, 32, 3), 100, np.uint8))
    (tmp_path / "c.png").write_bytes(png_declaring(60000, 60000))
    cv2.imwrite(str(tmp_path / "d.png"), np.full((32, 32, 3), 200, np.uint8))
    worker, metrics, hub = run_worker(CameraConfig(id="cam", uri=str(tmp_path), backpressure="block",
                                                   queue_size=64, reconnect={"initial_s": 0.01, "max_s": 0.01}))
    assert worker.ended.wait(60), "the folder was not read to its end"
    worker.stop_event.set()
    worker.join(5)
    assert [f.source_ref for f in hub.get_batch(64, 0.0)] == ["a.png", "b.png", "d.png"]
    assert metrics.counters_by("camera_errors_total", "kind") == {"file": 1.0}
    assert metrics.counter("camera_reconnects_total", camera="cam") == 0
    assert "c.png: its header declares 60000x60000 pixels" in worker.last_error


def test_corrupt_and_truncated_folder_images_are_counted(tmp_path):
    jpeg = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 255, (200, 200, 3)).astype(np.uint8))[1]
    jpeg = jpeg.tobytes()
    (tmp_path / "a.jpg").write_bytes(jpeg)
    (tmp_path / "b.jpg").write_bytes(b"not an image")
    (tmp_path / "c.jpg").write_bytes(jpeg[: len(jpeg) // 3])       # cut inside its scan: decodes to nothing
    (tmp_path / "d.jpg").write_bytes(jpeg[:200])                   # cut before its frame header
    (tmp_path / "e.jpg").write_bytes(jpeg)
    worker, metrics, hub = run_worker(CameraConfig(id="cam", uri=str(tmp_path), backpressure="block",
                                                   queue_size=64))
    assert worker.ended.wait(60)
    worker.join(5)
    refs = [f.source_ref for f in hub.get_batch(64, 0.0)]
    skipped = 5 - len(refs)
    assert refs[0] == "a.jpg" and refs[-1] == "e.jpg" and "b.jpg" not in refs and "d.jpg" not in refs
    assert metrics.counter("camera_errors_total", camera="cam", kind="file") == skipped >= 2


def test_a_folder_image_with_a_side_over_the_frame_limit_is_refused_before_decoding(tmp_path):
    side = MAX_FRAME_SIDE + 1
    cv2.imwrite(str(tmp_path / "a-wide.png"), np.zeros((1, side, 3), np.uint8))     # decodable, 49 kB decoded
    cv2.imwrite(str(tmp_path / "b.png"), np.zeros((8, 8, 3), np.uint8))
    skipped: list[str] = []
    src = ImageFolderSource(tmp_path, name="f", on_skip=skipped.append)
    src.open()
    assert src.read()[1] == "b.png"
    assert len(skipped) == 1 and f"declares {side}x1 pixels; expected sides of 1 to {MAX_FRAME_SIDE}" in skipped[0]


def test_a_small_png_that_decodes_to_gigabytes_does_not_grow_the_process(tmp_path):
    """A 5 MB PNG of 20000 x 20000 zero pixels: 1.2 GB once decoded. Refused from its header: memory stays flat."""
    side = 20000
    packer = zlib.compressobj(1)
    row = b"\0" * (side * 3 + 1)
    idat = b"".join([packer.compress(row) for _ in range(side)] + [packer.flush()])
    folder = tmp_path / "frames"
    folder.mkdir()
    (folder / "a.png").write_bytes(png_declaring(side, side, idat))
    cv2.imwrite(str(folder / "b.png"), np.zeros((8, 8, 3), np.uint8))
    result = run_python("""
        import resource, sys
        from agent.sources.folder import ImageFolderSource
        skipped = []
        src = ImageFolderSource(sys.argv[1], name="f", on_skip=skipped.append)
        src.open()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        ref = src.read()[1]
        grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        print(ref, len(skipped), round(grown_mb))
    """, str(folder))
    assert result.returncode == 0, result.stderr[-2000:]
    ref, n_skipped, grown_mb = result.stdout.split()
    assert ref == "b.png" and n_skipped == "1" and int(grown_mb) < 300, result.stdout


@pytest.mark.parametrize("ext", [".jpg", ".png", ".bmp", ".webp", ".tiff"])
@pytest.mark.parametrize("shape", [(37, 53), (480, 640)])
def test_the_header_reader_finds_the_size_opencv_decodes(tmp_path, ext, shape):
    path = tmp_path / f"x{ext}"
    assert cv2.imwrite(str(path), np.random.default_rng(1).integers(0, 255, (*shape, 3)).astype(np.uint8))
    with open(path, "rb") as fh:
        assert image_size(fh.read(), str(path)) == (shape[1], shape[0])


def test_the_header_reader_finds_a_jpeg_size_behind_large_metadata(tmp_path):
    jpeg = cv2.imencode(".jpg", np.zeros((30, 40, 3), np.uint8))[1].tobytes()
    app = b"\xff\xe1" + (65535).to_bytes(2, "big") + b"\0" * 65533      # three full APP1 segments after SOI
    path = tmp_path / "x.jpg"
    path.write_bytes(jpeg[:2] + app * 3 + jpeg[2:])
    with open(path, "rb") as fh:
        assert image_size(fh.read(), str(path)) == (40, 30)
    for data in (b"", b"GIF89a" + b"\0" * 40, jpeg[:2] + app[:100]):
        path.write_bytes(data)
        with open(path, "rb") as fh, pytest.raises(ImageHeaderError, match=str(path)):
            image_size(fh.read(), str(path))


def test_a_folder_source_resumes_where_it_stopped_after_a_reconnect(tmp_path):
    """A reconnect in the middle of a folder (here the kick the watchdog would send) continues after the last
    file taken, instead of a new source replaying the folder from its first file."""
    names = [f"{i:02d}.png" for i in range(6)]
    for name in names:
        cv2.imwrite(str(tmp_path / name), np.zeros((8, 8, 3), np.uint8))
    built = []

    def factory(cfg):
        built.append(open_source(cfg.uri, name=cfg.id))
        return built[-1]

    worker, metrics, hub = run_worker(CameraConfig(id="cam", uri=str(tmp_path), backpressure="block", queue_size=1,
                                                   reconnect={"initial_s": 0.01, "max_s": 0.01}),
                                      source_factory=factory)
    refs = [f.source_ref for f in hub.get_batch(1, 0.0, wait_s=30)]
    worker.kick()
    while not (worker.ended.is_set() and not hub.depths()["cam"]):
        refs += [f.source_ref for f in hub.get_batch(1, 0.0, wait_s=0.05)]
    worker.join(5)
    assert refs == names
    assert metrics.counter("camera_reconnects_total", camera="cam") == 1 and len(built) == 1


def test_a_video_file_resumes_at_its_frame_after_a_reconnect(tmp_path):
    video = write_video(tmp_path / "v.avi", n=10, size=(64, 48))
    src = OpenCVSource(str(video), kind="file", name="v")
    src.open()
    first = [src.read()[0] for _ in range(4)]
    src.close()
    src.open()
    fifth = src.read()[0]
    again = OpenCVSource(str(video), kind="file", name="v")
    again.open()
    frames = [again.read()[0] for _ in range(5)]
    assert np.array_equal(fifth, frames[4]) and not np.array_equal(fifth, first[0])


# ---------------------------------------------------------------- finding 5: backoff after a failed first read


class OpensThenFails:
    """A fake live camera (no camera device exists on a test machine) that opens and then fails its reads, as an
    RTSP camera that accepts and drops or a busy V4L2 device does; ``good`` frames first after each open."""

    finite = False

    def __init__(self, good: int = 0, opens_wanted: int = 6) -> None:
        self.name = "cam"
        self.good = good
        self.opens = 0
        self.opens_wanted = opens_wanted
        self.done = threading.Event()
        self._left = 0

    def open(self) -> None:
        self.opens += 1
        self._left = self.good
        if self.opens >= self.opens_wanted:
            self.done.set()

    def read(self):
        if self._left > 0:
            self._left -= 1
            return np.zeros((4, 4, 3), np.uint8), None
        raise SourceError("cam: read failed (camera lost or stream ended)")

    def close(self) -> None:
        pass


class NoJitter(random.Random):
    """Every backoff delay drawn at its top (the jitter is tested in test_sources_review.py)."""

    def uniform(self, a: float, b: float) -> float:
        return b


def _backoff_delays(fake: OpensThenFails, rng: random.Random | None = None) -> list[float]:
    cfg = CameraConfig(id="cam", uri="rtsp://cam/x", reconnect={"initial_s": 0.001, "max_s": 10, "factor": 2})
    metrics, stop = Metrics(), threading.Event()
    hub = FrameHub(metrics)
    hub.add_camera("cam", 64, "drop_oldest")
    worker = CameraWorker(cfg, hub, metrics, stop, source_factory=lambda c: fake, rng=rng or NoJitter())
    delays: list[float] = []
    real = worker._reconnect_after
    worker._reconnect_after = lambda why, delay: (delays.append(delay), real(why, delay))
    worker.start()
    assert fake.done.wait(60)
    stop.set()
    worker.join(10)
    return delays[: fake.opens_wanted - 1]


def test_a_camera_that_opens_then_fails_is_backed_off_not_retried_at_the_initial_delay():
    assert _backoff_delays(OpensThenFails(good=0)) == [0.001, 0.002, 0.004, 0.008, 0.016]


def test_the_backoff_starts_again_once_a_camera_delivered_a_frame():
    assert _backoff_delays(OpensThenFails(good=1)) == [0.001] * 5


def test_reconnect_delays_are_jittered_between_half_and_all_of_the_backoff():
    """Before: every camera waited exactly initial_s, initial_s * factor, ...: the cameras of a site that lost one
    RTSP server (an NVR restarting) together all reconnected at the same instants."""
    delays = _backoff_delays(OpensThenFails(good=0, opens_wanted=8), rng=random.Random(7))
    tops = [0.001 * 2**i for i in range(7)]
    assert len(delays) == 7 and all(top / 2 <= d <= top for d, top in zip(delays, tops))
    assert len({round(d / top, 6) for d, top in zip(delays, tops)}) == 7       # drawn, not one fixed share


# ---------------------------------------------------------------- finding 10: URI forms


def test_a_bare_device_number_keeps_the_capture_size_like_usb():
    bare = open_source("0", name="c", width=640, height=480)
    usb = open_source("usb://0", name="c", width=640, height=480)
    assert (bare.kind, bare.target, bare.size) == (usb.kind, usb.target, usb.size) == ("v4l2", 0, (640, 480))


@pytest.mark.parametrize("uri", ["v4l2://dev/video0", "file://relative/x.mp4", "file://host/data/x.mp4"])
def test_a_host_part_in_a_local_uri_is_refused_not_dropped(uri):
    with pytest.raises(SourceError, match=r"takes an absolute path after three slashes .* not a host name"):
        open_source(uri, name="c")


def test_local_uri_forms_that_name_a_path(tmp_path):
    assert open_source(f"file://localhost{tmp_path}", name="c").folder == tmp_path
    assert open_source("v4l2:///dev/video2", name="c").target == "/dev/video2"
    assert open_source("gst:videotestsrc ! appsink", name="c").target == "videotestsrc ! appsink"
    assert open_source("gst://videotestsrc ! appsink", name="c").target == "videotestsrc ! appsink"


@pytest.mark.parametrize("end_when_unopenable", [True, False], ids=["exit-at-end", "running for good"])
def test_a_file_source_that_cannot_be_opened_again_ends_the_camera_only_when_asked(tmp_path, end_when_unopenable):
    """A looping folder whose folder is removed: its reads fail, its thread reconnects and cannot open it. Under
    ``run --exit-at-end`` the camera ends (saying why), so the run can end; otherwise it is retried with backoff,
    as a live camera is (the folder may come back)."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"{i:02d}.png"), np.full((8, 8, 3), 50 * i, np.uint8))
    worker, metrics, hub = run_worker(CameraConfig(id="cam", uri=str(folder), loop=True, queue_size=1,
                                                   reconnect={"initial_s": 0.01, "max_s": 0.05}),
                                      end_when_unopenable=end_when_unopenable)
    try:
        assert hub.get_batch(1, 0.0, wait_s=30), "no frame from the folder"
        shutil.rmtree(folder)
        if end_when_unopenable:
            assert worker.ended.wait(60), "the camera is still retrying a folder that is gone"
            assert worker.unopenable == f"{folder}: image folder does not exist"
            assert metrics.counter("camera_errors_total", camera="cam", kind="source") == 1
        else:
            wait_for(lambda: metrics.counter("camera_reconnects_total", camera="cam") >= 3, what="three reconnects")
            assert not worker.ended.is_set() and worker.unopenable is None
    finally:
        worker.stop_event.set()
        worker.join(10)
