"""Per-station record of the models rolled out and the URLs they came from (the rollback's memory).

A model is its name and its version together: two models may both have a version "2", and a rollback
must never switch a station to another model because a version string matched. Several rollouts may
share one file (two operators, two groups): every record re-reads the file, adds its entry and writes it
back under a lock, so none erases another's.
"""

from __future__ import annotations

import fcntl
import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from central.rollout.remote import RemoteBundle, sibling_location
from contract.events import RolloutError, utc_now, write_json_atomic

log = logging.getLogger(__name__)

SCHEMA = "rollout-history.v1"
MAX_ENTRIES = 200     # per station, the newest kept: 'previous' walks back at most this far; the file stays bounded
MAX_BUNDLES = 2000    # bundle locations by name/version, the most recently sent kept
# a station's reason may be 16 KiB (status.v1): 200 of those per station made 3 MB per station, all re-read and
# rewritten at every record; the summary and the event carry the whole reason, the history its beginning
MAX_REASON_CHARS = 2000
Model = tuple[str, str]          # (name, version)


class RolloutHistory:
    """Per station, every model sent and where it came from; written atomically, under a lock, after each change."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.data = self._read()
        self.unwritten: list[tuple[str, dict[str, Any], dict[str, str]]] = []   # records a failed write still holds

    def _read(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"schema": SCHEMA, "bundles": {}, "stations": {}}
        try:
            data = json.loads(self.path.read_bytes().decode("utf-8"))
        except OSError as exc:
            raise RolloutError(f"{self.path}: cannot read the rollout history ({exc.strerror or exc})") from exc
        except UnicodeDecodeError as exc:
            raise RolloutError(f"{self.path}: rollout history is not UTF-8 (byte {exc.start}: {exc.reason})") from exc
        except json.JSONDecodeError as exc:
            raise RolloutError(f"{self.path}: rollout history is not valid JSON ({exc})") from exc
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise RolloutError(f"{self.path}: field schema: expected {SCHEMA}")
        stations, bundles = data.get("stations"), data.get("bundles")
        if not isinstance(stations, dict) or not all(
                isinstance(es, list) and all(isinstance(e, dict) for e in es) for es in stations.values()):
            raise RolloutError(f"{self.path}: field stations: expected an object of lists of entries")
        if not isinstance(bundles, dict) or not all(isinstance(b, dict) for b in bundles.values()):
            raise RolloutError(f"{self.path}: field bundles: expected an object of bundle records")
        return data

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The file's lock (a dot-file beside it): one writer at a time, each working on what is on disk now."""
        lock_path = self.path.with_name(f".{self.path.name}.lock")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock = open(lock_path, "a")
        except OSError as exc:
            raise RolloutError(f"{lock_path}: cannot open the history's lock ({exc.strerror or exc})") from exc
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def record(self, station: str, *, action: str, bundle: RemoteBundle, from_version: str | None, ok: bool,
               reason: str | None, from_name: str | None = None) -> None:
        """Add one switch (``from_name``/``from_version``: the model the station ran before) to the file."""
        if reason is not None and len(reason) > MAX_REASON_CHARS:
            reason = f"{reason[:MAX_REASON_CHARS]}... ({len(reason) - MAX_REASON_CHARS} more characters not kept)"
        entry = {"ts": utc_now(), "action": action, "name": bundle.name, "version": bundle.version,
                 "from_name": from_name, "from_version": from_version, "bundle": bundle.location,
                 "sha256": bundle.sha256, "ok": ok, "reason": reason}
        known = {"name": bundle.name, "version": bundle.version, "bundle": bundle.location, "sha256": bundle.sha256}
        self.unwritten.append((station, entry, known))
        self.flush()

    def flush(self) -> None:
        """Write the records not yet in the file. RolloutError naming the file when it cannot be (a full disk, a
        file another program damaged meanwhile): they stay held here, and the next record writes them too, so a
        rollout goes on and a short failure loses none."""
        if not self.unwritten:
            return
        try:
            with self._locked():
                data = self._read()           # what other rollouts wrote since this one loaded the file
                for station, entry, known in self.unwritten:
                    key = f"{known['name']}/{known['version']}"
                    data["bundles"].pop(key, None)          # to the end: the most recently sent
                    data["bundles"][key] = known
                    entries = data["stations"].setdefault(station, [])
                    entries.append(entry)
                    del entries[:-MAX_ENTRIES]             # rewritten whole at every record: bounded
                for key in list(data["bundles"])[:-MAX_BUNDLES]:
                    del data["bundles"][key]
                try:
                    write_json_atomic(self.path, data)
                except OSError:
                    for tmp in self.path.parent.glob(f".{self.path.name}.*.tmp"):   # what the failed write left
                        tmp.unlink(missing_ok=True)             # (the lock is held: no other writer's file)
                    raise
        except OSError as exc:
            raise RolloutError(f"{self.path}: cannot write the rollout history ({exc.strerror or exc}); "
                               f"{len(self.unwritten)} record(s) not in it") from exc
        except RolloutError as exc:
            raise RolloutError(f"{exc}; {len(self.unwritten)} record(s) not in it") from exc
        self.data, self.unwritten = data, []

    def entries(self, station: str) -> list[dict[str, Any]]:
        return list(self.data["stations"].get(station, []))

    def ran_before(self, station: str) -> list[Model]:
        """The models the station ran, oldest first, ending with the one it runs now: a stack, where a rollout
        pushes and a rollback pops back to its target. So "previous" after a rollback is what came before the
        target, never the version just left (v3, back to v2, back again: v1)."""
        stack: list[Model] = []
        for entry in self.entries(station):
            if not entry.get("ok"):
                continue
            model = (entry.get("name"), entry.get("version"))
            if entry.get("action") == "rollback":
                if model in stack:
                    del stack[len(stack) - stack[::-1].index(model):]
                else:      # sent back to a model not on record here: what it ran before that is not known
                    stack = [model]
                continue
            # an entry written before from_name was recorded: the same model as the one it installed
            before = (entry.get("from_name") or entry.get("name"), entry.get("from_version"))
            if before[1] is not None and before != model and (not stack or stack[-1] != before):
                stack.append(before)
            if not stack or stack[-1] != model:
                stack.append(model)
        return stack

    def previous_model(self, station: str, current: Model | None) -> Model | None:
        """What the station ran before ``current`` (name, version), by the stack of ``ran_before``."""
        stack = self.ran_before(station)
        if current is None or len(stack) < 2 or stack[-1] != current:
            return None
        return stack[-2]

    def location_of(self, name: str, version: str, station: str | None = None) -> str | None:
        """Where model ``name`` ``version`` was published: where the station itself got it, else the bundle of
        that name and version recorded, else beside a version of the same model (the same served tree)."""
        def url(record: dict[str, Any]) -> str | None:     # a hand-edited record may lack it: passed over
            return record.get("bundle") if isinstance(record.get("bundle"), str) and record["bundle"] else None

        own = self.entries(station) if station else []
        for entry in reversed(own):
            if (entry.get("name"), entry.get("version")) == (name, version) and url(entry):
                return url(entry)
        known = self.data["bundles"].get(f"{name}/{version}")
        if known and (known.get("name"), known.get("version")) == (name, version) and url(known):
            return url(known)
        everyone = [e for es in self.data["stations"].values() for e in es]
        for entry in [*reversed(own), *reversed(everyone)]:
            if entry.get("name") == name and url(entry):
                return sibling_location(url(entry), version)
        return None
