"""Publish a promoted bundle into the served tree, and serve that tree over HTTP for ``cmd/model``.

``publish_bundle`` copies ``models/<name>/<version>`` to ``<root>/<name>/<version>/`` after the
agent's own verification (``contract.bundle.load_bundle``) and the gate record written by
``python -m trainer retrain`` (``gate.json``): a rejected version is refused, always.
``BundleServer`` serves the tree (standard library), which is what ``cmd/model`` URLs name.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import ssl
import threading
import uuid
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from contract.events import (
    GATE_FILE,
    RolloutError,
    manifest_sha256,
    read_gate,
    rejected_in_log,
    utc_now,
    write_json_atomic,
)

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"
PUBLISHABLE = ("promoted", "baseline")


@dataclass(frozen=True)
class PublishResult:
    name: str
    version: str
    path: Path
    url_path: str          # relative to the served root: "<name>/<version>/"
    sha256: str            # of manifest.json: what cmd/model carries
    decision: str
    already: bool = False


def _check_publishable(bundle_dir: Path, sha: str, root: Path, name: str, baseline: bool) -> dict[str, Any]:
    gate = read_gate(bundle_dir)
    logged = rejected_in_log(bundle_dir, sha)
    if (gate is not None and gate["decision"] == "rejected") or logged is not None:
        why = (gate or logged or {}).get("reason") or "see the retrain report"
        raise RolloutError(f"{bundle_dir}: rejected by the retrain gate ({why}); a rejected version is never published")
    if gate is not None:
        if gate.get("manifest_sha256") != sha:
            raise RolloutError(f"{bundle_dir / GATE_FILE}: field manifest_sha256: {gate.get('manifest_sha256')} "
                               f"is not the sha256 of this manifest.json ({sha}); the bundle changed after the gate")
        return gate
    if not baseline:
        raise RolloutError(f"{bundle_dir}: no {GATE_FILE}: only a version promoted by 'python -m trainer retrain' is "
                           "published (pass --baseline for the first version of a model, exported by 'trainer export')")
    others = [p.name for p in (root / name).iterdir() if p.is_dir() and not p.name.startswith(".")] \
        if (root / name).is_dir() else []
    if others:
        raise RolloutError(f"{bundle_dir}: --baseline is only for the first version of {name!r}, and {root / name} "
                           f"already holds {', '.join(sorted(others))}; later versions go through the retrain gate")
    return {"decision": "baseline", "manifest_sha256": sha, "name": name,
            "reason": "first version of the model, exported by 'trainer export' (not gated)", "ts": utc_now()}


def publish_bundle(bundle_dir: str | Path, root: str | Path, *, baseline: bool = False,
                   public_key: Path | None = None) -> PublishResult:
    """Copy a verified, promoted bundle into ``root/<name>/<version>/``; nothing appears there half-copied."""
    from contract.bundle import (
        MANIFEST,
        SIGNATURE,
        BundleError,
        load_bundle,
        load_public_key,
    )

    bundle_dir, root = Path(bundle_dir), Path(root)
    try:
        bundle = load_bundle(bundle_dir, load_public_key(public_key) if public_key else None)
    except BundleError as exc:
        raise RolloutError(f"refusing to publish an unverifiable bundle: {exc}") from exc
    bundle_dir = bundle.root
    sha = manifest_sha256(bundle_dir)
    gate = _check_publishable(bundle_dir, sha, root, bundle.name, baseline)
    target = root / bundle.name / bundle.version
    url_path = f"{bundle.name}/{bundle.version}/"
    if target.exists():
        if (target / MANIFEST).exists() and manifest_sha256(target) == sha:
            return PublishResult(bundle.name, bundle.version, target, url_path, sha, gate["decision"], already=True)
        raise RolloutError(f"{target}: version {bundle.version} is already published with another manifest; "
                           "a published version is never replaced (export a new version)")
    partial = target.parent / f".{bundle.version}.partial-{uuid.uuid4().hex[:8]}"
    try:
        partial.mkdir(parents=True)
        files = [MANIFEST] + ([SIGNATURE] if (bundle_dir / SIGNATURE).exists() else [])
        files += [a.path.relative_to(bundle_dir).as_posix() for a in bundle.artifacts]
        for rel in files:
            (partial / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(bundle_dir / rel, partial / rel)
        write_json_atomic(partial / GATE_FILE, gate)
        load_bundle(partial, load_public_key(public_key) if public_key else None)   # the copy, checked again
        os.replace(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    _update_index(root / bundle.name, bundle.version, sha, gate["decision"])
    log.info("published %s %s at %s", bundle.name, bundle.version, target)
    return PublishResult(bundle.name, bundle.version, target, url_path, sha, gate["decision"])


def _update_index(model_dir: Path, version: str, sha: str, decision: str) -> None:
    path = model_dir / INDEX_FILE
    index = json.loads(path.read_text()) if path.exists() else {"versions": {}}
    index["versions"][version] = {"path": f"{version}/", "manifest_sha256": sha, "decision": decision,
                                  "published_at": utc_now()}
    write_json_atomic(path, index)


# ---------------------------------------------------------------- serve

class _BundleHandler(SimpleHTTPRequestHandler):
    """Files of the served tree, GET/HEAD only; no directory listings, nothing hidden (half-copied bundles)."""

    server_version = "inventory-bundles/1"

    def send_head(self):  # noqa: D401 (http.server API)
        parts = [p for p in unquote(urlparse(self.path).path).split("/") if p]
        if any(p.startswith(".") for p in parts):
            self.send_error(404, "not found")
            return None
        return super().send_head()

    def list_directory(self, path):  # noqa: ARG002 (http.server API)
        self.send_error(404, "no directory listings")
        return None

    def log_message(self, fmt: str, *args: Any) -> None:
        log.info("%s " + fmt, self.address_string(), *args)


class BundleServer:
    """The served tree over HTTP(S) with the standard library, in a background thread."""

    def __init__(self, root: str | Path, host: str = "127.0.0.1", port: int = 0, *,
                 tls_cert: Path | None = None, tls_key: Path | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise RolloutError(f"{self.root}: served folder does not exist (publish a bundle into it first)")
        handler = functools.partial(_BundleHandler, directory=str(self.root))
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.scheme = "http"
        if tls_cert is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(tls_cert), str(tls_key) if tls_key else None)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
            self.scheme = "https"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="bundle-server", daemon=True)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def url(self) -> str:
        host = self.httpd.server_address[0]
        return f"{self.scheme}://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{self.port}/"

    def start(self) -> "BundleServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
