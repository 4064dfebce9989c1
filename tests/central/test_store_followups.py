"""Follow-ups to the store and export reviews (2026-12-07): a store that cannot be written stops each command with
one line, an export is on disk once it says it is done, and ``--out`` is resolved (never the current folder).

Real stores of real frames on disk, the real CLI in subprocesses. A power cut cannot be simulated here: the exports'
fsyncs and renames are traced instead (as tests/central/test_store_review.py traces a stored frame's). A file-size
limit (RLIMIT_FSIZE) and a read-only folder are real; as root a folder's mode binds only once the command runs
without CAP_DAC_OVERRIDE (``setpriv`` drops it from the bounding set)."""

from __future__ import annotations

import errno
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from loop_support import LABELS, REPO, empty_scene_records, real_frames

from central.review.backgrounds import export_backgrounds
from central.review.labels import CSV_NAME, export_reviewed
from central.review.store import DB_NAME, FrameStore, StoreError

MQTT = ["--mqtt-host", "127.0.0.1", "--mqtt-port", "1"]     # never reached: the store is opened first


def reviewed_store(root: Path, n: int = 3, scenes: int = 0) -> FrameStore:
    store = FrameStore(root, labels=LABELS)
    for record in real_frames(n):
        assert store.add(record.body, record.blob).outcome == "stored"
        store.review(record.id, "label", label="Bag", reviewer="ana")
    for scene in empty_scene_records(scenes):
        assert store.add(scene.body, scene.blob).outcome == "stored"
    return store


def central(argv: list[str], *, prefix: list[str] = (), preexec=None, cwd: Path = REPO) -> tuple[int, list[str]]:
    """``python -m central argv``: its exit status and its output's lines."""
    done = subprocess.run([*prefix, sys.executable, "-m", "central", *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=120, preexec_fn=preexec,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    return done.returncode, (done.stdout + done.stderr).strip().splitlines()


def commands(store: Path, out: Path) -> dict[str, list[str]]:
    return {"review": ["review", "--store", str(store), "--port", "0", "--no-auth"],
            "ingest": ["ingest", "--store", str(store), *MQTT],
            "labels export": ["labels", "export", "--store", str(store), "--out", str(out)]}


def assert_one_line(rc: int, lines: list[str], *expected: str) -> str:
    errors = [line for line in lines if " ERROR " in line]
    assert rc == 2 and not any("Traceback" in line for line in lines), lines
    assert len(errors) == 1 and all(text in errors[0] for text in expected), lines
    return errors[0]


def file_size_limit_16k() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)       # a write past the limit then fails (EFBIG), it does not kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))


@pytest.mark.parametrize("command", ["review", "ingest", "labels export"])
def test_a_store_past_the_file_size_limit_stops_the_command_with_one_line(tmp_path, command):
    """Given a file-size limit of 16 kB (SQLite's writes then fail: "disk I/O error"), when review and ingest open a
    new store and labels export an existing one, then each stops with status 2 and one line naming the store
    folder and the cause: it was a traceback from ``FrameStore._wal``."""
    existing = tmp_path / "existing"
    reviewed_store(existing).close()
    store = existing if command == "labels export" else tmp_path / "new"
    rc, lines = central(commands(store, tmp_path / "out")[command], preexec=file_size_limit_16k)
    assert_one_line(rc, lines, f"{store}: the frame store cannot be opened", "disk I/O error", "ulimit -f")
    assert not (tmp_path / "out").exists()


def without_dac_override() -> list[str]:
    """The command prefix under which a folder's mode binds (root writes in any folder)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: a folder's mode cannot be made to bind")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]


@pytest.mark.parametrize("command", ["review", "ingest"])
def test_a_store_folder_that_cannot_be_written_stops_the_command_with_one_line(tmp_path, command):
    """Given a store folder that is read-only (a new empty one and a store of reviewed frames), when review or ingest
    opens it, then it stops with status 2 and one line naming the folder: it was a traceback ("unable to open
    database file", "attempt to write a readonly database"). The store is kept. (A labels export reads such a
    store: tests/central/test_review_followups.py.)"""
    prefix = without_dac_override()
    empty, existing = tmp_path / "empty", tmp_path / "existing"
    empty.mkdir()
    reviewed_store(existing).close()
    kept = sorted(p.name for p in existing.iterdir())
    stores = [empty, existing]
    try:
        for folder in (empty, existing):
            folder.chmod(0o555)
        for store in stores:
            rc, lines = central(commands(store, tmp_path / "out")[command], prefix=prefix)
            assert_one_line(rc, lines, f"{store}: the frame store cannot be opened", "folder it can write in")
    finally:
        for folder in (empty, existing):
            folder.chmod(0o755)
    assert sorted(p.name for p in existing.iterdir()) == kept


def test_a_store_under_a_folder_that_cannot_be_written_stops_the_command_with_one_line(tmp_path):
    """A new store whose folder cannot be made (its parent is read-only): a PermissionError traceback before."""
    prefix = without_dac_override()
    parent = tmp_path / "parent"
    parent.mkdir(mode=0o555)
    try:
        rc, lines = central(commands(parent / "store", tmp_path / "out")["review"], prefix=prefix)
    finally:
        parent.chmod(0o755)
    assert_one_line(rc, lines, f"{parent / 'store'}: the frame store cannot be opened", "Permission denied")


@pytest.mark.parametrize("command", ["review", "ingest", "labels export"])
def test_a_text_file_named_like_the_index_stops_the_command_with_one_line(tmp_path, command):
    store = tmp_path / "store"
    store.mkdir()
    (store / DB_NAME).write_text("notes, not a database\n" * 20)
    rc, lines = central(commands(store, tmp_path / "out")[command])
    assert_one_line(rc, lines, f"{store / DB_NAME}: not a readable frame store index")
    assert (store / DB_NAME).read_text() == "notes, not a database\n" * 20


# ------------------------------------------------------------------ export durability


def trace_export(monkeypatch) -> list[tuple]:
    """``os.fsync`` (the path synced), and the entries made and removed: ``os.link``, ``os.mkdir``, ``os.rename``,
    ``os.unlink``, ``os.rmdir``, in order."""
    events: list[tuple] = []
    real = {name: getattr(os, name) for name in ("fsync", "link", "mkdir", "rename", "unlink", "rmdir")}

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real["fsync"](fd)

    def traced(name):
        def call(path, *args, **kwargs):
            result = real[name](path, *args, **kwargs)
            if kwargs.get("dir_fd") is None:
                events.append((name, str(args[0]) if name in ("link", "rename") else str(path)))
            else:
                events.append((name, os.path.join(os.readlink(f"/proc/self/fd/{kwargs['dir_fd']}"), str(path))))
            if name == "rename":
                events[-1] = (name, str(path), str(args[0]))
            return result
        return call

    monkeypatch.setattr(os, "fsync", fsync)
    for name in ("link", "mkdir", "rename", "unlink", "rmdir"):
        monkeypatch.setattr(os, name, traced(name))
    return events


def unsynced_export(events: list[tuple], out: Path) -> list[str]:
    """What a power cut just after the export returned could lose: a file of ``out`` neither linked (its data is
    the store's, synced when stored) nor fsynced before the rename into place; an entry (file, folder) whose folder
    was not fsynced after it and before the rename; the rename itself, when ``out``'s parent was not fsynced after
    it and before the earlier export was deleted."""
    [final] = [i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(out)]
    tmp = Path(events[final][1])
    before, after = events[:final], events[final + 1:]
    synced = {e[1]: i for i, e in enumerate(before) if e[0] == "fsync"}     # the last fsync of each path
    lost = []
    for path in sorted(out.rglob("*")):
        at = str(tmp / path.relative_to(out))
        made = [i for i, e in enumerate(before) if e[0] in ("link", "mkdir") and e[1] == at]
        if path.is_file() and not made:           # written or copied: its own fsync is when it was complete
            made = [synced[at]] if at in synced else []
            if not made:
                lost.append(f"file {at} not fsynced")
                continue
        if synced.get(str(Path(at).parent), -1) < made[-1]:
            lost.append(f"entry {at}: its folder not fsynced after it")
    if str(tmp) not in synced:
        lost.append(f"folder {tmp} not fsynced")
    removals = [i for i, e in enumerate(after) if e[0] in ("unlink", "rmdir")]
    parent_synced = [i for i, e in enumerate(after) if e == ("fsync", str(out.parent))]
    if not parent_synced or (removals and removals[0] < parent_synced[0]):
        lost.append(f"rename into {out}: {out.parent} not fsynced before the earlier export was deleted")
    return lost


def test_a_labels_export_is_on_disk_before_it_says_done(tmp_path, monkeypatch):
    """Given a store of reviewed frames and an earlier export, when the export is written again (--force), then
    every file in it was fsynced or is a hard link of a stored file, every folder was fsynced after its entries,
    both before the rename into place, and the parent after the rename, before the earlier export is deleted:
    nothing was synced, so a power cut just after "export done" could leave only ``.<out>.old``, or an export with
    entries missing."""
    store = reviewed_store(tmp_path / "store", n=6)
    out = tmp_path / "exports" / "reviewed"
    export_reviewed(store, out)
    events = trace_export(monkeypatch)
    summary = export_reviewed(store, out, force=True)
    assert summary["frames"] == 6 and (out / CSV_NAME).is_file() and not (out.parent / ".reviewed.old").exists()
    assert unsynced_export(events, out) == []
    assert any(e[0] == "link" for e in events)
    store.close()


def test_a_labels_export_of_copies_syncs_each_copy(tmp_path, monkeypatch):
    """Where ``--out`` is on another file system than the store, the JPEGs are copied, not linked: each copy is
    fsynced. Two file systems are not at hand here, so ``os.link`` fails as it does across them (EXDEV)."""
    store = reviewed_store(tmp_path / "store", n=4)
    out = tmp_path / "new" / "export"
    events = trace_export(monkeypatch)

    def cross_device(src, dst, *args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link", str(src), None, str(dst))

    monkeypatch.setattr(os, "link", cross_device)
    assert export_reviewed(store, out)["frames"] == 4
    assert unsynced_export(events, out) == []
    assert ("mkdir", str(tmp_path / "new")) in events and ("fsync", str(tmp_path)) in events    # a new parent
    store.close()


def test_a_backgrounds_export_is_on_disk_before_it_says_done(tmp_path, monkeypatch):
    store = reviewed_store(tmp_path / "store", n=1, scenes=3)
    out = tmp_path / "bg"
    export_backgrounds(store, out)
    events = trace_export(monkeypatch)
    assert export_backgrounds(store, out, force=True)["images"] == 3
    assert unsynced_export(events, out) == []
    store.close()


@pytest.mark.parametrize("export", ["labels", "backgrounds"])
def test_a_sync_that_fails_fails_the_export_and_keeps_the_earlier_one(tmp_path, monkeypatch, export):
    """fsync is where a full disk or a bad block shows on some file systems (faked here: EIO): the export stops with
    its one line naming --out, the earlier export kept and nothing left beside it. backgrounds export ended in a
    traceback for any OSError (a full disk among them)."""
    store = reviewed_store(tmp_path / "store", n=2, scenes=2)
    run = export_reviewed if export == "labels" else export_backgrounds
    out = tmp_path / "out"
    run(store, out)
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))

    def failing(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(StoreError, match=f"--out {out}: the export could not be written .*Input/output error"):
        run(store, out, force=True)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    store.close()


# ------------------------------------------------------------------ --out resolved


@pytest.mark.parametrize("given", [".", "./", "..", "sub/..", "sub/../"])
@pytest.mark.parametrize("export", ["labels", "backgrounds"])
def test_an_out_that_is_or_holds_the_current_folder_is_refused_naming_the_flag(tmp_path, monkeypatch, given, export):
    """``--out . --force`` in an empty folder failed with "PosixPath('.') has an empty name"; in a folder holding an
    earlier export it would replace the folder the shell is in. Now refused, naming --out and why; nothing is
    written or removed."""
    store = reviewed_store(tmp_path / "store", scenes=1)
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    monkeypatch.chdir(work)
    run = export_reviewed if export == "labels" else export_backgrounds
    with pytest.raises(StoreError, match=rf"--out {re.escape(str(Path(given)))}: is .*current folder.*would leave "
                                         rf"this shell in a deleted folder"):
        run(store, Path(given), force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store", "work"]
    assert [p.name for p in work.iterdir()] == ["sub"] and not any((work / "sub").iterdir())
    store.close()


def test_the_cli_refuses_out_dot_with_one_line(tmp_path):
    reviewed_store(tmp_path / "store").close()
    (tmp_path / "empty").mkdir()
    rc, lines = central(["labels", "export", "--store", str(tmp_path / "store"), "--out", ".", "--force"],
                        cwd=tmp_path / "empty")
    assert_one_line(rc, lines, "--out .: is ", "the current folder", f"cd {tmp_path} and --out empty")
    assert not any((tmp_path / "empty").iterdir())


@pytest.mark.parametrize("given", ["sub/", "./sub//", "sub/../new", "new/"])
def test_an_out_with_a_trailing_slash_or_dots_is_the_folder_it_leads_to(tmp_path, monkeypatch, given):
    store = reviewed_store(tmp_path / "store")
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    monkeypatch.chdir(work)
    summary = export_reviewed(store, Path(given), force=True)
    target = (work / given).resolve()
    assert summary["frames"] == 3 and (target / CSV_NAME).is_file()
    assert sorted(p.name for p in work.iterdir()) == sorted({"sub", target.name})
    export_reviewed(store, Path(given), force=True)      # and an earlier export there is replaced
    assert sorted(p.name for p in work.iterdir()) == sorted({"sub", target.name})
    store.close()

