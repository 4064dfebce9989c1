"""Per-station record of the versions rolled out and the URLs they came from (the rollback's memory)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from central.rollout.remote import RemoteBundle, sibling_location
from contract.events import RolloutError, utc_now, write_json_atomic

log = logging.getLogger(__name__)


class RolloutHistory:
    """Per station, every version sent and where it came from; written atomically after each change."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.exists():
            try:
                self.data = json.loads(self.path.read_text())
            except json.JSONDecodeError as exc:
                raise RolloutError(f"{self.path}: rollout history is not valid JSON ({exc})") from exc
            if not isinstance(self.data, dict) or self.data.get("schema") != "rollout-history.v1":
                raise RolloutError(f"{self.path}: field schema: expected rollout-history.v1")
        else:
            self.data = {"schema": "rollout-history.v1", "bundles": {}, "stations": {}}

    def record(self, station: str, *, action: str, bundle: RemoteBundle, from_version: str | None, ok: bool,
               reason: str | None) -> None:
        self.data["bundles"][f"{bundle.name}/{bundle.version}"] = {
            "name": bundle.name, "version": bundle.version, "bundle": bundle.location, "sha256": bundle.sha256}
        self.data["stations"].setdefault(station, []).append({
            "ts": utc_now(), "action": action, "name": bundle.name, "version": bundle.version,
            "from_version": from_version, "bundle": bundle.location, "sha256": bundle.sha256, "ok": ok,
            "reason": reason})
        write_json_atomic(self.path, self.data)

    def entries(self, station: str) -> list[dict[str, Any]]:
        return list(self.data["stations"].get(station, []))

    def previous_version(self, station: str, current: str | None) -> str | None:
        """What the station ran before ``current`` (the from_version of the switch that installed it)."""
        for entry in reversed(self.entries(station)):
            if entry["ok"] and entry["version"] == current and entry["from_version"] not in (None, current):
                return entry["from_version"]
        return None

    def location_of(self, version: str, station: str | None = None) -> str | None:
        """Where ``version`` was published: where the station itself got it (the model it ran), else the one
        bundle of that version recorded (None when several models have it: which one is not known), else beside
        a version of the same tree."""
        for entry in reversed(self.entries(station) if station else []):
            if entry["version"] == version:
                return entry["bundle"]
        found = {info["bundle"] for info in self.data["bundles"].values() if info["version"] == version}
        if found:
            return found.pop() if len(found) == 1 else None
        entries = self.entries(station) if station else [e for es in self.data["stations"].values() for e in es]
        return sibling_location(entries[-1]["bundle"], version) if entries else None
