"""Labelled product images: three layouts, a stratified split, and Fashion-MNIST import.

Layouts (``detect_layout`` picks one):

- class folders: ``root/<class>/*.png`` (an optional ``root/labels.json`` maps
  folder names to display names, for names a filesystem cannot hold);
- flat files named ``<class>_<anything>.<ext>`` (the original design notes);
- a CSV with a header ``path,label`` (paths relative to the CSV's folder).

Hostile or damaged input never ends in a traceback: a problem that makes the dataset wrong (a class name
that is not UTF-8 text, a labels file of the wrong shape, a CSV that is not UTF-8, a truncated IDX file) is
a DatasetError naming the file; a single image that cannot be used (corrupt, unreadable, a file name that
is not UTF-8, a CSV row repeating an image an earlier row gave the same label) is skipped and listed in
``Dataset.skipped`` with the reason, as is any other file in a class folder (another type, a folder link, a
broken link). Hidden names (a Mac's ``._x.jpg``, ``.DS_Store``) are not samples; class names compare in NFC.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import logging
import os
import random
import re
import struct
import unicodedata
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Hashable, Iterable, Sequence

import numpy as np

from contract.dataset import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    IMAGE_EXTENSIONS,
    LABELS_FILE,
    MASK_SUFFIX,
    class_name_problem,
    folder_name,
    is_sample_image,
)
from contract.events import fsync_dir

log = logging.getLogger(__name__)

class DatasetError(ValueError):
    """A dataset that cannot be trained on; the message names the file or folder."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int
    as_seen: bool = False   # already a station's view (an item crop it sent back): trained as it is, never rendered
    #                         onto a surface again as a station view (a CSV row with view=station)
    digest: str | None = field(default=None, compare=False, repr=False)   # sha256 of the file's bytes, where
    #                         drop_unreadable read them (the fingerprint's; read again when None)


FINGERPRINT_PREFIX = "content-sha256:"   # Dataset.fingerprint since 2026-12-07; before it, 64 hex digits over sizes


def file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


@dataclass
class Dataset:
    """Samples with their class names; ``skipped`` lists files that could not be used."""

    root: Path
    classes: list[str]
    samples: list[Sample]
    layout: str
    skipped: list[dict[str, str]] = field(default_factory=list)
    duplicates: list[dict[str, Any]] = field(default_factory=list)   # images of the same bytes (drop_unreadable)

    def labels(self) -> list[int]:
        return [s.label for s in self.samples]

    def class_counts(self) -> dict[str, int]:
        counts = Counter(s.label for s in self.samples)
        return {name: counts.get(i, 0) for i, name in enumerate(self.classes)}

    def relative(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    def fingerprint(self) -> str:
        """``content-sha256:`` and the sha256 over the sorted (relative path, label, sha256 of the image's bytes):
        changes when any image, name or label does, an image replaced by another of the same size included (the
        size was hashed before 2026-12-07, not the bytes: ``legacy_fingerprint``), and not when a file is only
        touched or copied. The images' digests are those drop_unreadable took while reading each image; only the
        images of a dataset loaded without that check are read again here."""
        digest = hashlib.sha256()
        rows = sorted((_nfc(self.relative(s.path)), _nfc(self.classes[s.label]), s.digest or file_sha256(s.path))
                      for s in self.samples)      # NFC: path and class as load_split finds them after a Mac copy
        for rel, label, content in rows:
            digest.update(f"{rel}\t{label}\t{content}\n".encode())
        return FINGERPRINT_PREFIX + digest.hexdigest()

    def legacy_fingerprint(self) -> str:
        """The fingerprint as written before 2026-12-07: sha256 over sorted (relative path, label, size); blind to
        an image replaced by another of the same size. Only to compare with one saved then."""
        digest = hashlib.sha256()
        rows = sorted((self.relative(s.path), self.classes[s.label], s.path.stat().st_size) for s in self.samples)
        for rel, label, size in rows:
            digest.update(f"{rel}\t{label}\t{size}\n".encode())
        return digest.hexdigest()

    def matches_fingerprint(self, saved: object) -> bool | None:
        """Whether ``saved``, a fingerprint of this dataset's images written by this or an earlier version, is
        still theirs: a current one is compared with ``fingerprint``, one of 64 hex digits (before 2026-12-07) with
        ``legacy_fingerprint`` (which cannot see an image replaced by one of the same size). None for anything
        else: a fingerprint of a form this version does not know is not held against the data."""
        if isinstance(saved, str) and saved.startswith(FINGERPRINT_PREFIX):
            return saved == self.fingerprint()
        if isinstance(saved, str) and re.fullmatch(r"[0-9a-f]{64}", saved):
            return saved == self.legacy_fingerprint()
        return None

    def subset(self, indices: Sequence[int]) -> "Dataset":
        return Dataset(self.root, self.classes, [self.samples[i] for i in indices], self.layout, self.skipped,
                       self.duplicates)


def shown(path: Path | str) -> str:
    """A path as printable text: bytes of a name that is not UTF-8 appear as ``\\xNN``."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_class_name(name: object, where: Path | str) -> str:
    """A class name as it will travel in manifests and payloads (contract.dataset.class_name_problem)."""
    problem = class_name_problem(name)
    if problem is not None:
        quoted = f"'{shown(name)}'" if isinstance(name, str) and "not valid UTF-8" in problem else repr(name)
        raise DatasetError(f"{shown(where)}: class name {quoted} {problem}")
    return name  # type: ignore[return-value]


def _listdir(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError as exc:
        raise DatasetError(f"{shown(folder)}: cannot list ({exc.strerror or exc})") from exc


def _display_names(root: Path) -> dict[str, str]:
    path = root / LABELS_FILE
    if not path.exists():
        return {}
    try:
        names = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise DatasetError(f"{shown(path)}: cannot read ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{shown(path)}: not UTF-8 text (byte {exc.start})") from exc
    except (ValueError, RecursionError) as exc:
        raise DatasetError(f"{shown(path)}: not valid JSON ({exc})") from exc
    if not isinstance(names, dict):
        raise DatasetError(f"{shown(path)}: expected an object mapping folder names to class names, "
                           f"got {type(names).__name__}")
    for folder, name in names.items():
        check_class_name(name, f"{shown(path)}: field {folder}")
    return {_nfc(folder): name for folder, name in names.items()}


def _nfc(name: str) -> str:
    """A name in Unicode NFC: a folder named on a Mac (decomposed, NFD: ``e`` + combining accent) and the same
    name typed on Linux (composed) are one class, not two that print alike."""
    return unicodedata.normalize("NFC", name)


def _from_pairs(root: Path, pairs: Iterable[tuple[Path, str]], layout: str, classes: Sequence[str] | None,
                seen: Sequence[bool] | None = None) -> Dataset:
    pairs = [(path, _nfc(label)) for path, label in pairs]
    seen = list(seen) if seen is not None else [False] * len(pairs)
    names = list(classes) if classes is not None else sorted({label for _, label in pairs})
    for name in names:
        check_class_name(name, root)
    index = {name: i for i, name in enumerate(names)}
    index.update({_nfc(name): i for i, name in reversed(list(enumerate(names)))})   # given classes keep their spelling
    unknown = sorted({label for _, label in pairs if label not in index})
    if unknown:
        raise DatasetError(f"{root}: labels {unknown} are not among the expected classes {names}")
    return Dataset(root, names, [Sample(p, index[label], as_seen) for (p, label), as_seen in zip(pairs, seen)],
                   layout)


def _usable_names(files: list[Path], root: Path) -> tuple[list[Path], list[dict[str, str]]]:
    """Files whose names are UTF-8 (they travel in split files, reports and manifests), and the others as
    skipped rows."""
    kept, skipped = [], []
    for path in files:
        if _is_utf8(str(path.relative_to(root))):
            kept.append(path)
        else:
            skipped.append({"path": shown(path), "error": f"{shown(path)}: file name is not valid UTF-8"})
    for row in skipped:
        log.warning("skipping %s", row["error"])
    return kept, skipped


SYSTEM_FILES = {"thumbs.db", "desktop.ini"}     # what Windows Explorer leaves in a folder of pictures


def _hidden(path: Path, folder: Path) -> bool:
    """A name starting with ``.`` at or below ``folder``: what a Mac leaves on a copy (``._name.jpg`` resource
    forks, ``.DS_Store``), a thumbnail cache, a ``.git``; or Windows' ``Thumbs.db``: never a sample, never listed."""
    parts = path.relative_to(folder).parts
    return any(part.startswith(".") for part in parts) or parts[-1].lower() in SYSTEM_FILES


def _images_under(folder: Path) -> tuple[list[Path], list[dict[str, str]]]:
    """The sample images at any depth below a class folder, and the other files there as skipped rows: a file of
    another type (``.heic``, ``.gif``, ``.txt``), a link to a folder (not followed), a broken link or a link loop.
    Hidden names are left out and not listed; so are item masks (``<stem>.mask.png``), which are not samples."""
    try:
        entries = sorted(p for p in folder.rglob("*") if not _hidden(p, folder))
    except OSError as exc:
        raise DatasetError(f"{shown(folder)}: cannot list ({exc.strerror or exc})") from exc
    images, skipped = [], []
    for path in entries:
        if is_sample_image(path):
            images.append(path)
        elif path.is_symlink() and path.is_dir():
            skipped.append(_skipped_row(path, "a link to a folder, not followed (link the files, or copy the folder)"))
        elif path.is_symlink() and not path.exists():
            skipped.append(_skipped_row(path, "a broken link or a link loop"))
        elif path.is_file() and not path.name.lower().endswith(MASK_SUFFIX):
            skipped.append(_skipped_row(path, f"not an image file this trainer reads ({path.suffix or 'no extension'}; "
                                              f"reads {', '.join(sorted(IMAGE_EXTENSIONS))})"))
    return images, skipped


def _skipped_row(path: Path, why: str) -> dict[str, str]:
    log.warning("skipping %s: %s", shown(path), why)
    return {"path": shown(path), "error": f"{shown(path)}: {why}"}


def scan_class_folders(root: Path, classes: Sequence[str] | None = None) -> Dataset:
    display = _display_names(root)
    pairs, skipped = [], []
    folders = [p for p in _listdir(root) if p.is_dir() and not p.name.startswith(".")]
    for folder in folders:
        label = check_class_name(display.get(_nfc(folder.name), folder.name), folder)
        images, others = _images_under(folder)
        files, bad = _usable_names(images, root)
        skipped.extend(others + bad)
        if not files and classes is None:
            raise DatasetError(f"{folder}: class folder holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        pairs.extend((p, label) for p in files)
    dataset = _from_pairs(root, pairs, "folders", classes)
    dataset.skipped.extend(skipped)
    return dataset


_PREFIX = re.compile(r"^(?P<label>[^_]+)_.+$")


def scan_prefixed_files(root: Path, classes: Sequence[str] | None = None) -> Dataset:
    pairs = []
    files, skipped = _usable_names([p for p in _listdir(root) if is_sample_image(p) and not p.name.startswith(".")],
                                   root)
    for path in files:
        match = _PREFIX.match(path.stem)
        if not match:
            raise DatasetError(f"{path}: file name must look like <class>_<anything>{path.suffix}")
        pairs.append((path, match["label"]))
    dataset = _from_pairs(root, pairs, "prefixed", classes)
    dataset.skipped.extend(skipped)
    return dataset


VIEWS = ("", "canvas", "station")   # a CSV's optional view column: render station views from it, or it is one


def read_csv(csv_path: Path, classes: Sequence[str] | None = None) -> Dataset:
    """``path,label`` rows; an optional ``view`` column says ``station`` for a frame a station sent (its item crop:
    trained as it is) and ``canvas`` or nothing for a product image (rendered as station views when they are on)."""
    base = csv_path.parent
    pairs, seen, repeats = [], [], []
    first: dict[str, tuple[int, str, int]] = {}      # image -> (its first line, label, index in pairs)
    line = 1
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:      # -sig: the BOM a spreadsheet writes
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or not {"path", "label"} <= set(reader.fieldnames):
                raise DatasetError(f"{csv_path}: expected a header with columns 'path,label', got {reader.fieldnames}")
            for line, row in enumerate(reader, start=2):
                if not isinstance(row["path"], str) or not row["path"] or not isinstance(row["label"], str) \
                        or not row["label"].strip():
                    raise DatasetError(f"{csv_path}:{line}: empty path or label")
                if "\0" in row["path"]:
                    raise DatasetError(f"{csv_path}:{line}: field path holds a NUL character")
                path = Path(row["path"])
                label = check_class_name(row["label"].strip(), f"{csv_path}:{line}: field label")
                view = row.get("view")
                view = view.strip() if isinstance(view, str) else ""
                if view not in VIEWS:
                    raise DatasetError(f"{csv_path}:{line}: field view: expected 'station' (a station's frame) or "
                                       f"'canvas' or nothing, got {view!r}")
                path = path if path.is_absolute() else base / path
                key = os.path.abspath(path)
                if key in first:
                    repeats.append(_repeated_row(csv_path, line, row["path"], label, first[key]))
                    seen[first[key][2]] |= view == "station"     # a station's frame stays one, whichever row says so
                    continue
                first[key] = (line, label, len(pairs))
                pairs.append((path, label))
                seen.append(view == "station")
    except OSError as exc:
        raise DatasetError(f"{shown(csv_path)}: cannot read ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{csv_path}: not UTF-8 text (near line {line + 1})") from exc
    except csv.Error as exc:
        raise DatasetError(f"{csv_path}:{line + 1}: not valid CSV ({exc})") from exc
    for row in repeats:
        log.warning("skipping %s", row["error"])
    dataset = _from_pairs(base, pairs, "csv", classes, seen)
    dataset.skipped.extend(repeats)
    return dataset


def _repeated_row(csv_path: Path, line: int, path: str, label: str, first: tuple[int, str, int]) -> dict[str, str]:
    """A row naming an image an earlier row named (a labels export appended twice, two CSVs merged). Kept as a
    second sample, the split could put the image on both sides, trained on and validated on. With the same label
    the repeat is skipped and listed; with another label it is a DatasetError naming both lines, since which of
    the two is right cannot be known here."""
    first_line, first_label, _ = first
    if label != first_label:
        raise DatasetError(f"{csv_path}:{line}: image {shown(path)} is labelled {label!r} here and {first_label!r} "
                           f"on line {first_line}; one image takes one label")
    return {"path": shown(path), "error": f"{csv_path}:{line}: image {shown(path)} repeats line {first_line} "
                                         f"(same label {label!r}); the repeat is left out"}


def detect_layout(source: Path) -> str:
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise DatasetError(f"{source}: a dataset file must be a .csv with columns path,label")
        return "csv"
    if not source.is_dir():
        raise DatasetError(f"{source}: dataset path does not exist")
    entries = _listdir(source)
    if any(p.is_dir() and not p.name.startswith(".") for p in entries):
        return "folders"
    if any(is_sample_image(p) and not p.name.startswith(".") for p in entries):
        return "prefixed"
    raise DatasetError(f"{source}: no class folders, no images and not a CSV")


def load_dataset(source: str | Path, classes: Sequence[str] | None = None, *, check_images: bool = True) -> Dataset:
    """Read a dataset in any layout, drop unreadable images (listed in ``skipped``), check classes.

    ``classes`` fixes the class list (for a test split that must use the training classes).
    """
    source = Path(source)
    layout = detect_layout(source)
    scan = {"csv": read_csv, "folders": scan_class_folders, "prefixed": scan_prefixed_files}[layout]
    dataset = scan(source, classes)
    if check_images:
        dataset = drop_unreadable(dataset)
    if classes is None:
        _check_classes(dataset)
    log.info("%s: %d images in %d classes (%s layout)", source, len(dataset.samples), len(dataset.classes), layout)
    return dataset


def _check_classes(dataset: Dataset) -> None:
    if len(dataset.classes) < 2:
        raise DatasetError(f"{dataset.root}: found {len(dataset.classes)} class ({dataset.classes}); need at least 2")
    empty = [name for name, n in dataset.class_counts().items() if n == 0]
    if empty:
        raise DatasetError(f"{dataset.root}: classes {empty} have no readable images")


def drop_unreadable(dataset: Dataset, workers: int = 4) -> Dataset:
    """Decode the header of every image; keep what decodes, list the rest by path with the reason. Images of the
    same bytes are listed in ``duplicates`` (``find_duplicates``)."""
    from concurrent.futures import ThreadPoolExecutor

    from contract.preprocess import ImageDecodeError, read_image

    def probe(sample: Sample) -> tuple[str | None, str | None]:
        try:
            read_image(sample.path)
            return None, file_sha256(sample.path)
        except ImageDecodeError as exc:
            return shown(str(exc)), None
        except Exception as exc:  # noqa: BLE001 (any file the decoder chokes on is skipped and listed, not fatal)
            return f"{shown(sample.path)}: cannot decode ({type(exc).__name__}: {shown(str(exc))})", None

    with ThreadPoolExecutor(workers) as pool:
        probed = list(pool.map(probe, dataset.samples, chunksize=256))
    kept = [replace(s, digest=digest) for s, (err, digest) in zip(dataset.samples, probed) if err is None]
    skipped = [{"path": shown(s.path), "error": err} for s, (err, _) in zip(dataset.samples, probed) if err is not None]
    for row in skipped:
        log.warning("skipping unreadable image %s", row["error"])
    result = Dataset(dataset.root, dataset.classes, kept, dataset.layout, dataset.skipped + skipped)
    result.duplicates = find_duplicates(result, [digest for err, digest in probed if err is None])
    return result


def find_duplicates(dataset: Dataset, digests: Sequence[str]) -> list[dict[str, Any]]:
    """Groups of samples with the same bytes (``digests``, one per sample), each ``{"images": [...], "labels":
    [...], "conflict": bool}``, and a warning naming them. The same photo under two classes (copied into both, a
    class folder linking to the root) is a label conflict: the model is taught both; the same photo twice in one
    class can land on both sides of the split. Reported, not dropped: which copy is right is the user's call."""
    members: dict[str, list[int]] = defaultdict(list)
    for i, digest in enumerate(digests):
        members[digest].append(i)
    groups = []
    for idx in members.values():
        if len(idx) > 1:
            labels = sorted({dataset.classes[dataset.samples[i].label] for i in idx})
            groups.append({"images": [dataset.relative(dataset.samples[i].path) for i in idx], "labels": labels,
                           "conflict": len(labels) > 1})
    conflicts = [g for g in groups if g["conflict"]]
    if conflicts:
        log.warning("%s: %d image(s) of the same bytes under more than one class, a label conflict (listed in "
                    "Dataset.duplicates): %s", dataset.root, len(conflicts),
                    "; ".join(_duplicate_text(g) for g in conflicts[:5]))
    if len(groups) > len(conflicts):
        log.warning("%s: %d image(s) of the same bytes more than once in one class: %s", dataset.root,
                    len(groups) - len(conflicts),
                    "; ".join(_duplicate_text(g) for g in [g for g in groups if not g["conflict"]][:5]))
    return groups


def _duplicate_text(group: dict[str, Any]) -> str:
    return " = ".join(shown(p) for p in group["images"][:4]) + f" ({', '.join(map(repr, group['labels']))})"


def stratified_split(labels: Sequence[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, val): each class split in the same proportion, reproducibly for a seed: the grouped split
    with every image a group of its own."""
    return grouped_split(labels, range(len(labels)), val_fraction, seed)


def grouped_split(labels: Sequence[int], groups: Sequence[Hashable], val_fraction: float,
                  seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, val) with each group wholly on one side: the frames of one item never on both.

    A group counts under its most common label (the smallest of equals); within each label the groups are split
    as ``stratified_split`` splits images: ``round(groups x val_fraction)``, at least one when there are two or
    more. With every group a single image it is ``stratified_split``."""
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if len(groups) != len(labels):
        raise ValueError(f"{len(groups)} groups for {len(labels)} labels")
    members: dict[Hashable, list[int]] = {}
    for i, group in enumerate(groups):
        members.setdefault(group, []).append(i)
    by_class: dict[int, list[Hashable]] = defaultdict(list)
    for group, idx in members.items():      # in order of each group's first index, as stratified_split's images
        votes = Counter(labels[i] for i in idx)
        by_class[min(votes, key=lambda c: (-votes[c], c))].append(group)
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted(by_class):
        keys = by_class[label]
        rng.shuffle(keys)
        n_val = min(len(keys) - 1, max(1, round(len(keys) * val_fraction))) if len(keys) > 1 else 0   # keep one
        val.extend(i for key in keys[:n_val] for i in members[key])
        train.extend(i for key in keys[n_val:] for i in members[key])
    return sorted(train), sorted(val)


def station_frames_trained(dataset: Dataset, train: Sequence[int], val: Sequence[int]) -> tuple[list[int], list[int]]:
    """The split with a station's own frames (``Sample.as_seen``: a retrain's reviewed frames) all on the training
    side: they are few and labelled by hand, so they are trained on, never spent on choosing the epoch (a retrain
    holds out its own share of them, by item, for its gate). Unchanged when they are all the validation has."""
    seen = [i for i in val if dataset.samples[i].as_seen]
    if not seen or len(seen) == len(val):
        return list(train), list(val)
    moved = set(seen)
    return sorted([*train, *seen]), [i for i in val if i not in moved]


def save_split(path: Path, dataset: Dataset, train: Sequence[int], val: Sequence[int], seed: int, *,
               drawn_for: dict | None = None) -> None:
    """The split as image paths (relative to the dataset root) with labels. ``drawn_for``: the settings the
    trainer drew it with (data, seed, val_fraction, limit_per_class), which mark a split as the trainer's own; a
    split saved without them is one a caller placed in the run folder, which the trainer uses as it is. The
    fingerprint of its images (``Dataset.fingerprint``, where drop_unreadable took their digests, as for every
    dataset the trainer loads) lets a resume see an image replaced since (load_split).
    Written to a temporary file and renamed, so a reader (another rank of a distributed run, an export) never sees
    half of it."""
    payload = {
        "seed": seed,
        "root": str(dataset.root),
        "classes": dataset.classes,
        "train": [[dataset.relative(dataset.samples[i].path), dataset.samples[i].label] for i in train],
        "val": [[dataset.relative(dataset.samples[i].path), dataset.samples[i].label] for i in val],
    }
    images = dataset.subset(sorted({*train, *val}))
    if all(s.digest for s in images.samples):       # read by drop_unreadable (the trainer's); no file is read here
        payload["fingerprint"] = images.fingerprint()
    seen = sorted(dataset.relative(s.path) for s in dataset.samples if s.as_seen)
    if seen:        # a station's frames (Sample.as_seen): the export never renders them as station views again
        payload["as_seen"] = seen
    if drawn_for is not None:
        payload["drawn_for"] = drawn_for
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(payload))
            fh.flush()
            os.fsync(fh.fileno())       # on disk before the rename: a resume needs it after a power cut
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def split_drawn_for(path: Path) -> dict | None:
    """The settings a saved split was drawn with (``save_split``'s ``drawn_for``), or None for a split a caller
    placed in the run folder; DatasetError naming the file when it is not a saved split."""
    payload = read_split(path)
    drawn_for = payload.get("drawn_for") if isinstance(payload, dict) else None
    if not isinstance(payload, dict) or not isinstance(drawn_for, (dict, type(None))):
        raise DatasetError(f"{path}: not a saved split (expected a JSON object with train and val lists, and "
                           f"drawn_for an object when present)")
    return drawn_for


def read_split(path: Path) -> Any:
    """A saved split's JSON, as it was written; DatasetError naming the file when it cannot be read or parsed."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read the saved split ({exc.strerror or exc})") from exc
    except ValueError as exc:           # UnicodeDecodeError too
        raise DatasetError(f"{path}: not a saved split (not JSON: {exc})") from exc


def load_split(path: Path, dataset: Dataset) -> tuple[list[int], list[int]]:
    """Indices of a saved split in ``dataset``; a resumed run must see the same split."""
    payload = read_split(path)
    try:
        rows = {part: [(p, label) for p, label in payload[part]] for part in ("train", "val")}
    except (ValueError, TypeError, KeyError) as exc:
        raise DatasetError(f"{path}: not a saved split (expected JSON with train and val lists of "
                           f"[path, label]; {type(exc).__name__}: {exc})") from exc
    where = {_nfc(dataset.relative(s.path)): i for i, s in enumerate(dataset.samples)}
    listed = [p for part in ("train", "val") for p, _ in rows[part]]
    if not all(isinstance(p, str) for p in listed):
        raise DatasetError(f"{path}: not a saved split (an image path that is not text)")
    missing = [p for p in listed if _nfc(p) not in where]
    if missing:
        raise DatasetError(f"{path}: {len(missing)} of the {len(listed)} images of the saved split are no longer in "
                           f"{dataset.root} (moved, renamed, deleted or now unreadable): {', '.join(missing[:10])}"
                           f"{', ...' if len(missing) > 10 else ''}; restore them, or start a new run (another "
                           f"--name) to draw a split of the data as it is")
    found = {part: [where[_nfc(p)] for p, _ in rows[part]] for part in ("train", "val")}
    for part in ("train", "val"):
        for (rel, saved), i in zip(rows[part], found[part]):
            _check_split_label(path, dataset, rel, saved, dataset.samples[i].label)
    _check_split_fingerprint(path, dataset.subset(sorted({*found["train"], *found["val"]})), payload.get("fingerprint"))
    return found["train"], found["val"]


def _check_split_fingerprint(path: Path, images: Dataset, saved: Any) -> None:
    """The split's images must still be the images it was saved with: one replaced by another under the same name
    (a photo exported again, a relabelled copy put in its place) would be trained on and validated on by a resumed
    run, and described by its reports, as if it were the one the run started with. A split saved without a
    fingerprint (before 2026-12-07, or placed by a caller) is not checked; one saved before 2026-12-07 with the
    fingerprint of sizes is checked by sizes (``Dataset.matches_fingerprint``)."""
    if saved is None:
        return
    matches = images.matches_fingerprint(saved)
    if matches is None:
        log.warning("%s: fingerprint %r is of a form this version does not read; the images are not checked",
                    path, shown(str(saved))[:80])
    elif not matches:
        raise DatasetError(f"{path}: the {len(images.samples)} images of this saved split are not all the images it "
                           f"was saved with: an image in {images.root} was replaced by another under the same name "
                           f"(the dataset's fingerprint differs); a run keeps the images it started with: restore "
                           f"them, or start a new run (another --name) to train on the images as they are")


def _check_split_label(path: Path, dataset: Dataset, rel: str, saved: Any, now: int) -> None:
    """A saved split's image must still carry the label it was saved with (a CSV row relabelled since): a resumed
    run would otherwise train on, and report, labels its checkpoint and split were not made with, without a word."""
    if isinstance(saved, int) and not isinstance(saved, bool) and saved == now:
        return
    was = repr(dataset.classes[saved]) if isinstance(saved, int) and 0 <= saved < len(dataset.classes) else repr(saved)
    raise DatasetError(f"{path}: image {rel} is labelled {dataset.classes[now]!r} in {dataset.root} now, {was} in "
                       f"this saved split; a run keeps the labels it started with: restore the label, or start a new "
                       f"run (another --name) to train on the new labels")


def spread(count: int, take: int | None, seed: int = 3) -> list[int]:
    """Indices of ``take`` of ``count`` items drawn at random with ``seed`` (all of them when ``take`` is None or
    not smaller), in their order. A run's split lists its validation images class by class, and a backgrounds
    folder its frames camera by camera, so their first N are a few classes' or cameras': every subset of them
    the export or the trainer takes is drawn with this."""
    if take is None or take >= count:
        return list(range(count))
    return sorted(np.random.default_rng(seed).permutation(count)[: max(0, take)].tolist())


def spread_classes(labels: Sequence[int], take: int | None, seed: int = 3, *, order: Sequence[int] | None = None,
                   keep_order: bool = False) -> list[int]:
    """``spread``'s draw of ``take`` of the items whose classes are ``labels`` (or the first ``take`` of ``order``,
    a permutation), with every class it can hold in it: a class the draw missed (a small split: 10 of 30 images
    over 10 classes reached 8) gets its first image in the order in place of the last drawn image of the class
    drawn most. A draw that holds every class already, as one of hundreds over a few dozen classes does, is
    ``spread``'s exactly. Sorted, or in the order's order with ``keep_order``."""
    count = len(labels)
    if take is None or take >= count:
        return list(range(count))
    order = [int(i) for i in (np.random.default_rng(seed).permutation(count) if order is None else order)]
    chosen = order[: max(0, take)]
    classes = sorted(set(labels))
    if len(chosen) >= len(classes):
        have = Counter(labels[i] for i in chosen)
        for c in classes:
            if have[c]:
                continue
            add = next(i for i in order[len(chosen):] if labels[i] == c)
            most = max(have, key=lambda k: (have[k], -k))
            drop = next(j for j in range(len(chosen) - 1, -1, -1) if labels[chosen[j]] == most)
            chosen[drop] = add
            have[most] -= 1
            have[c] += 1
    return chosen if keep_order else sorted(chosen)


def limit_per_class(dataset: Dataset, limit: int, seed: int) -> Dataset:
    """At most ``limit`` images per class, chosen reproducibly (for quick runs and demos)."""
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(dataset.samples):
        by_class[s.label].append(i)
    rng = random.Random(seed)
    keep = []
    for label in sorted(by_class):
        idx = by_class[label]
        keep.extend(sorted(rng.sample(idx, min(limit, len(idx)))))
    return dataset.subset(sorted(keep))


# --- Fashion-MNIST --------------------------------------------------------------------------------


MAX_IDX_BYTES = 1 << 30     # an IDX body (Fashion-MNIST's train images: 47 MB); a header may declare 4 GiB^3


def _read_idx(path: Path, ndim_expected: int) -> "tuple[tuple[int, ...], bytes]":
    """An IDX file's dims and body, read no further than its header says (a small gzip file can inflate to
    gigabytes): a body longer or shorter than the header's dims, or over MAX_IDX_BYTES, is a DatasetError."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            return _read_idx_stream(path, fh, ndim_expected)
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"{path}: cannot read IDX file ({exc})") from exc


def _read_idx_stream(path: Path, fh: Any, ndim_expected: int) -> "tuple[tuple[int, ...], bytes]":
    head = fh.read(4)
    if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] != 0x08:
        raise DatasetError(f"{path}: not an unsigned-byte IDX file")
    ndim = head[3]
    if ndim != ndim_expected:
        raise DatasetError(f"{path}: IDX header says {ndim} dimensions, expected {ndim_expected}")
    raw_dims = fh.read(4 * ndim)
    if len(raw_dims) < 4 * ndim:
        raise DatasetError(f"{path}: truncated IDX header ({4 + len(raw_dims)} bytes)")
    dims = struct.unpack(f">{ndim}I", raw_dims)
    if ndim > 1 and 0 in dims[1:]:      # images of 0 px: nothing to write, and an encoder's assertion if tried
        raise DatasetError(f"{path}: IDX header says images of {' x '.join(map(str, dims[1:]))} px")
    expected = 1
    for d in dims:
        expected *= d
    if expected > MAX_IDX_BYTES:
        raise DatasetError(f"{path}: header says {dims} ({expected} bytes), more than {MAX_IDX_BYTES} (not read)")
    body = fh.read(expected + 1)
    if len(body) != expected:
        has = f"{len(body)} bytes" if len(body) < expected else "more (not read)"
        raise DatasetError(f"{path}: header says {dims} ({expected} bytes) but the body has {has}")
    return dims, body


IMPORT_COMPLETE = ".import-complete.json"     # written by import_fashion_mnist after its last image


def fashion_mnist_imported(out_dir: str | Path) -> bool:
    """Whether ``out_dir`` holds a finished import of all of Fashion-MNIST (not one that was interrupted, or one
    of its first N images)."""
    try:
        done = json.loads((Path(out_dir) / IMPORT_COMPLETE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(done, dict) and "limit" in done and done["limit"] is None


def import_fashion_mnist(out_dir: str | Path, source: str | Path = FASHION_MNIST_DIR, limit: int | None = None) -> dict[str, int]:
    """Write Fashion-MNIST as PNG class folders ``out/train/<class>/`` and ``out/test/<class>/``.

    Returns the number of images written per split. Idempotent: existing files are kept, so an interrupted import
    run again completes; ``out/.import-complete.json`` (``fashion_mnist_imported``) marks one that finished.
    """
    import cv2

    source, out_dir = Path(source), Path(out_dir)
    if not source.is_dir():
        raise DatasetError(
            f"{source}: Fashion-MNIST not found; install it with 'apt-get install dataset-fashion-mnist'"
        )
    counts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images_path, labels_path = source / f"{prefix}-images-idx3-ubyte.gz", source / f"{prefix}-labels-idx1-ubyte.gz"
        (dims, images), (label_dims, labels) = _read_idx(images_path, 3), _read_idx(labels_path, 1)
        n, h, w = dims
        if label_dims[0] != n:
            raise DatasetError(f"{labels_path}: {label_dims[0]} labels for the {n} images of {images_path}")
        pixels = np.frombuffer(images, dtype=np.uint8).reshape(n, h, w)
        label_ids = np.frombuffer(labels, dtype=np.uint8)
        if n and int(label_ids.max()) >= len(FASHION_MNIST_CLASSES):
            raise DatasetError(f"{labels_path}: label {int(label_ids.max())} is not one of the "
                               f"{len(FASHION_MNIST_CLASSES)} Fashion-MNIST classes (0..{len(FASHION_MNIST_CLASSES) - 1})")
        root = out_dir / split
        names = {folder_name(c): c for c in FASHION_MNIST_CLASSES}
        try:
            for folder in names:
                (root / folder).mkdir(parents=True, exist_ok=True)
            (root / LABELS_FILE).write_text(json.dumps(names, indent=1))
        except OSError as exc:
            raise DatasetError(f"{root}: cannot write the imported images here ({exc.strerror or exc})") from exc
        written = 0
        for i in range(n if limit is None else min(n, limit)):
            path = root / folder_name(FASHION_MNIST_CLASSES[label_ids[i]]) / f"{split}_{i:05d}.png"
            if not path.exists() and not cv2.imwrite(str(path), pixels[i]):
                raise DatasetError(f"{path}: cannot write the image")
            written += 1
        counts[split] = written
        log.info("Fashion-MNIST %s: %d images in %s", split, written, root)
    try:
        (out_dir / IMPORT_COMPLETE).write_text(json.dumps({"counts": counts, "limit": limit}), encoding="utf-8")
    except OSError as exc:
        raise DatasetError(f"{out_dir}: cannot write the imported images here ({exc.strerror or exc})") from exc
    return counts
