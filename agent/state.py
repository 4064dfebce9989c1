"""What a station was told at run time and must keep across restarts.

``cmd/model`` installs a verified bundle and ``cmd/thresholds`` tunes the low-confidence policy
while the agent runs. Both are written to ``station-state.json`` beside the outbox database (the
folder a station keeps on a volume), atomically, after they took effect; the next start applies
them again, so a reboot or a container restart does not put a rolled-out station back on the
config's bundle. The state records the sha256 of the configured bundle's manifest it was made on:
when an operator deploys a config with another bundle, that config wins and the old state is set
aside (logged). A state file that is unreadable, or a bundle that no longer verifies, is logged and
the configured bundle runs; nothing is lost by a bad state file (it is kept as ``.bad``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STATE_FILE = "station-state.json"
SCHEMA = "station-state.v1"


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

    @classmethod
    def load(cls, path: Path, configured_bundle: Path) -> "StationState":
        """The state for this config; a fresh one when there is none, it is damaged, or the config changed."""
        configured = manifest_sha256(configured_bundle)
        fresh = cls(path, configured)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return fresh
        except (OSError, ValueError) as exc:
            log.error("%s: unreadable station state (%s); kept as %s.bad, starting from the config", path, exc,
                      path.name)
            _set_aside(path, ".bad")
            return fresh
        if not isinstance(raw, dict) or raw.get("schema") != SCHEMA:
            log.error("%s: field schema: expected %s; kept as %s.bad, starting from the config", path, SCHEMA,
                      path.name)
            _set_aside(path, ".bad")
            return fresh
        if raw.get("configured_sha256") != configured:
            log.warning("%s: made for another configured bundle (the config changed); the config's bundle and "
                        "thresholds win, the old state is kept as %s.previous", path, path.name)
            _set_aside(path, ".previous")
            return fresh
        model = raw.get("model") if isinstance(raw.get("model"), dict) else None
        thresholds = {str(k): v for k, v in (raw.get("thresholds") or {}).items() if isinstance(v, dict)}
        return cls(path, configured, model, thresholds)

    def set_model(self, bundle_root: Path, version: str) -> None:
        self.model = {"bundle": str(bundle_root), "version": version, "sha256": manifest_sha256(bundle_root)}
        self.save()

    def set_thresholds(self, overrides: dict[str, dict[str, Any]]) -> None:
        """The effective cmd/thresholds overrides per camera (what the inference stage holds now)."""
        self.thresholds = overrides
        self.save()

    def save(self) -> None:
        body = {"schema": SCHEMA, "configured_sha256": self.configured_sha256, "model": self.model,
                "thresholds": self.thresholds}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(body, fh, indent=2)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _set_aside(path: Path, suffix: str) -> None:
    try:
        os.replace(path, path.with_name(path.name + suffix))
    except OSError as exc:
        log.error("%s: cannot set aside (%s)", path, exc)
