"""Deployment test helpers: a hand-made bundle (no torch), TLS material, a real mosquitto with the shipped ACL.

The broker runs the repository's own deploy/central/acl file, so the test checks
the ACL that ships, not a copy of it.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import time
import threading
from dataclasses import dataclass, field
from pathlib import Path

from agent.engine_cache import BuildRequest, DeviceInfo


REPO = Path(__file__).resolve().parents[2]
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


# ---------------------------------------------------------------- bundles

def _entry(path: Path, root: Path, **fields) -> dict:
    data = path.read_bytes()
    return {"path": path.relative_to(root).as_posix(), "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data), **fields}


def make_bundle(root: Path, *, version: str = "v1", onnx_bytes: bytes = b"fp32-onnx-stand-in",
                int8: str | None = "deployable", engines: list[dict] | None = None) -> Path:
    """A bundle per docs/bundle.md whose ONNX files are placeholder bytes.

    The engine cache hashes the ONNX file and hands its path to the builder; it
    never parses it, so placeholder bytes are enough and no torch is needed.
    ``int8``: "deployable", "gated" (present, deployable false) or None (absent).
    """
    folder = root / "demo" / version
    folder.mkdir(parents=True)
    (folder / "model.fp32.onnx").write_bytes(onnx_bytes)
    artifacts = [_entry(folder / "model.fp32.onnx", folder, role="onnx-fp32", precision="fp32", deployable=True)]
    if int8:
        (folder / "model.int8.onnx").write_bytes(b"int8-qdq-onnx-stand-in" + onnx_bytes)
        artifacts.append(_entry(folder / "model.int8.onnx", folder, role="onnx-int8", precision="int8",
                                deployable=int8 == "deployable",
                                reason=None if int8 == "deployable" else "INT8 gate failed: -2.1 points"))
    for i, eng in enumerate(engines or []):
        path = folder / f"model.{eng['precision']}.{i}.engine"
        path.write_bytes(b"shipped-engine-" + json.dumps(eng).encode())
        artifacts.append(_entry(path, folder, role="tensorrt-engine", deployable=True, **eng))
    manifest = {
        "schema_version": 1, "name": "demo", "version": version,
        "created_at": datetime.datetime(2026, 11, 26, tzinfo=datetime.timezone.utc).isoformat(),
        "architecture": "mobilenet_v2", "frameworks": {"onnx": "1.23.2"}, "labels": LABELS,
        "input": {"height": 48, "width": 48, "resize_shorter": 48, "interpolation": "bilinear",
                  "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "channel_order": "RGB",
                  "layout": "NCHW", "dtype": "float32", "input_name": "input", "output_name": "logits"},
        "artifacts": artifacts,
        "quality": {"thresholds": {"min_confidence": 0.5, "min_margin": 0.1, "max_entropy": 1.5}},
        "provenance": {"code_version": "test"},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return folder


# ---------------------------------------------------------------- TLS material

@dataclass
class Pki:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def _write_pem_key(key, path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def make_pki(folder: Path) -> Pki:
    """A throw-away CA and a server certificate for 127.0.0.1 / localhost (EC P-256: fast to generate)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "inventory test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(san, critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pki = Pki(folder / "ca.crt", folder / "server.crt", folder / "server.key")
    pki.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_pem_key(key, pki.server_key)
    return pki


# ---------------------------------------------------------------- broker

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SHIPPED_CONF = REPO / "deploy" / "central" / "mosquitto" / "mosquitto.conf"
SHIPPED_ACL = REPO / "deploy" / "central" / "mosquitto" / "acl"

USERS = {
    "ber1/receiving-01": "pw-receiving",   # station receiving-01 at site ber1 (user name = <site>/<station>)
    "ber1/qc-01": "pw-qc",                 # station qc-01 at site ber1
    "central-ingest": "pw-central",        # the central services
    "dashboard": "pw-dashboard",
}


@dataclass
class CentralBroker:
    """mosquitto running the shipped config and ACL: a TLS listener and a TLS websocket listener, nothing plain."""

    workdir: Path
    pki: Pki
    tls_port: int = field(default_factory=free_port)
    ws_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    def write_config(self) -> Path:
        """The shipped deploy/central/mosquitto/mosquitto.conf with paths and ports moved into the test's folder."""
        passwd = self.workdir / "passwd"
        passwd.write_text("")
        for user, password in USERS.items():
            subprocess.run([MOSQUITTO_PASSWD, "-b", str(passwd), user, password], check=True, capture_output=True)
        os.chmod(passwd, 0o600)
        (self.workdir / "data").mkdir(exist_ok=True)
        text = SHIPPED_CONF.read_text()
        for old, new in [("/mosquitto/config/passwd", str(passwd)), ("/mosquitto/config/acl", str(SHIPPED_ACL)),
                         ("/mosquitto/certs/ca.crt", str(self.pki.ca_cert)),
                         ("/mosquitto/certs/server.crt", str(self.pki.server_cert)),
                         ("/mosquitto/certs/server.key", str(self.pki.server_key)),
                         ("/mosquitto/data/", f"{self.workdir / 'data'}/"),
                         ("listener 8883\n", f"listener {self.tls_port} 127.0.0.1\n"),
                         ("listener 8884\n", f"listener {self.ws_port} 127.0.0.1\n"),
                         ("log_dest stdout", f"log_dest file {self.workdir / 'mosquitto.log'}\nlog_type all")]:
            assert old in text, f"{SHIPPED_CONF}: expected {old!r}"
            text = text.replace(old, new)
        if os.geteuid() == 0:
            text = "user root\n" + text   # else mosquitto drops to 'mosquitto' and cannot read tmp_path
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(text)
        return conf

    def start(self) -> "CentralBroker":
        conf = self.write_config()
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_listening(self.proc, self.tls_port)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def log(self) -> str:
        path = self.workdir / "mosquitto.log"
        return path.read_text() if path.exists() else ""


def wait_listening(proc: subprocess.Popen, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited: {proc.stderr.read().decode()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"mosquitto did not listen on {port}")


# ---------------------------------------------------------------- a stand-in for TensorRT
# What probe_device() reads on a Jetson Orin with JetPack 6.1.
ORIN = DeviceInfo(tensorrt_version="10.3.0", compute_capability="8.7")


class FakeTensorRT:
    """Stands for TensorRT's builder (not installable here): counts builds, returns a recognisable engine."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.requests: list[BuildRequest] = []
        self.fail = fail
        self.lock = threading.Lock()

    def __call__(self, request: BuildRequest) -> bytes:
        with self.lock:
            self.requests.append(request)
        if self.fail:
            raise self.fail
        return json.dumps({"engine-for": request.onnx_path.name, "key": request.key.digest()}).encode()

    @property
    def builds(self) -> int:
        return len(self.requests)
