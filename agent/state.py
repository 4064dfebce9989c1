"""What a station was told at run time and must keep across restarts.

``cmd/model`` installs a verified bundle, ``cmd/thresholds`` tunes the low-confidence policy and
``cmd/expect`` opens a shipment (its tally is saved with each receipt and before each batch it counts,
agent/receiving.py) while the agent runs. All are written to ``station-state.json`` beside the outbox database (the
folder a station keeps on a volume), atomically, after they took effect; the next start applies
them again, so a reboot or a container restart does not put a rolled-out station back on the
config's bundle. The state records the sha256 of the configured bundle's manifest it was made on:
when an operator deploys a config with another bundle, that config wins and the old state is set
aside (logged). A configured bundle whose manifest cannot be read at start (a volume not mounted yet)
proves no change of config: the state is then used as it is and its file left untouched (logged).
A state file that is unreadable, or a bundle that no longer verifies, is logged and the configured
bundle runs; nothing is lost by a bad state file (it is kept as ``.bad``). A saved shipment that is not one
(agent/receiving.py ``Shipment.from_json``) is not restored, and a copy of the file is kept as ``.bad`` before
the next save writes the state without it; its model and thresholds are used. The shipment closed last
(``last_closed``: its id, final receipt id and number of lines) is kept so a close sent again after a restart is
done already; one that is not one is dropped the same way (logged, ``.bad`` copy), and a state saved before it
was kept loads without it. A file set aside never
replaces an earlier one: the newest is ``.bad`` (``.previous``), the ones before it are renamed with
the UTC time they were displaced (``.bad.20260102T030405.678901Z``), the newest ``KEEP_SET_ASIDE`` kept.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from agent.receiving import ClosedShipment, Shipment, ShipmentError
from contract.events import fsync_dir
from contract.messages import dumps_finite, loads_finite

log = logging.getLogger(__name__)

STATE_FILE = "station-state.json"
SCHEMA = "station-state.v1"
KEEP_SET_ASIDE = 5      # set-aside copies kept per kind (.bad, .previous): the newest and the 4 before it


def manifest_sha256(bundle_root: Path) -> str | None:
    path = bundle_root / "manifest.json" if bundle_root.is_dir() else bundle_root
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


@dataclass
class StationState:
    path: Path
    configured_sha256: str | None = None
    model: dict[str, Any] | None = None            # {"bundle": path, "version": ..., "sha256": ...}
    thresholds: dict[str, dict[str, Any]] = field(default_factory=dict)   # camera id -> cmd/thresholds overrides
    shipment: dict[str, Any] | None = None         # the open shipment (agent/receiving.py Shipment.to_json)
    last_closed: dict[str, Any] | None = None      # the shipment closed last (agent/receiving.py ClosedShipment)
    # where each save reads the shipment closed last from (the agent sets the receiving desk's ``saved_closed``
    # once it holds the restored one); until then ``last_closed`` is saved as it was loaded
    closed_source: Callable[[], dict[str, Any] | None] | None = field(default=None, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @classmethod
    def load(cls, path: Path, configured_bundle: Path) -> "StationState":
        """The state for this config; a fresh one when there is none, it is damaged, or the config changed."""
        configured = manifest_sha256(configured_bundle)
        fresh = cls(path, configured)
        if configured is None and path.exists():
            log.warning("%s: the configured bundle's manifest (%s) cannot be read; the station state could not be "
                        "checked against it and is used as it is (its file is left untouched)", path,
                        configured_bundle)
        try:
            raw = _read(path)
        except FileNotFoundError:
            return fresh
        except (OSError, ValueError) as exc:
            log.error("%s: unreadable station state (%s); kept as %s.bad, starting from the config", path, exc,
                      path.name)
            _set_aside(path, ".bad")
            return fresh
        problem = _problem(raw)
        if problem is not None:
            log.error("%s: %s; kept as %s.bad, starting from the config", path, problem, path.name)
            _set_aside(path, ".bad")
            return fresh
        if configured is not None and raw.get("configured_sha256") != configured:
            log.warning("%s: made for another configured bundle (the config changed); the config's bundle and "
                        "thresholds win, the old state is kept as %s.previous", path, path.name)
            _set_aside(path, ".previous")
            return fresh
        # the sha it was made for: the configured bundle's, or kept as it was when that cannot be read
        return cls(path, raw.get("configured_sha256"), raw.get("model"), dict(raw.get("thresholds") or {}),
                   _restorable(path, raw.get("shipment"), Shipment.from_json, SHIPMENT_NOT_RESTORED),
                   _restorable(path, raw.get("last_closed"), ClosedShipment.from_json, CLOSED_NOT_RESTORED))

    def set_model(self, bundle_root: Path, version: str) -> None:
        self.model = {"bundle": str(bundle_root), "version": version, "sha256": manifest_sha256(bundle_root)}
        self.save()

    def set_thresholds(self, overrides: dict[str, dict[str, Any]]) -> None:
        """The effective cmd/thresholds overrides per camera (what the inference stage holds now)."""
        self.thresholds = overrides
        self.save()

    def set_shipment(self, shipment: dict[str, Any] | None) -> None:
        """The open shipment and its tally (None once it is closed); saved by the decide and command threads."""
        self.shipment = shipment
        self.save()

    def save(self) -> None:
        """Atomically; one writer at a time, each writing every field as it is now (none undoes another's)."""
        with self._lock:
            if self.closed_source is not None:
                self.last_closed = self.closed_source()
            self._write({"schema": SCHEMA, "configured_sha256": self.configured_sha256, "model": self.model,
                         "thresholds": self.thresholds, "shipment": self.shipment, "last_closed": self.last_closed})

    def _write(self, body: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(dumps_finite(body, separators=(",", ":")))    # compact: a full shipment fits the limit
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fsync_dir(self.path.parent)     # the rename itself survives a power cut (a Jetson's usual way to stop)


MAX_STATE_BYTES = 64 << 20     # a bundle path, thresholds, an open shipment of 1,000 lines with 50 refs each


def _read(path: Path) -> Any:
    """The file's JSON; ValueError for a file that is too large, not UTF-8, not JSON, or holds NaN/Infinity."""
    with open(path, "rb") as fh:
        data = fh.read(MAX_STATE_BYTES + 1)
    if len(data) > MAX_STATE_BYTES:
        raise ValueError(f"larger than {MAX_STATE_BYTES} bytes")
    return loads_finite(data)


def _problem(raw: Any) -> str | None:
    """What makes a parsed state unusable (naming the field), or None."""
    if not isinstance(raw, dict) or raw.get("schema") != SCHEMA:
        return f"field schema: expected {SCHEMA}"
    sha = raw.get("configured_sha256")
    if sha is not None and not isinstance(sha, str):
        return "field configured_sha256: expected a string or null"
    model = raw.get("model")
    if model is not None:
        if not isinstance(model, dict):
            return "field model: expected an object or null"
        for key in ("bundle", "version"):
            if not isinstance(model.get(key), str) or not model[key]:
                return f"field model.{key}: expected a non-empty string"
        if model.get("sha256") is not None and not isinstance(model["sha256"], str):
            return "field model.sha256: expected a string or null"
    thresholds = raw.get("thresholds")
    if thresholds is not None:
        if not isinstance(thresholds, dict):
            return "field thresholds: expected an object of camera id -> thresholds"
        for cid, values in thresholds.items():
            if not isinstance(values, dict):
                return f"field thresholds.{cid}: expected an object"
    shipment = raw.get("shipment")
    if shipment is not None and not isinstance(shipment, dict):
        return "field shipment: expected an object or null"
    return None


# what is logged when a saved record is not restored (``_restorable``): the error, then the file's name
SHIPMENT_NOT_RESTORED = "open shipment not restored: {}; a copy of the file is kept as {}.bad (its model and " \
                        "thresholds are used)"
CLOSED_NOT_RESTORED = "the shipment closed last is not restored: {} (its close sent again is refused as not open); " \
                      "a copy of the file is kept as {}.bad"


def _restorable(path: Path, raw: Any, parse: Callable[[Any], Any], what: str) -> Any:
    """A saved record (the open shipment, the shipment closed last) as saved, or None when there is none (a state
    saved before it was kept) or ``parse`` refuses it (ShipmentError naming the field): then logged (``what``, with
    the error and the file's name) and a copy of the file kept as ``.bad``: the next save writes the state without
    it, and a tally would be lost with no copy."""
    if raw is None:
        return None
    try:
        parse(raw)
    except ShipmentError as exc:
        log.error("%s: %s", path, what.format(exc, path.name))
        _set_aside(path, ".bad", copy=True)
        return None
    return raw


def _set_aside(path: Path, suffix: str, keep: int = KEEP_SET_ASIDE, copy: bool = False) -> None:
    """``path`` becomes ``path<suffix>`` (``copy``: a copy of it, ``path`` is left as it is); a copy already there
    is renamed ``path<suffix>.<UTC time>Z`` first, and of those only the newest ``keep - 1`` stay."""
    target = path.with_name(path.name + suffix)
    try:
        if target.exists():
            now = time.time()
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"
            older = target.with_name(f"{target.name}.{stamp}")
            n = 1
            while older.exists():       # two in the same microsecond, or a clock stepped back
                older = target.with_name(f"{target.name}.{stamp}-{n}")
                n += 1
            os.replace(target, older)
        if copy:
            shutil.copyfile(path, target)
        else:
            os.replace(path, target)
    except OSError as exc:
        log.error("%s: cannot set aside (%s)", path, exc)
        return
    _prune_set_aside(target, keep)


def _prune_set_aside(target: Path, keep: int) -> None:
    """Delete the oldest timestamped copies of ``target`` beyond ``keep - 1`` (``target`` itself is the newest)."""
    prefix = target.name + "."
    try:
        stamped = sorted(p for p in target.parent.iterdir() if p.name.startswith(prefix) and p.name[len(prefix):][:1]
                         .isdigit())
    except OSError as exc:
        log.error("%s: cannot list the older set-aside copies (%s)", target, exc)
        return
    for old in stamped[:max(0, len(stamped) - (keep - 1))]:
        try:
            old.unlink()
            log.info("%s: removed (only the newest %d set-aside copies are kept)", old, keep)
        except OSError as exc:
            log.error("%s: cannot remove an old set-aside copy (%s)", old, exc)
