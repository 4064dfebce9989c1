"""Stored empty scenes -> a folder of backgrounds that ``python -m trainer train --backgrounds DIR`` reads.

``python -m central backgrounds export --store DIR --out DIR [--site S] [--station S] [--camera C]
[--per-camera N] [--force]`` writes::

    <out>/<site>/<station>/<camera>/<frame_id>.jpg   the empty-scene JPEGs as stations sent them (hard links
                                                     where the file system allows; an id that is not a plain
                                                     name: ``store.file_stem``, so two ids never share a file)
    <out>/backgrounds.json                           counts per camera, the filters, the store

``trainer.backgrounds.folder_tiles`` walks the folder recursively and cuts random square crops of every
image; it reads at most 64 files, drawn at random over the folder (before 2026-12-06 the first 64 by path,
the first cameras' only). ``--per-camera`` keeps each camera's newest, so old scenes do not outnumber the
current ones. The scenes are read a page at a time (``FrameStore.iter_empty_scenes``): thousands of them
hold one page of rows, never all. Written beside ``--out`` and renamed into place, like
``labels export`` (and synced like it: once it says it is done, a power cut leaves the whole folder; ``--out``
resolved, never the current folder): an interrupted export leaves the previous one whole; an existing
``--out`` is replaced only with ``--force``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import tempfile
import time
from contextlib import closing
from pathlib import Path
from typing import Any, Iterator

from central.review.labels import _iso, check_out, place_new, replace_folder, write_synced
from central.review.store import FrameStore, StoreError, _safe, file_stem, make_folders

SUMMARY = "backgrounds.json"


def export_backgrounds(store: FrameStore, out: Path, *, site: str | None = None, station: str | None = None,
                       camera: str | None = None, per_camera: int | None = None,
                       force: bool = False) -> dict[str, Any]:
    """Write the store's empty scenes as a backgrounds folder; returns the ``backgrounds.json`` summary.

    Raises StoreError when ``out`` exists without ``force``, when no stored scene matches the filters (an empty
    folder would only fail the training run later), or when ``out`` cannot be written (a full disk, no permission:
    nothing half-written is left, an earlier export there is kept as it was)."""
    out = check_out(store, Path(out), SUMMARY, force)
    if per_camera is not None and per_camera < 1:
        raise StoreError(f"--per-camera {per_camera}: must be at least 1")
    filters = {k: v for k, v in (("site", site), ("station", station), ("camera", camera)) if v}
    with closing(store.iter_empty_scenes(site=site, station=station, camera=camera, per_camera=per_camera)) as scenes:
        first = next(scenes, None)
        if first is None:
            raise StoreError(f"--store {store.root}: no empty scenes stored" + (f" for {filters}" if filters else "")
                             + " (stations send them on cmd/capture-empty and every frames.empty_scene_interval_s)")
        try:
            return _write_backgrounds(store, itertools.chain([first], scenes), out, filters, per_camera)
        except OSError as exc:      # a full disk, no permission: which export failed, in one line, not a traceback
            raise StoreError(f"--out {out}: the export could not be written ({exc}); nothing of it was left there"
                             + (", and the earlier export is kept as it was" if out.exists() else "")) from exc


def _write_backgrounds(store: FrameStore, scenes: Iterator[dict[str, Any]], out: Path, filters: dict[str, str],
                       per_camera: int | None) -> dict[str, Any]:
    make_folders(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        counts, missing = _link_scenes(store, scenes, tmp)
        summary = {"store": str(store.root.resolve()), "exported_at": _iso(time.time()),
                   "images": sum(counts.values()), "by_camera": dict(sorted(counts.items())), "filters": filters,
                   "per_camera": per_camera, "image_file_missing": missing}
        write_synced(tmp / SUMMARY, json.dumps(summary, indent=2))
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _link_scenes(store: FrameStore, scenes: Iterator[dict[str, Any]], tmp: Path) -> tuple[dict[str, int], int]:
    """Each scene's JPEG under ``tmp``, one at a time: (scenes per camera, scenes whose image file is gone)."""
    counts: dict[str, int] = {}
    missing = 0
    for scene in scenes:
        src = store.root / scene["image"]
        if not src.is_file():
            missing += 1
            continue
        folder = Path(_safe(scene["site"])) / _safe(scene["station"]) / _safe(scene["camera"])
        place_new(src, tmp / folder / f"{file_stem(scene['id'])}.jpg", "two empty scenes")
        key = f"{scene['site']}/{scene['station']}/{scene['camera']}"
        counts[key] = counts.get(key, 0) + 1
    return counts, missing


def add_backgrounds_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("backgrounds", help="stations' empty scenes -> a folder for train/retrain --backgrounds")
    bg_sub = p.add_subparsers(dest="backgrounds_command", required=True)
    e = bg_sub.add_parser("export", help="write the stored empty scenes as a backgrounds folder")
    e.add_argument("--store", required=True, type=Path)
    e.add_argument("--out", required=True, type=Path, help="folder to write (use it as --backgrounds)")
    e.add_argument("--site", default=None)
    e.add_argument("--station", default=None)
    e.add_argument("--camera", default=None)
    e.add_argument("--per-camera", type=int, default=None,
                   help="at most the newest N scenes of each camera (the trainer reads at most 64 files)")
    e.add_argument("--force", action="store_true", help="replace an existing --out")


def cmd_backgrounds(args: argparse.Namespace) -> int:
    if not (args.store / "frames.sqlite").is_file():
        raise StoreError(f"--store {args.store}: no frames.sqlite (not a frame store)")
    store = FrameStore.open_read_only(args.store)   # an export never writes into the store (another user's, read-only)
    try:
        summary = export_backgrounds(store, args.out, site=args.site, station=args.station, camera=args.camera,
                                     per_camera=args.per_camera, force=args.force)
    finally:
        store.close()
    print(f"exported {summary['images']} empty scenes to {args.out}: {summary['by_camera']}")
    return 0
