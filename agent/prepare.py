"""A frame's model input, made on its camera's thread: localize the item, then preprocess what the model sees.

Invariants:
- Each camera has its own ``Localizer`` (its background model), created and updated only by the function
  ``camera_preparer`` returns, which only that camera's thread calls. The inference stage keeps its own
  preparers for frames that arrive unprepared (built by hand, e.g. by tests and benchmarks).
- The part of the ROI the model is fed is ``fed_box(frame, policy)``, whichever thread prepares it and for
  whichever model: the camera threads use it for the model of the moment, and the inference stage uses it
  again when a swap brought a model with another crop policy.
- With presence by the localizer (``decisions.presence.mode`` background or both) a frame in which it sees
  no item gets no model input at all (``Prepared.input`` None): the model never runs on an empty belt.
- ``Prepared.scene_empty`` is True only where the background is known to be the empty scene (``EmptySceneWitness``):
  a captured empty-scene image, or a background learned from frames that has since seen an item come into view.
  A background learned while an item stood in view (a start, a relearn) holds that item, and every later frame
  that still shows it would look empty: such frames must not go back as the station's empty scene.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

import numpy as np

from agent.config import AgentConfig, CameraConfig, ConfigError, PresenceConfig
from agent.localize import Box, Localizer, LocalizerSettings, Located, crop_box, cut, model_view
from agent.sources.base import Frame, Prepared
from contract.preprocess import CropPolicy, ImageDecodeError, read_image

if TYPE_CHECKING:
    from agent.pipeline import ModelHolder


def fed_box(frame: Frame, policy: CropPolicy) -> Box:
    """The part of the frame's ROI the model is fed under ``policy``: the item's square crop, else the ROI."""
    height, width = frame.image.shape[:2]
    box = frame.located.box if frame.located is not None else None
    crop = crop_box(box, (height, width), policy) if policy.mode == "foreground" else None
    return crop or (0, 0, width, height)


def model_input_image(frame: Frame, policy: CropPolicy) -> np.ndarray:
    """The image the preprocessor gets for this frame under ``policy`` (a view, no copy)."""
    box = fed_box(frame, policy)
    return frame.image if box == (0, 0, frame.image.shape[1], frame.image.shape[0]) else cut(frame.image, box)


def load_empty_scene(cfg: AgentConfig, cam: CameraConfig) -> np.ndarray | None:
    """The camera's captured empty-scene image (decisions.presence.empty_images), cut to its ROI when it is a
    whole frame; None when none is configured."""
    path = cfg.decisions.presence.empty_images.get(cam.id)
    if path is None:
        return None
    try:
        image = read_image(path)
    except ImageDecodeError as exc:
        raise ConfigError(f"decisions.presence.empty_images.{cam.id}: {exc}") from exc
    roi = cam.roi
    if roi is not None and image.shape[0] >= roi.y + roi.height and image.shape[1] >= roi.x + roi.width:
        image = image[roi.y : roi.y + roi.height, roi.x : roi.x + roi.width]
    elif roi is not None and image.shape[:2] != (roi.height, roi.width):
        # neither the ROI nor a whole frame holding it: the localizer could only drop it at the first frame
        raise ConfigError(f"decisions.presence.empty_images.{cam.id}: {path}: the image is {image.shape[1]}x"
                          f"{image.shape[0]} px; expected the camera's ROI ({roi.width}x{roi.height}) or a whole frame "
                          f"that holds the ROI {roi.describe()} (capture it at the camera's resolution)")
    return np.ascontiguousarray(image)


class EmptySceneWitness:
    """Whether one camera's localizer may be believed when it says the scene is empty.

    A background the localizer learned from frames (its warm-up at a start or after the ROI's size changed, a
    relearn after an item stood in view too long) may hold an item that stood there meanwhile; it is trusted once an
    item has been seen in front of it since (the belt moved: what was learned is the belt). A background from a
    captured empty-scene image (``decisions.presence.empty_images``: no warm-up) is trusted at once. A blank view
    (lights off) changes nothing: the background is kept through it."""

    def __init__(self) -> None:
        self.learned_from_frames = False
        self.item_seen = False
        self._relearned = 0
        self._blank_frames = 0

    def scene_empty(self, localizer: Localizer, located: Located) -> bool:
        blank = localizer.blank_frames != self._blank_frames
        self._blank_frames = localizer.blank_frames
        relearned = localizer.relearned != self._relearned
        self._relearned = localizer.relearned
        if relearned or (not located.settled and not blank):   # the background is (re)learned from frames
            self.learned_from_frames, self.item_seen = True, False
        elif located.present:
            self.item_seen = True
        return located.scene_empty and (self.item_seen or not self.learned_from_frames)


def camera_preparer(model: "ModelHolder", presence: PresenceConfig | None = None,
                    empty_scene: np.ndarray | None = None, watch_empty: bool = False) -> Callable[[np.ndarray], Prepared]:
    """For one camera thread: its localizer and the current model's preprocessing of what the model sees.

    ``watch_empty``: run the localizer on every frame even when neither presence nor the model's crop needs
    it, so that ``Prepared.scene_empty`` can tell when the scene is empty (empty-scene uploads); the frame's
    ``located`` is then reported only once presence or a crop has needed the localizer.
    """
    settings = LocalizerSettings.from_config(presence) if presence is not None else LocalizerSettings()
    skip_empty = presence is not None and presence.by_localizer
    localizer: Localizer | None = None
    witness = EmptySceneWitness()
    needed = False

    def prepare(image: np.ndarray) -> Prepared:
        nonlocal localizer, needed
        start = time.monotonic()
        preprocessor = model.current.preprocessor
        policy = preprocessor.spec.crop
        needed = needed or skip_empty or policy.mode == "foreground"
        located = None
        # Once started, the localizer sees every frame, so its background stays current across model swaps.
        if localizer is not None or needed or watch_empty:
            localizer = localizer or Localizer(settings, policy, empty_scene)
            located = localizer.update(image, policy)
        scene_empty = witness.scene_empty(localizer, located) if localizer is not None and located is not None else None
        if not needed:
            located = None
        if skip_empty and located is not None and not located.present:
            return Prepared(preprocessor, None, time.monotonic() - start, located, scene_empty)
        view = model_view(image, located.crop_box if located is not None else None, policy)
        return Prepared(preprocessor, preprocessor(view), time.monotonic() - start, located, scene_empty)

    return prepare
