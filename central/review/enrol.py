"""Enrol a new class from the review page: its reviewed frames become the examples (docs/enrol.md).

A reviewer marks frames of a product the model does not know as a new class (and labels more frames with it);
``POST /api/enrol {"label": ...}`` hands the stored frames of that class (item crops, as the station sent
them) to ``trainer.enroll``, which writes a new verified bundle version beside the configured one. The next
enrolment builds on the version just written, so several new classes accumulate. One enrolment at a time;
enrolment needs ONNX Runtime on the review host (the central image has none unless installed).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from central.review.store import FrameStore, StoreError

log = logging.getLogger(__name__)

EXAMPLE_STATUSES = ("labelled", "new_class")


class EnrolBusy(RuntimeError):
    """Another enrolment is running."""


class EnrolRefused(StoreError):
    """The gate refused the enrolment; ``details`` (its report as ``figures``, and ``allowance``) go in the answer
    beside the message."""

    def __init__(self, message: str, details: dict) -> None:
        super().__init__(message)
        self.details = details


@dataclass
class EnrolSettings:
    bundle: Path                      # the bundle new classes are added to (then the latest enrolled version)
    models_dir: Path | None = None    # default: the bundle's own models dir
    sign_key: Path | None = None
    public_key: Path | None = None
    gate_data: Path | None = None     # class folders of the old classes; default: the run's validation split
    min_examples: int = 5
    max_drop_points: float = 0.5      # the old classes' allowance (trainer enroll --max-drop), unless a request asks
    max_drop_limit: float | None = None   # the most a request may ask for (None: max_drop_points, no choice)

    @property
    def limit(self) -> float:
        return self.max_drop_points if self.max_drop_limit is None else self.max_drop_limit


def latest_enrolled(configured: Path, models_dir: Path | None) -> Path:
    """The newest version enrolled on top of ``configured`` (following ``provenance.enrolled_from``), else
    ``configured``: a restarted server enrols onto the classes it enrolled before, not onto its first bundle."""
    root = Path(models_dir) if models_dir is not None else configured.parent.parent
    try:
        head = json.loads((configured / "manifest.json").read_text())
        name = head["name"]
        children: dict[str, tuple[str, Path]] = {}
        for manifest_path in (root / name).glob("*/manifest.json"):
            manifest = json.loads(manifest_path.read_text())
            parent = (manifest.get("provenance") or {}).get("enrolled_from") or {}
            if parent.get("name") == name and isinstance(parent.get("version"), str):
                children[parent["version"]] = max(children.get(parent["version"], ("", manifest_path.parent)),
                                                  (manifest["version"], manifest_path.parent))
    except (OSError, ValueError, KeyError, TypeError):
        return configured              # the configured bundle is checked when an enrolment loads it
    found, version, seen = configured, head["version"], set()
    while version in children and version not in seen:
        seen.add(version)
        version, found = children[version]
    return found


class ReviewEnroller:
    """Turns the store's reviewed frames of a new class into a new bundle version, one enrolment at a time."""

    def __init__(self, store: FrameStore, settings: EnrolSettings) -> None:
        if importlib.util.find_spec("onnxruntime") is None:
            raise StoreError("--enrol-bundle: enrolment runs the bundle's model and needs onnxruntime on this host "
                             "(pip install onnxruntime)")
        if not (Path(settings.bundle) / "manifest.json").is_file():
            raise StoreError(f"--enrol-bundle {settings.bundle}: no manifest.json there")
        if not 0.0 < settings.max_drop_points < 100.0:          # NaN fails too
            raise StoreError(f"--enrol-max-drop: expected points in (0, 100), got {settings.max_drop_points!r}")
        if not settings.max_drop_points <= settings.limit < 100.0:
            raise StoreError(f"--enrol-max-drop-limit: expected points in [--enrol-max-drop "
                             f"{settings.max_drop_points:g}, 100), got {settings.max_drop_limit!r}")
        self.store = store
        self.settings = settings
        self.bundle = latest_enrolled(Path(settings.bundle), settings.models_dir)
        self._lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        """What the page needs to offer enrolment: the bundle new classes go into, the examples needed, the
        allowance."""
        s = self.settings
        return {"enabled": True, "bundle": str(self.bundle), "min_examples": s.min_examples,
                "allowance": {"default": s.max_drop_points, "limit": s.limit}}

    def examples(self, label: str) -> list[Path]:
        """Image files of the frames reviewed as ``label`` (labelled with it, or marked as that new class)."""
        return [self.store.image_path(f["id"]) for f in self.store.iter_reviewed()
                if f.get("status") in EXAMPLE_STATUSES and f.get("label") == label]

    def enrol(self, label: str, reviewer: str | None = None, max_drop_points: float | None = None,
              dry_run: bool = False) -> dict[str, Any]:
        """Enrol ``label`` from its reviewed frames at ``max_drop_points`` (None: the server's allowance; at most
        its limit); ``dry_run``: the figures only, nothing written (the page's preview)."""
        from trainer.enroll import EnrolConfig, EnrolError, enroll

        s = self.settings
        allowance = s.max_drop_points if max_drop_points is None else max_drop_points
        if not 0.0 < allowance <= s.limit:
            raise StoreError(f"field max_drop_points: expected points in (0, {s.limit:g}] (the server's "
                             f"--enrol-max-drop-limit), got {max_drop_points!r}")
        if not self._lock.acquire(blocking=False):
            raise EnrolBusy("another enrolment is running; try again when it has finished")
        try:
            paths = self.examples(label)
            if len(paths) < s.min_examples:
                raise StoreError(f"field label: {label!r} has {len(paths)} reviewed frame(s), at least "
                                 f"{s.min_examples} needed to enrol it")
            try:
                result = enroll(EnrolConfig(bundle=self.bundle, label=label, images=paths, models_dir=s.models_dir,
                                            sign_key=s.sign_key, public_key=s.public_key, gate_data=s.gate_data,
                                            min_examples=s.min_examples, max_drop_points=allowance,
                                            dry_run=dry_run))
            except EnrolError as exc:
                if exc.report:
                    raise EnrolRefused(str(exc), {"figures": exc.report, **self._allowance(allowance)}) from None
                raise StoreError(str(exc)) from None
            answer = {"frames": len(paths), "figures": result.report, **self._allowance(allowance),
                      "written": not dry_run}
            if dry_run:
                return {"bundle": str(self.bundle), "label": label, **answer}
            log.info("review: %s enrolled %r from %d reviewed frames at %g points into %s", reviewer or "a reviewer",
                     label, len(paths), allowance, result.bundle_dir)
            self.bundle = result.bundle_dir
            return {"bundle": str(result.bundle_dir), "name": result.manifest["name"],
                    "version": result.manifest["version"], "labels": result.manifest["labels"], "label": label,
                    **answer}
        finally:
            self._lock.release()

    def _allowance(self, used: float) -> dict:
        """The allowance used, and what this server lets a request ask for (the page offers those)."""
        return {"allowance": {"used": used, "default": self.settings.max_drop_points, "limit": self.settings.limit}}
