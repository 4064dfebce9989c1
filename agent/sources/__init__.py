"""Camera sources by URI, and the threads that run them."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from agent.sources.base import EndOfStream, Frame, FrameSource, SourceError
from agent.sources.folder import ImageFolderSource
from agent.sources.opencv import OpenCVSource, csi_pipeline

__all__ = ["EndOfStream", "Frame", "FrameSource", "SourceError", "open_source", "ImageFolderSource", "OpenCVSource"]


def open_source(uri: str, *, name: str, loop: bool = False, width: int | None = None,
                height: int | None = None) -> FrameSource:
    """A (not yet opened) source for a camera URI; see CameraConfig.uri for the forms. SourceError names a bad one."""
    try:
        return _source_for(uri, name=name, loop=loop, width=width, height=height)
    except ValueError as exc:     # e.g. usb://x (not a device number), a NUL in a path, a bad port
        raise SourceError(f"{uri}: not a camera URI ({exc})") from None


def _source_for(uri: str, *, name: str, loop: bool, width: int | None, height: int | None) -> FrameSource:
    if uri.isdigit():
        return OpenCVSource(int(uri), kind="v4l2", name=name)
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme in ("", "file"):
        path = Path(unquote(parsed.path) if scheme == "file" else uri)
        if path.is_dir():
            return ImageFolderSource(path, name=name, loop=loop)
        return OpenCVSource(str(path), kind="file", name=name, loop=loop)
    if scheme == "usb":
        return OpenCVSource(int(parsed.netloc or parsed.path.strip("/") or 0), kind="v4l2", name=name,
                            width=width, height=height)
    if scheme == "v4l2":
        return OpenCVSource(parsed.path, kind="v4l2", name=name, width=width, height=height)
    if scheme in ("rtsp", "rtsps"):
        return OpenCVSource(uri, kind="rtsp", name=name)
    if scheme == "csi":
        sensor = int(parsed.netloc or parsed.path.strip("/") or 0)
        return OpenCVSource(csi_pipeline(sensor, width or 1920, height or 1080), kind="gstreamer", name=name)
    if scheme == "gst":
        return OpenCVSource(uri[len("gst://"):], kind="gstreamer", name=name)
    raise SourceError(f"{uri}: unknown camera URI scheme {scheme!r} (file, v4l2, usb, rtsp, csi, gst)")
