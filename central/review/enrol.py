"""Enrol a new class from the review page: its reviewed frames become the examples (docs/enrol.md).

A reviewer marks frames of a product the model does not know as a new class (and labels more frames with it);
``POST /api/enrol {"label": ...}`` hands the stored frames of that class (item crops, as the station sent
them) to ``trainer.enroll``, which writes a new verified bundle version beside the configured one. The next
enrolment builds on the version just written, so several new classes accumulate. One enrolment at a time, per
models folder: an enrolment that writes holds ``<models dir>/.enrol.lock`` (``flock``) from choosing the version
it builds on until its version is in place, so two review servers on one models folder never both build on the
same version (the chain follows one of them and the other's class was lost); the second is answered 409 (busy).
The lock is ``trainer.enroll.models_dir_lock``'s, which ``python -m trainer enroll`` holds over the same span: a
CLI enrolment and a page enrolment on one models folder are serialised the same way (the second is refused).
Enrolment needs ONNX Runtime and the trainer package's enrol module on the review host (the central image has
neither: page enrolment runs where the trainer is installed).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.util
import json
import logging
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from central.review.store import FrameStore, StoreError

log = logging.getLogger(__name__)

EXAMPLE_STATUSES = ("labelled", "new_class")
LOCK_FILE = ".enrol.lock"      # in the models folder: trainer.enroll.LOCK_FILE (held by the enrolment writing there)


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


def _read_manifest(path: Path) -> dict | None:
    """The manifest at ``path`` as a dict, or None (logged) when it cannot be read or is no JSON object."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("%s: not read while looking for enrolled versions, skipped (%s)", path, exc)
        return None
    if not isinstance(manifest, dict):
        log.warning("%s: not a JSON object, skipped while looking for enrolled versions", path)
        return None
    return manifest


def _version_order(version: str) -> tuple:
    """A version's sort key: its digit runs as numbers ("10" after "9"), the rest as text."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", version))


def _created_order(created_at: Any) -> float:
    """``created_at`` (ISO 8601; without a zone: UTC) as seconds, or -inf where it is missing or not a time."""
    try:
        when = dt.datetime.fromisoformat(created_at)
        return (when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)).timestamp()
    except (TypeError, ValueError, OverflowError):
        return -math.inf


def _enrolled_child(folder: Path, name: str) -> tuple[str, str, tuple] | None:
    """(parent version, version, sort key) of a version of ``name`` enrolled onto another, else None (a retrained
    or exported version, a folder without a manifest, one that cannot be read)."""
    if not (folder / "manifest.json").exists():
        return None
    manifest = _read_manifest(folder / "manifest.json")
    provenance = manifest.get("provenance") if manifest is not None else None
    parent = provenance.get("enrolled_from") if isinstance(provenance, dict) else None
    if not (isinstance(parent, dict) and parent.get("name") == name and manifest.get("name") == name
            and isinstance(parent.get("version"), str) and isinstance(manifest.get("version"), str)):
        return None
    version = manifest["version"]
    return parent["version"], version, (_created_order(manifest.get("created_at")), _version_order(version))


def latest_enrolled(configured: Path, models_dir: Path | None) -> Path:
    """The newest version enrolled on top of ``configured`` (following ``provenance.enrolled_from``), else
    ``configured``: a restarted server enrols onto the classes it enrolled before, not onto its first bundle.

    Of several versions enrolled onto one, the newest by ``created_at`` (then by version, numbers as numbers).
    Hidden folders (an enrolment's ``.<version>.partial-*``, half written) are never taken; a manifest that
    cannot be read is skipped and logged, not a reason to forget the chain."""
    root = Path(models_dir) if models_dir is not None else configured.parent.parent
    head = _read_manifest(configured / "manifest.json")
    if head is None or not isinstance(head.get("name"), str) or not isinstance(head.get("version"), str):
        return configured              # the configured bundle is checked when an enrolment loads it
    name = head["name"]
    try:
        folders = sorted(p for p in (root / name).iterdir() if p.is_dir() and not p.name.startswith("."))
    except FileNotFoundError:          # nothing enrolled into this models dir yet
        return configured
    except OSError as exc:
        log.warning("%s: cannot list its versions (%s); enrolling onto %s", root / name, exc, configured)
        return configured
    children: dict[str, tuple[tuple, str, Path]] = {}     # parent version -> (order, version, folder) of its newest
    for folder in folders:
        child = _enrolled_child(folder, name)
        if child is not None and (child[0] not in children or child[2] > children[child[0]][0]):
            children[child[0]] = (child[2], child[1], folder)
    found, version, seen = configured, head["version"], set()
    while version in children and version not in seen:
        seen.add(version)
        _, version, found = children[version]
    return found


def _check_signing(settings: EnrolSettings, bundle: Path) -> None:
    """StoreError naming the server's flags, at start (not after the first enrolment has computed everything), where
    the versions it enrols would be refused by the stations: trainer enroll's rule (``trainer.enroll.check_signing``:
    a key that cannot sign, one that is not the private half of --enrol-public-key, a signed bundle and no key). The
    source is ``bundle`` (the newest enrolled version), or --enrol-bundle where only that one is signed."""
    from contract.bundle import SIGNATURE
    from trainer.enroll import EnrolError, check_signing

    source = next((b for b in (bundle, Path(settings.bundle)) if (b / SIGNATURE).exists()), bundle)
    try:
        check_signing(source, settings.sign_key, settings.public_key, sign_flag="--enrol-sign-key",
                      public_flag="--enrol-public-key", unsigned_flag=None)
    except EnrolError as exc:
        raise StoreError(str(exc)) from None


@contextlib.contextmanager
def models_dir_lock(models_dir: Path) -> Iterator[None]:
    """Hold ``models_dir``'s enrolment lock (``trainer.enroll.models_dir_lock``: ``flock`` on ``LOCK_FILE``,
    released by the kernel when the process ends, however it ends; the one ``python -m trainer enroll`` holds), or
    EnrolBusy at once where another enrolment (another review server, a CLI enrolment, another thread) holds it;
    StoreError naming the file where it cannot be opened."""
    from trainer.enroll import EnrolBusy as TrainerBusy
    from trainer.enroll import EnrolError
    from trainer.enroll import models_dir_lock as trainer_lock

    with contextlib.ExitStack() as held:
        try:
            held.enter_context(trainer_lock(Path(models_dir)))
        except TrainerBusy:
            path = Path(models_dir) / LOCK_FILE
            raise EnrolBusy(f"another enrolment is writing into {path.parent} (another review server or a trainer "
                            f"enroll on this models folder: it holds {path}); try again when it has finished") from None
        except EnrolError as exc:
            raise StoreError(str(exc)) from None
        yield


class ReviewEnroller:
    """Turns the store's reviewed frames of a new class into a new bundle version, one enrolment at a time."""

    def __init__(self, store: FrameStore, settings: EnrolSettings) -> None:
        missing = [what for module, what in (("onnxruntime", "onnxruntime (pip install onnxruntime)"),
                                             ("trainer", "the trainer package of this repository (its torch-free "
                                                         "enrol module: pip install --no-deps . from a checkout)"))
                   if importlib.util.find_spec(module) is None]
        if missing:     # the central image ships neither: page enrolment runs on a review host that has both
            raise StoreError(f"--enrol-bundle: enrolment runs the bundle's model with trainer.enroll and needs, on "
                             f"this host, {' and '.join(missing)}; the central image has neither")
        if not (Path(settings.bundle) / "manifest.json").is_file():
            raise StoreError(f"--enrol-bundle {settings.bundle}: no manifest.json there")
        if not 0.0 < settings.max_drop_points < 100.0:          # NaN fails too
            raise StoreError(f"--enrol-max-drop: expected points in (0, 100), got {settings.max_drop_points!r}")
        if not settings.max_drop_points <= settings.limit < 100.0:
            raise StoreError(f"--enrol-max-drop-limit: expected points in [--enrol-max-drop "
                             f"{settings.max_drop_points:g}, 100), got {settings.max_drop_limit!r}")
        bundle = latest_enrolled(Path(settings.bundle), settings.models_dir)
        _check_signing(settings, bundle)
        self.store = store
        self.settings = settings
        self.bundle = bundle
        self._lock = threading.Lock()

    def current_bundle(self) -> Path:
        """The version the next class goes onto: the newest enrolled onto the one this server enrolled last, so that
        a class enrolled meanwhile with ``trainer enroll`` (or by another review server) on the same models dir is
        built on, not dropped from the chain; where that version was removed, the newest from --enrol-bundle."""
        start = self.bundle if (Path(self.bundle) / "manifest.json").is_file() else Path(self.settings.bundle)
        return latest_enrolled(start, self.settings.models_dir)

    def describe(self) -> dict[str, Any]:
        """What the page needs to offer enrolment: the bundle new classes go into, the examples needed, the
        allowance."""
        s = self.settings
        return {"enabled": True, "bundle": str(self.current_bundle()), "min_examples": s.min_examples,
                "allowance": {"default": s.max_drop_points, "limit": s.limit}}

    def examples(self, label: str) -> list[Path]:
        """Image files of the frames reviewed as ``label`` (labelled with it, or marked as that new class): only
        those rows are read from the store, a page at a time (not every reviewed frame, ~3 kB each)."""
        return [self.store.root / f["image"] for f in self.store.iter_reviewed(label=label, statuses=EXAMPLE_STATUSES)]

    def enrolled_gate(self) -> dict[str, list[Path]]:
        """The frames reviewed as each class enrolled into the current bundle (``open_set.enrolled``): gate images
        of their class, so that a new class cannot take an enrolled one's items unseen (the run's validation
        split has none of them). Its frames are mostly those it was enrolled from, so the protection is
        optimistic; its images in ``--enrol-gate-data`` add others."""
        manifest = _read_manifest(Path(self.bundle) / "manifest.json") or {}
        open_set = manifest.get("open_set")
        enrolled = open_set.get("enrolled") if isinstance(open_set, dict) else None
        labels = [label for label in enrolled if isinstance(label, str)] if isinstance(enrolled, list) else []
        return {label: self.examples(label) for label in labels}

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
        held = contextlib.ExitStack()
        try:
            if not dry_run:     # a dry run writes nothing: it neither waits for nor holds up another server's
                held.enter_context(models_dir_lock(self.models_dir()))
            self.bundle = self.current_bundle()
            paths = self.examples(label)
            if len(paths) < s.min_examples:
                raise StoreError(f"field label: {label!r} has {len(paths)} reviewed frame(s), at least "
                                 f"{s.min_examples} needed to enrol it")
            try:
                result = enroll(EnrolConfig(bundle=self.bundle, label=label, images=paths, models_dir=s.models_dir,
                                            sign_key=s.sign_key, public_key=s.public_key, gate_data=s.gate_data,
                                            min_examples=s.min_examples, max_drop_points=allowance,
                                            dry_run=dry_run, enrolled_gate=self.enrolled_gate()))
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
            held.close()
            self._lock.release()

    def models_dir(self) -> Path:
        """The models folder enrolments write into (``<name>/<version>`` under it): ``settings.models_dir``, else
        the configured bundle's (where ``trainer.enroll`` writes a version enrolled onto any of its versions)."""
        s = self.settings
        return Path(s.models_dir) if s.models_dir is not None else Path(s.bundle).parent.parent

    def _allowance(self, used: float) -> dict:
        """The allowance used, and what this server lets a request ask for (the page offers those)."""
        return {"allowance": {"used": used, "default": self.settings.max_drop_points, "limit": self.settings.limit}}
