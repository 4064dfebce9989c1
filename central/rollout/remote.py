"""The bundle a rollout sends: its manifest and hashes, read from the served tree (HTTP) or a folder."""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlparse

from central.rollout.publish import PUBLISHABLE
from contract.bundle import MANIFEST_MAX_BYTES, BundleError, parse_manifest
from contract.events import GATE_FILE, RolloutError
from contract.messages import loads_finite

log = logging.getLogger(__name__)

FETCH_TIMEOUT_S = 30


@dataclass(frozen=True)
class RemoteBundle:
    """A published bundle as stations will fetch it: its location, identity and manifest sha256."""

    location: str
    name: str
    version: str
    sha256: str
    gate: dict[str, Any]

    @property
    def model(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version}

    def command(self) -> dict[str, Any]:
        """The cmd/model payload (contract/schemas/mqtt/cmd-model.v1.json)."""
        return {"bundle": self.location, "sha256": self.sha256, "version": self.version}


def _read_location(location: str, rel: str, *, optional: bool = False) -> bytes | None:
    parsed = urlparse(location)
    if parsed.scheme in ("http", "https"):
        base = location if location.endswith("/") else location + "/"
        url = urljoin(base, rel)
        try:
            with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as resp:
                data = resp.read(MANIFEST_MAX_BYTES + 1)     # a manifest or a gate record: never more
            if len(data) > MANIFEST_MAX_BYTES:
                raise RolloutError(f"{url}: more than {MANIFEST_MAX_BYTES} bytes, not a manifest or gate record")
            return data
        except urllib.error.HTTPError as exc:
            if optional and exc.code == 404:
                return None
            raise RolloutError(f"{url}: HTTP {exc.code}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise RolloutError(f"{url}: cannot fetch ({exc})") from exc
    if parsed.scheme not in ("", "file"):
        raise RolloutError(f"{location}: unsupported bundle location (a path, file://, http:// or https://)")
    path = Path(unquote(parsed.path) if parsed.scheme == "file" else location) / rel
    if not path.exists():
        if optional:
            return None
        raise RolloutError(f"{path}: does not exist")
    return path.read_bytes()


def resolve_bundle(location: str) -> RemoteBundle:
    """Read a published bundle's manifest and gate record where stations will fetch it.

    Refuses a version the gate rejected, one without a gate record (not published by
    ``central publish``), and one whose manifest changed after the gate. A relative path is made absolute
    here: sent as it is, each station would look for it in its own working folder.
    """
    if not urlparse(location).scheme:
        location = os.path.abspath(location)
    raw = _read_location(location, "manifest.json")
    assert raw is not None
    try:
        manifest = parse_manifest(raw, f"{location}: manifest.json")       # the schema a station checks
        name, version = manifest["name"], manifest["version"]
    except BundleError as exc:
        raise RolloutError(str(exc)) from exc
    sha = hashlib.sha256(raw).hexdigest()
    gate_raw = _read_location(location, GATE_FILE, optional=True)
    if gate_raw is None:
        raise RolloutError(f"{location}: no {GATE_FILE}; roll out only bundles published by "
                           "'python -m central publish'")
    try:
        gate = loads_finite(gate_raw)
    except ValueError as exc:
        raise RolloutError(f"{location}{GATE_FILE}: not valid JSON ({exc})") from exc
    if not isinstance(gate, dict):
        raise RolloutError(f"{location}{GATE_FILE}: expected a JSON object, got {type(gate).__name__}")
    if gate.get("decision") not in PUBLISHABLE:
        raise RolloutError(f"{location}: {name} {version} was {gate.get('decision')} by the retrain gate "
                           f"({gate.get('reason')}); it is never rolled out")
    if gate.get("manifest_sha256") != sha:
        raise RolloutError(f"{location}: manifest.json (sha256 {sha}) is not the one the gate decided on "
                           f"({gate.get('manifest_sha256')})")
    return RemoteBundle(location, name, version, sha, gate)


def sibling_location(location: str, version: str) -> str:
    """The same model's ``version`` in the same served tree (``<root>/<name>/<version>/``)."""
    parsed = urlparse(location)
    if parsed.scheme in ("http", "https"):
        base = location if location.endswith("/") else location + "/"
        return urljoin(base, f"../{version}/")
    return str(Path(unquote(parsed.path) if parsed.scheme == "file" else location).parent / version)
