"""When to send an empty-scene frame: on cmd/capture-empty and every ``frames.empty_scene_interval_s``.

Central training draws items on a station's real backgrounds (``python -m trainer train --backgrounds``);
this decides which frames of a camera go back as those backgrounds. Rules:

- Only a frame the camera's localizer, past its warm-up, sees as empty (no item, no foreground part at
  all: ``Located.scene_empty``) is ever taken. While the scene is busy a wanted frame waits for the next
  empty one, at most ``wait_s``; then it is given up and counted (a belt that is never empty sends nothing).
- cmd/capture-empty asks for ``count`` frames per camera, at least ``spacing_s`` apart (consecutive frames
  of a still scene are the same picture); a second command adds to what is still wanted (at most
  ``MAX_PENDING`` per camera) and restarts the wait.
- The schedule wants one frame per camera every ``interval_s`` (0: off), the first one ``interval_s``
  after the start; any empty-scene frame sent restarts that camera's interval.

The decide thread calls ``offer`` for every frame; the command thread calls ``request``. Time is the
caller's clock (the inference stage's), so tests can drive it. A frame ``offer`` took that could not be stored
(the outbox's disk full) is handed back with ``unsent``: it is wanted again, not lost with the request counted done.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Iterable

log = logging.getLogger(__name__)

MAX_PENDING = 50


@dataclass
class _Camera:
    wanted: int = 0                  # frames still wanted by commands
    wanted_until: float = 0.0        # ... until this time
    not_before: float = 0.0          # spacing between the frames of a command
    due: float | None = None         # the schedule's next frame is wanted from this time (None: off)


@dataclass(frozen=True)
class Offer:
    """What to do with one frame: send it (``trigger`` "command" or "schedule") or not; and how many wanted
    frames were given up now because no empty scene came in time."""

    trigger: str | None
    given_up: int = 0


class EmptySceneCapture:
    def __init__(self, camera_ids: Iterable[str], *, interval_s: float, wait_s: float, spacing_s: float,
                 now: float) -> None:
        self.interval_s, self.wait_s, self.spacing_s = interval_s, wait_s, spacing_s
        self._lock = threading.Lock()
        self._cams = {cid: _Camera(due=now + interval_s if interval_s > 0 else None) for cid in camera_ids}

    def request(self, camera_ids: Iterable[str], count: int, now: float) -> None:
        """cmd/capture-empty: ``count`` more frames from each camera, each waiting at most ``wait_s``."""
        if count < 1:       # a negative count left wanted below 0: truthy, every empty frame would be sent
            raise ValueError(f"empty-scene frames requested: {count}, expected at least 1")
        with self._lock:
            for cid in camera_ids:
                cam = self._cams[cid]
                cam.wanted = min(MAX_PENDING, cam.wanted + count)
                cam.wanted_until = now + self.wait_s

    def unsent(self, camera_id: str, trigger: str, now: float) -> None:
        """A frame ``offer`` took (``trigger``) was not stored: wanted again from the next empty frame, with a wait
        of its own (a full disk is not a busy scene)."""
        with self._lock:
            cam = self._cams.get(camera_id)
            if cam is None:
                return
            if trigger == "command":
                cam.wanted = min(MAX_PENDING, cam.wanted + 1)
                cam.wanted_until = max(cam.wanted_until, now + self.wait_s)
                cam.not_before = min(cam.not_before, now)
            elif trigger == "schedule" and cam.due is not None:
                cam.due = min(cam.due, now)

    def pending(self, camera_id: str) -> int:
        with self._lock:
            return self._cams[camera_id].wanted

    def offer(self, camera_id: str, scene_empty: bool | None, now: float) -> Offer:
        """Take this frame as an empty scene? ``scene_empty``: the localizer's verdict (None: not localized)."""
        with self._lock:
            cam = self._cams.get(camera_id)
            if cam is None:
                return Offer(None)
            if cam.due is not None and cam.due > now + self.interval_s:    # the clock stepped back (NTP): no
                cam.due = now + self.interval_s                             # wait longer than one interval
            cam.not_before = min(cam.not_before, now + self.spacing_s)
            cam.wanted_until = min(cam.wanted_until, now + self.wait_s)
            given_up = self._expire(camera_id, cam, now)
            if scene_empty is not True:
                return Offer(None, given_up)
            if cam.wanted and now >= cam.not_before:
                cam.wanted -= 1
                cam.not_before = now + self.spacing_s
                self._restart_interval(cam, now)
                return Offer("command", given_up)
            if cam.due is not None and now >= cam.due:
                self._restart_interval(cam, now)
                return Offer("schedule", given_up)
            return Offer(None, given_up)

    def _restart_interval(self, cam: _Camera, now: float) -> None:
        if cam.due is not None:
            cam.due = now + self.interval_s

    def _expire(self, camera_id: str, cam: _Camera, now: float) -> int:
        """Wanted frames whose wait ran out: given up (and, for the schedule, the next interval starts)."""
        given_up = 0
        if cam.wanted and now > cam.wanted_until:
            given_up += cam.wanted
            log.warning("camera %s: %d requested empty-scene frame(s) given up: the scene was not empty within "
                        "%.0f s", camera_id, cam.wanted, self.wait_s)
            cam.wanted = 0
        if cam.due is not None and now > cam.due + self.wait_s:
            given_up += 1
            log.warning("camera %s: scheduled empty-scene frame given up: the scene was not empty within %.0f s",
                        camera_id, self.wait_s)
            cam.due = now + self.interval_s
        return given_up
