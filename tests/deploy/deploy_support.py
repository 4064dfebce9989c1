"""Deployment test helpers: hand-made bundles, TLS material, a real mosquitto running the shipped config,
MQTT v5 probe clients, and a stand-in for TensorRT.

The broker runs the repository's own deploy/central/mosquitto/{mosquitto.conf,acl},
so the tests check what ships, not a copy of it.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.client import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

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


# ---------------------------------------------------------------- a runnable bundle (torch, for the end-to-end test)

def make_runnable_bundle(root: Path) -> Path:
    """A small random-weight CNN exported to ONNX, so the real agent can classify with ONNX Runtime."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, len(LABELS))).eval()
    folder = make_bundle(root, int8=None)
    onnx_path = folder / "model.fp32.onnx"
    torch.onnx.export(model, torch.zeros(1, 3, 48, 48), str(onnx_path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["artifacts"] = [_entry(onnx_path, folder, role="onnx-fp32", precision="fp32", deployable=True)]
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return folder


# ---------------------------------------------------------------- MQTT v5 probe clients

TIMEOUT = 10.0


@dataclass
class Probe:
    """One paho 2.x v5 client whose callbacks set events, so tests wait on replies, not on sleeps."""

    client: mqtt.Client
    connack: ReasonCode | None = None
    connected: threading.Event = field(default_factory=threading.Event)
    closed: threading.Event = field(default_factory=threading.Event)
    acks: dict[int, list] = field(default_factory=dict)
    acked: threading.Condition = field(default_factory=threading.Condition)
    received: list[mqtt.MQTTMessage] = field(default_factory=list)
    got_message: threading.Condition = field(default_factory=threading.Condition)

    def _ack(self, mid: int, codes: list) -> None:
        with self.acked:
            self.acks[mid] = codes
            self.acked.notify_all()

    def wait_ack(self, mid: int) -> list:
        with self.acked:
            assert self.acked.wait_for(lambda: mid in self.acks, TIMEOUT), f"no ack for mid {mid}"
            return self.acks[mid]

    def publish(self, topic: str, payload: bytes = b"{}") -> int:
        """The PUBACK reason code of one QoS 1 publish."""
        info = self.client.publish(topic, payload, qos=1)
        return self.wait_ack(info.mid)[0].value

    def subscribe(self, topic: str) -> int:
        """The SUBACK reason code (granted QoS, or 0x87)."""
        _, mid = self.client.subscribe(topic, options=mqtt.SubscribeOptions(qos=1))
        return self.wait_ack(mid)[0].value

    def wait_messages(self, n: int) -> list[mqtt.MQTTMessage]:
        with self.got_message:
            assert self.got_message.wait_for(lambda: len(self.received) >= n, TIMEOUT), \
                f"received {[m.topic for m in self.received]}, expected {n}"
            return list(self.received)

    def wait_until(self, done) -> list[mqtt.MQTTMessage]:
        """Wait until ``done(received so far)`` is true."""
        with self.got_message:
            assert self.got_message.wait_for(lambda: done(self.received), TIMEOUT), \
                f"gave up waiting; received {[m.topic for m in self.received]}"
            return list(self.received)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def make_probe(port: int, user: str | None, *, ca: str | None, transport: str = "tcp",
               password: str | None = None) -> Probe:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{(user or 'anon').replace('/', '-')}",
                         protocol=mqtt.MQTTv5, transport=transport)
    probe = Probe(client)
    if ca:
        client.tls_set(ca_certs=ca, cert_reqs=ssl.CERT_REQUIRED)
    if user:
        client.username_pw_set(user, password if password is not None else USERS[user])

    def on_connect(c, userdata, flags, reason, props):
        probe.connack = reason
        probe.connected.set()

    def on_disconnect(c, userdata, flags, reason, props):
        probe.closed.set()

    def on_message(c, userdata, msg):
        with probe.got_message:
            probe.received.append(msg)
            probe.got_message.notify_all()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_connect_fail = lambda c, userdata: probe.closed.set()   # TLS handshake or socket failure
    client.on_message = on_message
    client.on_publish = lambda c, u, mid, reason, props: probe._ack(mid, [reason])
    client.on_subscribe = lambda c, u, mid, reasons, props: probe._ack(mid, list(reasons))
    client.connect_async("127.0.0.1", port, keepalive=10)
    client.loop_start()
    return probe


def connected(probe: Probe) -> Probe:
    assert probe.connected.wait(TIMEOUT), "no CONNACK"
    assert not probe.connack.is_failure, f"connect refused: {probe.connack}"
    return probe
