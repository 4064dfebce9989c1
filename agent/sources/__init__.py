"""Camera sources by URI, and the threads that run them."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from agent.sources.base import EndOfStream, Frame, FrameSource, SourceError, redact_uri
from agent.sources.folder import ImageFolderSource
from agent.sources.opencv import DEFAULT_TIMEOUT_S, OpenCVSource, csi_pipeline

__all__ = ["EndOfStream", "Frame", "FrameSource", "SourceError", "open_source", "check_finite_source",
           "ImageFolderSource", "OpenCVSource", "redact_uri"]


def open_source(uri: str, *, name: str, loop: bool = False, width: int | None = None,
                height: int | None = None, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> FrameSource:
    """A (not yet opened) source for a camera URI; see CameraConfig.uri for the forms. SourceError names a bad one.
    ``timeout_s`` bounds a live capture's read (the camera's ``stall_timeout_s``)."""
    try:
        return _source_for(uri, name=name, loop=loop, width=width, height=height, timeout_s=timeout_s)
    except ValueError as exc:     # e.g. usb://x (not a device number), a NUL in a path, a bad port
        raise SourceError(f"{redact_uri(uri)}: not a camera URI ({redact_uri(str(exc))})") from None


def check_finite_source(uri: str, *, name: str) -> None:
    """Open and close a file or folder source once: SourceError when the video does not exist or does not decode,
    or the folder does not exist or holds no image. A live source is not opened (one that is not up yet is
    retried with backoff once the station runs)."""
    source = open_source(uri, name=name)
    if source.finite:
        source.open()
        source.close()


MAX_DEVICE_NUMBER = 2**31 - 1     # OpenCV takes a camera index as a C int: a larger one can never open


def _device_number(text: str) -> int:
    """A camera or sensor number (ValueError for one that is not a number OpenCV can take)."""
    number = int(text)
    if not -1 <= number <= MAX_DEVICE_NUMBER:      # -1: OpenCV's "the first camera found", as before
        raise ValueError(f"device number {text[:20]} is not 0 to {MAX_DEVICE_NUMBER}")
    return number


def _local_path(uri: str, scheme: str, netloc: str, path: str) -> str:
    """The path of a file:// or v4l2:// URI: absolute, after three slashes. A host part (file://x/a.mp4) would
    otherwise be dropped silently and another path opened (/a.mp4); ``localhost`` is the local host (RFC 8089)."""
    if netloc and not (scheme == "file" and netloc.lower() == "localhost"):
        raise SourceError(f"{uri}: a {scheme}:// URI takes an absolute path after three slashes "
                          f"({scheme}:///{netloc}{path}), not a host name ({netloc!r})")
    return unquote(path)


def _source_for(uri: str, *, name: str, loop: bool, width: int | None, height: int | None,
                timeout_s: float | None) -> FrameSource:
    if uri.isdigit():       # a bare device number, the same camera as usb://N
        return OpenCVSource(_device_number(uri), kind="v4l2", name=name, width=width, height=height,
                            timeout_s=timeout_s)
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme in ("", "file"):
        local = _local_path(uri, scheme, parsed.netloc, parsed.path) if scheme == "file" else uri
        if not local:       # file:// alone would read the working folder's images
            raise SourceError(f"{uri}: names no file or folder (file:///data/belt.mp4)")
        path = Path(local)
        if path.is_dir():
            return ImageFolderSource(path, name=name, loop=loop)
        return OpenCVSource(str(path), kind="file", name=name, loop=loop)
    if scheme == "usb":
        return OpenCVSource(_device_number(parsed.netloc or parsed.path.strip("/") or "0"), kind="v4l2", name=name,
                            width=width, height=height, timeout_s=timeout_s)
    if scheme == "v4l2":
        if not parsed.path.strip("/"):
            raise SourceError(f"{uri}: names no device (v4l2:///dev/video0)")
        return OpenCVSource(_local_path(uri, scheme, parsed.netloc, parsed.path), kind="v4l2", name=name,
                            width=width, height=height, timeout_s=timeout_s)
    if scheme in ("rtsp", "rtsps"):
        if not parsed.hostname:
            raise SourceError(f"{redact_uri(uri)}: names no host ({scheme}://<host>[:port]/<path>)")
        return OpenCVSource(uri, kind="rtsp", name=name, timeout_s=timeout_s)
    if scheme == "csi":
        sensor = _device_number(parsed.netloc or parsed.path.strip("/") or "0")
        return OpenCVSource(csi_pipeline(sensor, width or 1920, height or 1080), kind="gstreamer", name=name,
                            timeout_s=timeout_s)
    if scheme == "gst":
        pipeline = uri[len(parsed.scheme) + 1:]        # gst://<pipeline>, also gst:<pipeline>
        pipeline = pipeline[2:] if pipeline.startswith("//") else pipeline
        if not pipeline.strip():
            raise SourceError(f"{redact_uri(uri)}: names no GStreamer pipeline (gst://<pipeline> ! appsink)")
        return OpenCVSource(pipeline, kind="gstreamer", name=name, timeout_s=timeout_s)
    raise SourceError(f"{redact_uri(uri)}: unknown camera URI scheme {scheme!r} (file, v4l2, usb, rtsp, csi, gst)")
