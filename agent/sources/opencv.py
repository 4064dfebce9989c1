"""Sources read through OpenCV VideoCapture: video files, V4L2/USB, RTSP, GStreamer (CSI).

A capture is released only when no read of it runs: releasing a VideoCapture while another thread is
inside its read() frees the buffers that read decodes into and crashes the process. The camera thread
opens, reads and closes its source itself, and ``close`` waits for a read in progress (a lock held
across each read) should anything else call it. A stalled read is bounded by the capture's own
timeouts (``CAP_PROP_OPEN_TIMEOUT_MSEC``/``CAP_PROP_READ_TIMEOUT_MSEC`` for the FFmpeg (RTSP) and
GStreamer backends; the V4L2 backend gives up a read after its own 10 s select timeout), and the
watchdog only asks the camera thread to reconnect once its read has returned
(``agent.sources.camera.CameraWorker.kick``).

A capture whose stream declares frames over ``MAX_FRAME_SIDE`` on a side or ``MAX_FRAME_PIXELS`` in all
(agent/sources/base.py) is refused at open, before a frame is decoded: an 8 MB video can hold 16000 x 16000
frames, 768 MB each once decoded and as much again as RGB. A decoded frame over the bounds (a container that
declared less, or nothing) is refused too (SourceError: a file continues at its next frame when reopened).
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading

import cv2
import numpy as np

from agent.sources.base import EndOfStream, SourceError, frame_size_problem, redact_uri
from contract.preprocess import to_rgb

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0       # read timeout of a live capture when the caller gives none (CameraConfig's stall default)
MIN_OPEN_TIMEOUT_S = 5.0      # an RTSP handshake can take seconds: opening is never given less than this
FFMPEG_SOCKET_TIMEOUT_US = 5_000_000


def ffmpeg_socket_timeout_option(build_info: str) -> str | None:
    """The FFmpeg RTSP option for the socket I/O timeout of the FFmpeg this OpenCV was built with: ``timeout``
    from FFmpeg 5 (libavformat 59) on, ``stimeout`` before (where ``timeout`` means "wait for incoming
    connections" and makes the client listen as a server). None when the build information does not say."""
    match = re.search(r"avformat:\s*YES\s*\((\d+)\.", build_info)
    if match is None:
        return None
    return "timeout" if int(match.group(1)) >= 59 else "stimeout"


def rtsp_options(build_info: str) -> str:
    """``OPENCV_FFMPEG_CAPTURE_OPTIONS`` for RTSP: TCP (UDP packet loss smears frames) and a socket timeout."""
    key = ffmpeg_socket_timeout_option(build_info)
    return "rtsp_transport;tcp" + (f"|{key};{FFMPEG_SOCKET_TIMEOUT_US}" if key else "")


RTSP_OPTIONS = rtsp_options(cv2.getBuildInformation())


def capture_timeouts(kind: str, timeout_s: float | None) -> list[int]:
    """The open/read timeout parameters for ``cv2.VideoCapture(target, api, params)``: for the backends that
    take them (FFmpeg for RTSP, GStreamer), when this OpenCV has the properties; [] otherwise."""
    open_prop = getattr(cv2, "CAP_PROP_OPEN_TIMEOUT_MSEC", None)
    read_prop = getattr(cv2, "CAP_PROP_READ_TIMEOUT_MSEC", None)
    if timeout_s is None or kind not in ("rtsp", "gstreamer") or open_prop is None or read_prop is None:
        return []
    return [int(open_prop), int(max(timeout_s, MIN_OPEN_TIMEOUT_S) * 1000),
            int(read_prop), max(1, int(timeout_s * 1000))]


def csi_pipeline(sensor_id: int, width: int = 1920, height: int = 1080, fps: int = 30) -> str:
    """The Jetson Argus pipeline that hands BGR frames to OpenCV's appsink."""
    return (
        f"nvarguscamerasrc sensor-id={sensor_id} ! "
        f"video/x-raw(memory:NVMM), width={width}, height={height}, framerate={fps}/1 ! "
        "nvvidconv ! video/x-raw, format=BGRx ! videoconvert ! video/x-raw, format=BGR ! "
        "appsink drop=true max-buffers=1 sync=false"
    )


def declared_size_problem(cap: cv2.VideoCapture) -> str | None:
    """Why the frames an opened capture declares are too large (``frame_size_problem``); None when they are not,
    or when it declares no size (0, or not a number: a live pipeline before its first frame)."""
    try:
        width, height = cap.get(cv2.CAP_PROP_FRAME_WIDTH), cap.get(cv2.CAP_PROP_FRAME_HEIGHT)
    except cv2.error:
        return None
    if not (math.isfinite(width) and math.isfinite(height)):
        return None
    return frame_size_problem(width, height)


class OpenCVSource:
    """One VideoCapture. ``kind`` is file, v4l2, rtsp or gstreamer; it picks the backend and options.

    ``timeout_s`` bounds a live capture's read (and, at least ``MIN_OPEN_TIMEOUT_S``, its open); the camera
    thread passes its ``stall_timeout_s``. A file source continues at the frame it stopped at when it is
    opened again (a reconnect), instead of replaying the file from its start."""

    def __init__(self, target: str | int, *, kind: str, name: str, loop: bool = False,
                 width: int | None = None, height: int | None = None,
                 timeout_s: float | None = DEFAULT_TIMEOUT_S) -> None:
        self.target = target
        self.kind = kind
        self.name = name
        self.loop = loop
        self.finite = kind == "file"
        self.size = (width, height)
        self.timeout_s = timeout_s
        self._cap: cv2.VideoCapture | None = None
        self._resume_at = 0                 # file: the frame to continue from when opened again
        self._lock = threading.Lock()       # held across each read and the release: never one during the other

    @property
    def shown(self) -> str:
        """The target as logs and errors show it: an RTSP URI's password replaced by ``***``."""
        return redact_uri(str(self.target))

    def open(self) -> None:
        if self.kind == "file" and not os.path.isfile(str(self.target)):
            raise SourceError(f"{self.target}: video file does not exist")
        if self.kind == "rtsp":
            # OpenCV reads this at every open; an operator's own setting wins.
            os.environ.setdefault("OPENCV_FFMPEG_CAPTURE_OPTIONS", RTSP_OPTIONS)
        api = {"file": cv2.CAP_ANY, "rtsp": cv2.CAP_FFMPEG, "gstreamer": cv2.CAP_GSTREAMER,
               "v4l2": cv2.CAP_V4L2}[self.kind]
        params = capture_timeouts(self.kind, self.timeout_s)
        try:
            cap = cv2.VideoCapture(self.target, api, params) if params else cv2.VideoCapture(self.target, api)
            if not cap.isOpened() and params and self.kind == "gstreamer":
                # A GStreamer backend older than the timeout properties refuses them: open without, and say so.
                cap.release()
                cap = cv2.VideoCapture(self.target, api)
                if cap.isOpened():
                    log.warning("camera %s: this OpenCV's GStreamer backend takes no read timeout; a stalled "
                                "pipeline is reconnected only once its read returns", self.name)
        except cv2.error as exc:
            raise SourceError(f"{self.name}: cannot open {self.kind} source {self.shown} ({exc.msg})") from None
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"{self.name}: cannot open {self.kind} source {self.shown}")
        width, height = self.size
        if width and height and self.kind == "v4l2":
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, width)
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
        problem = declared_size_problem(cap)
        if problem is not None:
            cap.release()
            raise SourceError(f"{self.name}: {self.kind} source {self.shown} declares frames of {problem}; refused "
                              "before decoding")
        if self.finite and self._resume_at > 0:
            cap.set(cv2.CAP_PROP_POS_FRAMES, self._resume_at)
        with self._lock:
            old, self._cap = self._cap, cap
        if old is not None:
            old.release()

    def read(self) -> tuple[np.ndarray, str | None]:
        with self._lock:
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
            raise SourceError(f"{self.name}: read failed (camera lost, stream ended or no frame within "
                              f"{self.timeout_s}s)")
        problem = frame_size_problem(image.shape[1], image.shape[0]) if image is not None and image.ndim >= 2 else None
        if problem is not None:
            del image       # not converted nor handed on
            raise SourceError(f"{self.name}: {self.kind} source {self.shown} delivered a frame of {problem}; refused "
                              "(its stream declared less, or no size, at open)")
        return to_rgb(image, bgr=True), None

    def close(self) -> None:
        """Release the capture once no read of it runs (a read in progress is waited for: at most the read
        timeout). The camera thread calls it after its own read returned; the watchdog never does."""
        with self._lock:
            cap, self._cap = self._cap, None
            if cap is None:
                return
            if self.finite:
                try:
                    self._resume_at = max(0, int(cap.get(cv2.CAP_PROP_POS_FRAMES)))
                except (cv2.error, ValueError, OverflowError):    # NaN, or a backend that does not know its position
                    self._resume_at = 0
            cap.release()
