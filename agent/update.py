"""Model update commands: fetch a bundle named by path or URL, check it, load it.

A bundle URL points at the bundle folder; manifest.json (and manifest.json.sig
when present) and every artifact the manifest lists are fetched relative to it.
The sha256 in the command is of manifest.json, which in turn pins every
artifact's sha256, so one hash covers the whole bundle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlparse

from contract.bundle import MANIFEST, SIGNATURE, Bundle, BundleError, load_bundle

log = logging.getLogger(__name__)
FETCH_TIMEOUT_S = 60


@dataclass(frozen=True)
class ModelCommand:
    bundle: str
    sha256: str | None
    version: str | None

    @classmethod
    def parse(cls, payload: bytes) -> "ModelCommand":
        try:
            data: Any = json.loads(payload)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"cmd/model: payload is not JSON ({exc})") from exc
        if not isinstance(data, dict) or not isinstance(data.get("bundle"), str):
            raise BundleError("cmd/model: field bundle: expected a bundle path or URL string")
        sha = data.get("sha256")
        if sha is not None and (not isinstance(sha, str) or len(sha) != 64):
            raise BundleError("cmd/model: field sha256: expected the 64-hex sha256 of manifest.json")
        return cls(data["bundle"], sha, data.get("version"))


def _download(url: str, dest: Path, *, optional: bool = False) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as resp, open(dest, "wb") as fh:
            shutil.copyfileobj(resp, fh)
        return True
    except urllib.error.HTTPError as exc:
        if optional and exc.code == 404:
            return False
        raise BundleError(f"{url}: download failed (HTTP {exc.code})") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise BundleError(f"{url}: download failed ({exc})") from exc


def fetch_bundle(location: str, download_dir: Path, version: str | None) -> Path:
    """A local bundle folder for a path, file:// URL or http(s):// URL."""
    parsed = urlparse(location)
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path) if parsed.scheme == "file" else location)
    if parsed.scheme not in ("http", "https"):
        raise BundleError(f"{location}: unsupported bundle URL scheme {parsed.scheme!r} (path, file, http, https)")
    base = location if location.endswith("/") else location + "/"
    # Into a fresh folder: a bundle already installed under this version (maybe the running one) stays
    # intact until the new copy is verified (install_bundle).
    download_dir.mkdir(parents=True, exist_ok=True)
    target = Path(tempfile.mkdtemp(prefix=f".incoming-{version or 'bundle'}-", dir=download_dir))
    try:
        _fetch_into(base, location, target)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return target


def _fetch_into(base: str, location: str, target: Path) -> None:
    _download(urljoin(base, MANIFEST), target / MANIFEST)
    _download(urljoin(base, SIGNATURE), target / SIGNATURE, optional=True)
    try:
        manifest = json.loads((target / MANIFEST).read_bytes())
        paths = [a["path"] for a in manifest["artifacts"]]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise BundleError(f"{location}/{MANIFEST}: not a bundle manifest ({exc})") from exc
    for rel in paths:
        dest = (target / rel).resolve()
        if target.resolve() not in dest.parents:
            raise BundleError(f"{location}/{MANIFEST}: artifact path {rel} leaves the bundle")
        dest.parent.mkdir(parents=True, exist_ok=True)
        _download(urljoin(base, rel), dest)


def install_bundle(incoming: Path, download_dir: Path, version: str) -> Path:
    """Move a verified download to ``download_dir/<version>``, replacing an older copy in one rename."""
    target = download_dir / version
    old = None
    if target.exists():
        old = download_dir / f".old-{version}-{uuid.uuid4().hex[:8]}"
        target.rename(old)
    incoming.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def verify_command_bundle(cmd: ModelCommand, download_dir: Path, public_key: Any | None) -> Bundle:
    """Fetch and fully verify the bundle a command names; BundleError says why it is refused.

    A download is verified in a temporary folder and only then installed as ``download_dir/<version>``;
    a refused one is deleted, so nothing already installed is touched.
    """
    downloaded = urlparse(cmd.bundle).scheme in ("http", "https")
    root = fetch_bundle(cmd.bundle, download_dir, cmd.version)
    try:
        bundle = _verify(cmd, root, public_key)
    except BundleError:
        if downloaded:
            shutil.rmtree(root, ignore_errors=True)
        raise
    if not downloaded:
        return bundle
    return load_bundle(install_bundle(root, download_dir, bundle.version), public_key)


def _verify(cmd: ModelCommand, root: Path, public_key: Any | None) -> Bundle:
    manifest_path = (root.parent if root.name == MANIFEST else root) / MANIFEST
    if cmd.sha256 is not None:
        try:
            digest = hashlib.sha256(manifest_path.read_bytes()).hexdigest()
        except OSError as exc:
            raise BundleError(f"{manifest_path}: cannot read ({exc.strerror or exc})") from exc
        if digest != cmd.sha256:
            raise BundleError(f"{manifest_path}: sha256 {digest} does not match the command's {cmd.sha256}")
    bundle = load_bundle(root, public_key)
    if cmd.version is not None and bundle.version != cmd.version:
        raise BundleError(f"{manifest_path}: field version: {bundle.version!r}, the command expects {cmd.version!r}")
    return bundle
