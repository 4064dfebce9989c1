"""Reviewed frames -> a dataset the trainer reads directly, with each frame's provenance.

``python -m central labels export --store DIR --out DIR`` writes::

    <out>/reviewed.csv     path,label + provenance columns (the trainer's CSV layout reads path,label
                           and ignores the rest): frame_id, site, station, camera, model_name,
                           model_version, predicted, confidence, selected_because, status, reviewer,
                           reviewed_at, received_at, sha256, captured_at, note, track (the item the
                           frame shows, as the station's tracker named it: retrain holds out whole items)
    <out>/<class folder>/<frame_id>.jpg   the JPEGs (hard links where the file system allows)
    <out>/labels.json      class folder -> class name (as ``import-fashion-mnist`` writes it)
    <out>/export.json      counts, what was left out and why, the store it came from

So ``<out>`` is also a class-folder dataset: ``--data <out>`` and ``--data <out>/reviewed.csv`` read
the same images with the same labels (the CSV adds the provenance).

The CSV is UTF-8 whatever the host's locale (the trainer reads it as UTF-8). People open it in a spreadsheet
too, and its free-text provenance cells come from stations (model name and version, predicted label, why the
frame was sent) and reviewers (name, note): such a cell that begins with ``=``, ``+``, ``-``, ``@``, a tab
or a carriage return is written with a ``'`` before it, so that a spreadsheet shows it as text and never
runs it as a formula. ``path``, ``label`` and the identifiers are written as they are.

Labelled frames carry their label, new-class frames their new class name, defect frames their
defect class (a defect without a class name is left out: there is nothing to learn it as). Skipped
and pending frames are left out. The export is written to a temporary folder and renamed into place,
so an interrupted export never leaves a half-written dataset; an existing ``--out`` is replaced only
with ``--force``. Before the rename every file written or copied, every folder and the temporary folder are
fsynced, and after it the folder holding ``--out``: once the export says it is done, a power cut leaves the
whole export (before 2026-12-07 it could leave only ``.<out>.old``, or an export with entries missing).
``--out`` is resolved first (``sub/``, ``sub/..`` name the folder they lead to); a ``--out`` that is the current
folder or holds it is refused: replacing it would leave the shell in a deleted folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from central.review.store import FrameStore, StoreError, file_stem, make_folders
from contract.dataset import LABELS_FILE, folder_name
from contract.events import fsync_dir

CSV_NAME = "reviewed.csv"
SUMMARY = "export.json"
COLUMNS = ["path", "label", "frame_id", "site", "station", "camera", "model_name", "model_version", "predicted",
           "confidence", "selected_because", "status", "reviewer", "reviewed_at", "received_at", "sha256",
           "captured_at", "note", "track"]


# free text from stations and reviewers: a spreadsheet must show it, never evaluate it
TEXT_COLUMNS = ("site", "station", "camera", "model_name", "model_version", "predicted", "selected_because",
                "reviewer", "note")
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
RESERVED_NAMES = {name.lower() for name in (CSV_NAME, SUMMARY, LABELS_FILE)}    # no class folder takes these


def as_text_cell(value: Any) -> Any:
    """``value`` as a spreadsheet shows it as text: a ``'`` before a string that would start a formula."""
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_START) else value


def training_label(frame: dict[str, Any]) -> str | None:
    if frame["status"] in ("labelled", "new_class"):
        return frame["label"]
    if frame["status"] == "defect" and frame.get("defect") and frame["defect"] != "defect":
        return frame["defect"]
    return None


def export_reviewed(store: FrameStore, out: Path, *, force: bool = False) -> dict[str, Any]:
    """Write the export (module docstring). StoreError naming ``--out`` when it cannot be written (a full disk, no
    permission): nothing half-written is left, and an earlier export there is kept as it was."""
    out = check_out(store, Path(out), SUMMARY, force)
    try:
        return _write_export(store, out)
    except OSError as exc:      # ENOSPC while writing names no file: say which export failed, not a traceback
        raise StoreError(f"--out {out}: the export could not be written ({exc}); nothing of it was left there"
                         + (", and the earlier export is kept as it was" if out.exists() else "")) from exc


def _write_export(store: FrameStore, out: Path) -> dict[str, Any]:
    make_folders(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    counts: dict[str, int] = {}
    left_out: dict[str, int] = {}
    folders: dict[str, str] = {}
    try:
        # each row written as it is read (the store hands them out a page at a time): memory stays flat at any size
        with open(tmp / CSV_NAME, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS)
            writer.writeheader()
            for frame in store.iter_reviewed():
                row = _exported_row(store, frame, tmp, folders, left_out)
                if row is not None:
                    counts[row["label"]] = counts.get(row["label"], 0) + 1
                    writer.writerow(row)
            sync_file(fh)
        summary = {"store": str(store.root.resolve()), "exported_at": _iso(time.time()),
                   "frames": sum(counts.values()), "by_label": dict(sorted(counts.items())), "left_out": left_out,
                   "csv": CSV_NAME}
        write_synced(tmp / SUMMARY, json.dumps(summary, indent=2))
        write_synced(tmp / LABELS_FILE, json.dumps({folder: label for label, folder in sorted(folders.items())},
                                                   indent=2))
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _exported_row(store: FrameStore, frame: dict[str, Any], tmp: Path, folders: dict[str, str],
                  left_out: dict[str, int]) -> dict[str, Any] | None:
    """``frame``'s CSV row, its JPEG linked under its class folder in ``tmp``; None (counted in ``left_out``)
    when it has nothing to learn or its image is gone. ``folders``: class -> folder, grown as classes appear."""
    label = training_label(frame)
    if label is None:
        why = "defect without a class" if frame["status"] == "defect" else frame["status"]
        left_out[why] = left_out.get(why, 0) + 1
        return None
    src = store.root / frame["image"]
    if not src.is_file():
        left_out["image file missing"] = left_out.get("image file missing", 0) + 1
        return None
    if label not in folders:
        name = folder_name(label)
        # a class named like the export's own files ("labels.json") would take their place: every export failed
        while name in folders.values() or name.startswith(".") or name.lower() in RESERVED_NAMES:
            name = "_" + name
        folders[label] = name
    rel = Path(folders[label]) / f"{file_stem(frame['id'])}.jpg"      # one file per id (frame:1 and frame_1)
    place_new(src, tmp / rel, "two reviewed frames")
    row = {"path": rel.as_posix(), "label": label, "frame_id": frame["id"], "site": frame["site"],
           "station": frame["station"], "camera": frame["camera"], "model_name": frame["model_name"],
           "model_version": frame["model_version"], "predicted": frame["predicted"],
           "confidence": frame["confidence"], "selected_because": "; ".join(frame["selected_because"]),
           "status": frame["status"], "reviewer": frame["reviewer"] or "",
           "reviewed_at": _iso(frame["reviewed_at"]), "received_at": _iso(frame["received_at"]),
           "sha256": frame["sha256"], "captured_at": _iso(frame["captured_at"]),
           "note": frame["note"] or "", "track": frame["track"] or ""}
    return {**row, **{k: as_text_cell(row[k]) for k in TEXT_COLUMNS}}


def place_new(src: Path, dst: Path, what: str) -> None:
    """``src`` at ``dst``: a hard link, or a copy where the file system has none; never over a file there
    (StoreError naming ``dst``: ``what`` would be exported under one name). A copy is fsynced (a link's data is
    the store's, synced when it was stored); the new entry is synced with its folder by ``replace_folder``."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except FileExistsError:
        raise StoreError(f"{dst}: {what} would be exported under one name") from None
    except OSError:
        with open(src, "rb") as fin, open(dst, "xb") as fout:
            shutil.copyfileobj(fin, fout)
            sync_file(fout)
        shutil.copystat(src, dst)


def sync_file(fh) -> None:
    """``fh``'s data on disk before the export that holds it is renamed into place."""
    fh.flush()
    os.fsync(fh.fileno())


def write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        sync_file(fh)


def check_out(store: FrameStore, out: Path, summary: str, force: bool) -> Path:
    """``out`` resolved (the folder to write): an export may write it only away from the store and the current
    folder, and replace (``force``) only an earlier export of its kind (``summary`` in it) or an empty folder:
    a mistyped ``--out`` must never delete the frames or a folder of someone else's."""
    given = out
    # ``.``, ``sub/..`` have no name to rename; the last part stays unresolved, so a symlink there is seen as one
    out = out.resolve() if out.name in ("", "..") else out.parent.resolve() / out.name
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        where = "the current folder" if out == cwd else "a folder that holds the current folder"
        hint = f": run it from outside (e.g. cd {out.parent} and --out {out.name})" if out.name else ""
        raise StoreError(f"--out {given}: is {out}, {where}; an export replaces its --out folder, which would leave "
                         f"this shell in a deleted folder{hint}")
    target, root = out.resolve(), store.root.resolve()
    if target == root or target in root.parents or root in target.parents:
        raise StoreError(f"--out {out}: is, holds or lies inside the frame store {store.root}; write the export to a "
                         f"folder of its own")
    if not out.exists() and not out.is_symlink():
        return out
    if not force:
        raise StoreError(f"--out {out}: already exists (pass --force to replace it)")
    if not out.is_dir() or out.is_symlink() or (any(out.iterdir()) and not (out / summary).is_file()):
        raise StoreError(f"--out {out}: exists and is not an earlier export (no {summary} in it); --force replaces "
                         f"only an earlier export or an empty folder")
    return out


def replace_folder(tmp: Path, out: Path) -> None:
    """Put a finished export ``tmp`` (its files synced) where ``out`` was, durably: every folder in ``tmp`` synced
    (deepest first, so each entry is on disk before the rename), the rename(s), then ``out``'s parent synced; the
    old export goes only once the new one is in place and on disk."""
    for folder in reversed(_folders(tmp)):
        fsync_dir(folder)
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        fsync_dir(out.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
        fsync_dir(out.parent)


def _folders(top: Path) -> list[Path]:
    """``top`` and every folder under it, parents before their children (only folders are held: a class folder
    of 100k files is walked, not listed)."""
    found, i = [top], 0
    while i < len(found):
        with os.scandir(found[i]) as entries:
            found.extend(Path(e.path) for e in entries if e.is_dir(follow_symlinks=False))
        i += 1
    return found


def _iso(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def add_labels_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("labels", help="reviewed frames -> a dataset the trainer reads")
    labels_sub = p.add_subparsers(dest="labels_command", required=True)
    e = labels_sub.add_parser("export", help="write reviewed.csv (path,label + provenance) and the images")
    e.add_argument("--store", required=True, type=Path)
    e.add_argument("--out", required=True, type=Path, help="dataset folder to write (reviewed.csv inside)")
    e.add_argument("--force", action="store_true", help="replace an existing --out")


def cmd_labels(args) -> int:
    store = FrameStore.open_read_only(args.store)   # an export never writes into the store (another user's, read-only)
    try:
        summary = export_reviewed(store, args.out, force=args.force)
    finally:
        store.close()
    said = (f"exported {summary['frames']} reviewed frames to {args.out / CSV_NAME}: {summary['by_label']}"
            + (f"; left out {summary['left_out']}" if summary["left_out"] else ""))
    try:
        print(said)
    except UnicodeEncodeError:      # a terminal whose locale cannot show a class's name: it is escaped, not an error
        print(said.encode("ascii", "backslashreplace").decode("ascii"))
    return 0
