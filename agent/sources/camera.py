"""Camera threads: read, crop, pace, and hand frames to a bounded latest-frame hub.

Each camera runs in its own thread so a lost or slow camera never stalls the
others; a watchdog flags a stalled camera (reported down: ``connected`` false, ``camera_connected`` 0), and its
thread reconnects with backoff once its read returns (the capture's own read timeout bounds that read; see
agent/sources/opencv.py). A live source is read on a thread of its own (``LiveReader``): a read that has not
returned ``READ_GRACE_S`` after the stall timeout (a capture without a read timeout, such as a GStreamer pipeline
on an OpenCV whose backend takes none) is given up, and the camera opens a new source meanwhile.

Invariants:
- A camera thread ends only when stopped or at the end of a finite source. Whatever a source does
  (raises anything from open, read or close, returns None, a frame of another shape or dtype) is
  counted in ``camera_errors_total{camera,kind}``, logged (the first time per distinct problem), and
  the thread skips the frame or reconnects with backoff.
- A frame the ROI does not fit in is refused and counted (kind ``roi``), never classified whole.
- A source is never closed while it is read: a capture released by another thread while its read runs
  crashes the process. The camera thread opens and closes it; a live source is read by its ``LiveReader``
  thread, which closes it itself only when its read was given up (after that read returns). ``kick`` (the
  watchdog) only sets a flag. At most ``MAX_ABANDONED_READS`` given-up reads per camera are outstanding.
- The reconnect backoff starts again from ``reconnect.initial_s`` at the first usable frame after an
  open, not at the open: a camera that opens and then fails backs off like one that does not open.
- A finite source (file, folder) is opened again, not made anew, on a reconnect: it continues where it
  stopped instead of replaying its input from the start. With ``end_when_unopenable`` (``run --exit-at-end``)
  one that cannot be opened (its file or folder gone) ends the camera, saying why in ``unopenable``, instead of
  being retried for good: the run it belongs to waits for the end of its input.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from typing import Callable

import numpy as np

from agent.config import Backoff, CameraConfig, Roi
from agent.health import Metrics
from agent.priority import lower_this_thread
from agent.sources import open_source
from agent.sources.base import EndOfStream, Frame, FrameSource, Prepared, SourceError, redact_uri

log = logging.getLogger(__name__)


BAD_FRAMES_BEFORE_RECONNECT = 50     # a source that returns only bad frames is reconnected, not spun on
MAX_DISTINCT_REPORTS = 64            # distinct problems logged per camera; later ones only counted


READ_GRACE_S = 15.0      # a live read still running this long past stall_timeout_s is given up (its capture's own
                         # timeouts, V4L2's 10 s select among them, would have ended it by then)
MAX_ABANDONED_READS = 1  # per camera: reads given up and not returned yet; past it the camera waits, as before


class RoiError(ValueError):
    """The camera's ROI does not lie inside the frame it delivered."""


_STOPPED = object()      # a live read given up because the camera stops


class _Unopenable(Exception):
    """A finite source that cannot be opened, with ``end_when_unopenable``: the camera ends."""


class FrameHub:
    """Per-camera bounded queues behind one condition, so inference can batch across cameras."""

    def __init__(self, metrics: Metrics) -> None:
        self._cond = threading.Condition()
        self._queues: dict[str, deque[Frame]] = {}
        self._limits: dict[str, tuple[int, str]] = {}
        self._order: list[str] = []
        self._next = 0
        self.metrics = metrics

    def add_camera(self, camera_id: str, size: int, backpressure: str) -> None:
        with self._cond:
            self._queues[camera_id] = deque()
            self._limits[camera_id] = (size, backpressure)
            self._order.append(camera_id)

    def put(self, frame: Frame, stop: threading.Event) -> None:
        """Drop the oldest frame when full, or wait for space in ``block`` mode; a frame that still finds no
        space when ``stop`` is set is dropped. Every dropped frame is counted (``frames_dropped_total``)."""
        with self._cond:
            queue = self._queues[frame.camera_id]
            size, policy = self._limits[frame.camera_id]
            while len(queue) >= size:
                if policy == "drop_oldest":
                    queue.popleft()
                    self.metrics.inc("frames_dropped_total", camera=frame.camera_id)
                elif stop.is_set():
                    self.metrics.inc("frames_dropped_total", camera=frame.camera_id)
                    return
                else:
                    self._cond.wait(0.1)
            queue.append(frame)
            self._cond.notify_all()

    def _available(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def get_batch(self, max_n: int, fill_timeout_s: float, wait_s: float = 0.2) -> list[Frame]:
        """Up to ``max_n`` frames, taken round-robin across cameras; [] if none arrived within ``wait_s``."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._available() > 0, wait_s):
                return []
            deadline = time.monotonic() + fill_timeout_s
            while self._available() < max_n:
                left = deadline - time.monotonic()
                if left <= 0 or not self._cond.wait(left):
                    break
            batch = self._take(max_n)
            self._cond.notify_all()
            return batch

    def _take(self, max_n: int) -> list[Frame]:
        batch: list[Frame] = []
        while len(batch) < max_n and self._available():
            camera_id = self._order[self._next % len(self._order)]
            self._next += 1
            if self._queues[camera_id]:
                batch.append(self._queues[camera_id].popleft())
        return batch

    def depths(self) -> dict[str, int]:
        with self._cond:
            return {cid: len(q) for cid, q in self._queues.items()}

    def drop_queued(self) -> dict[str, int]:
        """Empty every queue (the inference stage ends with frames it had no time for): the frames dropped per
        camera, each counted in ``frames_dropped_total``."""
        with self._cond:
            dropped = {cid: len(q) for cid, q in self._queues.items() if q}
            for cid, n in dropped.items():
                self._queues[cid].clear()
                self.metrics.inc("frames_dropped_total", n, camera=cid)
            self._cond.notify_all()
            return dropped

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


def crop_roi(image: np.ndarray, roi: Roi | None) -> np.ndarray:
    """The ROI of the image (a view). RoiError when any of it lies outside the frame: the model would otherwise
    see another region than the one configured (a camera whose resolution changed, a wrong config)."""
    if roi is None:
        return image
    h, w = image.shape[:2]
    if not roi.fits(w, h):
        raise RoiError(f"roi {roi.describe()} does not fit the {w}x{h} frame; its frames are refused")
    return image[roi.y : roi.y + roi.height, roi.x : roi.x + roi.width]


def frame_problem(image: object) -> str | None:
    """Why a source's frame cannot be used (a height x width x 3 uint8 RGB array), or None."""
    if image is None:
        return "the source returned no image (None)"
    if not isinstance(image, np.ndarray):
        return f"the source returned a {type(image).__name__}, not an image array"
    if image.dtype != np.uint8:
        return f"frame of dtype {image.dtype}, expected uint8"
    if image.ndim != 3 or image.shape[2] != 3:
        return f"frame of shape {image.shape}, expected height x width x 3 (RGB)"
    if image.shape[0] == 0 or image.shape[1] == 0:
        return f"empty frame of shape {image.shape}"
    return None


class LiveReader:
    """Reads one live source on a thread of its own, one read at a time as the camera thread asks.

    A read that never returns (a GStreamer pipeline such as the Jetson's ``nvarguscamerasrc`` opened by an
    OpenCV whose GStreamer backend takes no read timeout, a wedged driver) then holds only this thread: the camera
    thread gives the source up (``abandon``) and opens a new one. This thread then releases the old source itself,
    once its read returns: a capture is never released while it is read."""

    def __init__(self, source: FrameSource, name: str, nice: int = 0) -> None:
        self.source = source
        self._nice = nice
        self._lock = threading.Lock()
        self._go = threading.Event()
        self._done = threading.Event()
        self._result: tuple[object, BaseException | None] = (None, None)
        self._quit = False
        self._abandoned = False
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        lower_this_thread(self._nice)
        while True:
            self._go.wait()
            self._go.clear()
            if self._quit:
                return
            try:
                result: tuple[object, BaseException | None] = (self.source.read(), None)
            except BaseException as exc:  # noqa: BLE001 (handed to the camera thread, which counts it)
                result = (None, exc)
            with self._lock:
                self._result = result
                self._done.set()
                if not self._abandoned:
                    continue
            try:
                self.source.close()
            except Exception:  # noqa: BLE001 (nobody left to tell but the log)
                log.exception("closing the abandoned source %s failed", getattr(self.source, "name", "?"))
            return

    def start_read(self) -> None:
        self._done.clear()
        self._go.set()

    def wait(self, timeout_s: float) -> bool:
        return self._done.wait(timeout_s)

    def result(self) -> object:
        """The read's (image, name), or what it raised, raised again here."""
        value, exc = self._result
        self._result = (None, None)
        if exc is not None:
            raise exc
        return value

    def abandon(self) -> None:
        """Give up the read in progress: this thread closes the source when (if) it returns."""
        with self._lock:
            self._abandoned = True
            returned = self._done.is_set()
        if returned:        # it returned meanwhile: nothing reads it, close it here
            self._quit = True
            self._go.set()
            self.source.close()

    def stop(self) -> None:
        """End the (idle) thread; the caller closes the source."""
        self._quit = True
        self._go.set()
        self.thread.join(5)


def backoff_delays(cfg: Backoff):
    """initial, initial*factor, ... capped at max: the waits between retries."""
    delay = cfg.initial_s
    while True:
        yield delay
        delay = min(cfg.max_s, delay * cfg.factor)


class CameraWorker(threading.Thread):
    """Runs one camera until stopped or (finite sources) the end of input."""

    def __init__(self, cfg: CameraConfig, hub: FrameHub, metrics: Metrics, stop: threading.Event,
                 source_factory: Callable[[CameraConfig], FrameSource] | None = None, keep_full: bool = False,
                 prepare: Callable[[np.ndarray], Prepared] | None = None, nice: int = 0,
                 end_when_unopenable: bool = False, rng: random.Random | None = None) -> None:
        super().__init__(name=f"camera-{cfg.id}", daemon=True)
        self._rng = rng or random.Random()     # the reconnect jitter: cameras (and stations) never retry in step
        self.nice = nice
        self.cfg = cfg
        self.hub = hub
        self.metrics = metrics
        self.stop_event = stop
        self.factory = source_factory or (lambda c: open_source(c.uri, name=c.id, loop=c.loop, width=c.width,
                                                                height=c.height, timeout_s=c.stall_timeout_s))
        self.keep_full = keep_full and cfg.roi is not None
        self.prepare = prepare
        self.ended = threading.Event()
        self.last_frame_mono = time.monotonic()
        self.connected = False
        self.live = False
        self._source: FrameSource | None = None
        self._reader: LiveReader | None = None             # reads a live source off this thread
        self._abandoned: list[LiveReader] = []              # given up, their reads not returned yet
        self.read_grace_s = READ_GRACE_S
        self._finite_source: FrameSource | None = None     # kept across reconnects: it resumes where it stopped
        self._kicked = threading.Event()                    # set by the watchdog; this thread reconnects
        self._delays = backoff_delays(cfg.reconnect)
        self._seq = 0
        self._next_due = 0.0
        self._bad_in_a_row = 0
        self._reported: set[tuple[str, str]] = set()
        self.last_error: str | None = None     # the newest problem, for status and tests
        self.end_when_unopenable = end_when_unopenable
        self.unopenable: str | None = None     # why a finite source that could not be opened ended the camera

    def run(self) -> None:
        lower_this_thread(self.nice)
        self._delays = backoff_delays(self.cfg.reconnect)
        while not self.stop_event.is_set():
            try:
                self._open()
                self._read_loop()       # starts the backoff again at its first usable frame
            except EndOfStream:
                log.info("camera %s: end of input after %d frames", self.cfg.id, self._seq)
                break
            except _Unopenable as exc:
                self.unopenable = str(exc)
                self.report("source", f"{exc}; the camera ends after {self._seq} frames (--exit-at-end: a file or "
                                      "folder source is not retried)")
                break
            except SourceError as exc:
                self._close()       # released (and reported down) before the wait, not after it
                self._reconnect_after(str(exc), self._next_delay())
            except Exception as exc:  # noqa: BLE001 (a source's own bug must not end the camera thread)
                self.report("source", f"{type(exc).__name__}: {exc}", exc)
                self._close()
                self._reconnect_after(f"{type(exc).__name__}: {exc}", self._next_delay())
            finally:
                self._close()
        self.ended.set()
        self.hub.wake()

    def _next_delay(self) -> float:
        """The next backoff delay, drawn between half of it and all of it: cameras that lost one RTSP server (an
        NVR restarting) together, on one station or many, do not reconnect in step."""
        delay = next(self._delays)
        return self._rng.uniform(delay / 2, delay)

    def _reconnect_after(self, why: str, delay: float) -> None:
        why = redact_uri(why)       # a source's own error text may quote its URI
        self.metrics.inc("camera_reconnects_total", camera=self.cfg.id)
        log.warning("camera %s: %s; reconnecting in %.1fs", self.cfg.id, why, delay)
        self.stop_event.wait(delay)

    def report(self, kind: str, message: str, exc: BaseException | None = None) -> None:
        """Count a problem (camera_errors_total{camera,kind}); log it the first time it is seen on this camera."""
        self.metrics.inc("camera_errors_total", camera=self.cfg.id, kind=kind)
        message = redact_uri(message)
        self.last_error = f"{kind}: {message}"
        key = (kind, message)
        if key in self._reported or len(self._reported) >= MAX_DISTINCT_REPORTS:
            log.debug("camera %s: %s (again)", self.cfg.id, message)
            return
        self._reported.add(key)
        log.error("camera %s: %s (counted in camera_errors_total, kind %s; reported once)", self.cfg.id, message,
                  kind, exc_info=exc)

    def _open(self) -> None:
        source = self._finite_source if self._finite_source is not None else self.factory(self.cfg)
        if getattr(source, "finite", False):
            self._finite_source = source
        if hasattr(source, "on_skip") and getattr(source, "on_skip", None) is None:   # a folder's skipped files
            source.on_skip = lambda message: self.report("file", message)
        self._kicked.clear()
        try:
            source.open()
        except SourceError as exc:
            if self.end_when_unopenable and getattr(source, "finite", False):
                raise _Unopenable(str(exc)) from None
            raise
        self._source = source
        self.live = not source.finite
        if self.live:
            self._reader = LiveReader(source, f"camera-{self.cfg.id}-read", self.nice)
        self.connected = True
        self.last_frame_mono = time.monotonic()
        self.metrics.set("camera_connected", 1, camera=self.cfg.id)
        log.info("camera %s: opened %s", self.cfg.id, redact_uri(self.cfg.uri))

    def _close(self) -> None:
        source, self._source = self._source, None
        reader, self._reader = self._reader, None
        self.connected = False
        self.metrics.set("camera_connected", 0, camera=self.cfg.id)
        if reader is not None:
            reader.stop()
        if source is not None:
            try:
                source.close()
            except Exception as exc:  # noqa: BLE001
                self.report("source", f"close failed: {type(exc).__name__}: {exc}", exc)

    def _read_loop(self) -> None:
        source = self._source
        assert source is not None
        first = True
        while not self.stop_event.is_set():
            if self._kicked.is_set():       # here, between reads: the source is released by this thread
                raise SourceError(f"{self.cfg.id}: no frame for more than {self.cfg.stall_timeout_s}s "
                                  "(the watchdog asked for a reconnect)")
            image, ref = self._read(source)
            if image is None:
                continue
            if first:       # the camera works again: the next failure is retried soon, then backed off again
                first = False
                self._delays = backoff_delays(self.cfg.reconnect)
            now = time.monotonic()
            self.last_frame_mono = now
            if not self._due(now, source.finite):
                continue
            try:
                cropped = crop_roi(image, self.cfg.roi)
            except RoiError as exc:
                self.report("roi", str(exc))
                continue
            self._seq += 1
            try:
                # Localization and preprocessing here run in parallel across cameras, and each camera's
                # localizer (its background model) lives in its own thread.
                prepared = self.prepare(cropped) if self.prepare is not None else None
            except Exception as exc:  # noqa: BLE001 (one frame the preprocessing cannot take is skipped)
                self.report("prepare", f"frame {self._seq} not prepared: {type(exc).__name__}: {exc}", exc)
                continue
            frame = Frame(self.cfg.id, self._seq, time.time(), now, cropped, ref,
                          image if self.keep_full else None, prepared,
                          prepared.located if isinstance(prepared, Prepared) else None)
            self.metrics.inc("frames_captured_total", camera=self.cfg.id)
            self.hub.put(frame, self.stop_event)

    def _read(self, source: FrameSource) -> tuple[np.ndarray | None, str | None]:
        """The next usable frame, or (None, None) for one that is not (counted); many in a row: reconnect."""
        result = source.read() if self._reader is None else self._read_live(self._reader)
        if result is _STOPPED:
            return None, None
        try:
            image, ref = result
        except (TypeError, ValueError):
            image, ref = None, None
            problem: str | None = f"read() returned a {type(result).__name__}, expected (image, name)"
        else:
            problem = frame_problem(image)
        if problem is None:
            self._bad_in_a_row = 0
            return image, ref if isinstance(ref, str) or ref is None else str(ref)
        self.report("frame", problem)
        self._bad_in_a_row += 1
        if self._bad_in_a_row >= BAD_FRAMES_BEFORE_RECONNECT:
            self._bad_in_a_row = 0
            raise SourceError(f"{self.cfg.id}: {BAD_FRAMES_BEFORE_RECONNECT} unusable frames in a row ({problem})")
        return None, None

    def _read_live(self, reader: LiveReader) -> object:
        """The live source's next read, waited for until the stall timeout plus ``read_grace_s``: one still running
        then is given up (SourceError: the camera reconnects with a new source) while fewer than
        ``MAX_ABANDONED_READS`` given up earlier are still running; at a stop it is given up at once."""
        reader.start_read()
        started = time.monotonic()
        limit = self.cfg.stall_timeout_s + self.read_grace_s
        while not reader.wait(0.2):
            waited = time.monotonic() - started
            stopping = self.stop_event.is_set()
            if not stopping and waited <= limit:
                continue
            self._abandoned = [r for r in self._abandoned if r.thread.is_alive()]
            if not stopping and len(self._abandoned) >= MAX_ABANDONED_READS:
                continue        # an earlier stuck read still holds the device: opening another would not help
            self._abandoned.append(reader)
            self._reader, self._source = None, None     # its own thread closes it once its read returns
            reader.abandon()
            if stopping:
                return _STOPPED
            self.report("source", f"a read did not return within {limit:g}s (stall_timeout_s + {self.read_grace_s:g}"
                                  "s); the source is given up (released when its read returns) and opened anew")
            raise SourceError(f"{self.cfg.id}: read did not return within {limit:g}s")
        return reader.result()

    def _due(self, now: float, finite: bool) -> bool:
        """Target fps: a finite source is paced (sleep), a live one skips frames that come too early."""
        if self.cfg.fps is None:
            return True
        period = 1.0 / self.cfg.fps
        if now < self._next_due:
            if not finite:
                return False
            self.stop_event.wait(self._next_due - now)
        self._next_due = max(self._next_due + period, time.monotonic() - period)
        return True

    def kick(self) -> bool:
        """Ask this camera's thread to reconnect once its read returns (the watchdog's call). Nothing of the
        source is touched from the calling thread: releasing a capture while its read runs crashes the process;
        the capture's read timeout (``stall_timeout_s``) ends a stalled read. False when an earlier kick is still
        waiting for that read."""
        pending = self._kicked.is_set()
        self._kicked.set()
        return not pending


class Watchdog(threading.Thread):
    """Flags cameras that delivered nothing for their stall timeout (counted in ``camera_stalls_total``); their
    threads reconnect once their read returns."""

    def __init__(self, workers: list[CameraWorker], stop: threading.Event, period_s: float = 0.5) -> None:
        super().__init__(name="camera-watchdog", daemon=True)
        self.workers = workers
        self.stop_event = stop
        self.period_s = period_s

    def run(self) -> None:
        while not self.stop_event.wait(self.period_s):
            now = time.monotonic()
            for worker in self.workers:
                try:
                    self._check(worker, now)
                except Exception as exc:  # noqa: BLE001 (one camera's broken close must not end the watchdog)
                    worker.report("source", f"watchdog reconnect failed: {type(exc).__name__}: {exc}", exc)

    @staticmethod
    def _check(worker: CameraWorker, now: float) -> None:
        stalled = now - worker.last_frame_mono > worker.cfg.stall_timeout_s
        if worker.live and worker.connected and stalled and not worker.ended.is_set():
            silent = now - worker.last_frame_mono
            worker.metrics.inc("camera_stalls_total", camera=worker.cfg.id)
            worker.last_frame_mono = now
            # reported down (status cameras, camera_connected) until its reconnect opens it again
            worker.connected = False
            worker.metrics.set("camera_connected", 0, camera=worker.cfg.id)
            if worker.kick():
                log.warning("camera %s: no frame for %.1fs, reconnecting", worker.cfg.id, silent)
            else:
                log.warning("camera %s: still no frame %.1fs later; its read has not returned yet (it reconnects "
                            "when it does)", worker.cfg.id, silent)
