"""Sources read through OpenCV VideoCapture: video files, V4L2/USB, RTSP, GStreamer (CSI)."""

from __future__ import annotations

import logging
import os
import threading

import cv2
import numpy as np

from agent.sources.base import EndOfStream, SourceError
from contract.preprocess import to_rgb

log = logging.getLogger(__name__)

RTSP_OPTIONS = "rtsp_transport;tcp|stimeout;5000000"


def csi_pipeline(sensor_id: int, width: int = 1920, height: int = 1080, fps: int = 30) -> str:
    """The Jetson Argus pipeline that hands BGR frames to OpenCV's appsink."""
    return (
        f"nvarguscamerasrc sensor-id={sensor_id} ! "
        f"video/x-raw(memory:NVMM), width={width}, height={height}, framerate={fps}/1 ! "
        "nvvidconv ! video/x-raw, format=BGRx ! videoconvert ! video/x-raw, format=BGR ! "
        "appsink drop=true max-buffers=1 sync=false"
    )


class OpenCVSource:
    """One VideoCapture. ``kind`` is file, v4l2, rtsp or gstreamer; it picks the backend and options."""

    def __init__(self, target: str | int, *, kind: str, name: str, loop: bool = False,
                 width: int | None = None, height: int | None = None) -> None:
        self.target = target
        self.kind = kind
        self.name = name
        self.loop = loop
        self.finite = kind == "file"
        self.size = (width, height)
        self._cap: cv2.VideoCapture | None = None
        self._lock = threading.Lock()

    def open(self) -> None:
        if self.kind == "file" and not os.path.isfile(str(self.target)):
            raise SourceError(f"{self.target}: video file does not exist")
        if self.kind == "rtsp":
            # OpenCV reads this at open time; TCP avoids UDP packet loss smearing frames.
            os.environ.setdefault("OPENCV_FFMPEG_CAPTURE_OPTIONS", RTSP_OPTIONS)
        api = {"file": cv2.CAP_ANY, "rtsp": cv2.CAP_FFMPEG, "gstreamer": cv2.CAP_GSTREAMER,
               "v4l2": cv2.CAP_V4L2}[self.kind]
        cap = cv2.VideoCapture(self.target, api)
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"{self.name}: cannot open {self.kind} source {self.target}")
        width, height = self.size
        if width and height and self.kind == "v4l2":
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, width)
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
        with self._lock:
            self._cap = cap

    def read(self) -> tuple[np.ndarray, str | None]:
        cap = self._cap
        if cap is None:
            raise SourceError(f"{self.name}: not open")
        ok, image = cap.read()
        if not ok and self.finite and self.loop:
            cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, image = cap.read()
        if not ok:
            if self.finite:
                raise EndOfStream(self.name)
            raise SourceError(f"{self.name}: read failed (camera lost or stream ended)")
        return to_rgb(image, bgr=True), None

    def close(self) -> None:
        """Safe from another thread: the watchdog calls it to unblock a stalled read."""
        with self._lock:
            cap, self._cap = self._cap, None
        if cap is not None:
            cap.release()
