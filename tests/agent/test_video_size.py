"""A camera source never decodes a frame larger than the frame bounds: a video (or a folder image) that declares
16000 x 16000 pixels is refused from its header, naming the source and the size, before anything is decoded.

Real OpenCV (FFmpeg) on real files throughout. The large files are crafted, never decoded: a 64 x 64 MJPEG AVI
written by cv2.VideoWriter whose AVI size fields and JPEG frame headers are rewritten to 16000 x 16000 (6 kB, and
FFmpeg reports that size at open), and a PNG whose header declares it.
"""

from __future__ import annotations

import struct
import threading
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from agent_support import as_config, station_config

from agent.app import StartupError, check_finite_sources
from agent.config import MAX_FRAME_SIDE, CameraConfig
from agent.health import Metrics
from agent.sources import base as source_base
from agent.sources import check_finite_source, open_source
from agent.sources.base import MAX_FRAME_PIXELS, SourceError, frame_size_problem
from agent.sources.camera import CameraWorker, FrameHub
from agent.sources.folder import ImageFolderSource


def write_video(path: Path, n: int = 3, size: tuple[int, int] = (64, 48)) -> Path:
    """A real MJPEG AVI of ``n`` frames, frame i a flat grey of 40 * i + 20."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5, size)
    assert writer.isOpened()
    for i in range(n):
        writer.write(np.full((size[1], size[0], 3), 40 * i + 20, np.uint8))
    writer.release()
    return path


def video_declaring(path: Path, width: int, height: int) -> Path:
    """A 64 x 64 MJPEG AVI rewritten to declare ``width`` x ``height`` frames: the AVI main header (avih), the
    stream header's frame rectangle (strh), its BITMAPINFOHEADER (strf) and every JPEG's frame header (SOF0)."""
    write_video(path, n=2, size=(64, 64))
    data = bytearray(path.read_bytes())
    avih, strh, strf = data.find(b"avih"), data.find(b"strh"), data.find(b"strf")
    assert min(avih, strh, strf) > 0, "not the AVI layout cv2.VideoWriter writes"
    struct.pack_into("<II", data, avih + 8 + 32, width, height)                         # dwWidth, dwHeight
    struct.pack_into("<hhhh", data, strh + 8 + 48, 0, 0, min(width, 32767), min(height, 32767))   # rcFrame
    struct.pack_into("<ii", data, strf + 8 + 4, width, height)                          # biWidth, biHeight
    start, frames = 0, 0
    while (sof := data.find(b"\xff\xc0", start)) >= 0:                                  # SOF0: length, precision, h, w
        struct.pack_into(">HH", data, sof + 5, height, width)
        start, frames = sof + 2, frames + 1
    assert frames == 2
    path.write_bytes(bytes(data))
    return path


def read_all(source) -> list[np.ndarray]:
    frames = []
    source.open()
    try:
        while True:
            try:
                frames.append(source.read()[0])
            except source_base.EndOfStream:
                return frames
    finally:
        source.close()


def test_the_bounds_take_a_large_camera_and_refuse_a_frame_of_gigabytes():
    assert frame_size_problem(7680, 4320) is None and frame_size_problem(8192, 8192) is None        # 8K, 64 Mpx
    assert frame_size_problem(16000, 16000) == f"16000x16000 pixels, more than {MAX_FRAME_PIXELS} (67 Mpx)"
    assert frame_size_problem(MAX_FRAME_SIDE + 1, 1) == f"{MAX_FRAME_SIDE + 1}x1 pixels, a side over {MAX_FRAME_SIDE}"


def test_a_video_declaring_16000_square_frames_is_refused_at_open_naming_it_and_its_size(tmp_path):
    # given: a 6 kB video whose frames declare 16000 x 16000 pixels (768 MB each decoded, as much again as RGB)
    path = video_declaring(tmp_path / "huge.avi", 16000, 16000)
    assert path.stat().st_size < 20_000
    cap = cv2.VideoCapture(str(path))
    assert (cap.get(cv2.CAP_PROP_FRAME_WIDTH), cap.get(cv2.CAP_PROP_FRAME_HEIGHT)) == (16000, 16000)
    cap.release()
    # when: the station opens it as a camera (file://), and checks it at the start
    source = open_source(f"file://{path}", name="cam-a")
    with pytest.raises(SourceError) as refused:
        source.open()
    # then: refused before a frame is decoded, saying which camera, which file and what size
    text = str(refused.value)
    assert text.startswith("cam-a: file source ") and str(path) in text
    assert "declares frames of 16000x16000 pixels, more than 67108864" in text and "refused before decoding" in text
    assert source._cap is None
    with pytest.raises(SourceError, match="16000x16000"):
        check_finite_source(str(path), name="cam-a")


def test_a_video_declaring_a_side_over_the_frame_limit_is_refused(tmp_path):
    path = video_declaring(tmp_path / "wide.avi", MAX_FRAME_SIDE + 16, 16)     # few pixels, one side too long
    with pytest.raises(SourceError, match=f"{MAX_FRAME_SIDE + 16}x16 pixels, a side over {MAX_FRAME_SIDE}"):
        open_source(str(path), name="cam-a").open()


def test_the_station_refuses_to_start_on_such_a_video_naming_the_camera_field(tmp_path):
    path = video_declaring(tmp_path / "huge.avi", 16000, 16000)
    cfg = as_config(station_config(tmp_path, tmp_path / "no-bundle", f"file://{path}", 1883))
    with pytest.raises(StartupError) as refused:
        check_finite_sources(cfg)
    assert "cameras[0].uri" in str(refused.value) and "16000x16000" in str(refused.value)


def test_a_camera_on_such_a_video_counts_the_refusal_and_hands_on_no_frame(tmp_path):
    """The camera thread (with --exit-at-end) ends on the video it cannot open, saying why; no frame is queued."""
    path = video_declaring(tmp_path / "huge.avi", 16000, 16000)
    metrics = Metrics()
    hub = FrameHub(metrics)
    cfg = CameraConfig(id="cam", uri=f"file://{path}", backpressure="block", queue_size=4)
    hub.add_camera(cfg.id, cfg.queue_size, cfg.backpressure)
    worker = CameraWorker(cfg, hub, metrics, threading.Event(), end_when_unopenable=True)
    worker.start()
    assert worker.ended.wait(60)
    worker.join(5)
    assert "16000x16000" in (worker.unopenable or "") and hub.depths() == {"cam": 0}


def test_a_normal_video_still_plays_every_frame(tmp_path):
    path = write_video(tmp_path / "belt.avi", n=3, size=(64, 48))
    frames = read_all(open_source(f"file://{path}", name="cam-a"))
    assert [f.shape for f in frames] == [(48, 64, 3)] * 3
    assert [int(np.median(f)) for f in frames] == pytest.approx([20, 60, 100], abs=3)


def test_a_decoded_frame_over_the_bounds_is_refused_and_the_file_goes_on_at_its_next_frame(tmp_path, monkeypatch):
    """A container that declares a smaller size than its frames decode to. FFmpeg itself corrects such a header
    from the first frame (and scales later frames to it), so the lie is made here by lowering the bound after
    the open, between the declared size (64 x 48) and no frame at all: the frame decoded is then over it."""
    path = write_video(tmp_path / "belt.avi", n=3, size=(64, 48))
    source = open_source(f"file://{path}", name="cam-a")
    source.open()
    try:
        monkeypatch.setattr(source_base, "MAX_FRAME_PIXELS", 64 * 48 - 1)
        with pytest.raises(SourceError) as refused:
            source.read()
        text = str(refused.value)
        assert text.startswith("cam-a: file source ") and str(path) in text
        assert "delivered a frame of 64x48 pixels, more than 3071" in text
        monkeypatch.undo()
        # the camera thread closes and reopens the source after a SourceError: it continues after that frame
        source.close()
        source.open()
        assert int(np.median(source.read()[0])) == pytest.approx(60, abs=3)
    finally:
        source.close()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_a_folder_image_declaring_16000_square_pixels_is_skipped_before_decoding(tmp_path):
    # given: a PNG whose (valid) header declares 16000 x 16000 RGB pixels, each side under MAX_FRAME_SIDE
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", 16000, 16000, 8, 2, 0, 0, 0))
    (tmp_path / "a-huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", zlib.compress(b"\0" * 100))
                                          + png_chunk(b"IEND", b""))
    cv2.imwrite(str(tmp_path / "b.png"), np.zeros((8, 8, 3), np.uint8))
    skipped: list[str] = []
    source = ImageFolderSource(tmp_path, name="f", on_skip=skipped.append)
    source.open()
    # then: it is skipped from its header (not by a failed decode), the next image served
    assert source.read()[1] == "b.png"
    assert len(skipped) == 1 and str(tmp_path / "a-huge.png") in skipped[0]
    assert "declares 16000x16000 pixels, more than 67108864 (67 Mpx) (refused before decoding)" in skipped[0]
