"""A fleet of simulated stations that speaks the MQTT contract: ``python -m agent.sim.fleet``.

Each simulated station logs in as a real one does (client id ``agent-<site>-<station>``, user
``<site>/<station>`` with its own password, over TLS), so it passes through the central broker's
password file and ACL (deploy/central). It publishes what the agent publishes, built with the agent's own
code wherever that code is callable: probabilities go through ``classify_batch`` and the bundle's
``LowConfidencePolicy``, items through ``ItemTracker`` (consensus, ``LaneMap``, the review lane), QC
through ``QcAlerter``, uploads through ``UploadGate``, stats are ``Metrics.snapshot()``, and every
outbox kind is put on the wire by ``agent.mqtt.encode`` (frames: the JPEG as payload, the ``frame.v1``
metadata in the ``meta`` user property). Only the body dicts are assembled here (``StationSim``), because
the agent builds them inside ``InferenceStage`` and ``Agent``; tests check every kind against
``contract.messages.checker``.

What happens over a run: a retained ``online`` status with the last will ``offline``; results at
``results_per_s`` per station, 3-6 frames per item and a decision per item; stats every
``stats_interval_s`` (QoS 0, as the agent); now and then a low-confidence frame (a real Fashion-MNIST
test image as JPEG) and, on QC stations, an alert. After ``trouble_after_s`` the first ``offline``
stations drop their connection without a DISCONNECT (the broker publishes their will) and the next
``stale`` ones stop publishing but stay connected. A rollout moves ``rollout_share`` of the fleet from
``model_from`` to ``model_to`` over ``rollout_over_s`` (status with ``last_model_update``; one in ten
refuses it and keeps its model, as a station with a bad download does). With ``shipment_items`` set, every
receiving station is a dock: it opens a shipment of that many items (2-5 expected lines; about 5% of the items
arriving are a label not on it), its items are drawn from the shipment, decided with the shipment's prior
and tallied by the agent's ``ReceivingDesk``, a ``receipt.v1`` goes out as the agent sends it (one on opening,
after decided items at ``receipt_interval_s``, the final one on closing), and the next shipment opens when
the last item of one has arrived.

Cheap per station: ``loops`` threads, each multiplexing its share of paho clients on one selector (paho's
external-loop API), one TLS context for all; ``--part K --parts P`` splits a fleet over processes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import selectors
import signal
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import paho.mqtt.client as paho

from agent.config import ExpectCommand, PresenceConfig, QcConfig, ReceivingConfig, SortingConfig
from agent.decide import (
    ItemTracker,
    LaneMap,
    LowConfidencePolicy,
    Observation,
    PolicyThresholds,
    QcAlerter,
    UploadGate,
    classify_batch,
    dhash,
    softmax,
)
from agent.health import Metrics
from agent.mqtt import encode
from agent.outbox import Record
from agent.pipeline import encode_jpeg, thumbnail_b64, top_k_json
from agent.receiving import ReceivingDesk, receipt_body
from contract.broker import BrokerSettings, add_broker_args, settings_from_args
from contract.dataset import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR
from contract.messages import Topics, dumps_finite, station_root

log = logging.getLogger(__name__)

AGENT_VERSION = "0.1.0-sim"
THRESHOLDS = {"min_confidence": 0.5, "min_margin": 0.1, "max_entropy": 1.5}   # a trained bundle's suggestion
QOS = {"status": 1, "result": 1, "decision": 1, "alert": 1, "frame": 1, "stats": 0, "receipt": 1}
KIND_LEAF = {"status": "status", "result": "result", "decision": "decision", "alert": "alert", "frame": "frames",
             "stats": "stats", "receipt": "receipt"}


@dataclass(frozen=True)
class FleetConfig:
    sites: int = 5
    per_site: int = 40
    cameras: int = 1
    results_per_s: float = 1.0            # per station: classified frames published per second
    item_frames: tuple[int, int] = (3, 6)
    hard_items: float = 0.2               # share of items the model is unsure of (many go to review)
    stats_interval_s: float = 10.0
    frame_interval_s: float = 20.0        # UploadGate: at most one low-confidence frame per camera per this
    qc_every: int = 10                    # every n-th station is a QC station with a defect class
    defect_label: str = "Bag"
    alert_cooldown_s: float = 30.0
    offline: int = 0                      # stations that drop their connection (their will says offline)
    stale: int = 0                        # stations that stop publishing but stay connected
    trouble_after_s: float = 10.0
    rollout_share: float = 0.0
    rollout_over_s: float = 60.0
    model_name: str = "fashion-mnist"
    model_from: str = "1.0.0"
    model_to: str = "1.1.0"
    labels: tuple[str, ...] = FASHION_MNIST_CLASSES
    thresholds: dict[str, float] = field(default_factory=lambda: dict(THRESHOLDS))
    jpeg_side: int = 96
    shipment_items: int = 0               # receiving stations: items per shipment (0: no shipments)
    receipt_interval_s: float = 0.0       # decisions.receiving.receipt_interval_s (0: after every decided item)
    unexpected_share: float = 0.05        # items of a shipment whose label is not on it
    latency_of: tuple[str, ...] = ()     # stations ("site/station") whose result publish times are kept
    latency_keep: int = 20_000            # per such station: the newest this many (a long run stays bounded)
    loops: int = 2
    seed: int = 0
    part: int = 0
    parts: int = 1

    @property
    def stations(self) -> int:
        return self.sites * self.per_site


def station_names(cfg: FleetConfig) -> list[tuple[str, str]]:
    """Every (site, station) of the fleet, in index order: ``site-00``/``st-000``."""
    return [(f"site-{i // cfg.per_site:02d}", f"st-{i % cfg.per_site:03d}") for i in range(cfg.stations)]


def unknown_stations(cfg: FleetConfig, keys: tuple[str, ...]) -> list[str]:
    """The keys (``site/station``) that name no station of the fleet."""
    known = {f"{site}/{station}" for site, station in station_names(cfg)}
    return [key for key in keys if key not in known]


def troubled(cfg: FleetConfig) -> dict[str, str]:
    """Which stations go offline (by their will) or stale: ``{"site/station": "offline" | "stale"}``.

    The last station of each site in turn, so trouble is spread over the sites."""
    order = [(s, p) for p in range(cfg.per_site - 1, -1, -1) for s in range(cfg.sites)]
    picked = [f"site-{s:02d}/st-{p:03d}" for s, p in order[:cfg.offline + cfg.stale]]
    return {key: "offline" if i < cfg.offline else "stale" for i, key in enumerate(picked)}


# ---------------------------------------------------------------- credentials

def write_credentials(cfg: FleetConfig, folder: Path, extra: dict[str, str] | None = None,
                      mosquitto_passwd: str = "mosquitto_passwd") -> tuple[Path, Path]:
    """A random password per station: ``stations.credentials`` (``user:password`` lines, mode 0600, what the
    simulator reads) and ``passwd`` hashed by ``mosquitto_passwd -U`` (what the broker reads).
    ``extra``: more users (``central-ingest``, ``dashboard``) for the broker's file only."""
    folder.mkdir(parents=True, exist_ok=True)
    users = {f"{site}/{station}": uuid.uuid4().hex for site, station in station_names(cfg)}
    plain = folder / "stations.credentials"
    passwd = folder / "passwd"
    for path, rows in ((plain, users), (passwd, {**users, **(extra or {})})):
        path.write_text("".join(f"{user}:{password}\n" for user, password in rows.items()))
        os.chmod(path, 0o600)
    subprocess.run([mosquitto_passwd, "-U", str(passwd)], check=True, capture_output=True)
    return plain, passwd


def read_credentials(path: Path) -> dict[str, str]:
    users = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        user, sep, password = line.partition(":")
        if not sep or not password:
            raise ValueError(f"{path}: line {n}: expected user:password")
        users[user] = password
    return users


# ---------------------------------------------------------------- images

class ItemImages:
    """Fashion-MNIST test images by class, as the RGB crops a station's model would have seen."""

    def __init__(self, labels: tuple[str, ...], side: int, root: Path = FASHION_MNIST_DIR) -> None:
        from agent.sim.scenes import load_test_split

        images, classes = load_test_split(root)
        self.side = side
        self.by_class = [images[classes == (c % 10)][:200] for c in range(len(labels))]

    def image(self, class_id: int, rng: np.random.Generator) -> np.ndarray:
        pool = self.by_class[class_id]
        gray = cv2.resize(pool[rng.integers(len(pool))], (self.side, self.side), interpolation=cv2.INTER_LINEAR)
        return cv2.cvtColor(255 - gray, cv2.COLOR_GRAY2RGB)      # dark item on a light belt


# ---------------------------------------------------------------- one station's messages

@dataclass
class Item:
    class_id: int
    strength: float
    frames_left: int
    image: np.ndarray


class StationSim:
    """The messages of one station, in the agent's shapes; no network. ``messages`` are (kind, body, blob)."""

    def __init__(self, cfg: FleetConfig, site: str, station: str, index: int, images: ItemImages,
                 rng: np.random.Generator) -> None:
        self.cfg, self.site, self.station, self.rng, self.images = cfg, site, station, rng, images
        self.key = f"{site}/{station}"
        self.role = "qc" if cfg.qc_every and index % cfg.qc_every == cfg.qc_every - 1 else "receiving"
        self.cameras = [f"cam{i}" for i in range(cfg.cameras)]
        self.topics = Topics(station_root(site, station))
        self.started = time.monotonic()
        self.seq = 0
        self.version = cfg.model_from
        self.last_update: dict[str, Any] | None = None
        self.metrics = Metrics(window=256)
        self.metrics.info.update(model_name=cfg.model_name, model_version=self.version)
        self.policy = LowConfidencePolicy(PolicyThresholds.resolve(cfg.thresholds))
        lanes = LaneMap(SortingConfig(lanes={label: f"lane-{i % 4 + 1}" for i, label in enumerate(cfg.labels)}))
        presence = PresenceConfig(mode="background", min_frames=2)
        self.desk = (ReceivingDesk(ReceivingConfig(receipt_interval_s=cfg.receipt_interval_s), clock=time.time)
                     if self.role == "receiving" and cfg.shipment_items > 0 else None)
        self.shipments = 0                    # opened so far; the open one is desk.shipment
        self.arriving: list[int] = []         # the open shipment's items still to come (class ids)
        self.queued: list[tuple[str, dict[str, Any], bytes | None]] = []   # receipts of an opening and a closing
        prior = self.desk.prior if self.desk is not None else None
        self.trackers = {cam: ItemTracker(cam, cfg.labels, presence, lanes, self.policy, prior=prior)
                         for cam in self.cameras}
        defects = [cfg.defect_label] if self.role == "qc" else []
        self.qc = QcAlerter(QcConfig(defect_classes=defects, min_confidence=0.5, cooldown_s=cfg.alert_cooldown_s))
        self.uploads = UploadGate(cfg.frame_interval_s, dedupe_bits=6, window=16)
        self.items: dict[str, Item | None] = {cam: None for cam in self.cameras}
        self.frame_seq = dict.fromkeys(self.cameras, 0)
        self.inference_ms = float(rng.uniform(4.0, 12.0))

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    @property
    def identity(self) -> dict[str, str]:
        return {"name": self.cfg.model_name, "version": self.version, "backend": "onnxruntime-cpu",
                "precision": "fp32"}

    # ------------------------------------------------------------ status, stats, rollout

    def status_body(self, state: str) -> dict[str, Any]:
        """As ``Agent.status_body`` (agent/app.py), with the next sequence number as the publisher adds it."""
        online = state == "online"
        return {"schema": "status.v1", "id": str(uuid.uuid4()), "state": state, "ts": round(time.time(), 6),
                "site": self.site, "station": self.station, "role": self.role, "agent_version": AGENT_VERSION,
                "uptime_s": round(time.monotonic() - self.started, 3) if online else None,
                "model": self.identity, "artifact_choice": None, "cameras": dict.fromkeys(self.cameras, True),
                "last_model_update": self.last_update, "last_thresholds_update": None, "last_capture_empty": None,
                "seq": self.next_seq()}

    def stats_body(self, outbox_depth: int) -> dict[str, Any]:
        """As ``Agent.stats_body``: the station's ``Metrics.snapshot()``; the outbox is what awaits a PUBACK."""
        self.metrics.set("outbox_depth", outbox_depth)
        return {"schema": "stats.v1", "id": str(uuid.uuid4()), "seq": self.next_seq(), "ts": round(time.time(), 6),
                "site": self.site, "station": self.station, **self.metrics.snapshot()}

    def update_model(self, refuse: bool) -> None:
        """The outcome of a ``cmd/model`` as ``Agent.reload_model`` records it."""
        now = round(time.time(), 6)
        request = {"bundle": f"models/{self.cfg.model_name}/{self.cfg.model_to}", "sha256": None,
                   "version": self.cfg.model_to}      # the command it answers, as a station says (status.v1)
        if refuse:
            reason = (f"models/{self.cfg.model_name}/{self.cfg.model_to}/manifest.json: sha256 does not match "
                      "the command's")
            self.last_update = {"ok": False, "reason": reason, "ts": now, "request": request,
                                "running": {"name": self.cfg.model_name, "version": self.version}}
            return
        self.version = self.cfg.model_to
        self.metrics.info.update(model_version=self.version)
        self.last_update = {"ok": True, "reason": None, "ts": now, "request": request,
                            "running": {"name": self.cfg.model_name, "version": self.version}}

    # ------------------------------------------------------------ frames

    def next_logits(self, camera: str) -> np.ndarray:
        """The model's logits for the next frame of this camera's current item (a new item when none; an empty belt,
        logits of no item, while a dock's camera waits for the other cameras to finish the shipment's last items)."""
        item = self.items[camera]
        if item is None:
            lo, hi = self.cfg.item_frames
            class_id = self._next_arrival() if self.desk is not None else int(self.rng.integers(len(self.cfg.labels)))
            if class_id is None:
                return self.rng.normal(0.0, 1.0, len(self.cfg.labels))
            hard = self.rng.random() < self.cfg.hard_items
            strength = float(self.rng.uniform(0.5, 3.0) if hard else self.rng.uniform(4.0, 8.0))
            item = self.items[camera] = Item(class_id, strength, int(self.rng.integers(lo, hi + 1)),
                                             self.images.image(class_id, self.rng))
        logits = self.rng.normal(0.0, 1.0, len(self.cfg.labels))
        logits[item.class_id] += item.strength
        return logits

    # ------------------------------------------------------------ shipments (a receiving dock)

    def _next_arrival(self) -> int | None:
        """The class of the next item off the truck: the open shipment's next, or, when all of it has arrived and no
        camera has one of its items in view any more, the first of the next shipment (the open one is closed with
        its final receipt and the next opened). None while all of it has arrived but another camera still has one
        of its items in view: closing now would record that item's decision into the next shipment."""
        assert self.desk is not None
        if not self.arriving:
            if any(item is not None for item in self.items.values()):
                return None
            now = time.time()
            if self.desk.shipment is not None:
                self.queued.append(self._receipt(self.desk.close(self.desk.shipment.id).receipt(), now, final=True))
            self._open_shipment(now)
        return self.arriving.pop()

    def _open_shipment(self, now: float) -> None:
        """2-5 expected lines over ``shipment_items`` items; ``unexpected_share`` of the items that arrive are
        another label (a line may then come short); the order of arrival shuffled."""
        assert self.desk is not None
        cfg, rng = self.cfg, self.rng
        n = cfg.shipment_items
        picked = rng.choice(len(cfg.labels), size=min(int(rng.integers(2, 6)), len(cfg.labels), n), replace=False)
        counts = 1 + rng.multinomial(n - len(picked), np.full(len(picked), 1.0 / len(picked)))
        arriving = [int(c) for c, k in zip(picked, counts) for _ in range(int(k))]
        others = [c for c in range(len(cfg.labels)) if c not in set(picked.tolist())]
        for i in np.flatnonzero(rng.random(n) < cfg.unexpected_share) if others else []:
            arriving[i] = int(rng.choice(others))
        rng.shuffle(arriving)
        self.arriving = arriving
        self.shipments += 1
        lines = {cfg.labels[int(c)]: int(k) for c, k in zip(picked, counts)}
        shipment = self.desk.open(ExpectCommand(shipment=f"{self.station}-{self.shipments:05d}", lines=lines),
                                  cfg.labels)
        self.queued.append(self._receipt(shipment.receipt(), now, final=False))    # every line short

    def _receipt(self, receipt: dict[str, Any], now: float, final: bool) -> tuple[str, dict[str, Any], None]:
        return ("receipt", receipt_body(receipt, site=self.site, station=self.station, ts=now, final=final), None)

    # ------------------------------------------------------------ frames

    def frame_messages(self, camera: str, cls: Any) -> list[tuple[str, dict[str, Any], bytes | None]]:
        """One classified frame, as ``InferenceStage._item_frame`` and the item tracker make it (and a dock's
        receipts, as ``InferenceStage`` and ``Agent.expect`` send them). A camera with no item (a dock's camera
        waiting for the shipment's last items on the others) sends an empty frame: counted, not published, as the
        agent's ``_empty_frame`` with ``decisions.empty_frames: skip``."""
        item = self.items[camera]
        if item is None:
            self.frame_seq[camera] += 1
            self.metrics.inc("frames_captured_total", camera=camera)
            self.metrics.inc("frames_empty_total", camera=camera)
            self.trackers[camera].update(None, False)
            queued, self.queued = self.queued, []
            return queued
        now = time.time()
        self.frame_seq[camera] += 1
        seq = self.frame_seq[camera]
        common = {"ts": round(now, 6), "site": self.site, "station": self.station, "camera": camera,
                  "frame_seq": seq, "captured_at": round(now - 0.02, 6), "model": self.identity}
        self._count(camera)
        tracker = self.trackers[camera]
        tracker.update(Observation(seq, now, cls), True)        # first: the frame's upload names its item's track
        out: list[tuple[str, dict[str, Any], bytes | None]] = [("result", {
            "schema": "result.v1", **common, "label": cls.label, "class_id": cls.class_id,
            "confidence": round(cls.confidence, 6), "top_k": top_k_json(cls.top_k),
            "low_confidence": cls.low_confidence, "reasons": list(cls.reasons),
            "latency_ms": {"queue": 1.0, "preprocess": 2.5, "inference": round(self.inference_ms, 3)}}, None)]
        if cls.low_confidence:
            self.metrics.inc("frames_low_confidence_total", camera=camera)
            if self.uploads.admit(camera, lambda: dhash(item.image), time.monotonic()) is None:
                out.append(self._frame(common, cls, item.image, tracker.track))
        if self.qc.check(camera, cls, time.monotonic()):
            out.append(("alert", {"schema": "alert.v1", **common, "defect": cls.label,
                                  "confidence": round(cls.confidence, 6),
                                  "evidence": {"top_k": top_k_json(cls.top_k), "frame_seq": seq, "source_ref": None,
                                               "thumbnail_jpeg_b64": thumbnail_b64(item.image)}}, None))
        item.frames_left -= 1
        if item.frames_left <= 0:
            self.items[camera] = None
            decision = tracker.flush()
            if decision is not None:
                body = self._decision(decision)
                out.append(("decision", body, None))
                if self.desk is not None:
                    self.desk.record(decision, body["id"])
                    receipt = self.desk.due_receipt(now)
                    if receipt is not None:
                        out.append(self._receipt(receipt, now, final=False))
        queued, self.queued = self.queued, []
        return queued + out

    def _count(self, camera: str) -> None:
        m = self.metrics
        m.inc("frames_captured_total", camera=camera)
        m.inc("frames_classified_total", camera=camera)
        jitter = float(self.rng.gamma(4.0, 0.25))
        for stage, ms in (("queue", 1.0), ("preprocess", 2.5), ("inference", self.inference_ms), ("decide", 0.4)):
            m.observe(stage, ms * jitter / 1000.0)

    def _frame(self, common: dict[str, Any], cls: Any, image: np.ndarray,
               track: str | None) -> tuple[str, dict[str, Any], bytes]:
        jpeg = encode_jpeg(image, 85)
        self.metrics.inc("frames_uploaded_total", camera=common["camera"])
        body = {"schema": "frame.v1", **common, "label": cls.label, "confidence": round(cls.confidence, 6),
                "top_k": top_k_json(cls.top_k), "selected_because": list(cls.reasons), "source_ref": None,
                "jpeg": {"width": int(image.shape[1]), "height": int(image.shape[0]), "quality": 85,
                         "bytes": len(jpeg), "roi_crop": False, "item_crop": False}}
        if track is not None:
            body["track"] = track
        return ("frame", body, jpeg)

    def _decision(self, d: Any) -> dict[str, Any]:
        self.metrics.inc("items_decided_total", camera=d.camera_id)
        return {"schema": "decision.v1", "id": str(uuid.uuid4()),     # the id a receipt's refs name
                "ts": round(time.time(), 6), "site": self.site, "station": self.station, "camera": d.camera_id,
                "item_seq": d.item_seq, "label": d.label, "class_id": d.class_id, "confidence": d.confidence,
                "agreement": d.agreement, "frames": d.frames,
                "first_seen": round(d.first_seen, 6), "last_seen": round(d.last_seen, 6), "lane": d.lane,
                "low_confidence": d.low_confidence, "reasons": list(d.reasons), "top_k": top_k_json(d.top_k),
                "model": self.identity, **({"track": d.track} if d.track is not None else {})}

    def record(self, kind: str, body: dict[str, Any], blob: bytes | None) -> Record:
        """An outbox record, as ``Outbox.put_many`` makes it (id and seq first)."""
        body = {"id": str(uuid.uuid4()), "seq": self.next_seq(), **body}
        return Record(body["seq"], body["id"], kind, dumps_finite(body, separators=(",", ":")), blob, time.time(),
                      body.get("captured_at"))


def classify(stations: list[StationSim], logits: list[np.ndarray], labels: tuple[str, ...]) -> list[Any]:
    """One batch through the agent's softmax and ``classify_batch`` with each station's policy."""
    probs = softmax(np.stack(logits))
    return classify_batch(probs, labels, 3, [s.policy for s in stations])


# ---------------------------------------------------------------- the network side

@dataclass
class Tally:
    """What one station published: per kind, handed to paho (``sent``) and acknowledged (``acked``: PUBACK for
    QoS 1, written for QoS 0); ``wills``: last wills the broker was left to publish."""

    sent: Counter = field(default_factory=Counter)
    acked: Counter = field(default_factory=Counter)
    refused: Counter = field(default_factory=Counter)
    wills: int = 0


class SimClient:
    """One station's paho client (MQTT v5, as the agent) and what it published."""

    def __init__(self, sim: StationSim, password: str, settings: BrokerSettings, tls: ssl.SSLContext | None,
                 keep_result_times: int = 0) -> None:
        self.sim = sim
        self.settings = settings
        self.tally = Tally()
        self.inflight: dict[int, tuple[str, str, float]] = {}     # mid -> (kind, id, handed to paho at)
        # (result id, wall time it was published): the newest ``keep_result_times``, none unless the station's
        # latency is measured (--latency-of); one entry per result of every station grew ~0.5 GiB/h per 1,000
        self.result_times: deque[tuple[str, float]] = deque(maxlen=max(0, keep_result_times))
        self.connack: Any = None
        self.state = "new"                   # new, online, stale, dropped, gone
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"agent-{sim.site}-{sim.station}",
                             protocol=paho.MQTTv5, reconnect_on_failure=False)
        client.max_inflight_messages_set(64)
        client.max_queued_messages_set(0)
        if tls is not None:
            client.tls_set_context(tls)
            client.tls_insecure_set(settings.tls_insecure)
        client.username_pw_set(sim.key, password)
        self.will = sim.status_body("offline")
        client.will_set(sim.topics.status, dumps_finite(self.will), qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_publish = self._on_publish
        self.client = client

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connack = reason_code
        if reason_code.is_failure:
            log.error("fleet: %s refused: %s", self.sim.key, reason_code)
            return
        self.state = "online"
        client.subscribe(self.sim.topics.cmd(), qos=1)
        self.publish_status("online")

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        if mid not in self.inflight:      # QoS 0: written before publish() returned; counted there
            return
        kind, _id, handed = self.inflight.pop(mid)
        if reason_code is not None and reason_code.is_failure:
            self.tally.refused[kind] += 1
            log.error("fleet: %s: broker refused a %s: %s", self.sim.key, kind, reason_code)
            return
        self.tally.acked[kind] += 1
        if QOS.get(kind) == 1:
            self.sim.metrics.observe("publish", max(0.0, time.time() - handed))

    def _send(self, kind: str, message_id: str, payload: bytes | str, props: Any = None, retain: bool = False) -> None:
        info = self.client.publish(f"{self.sim.topics.root}/{KIND_LEAF[kind]}", payload, qos=QOS[kind], retain=retain,
                                   properties=props)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            self.tally.refused[kind] += 1
            return
        self.tally.sent[kind] += 1
        if QOS[kind] == 0:
            self.tally.acked[kind] += 1
        else:
            self.inflight[info.mid] = (kind, message_id, time.time())

    def publish_status(self, state: str) -> None:
        body = self.sim.status_body(state)
        self._send("status", body["id"], dumps_finite(body), retain=True)

    def publish_stats(self) -> None:
        body = self.sim.stats_body(len(self.inflight))
        self._send("stats", body["id"], dumps_finite(body))

    def publish(self, kind: str, body: dict[str, Any], blob: bytes | None) -> None:
        record = self.sim.record(kind, body, blob)
        payload, props = encode(record, True)
        self._send(kind, record.id, payload, props)
        if kind == "result" and self.result_times.maxlen:
            self.result_times.append((record.id, time.time()))

    def drop(self) -> None:
        """Lose the connection without a DISCONNECT: the broker publishes the last will (offline)."""
        sock = self.client.socket()
        if sock is not None:
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        self.tally.wills += 1
        self.state = "dropped"


@dataclass
class Schedule:
    next_frame: float
    next_stats: float
    camera: int = 0
    trouble: str | None = None          # "offline" or "stale", at trouble_at
    trouble_at: float = 0.0
    rollout_at: float | None = None
    refuse_rollout: bool = False


class FleetLoop(threading.Thread):
    """Many station clients on one selector: reads, writes, keepalives and the stations' own clocks."""

    def __init__(self, name: str, clients: list[SimClient], schedules: list[Schedule], cfg: FleetConfig) -> None:
        super().__init__(name=name, daemon=True)
        self.clients, self.schedules, self.cfg = clients, schedules, cfg
        self.sel = selectors.DefaultSelector()
        self.producing = threading.Event()
        self.stopping = threading.Event()
        self.connected = threading.Event()
        self.done = threading.Event()
        self.goodbye = True
        self.errors: list[str] = []

    def run(self) -> None:
        try:
            self._connect_all()
            self.connected.set()
            next_misc = 0.0
            while not self.stopping.is_set():
                now = time.monotonic()
                if self.producing.is_set():
                    self._produce(now)
                self._service(0.02)
                if now >= next_misc:
                    for c in self._alive():
                        c.client.loop_misc()
                    next_misc = now + 1.0
            self._finish()
        except Exception as exc:   # noqa: BLE001 - reported, never a silent thread death
            log.exception("fleet: loop %s failed", self.name)
            self.errors.append(f"{self.name}: {type(exc).__name__}: {exc}")
        finally:
            self.connected.set()
            self.done.set()

    def _alive(self) -> list[SimClient]:
        return [c for c in self.clients if c.state in ("new", "online", "stale")]

    def _connect_all(self, timeout: float = 60.0) -> None:
        for c in self.clients:
            c.client.connect(c.settings.host, c.settings.port, c.settings.keepalive_s)
            self.sel.register(c.client.socket(), selectors.EVENT_READ, c)
            self._service(0)
        deadline = time.monotonic() + timeout
        while any(c.connack is None for c in self.clients) and time.monotonic() < deadline:
            self._service(0.05)
        for c in self.clients:
            if c.connack is None or c.connack.is_failure:
                self.errors.append(f"{c.sim.key}: {'no CONNACK' if c.connack is None else c.connack}")

    def _service(self, timeout: float) -> None:
        for key, _mask in self.sel.select(timeout):
            c = key.data
            if c.state in ("dropped", "gone"):
                continue
            c.client.loop_read()
            sock = c.client.socket()
            while sock is not None and hasattr(sock, "pending") and sock.pending():   # TLS: bytes already decrypted
                c.client.loop_read()
                sock = c.client.socket()
        for c in self.clients:
            if c.state in ("online", "stale") and c.client.want_write():
                c.client.loop_write()

    def _produce(self, now: float) -> None:
        due: list[tuple[SimClient, str]] = []
        interval = 1.0 / self.cfg.results_per_s if self.cfg.results_per_s > 0 else float("inf")
        for c, s in zip(self.clients, self.schedules):
            if c.state != "online":
                continue
            if s.trouble and now >= s.trouble_at:
                if s.trouble == "offline":
                    self.sel.unregister(c.client.socket())
                    c.drop()
                else:
                    c.state = "stale"
                continue
            if s.rollout_at is not None and now >= s.rollout_at:
                s.rollout_at = None
                c.sim.update_model(s.refuse_rollout)
                c.publish_status("online")
            if now >= s.next_stats:
                s.next_stats += self.cfg.stats_interval_s
                c.publish_stats()
            if now >= s.next_frame:
                s.next_frame = max(s.next_frame + interval, now - 1.0)
                due.append((c, c.sim.cameras[s.camera]))
                s.camera = (s.camera + 1) % len(c.sim.cameras)
        if not due:
            return
        sims = [c.sim for c, _ in due]
        for (c, camera), cls in zip(due, classify(sims, [c.sim.next_logits(cam) for c, cam in due], self.cfg.labels)):
            for kind, body, blob in c.sim.frame_messages(camera, cls):
                c.publish(kind, body, blob)

    def _finish(self, drain_s: float = 30.0) -> None:
        """Wait for every PUBACK; then each connected station leaves as an agent does: (goodbye) it says offline
        and disconnects, as on SIGTERM; else its connection is lost without a DISCONNECT, as when it crashes or
        loses power, and the broker publishes its last will. A clean DISCONNECT without the offline status (what
        no agent does) discarded the will and left the station's retained status "online" for good."""
        self._drain(drain_s)
        if self.goodbye:
            for c in self._alive():
                if c.state in ("online", "stale"):
                    c.publish_status("offline")
            self._drain(drain_s)
        for c in self._alive():
            if not self.goodbye and c.state in ("online", "stale"):
                self.sel.unregister(c.client.socket())
                c.drop()
                continue
            c.client.disconnect()
            c.client.loop_write()
            c.state = "gone"

    def _drain(self, drain_s: float) -> None:
        deadline = time.monotonic() + drain_s
        while any(c.inflight for c in self._alive()) and time.monotonic() < deadline:
            self._service(0.02)


class Fleet:
    """The simulated stations of one process (``cfg.part`` of ``cfg.parts``), spread over ``cfg.loops`` threads."""

    def __init__(self, cfg: FleetConfig, settings: BrokerSettings, passwords: dict[str, str],
                 images: ItemImages | None = None) -> None:
        self.cfg = cfg
        unknown = unknown_stations(cfg, cfg.latency_of)
        if unknown:
            raise ValueError(f"latency_of: no such station in this fleet: {', '.join(unknown)}")
        images = images or ItemImages(cfg.labels, cfg.jpeg_side)
        tls = ssl.create_default_context(cafile=str(settings.tls_ca) if settings.tls_ca else None) \
            if settings.use_tls else None     # one context for all: a context per client costs memory and CA loads
        trouble = troubled(cfg)
        names = station_names(cfg)
        in_rollout = [i for i in range(cfg.stations) if (i * 7919) % 100 < cfg.rollout_share * 100]
        start = time.monotonic()
        self.clients: list[SimClient] = []
        schedules: list[Schedule] = []
        for i, (site, station) in enumerate(names):
            if i % cfg.parts != cfg.part:
                continue
            rng = np.random.default_rng([cfg.seed, i])
            sim = StationSim(cfg, site, station, i, images, rng)
            if sim.key not in passwords:
                raise KeyError(f"no password for station {sim.key} in the credentials")
            keep = cfg.latency_keep if sim.key in cfg.latency_of else 0
            self.clients.append(SimClient(sim, passwords[sim.key], settings, tls, keep_result_times=keep))
            sched = Schedule(next_frame=start + float(rng.uniform(0, 1.0 / max(cfg.results_per_s, 1e-3))),
                             next_stats=start + float(rng.uniform(0, cfg.stats_interval_s)),
                             trouble=trouble.get(sim.key), trouble_at=start + cfg.trouble_after_s)
            if i in in_rollout:
                k = in_rollout.index(i)
                sched.rollout_at = start + cfg.rollout_over_s * (k + 1) / len(in_rollout)
                sched.refuse_rollout = k % 10 == 9
            schedules.append(sched)
        n = max(1, min(cfg.loops, len(self.clients)))
        self.loops = [FleetLoop(f"fleet-{j}", self.clients[j::n], schedules[j::n], cfg) for j in range(n)]

    def start(self, timeout: float = 120.0) -> None:
        """Connect every station (each publishes its online status), then start publishing."""
        for loop in self.loops:
            loop.start()
        for loop in self.loops:
            loop.connected.wait(timeout)
        errors = [e for loop in self.loops for e in loop.errors]
        if errors:
            self.stop()
            raise RuntimeError(f"{len(errors)} stations could not connect: {'; '.join(errors[:5])}")
        for loop in self.loops:
            loop.producing.set()

    def stop(self, goodbye: bool = True, timeout: float = 120.0) -> None:
        for loop in self.loops:
            loop.goodbye = goodbye
            loop.stopping.set()
        for loop in self.loops:
            loop.done.wait(timeout)

    def report(self) -> dict[str, Any]:
        """Totals per kind, per station what each published (for a subscriber's loss check), result times (of the
        ``latency_of`` stations only)."""
        sent, acked, refused = Counter(), Counter(), Counter()
        stations = {}
        for c in self.clients:
            t = c.tally
            sent.update(t.sent)
            acked.update(t.acked)
            refused.update(t.refused)
            stations[c.sim.key] = {"acked": dict(t.acked), "wills": t.wills, "state": c.state,
                                   "model_version": c.sim.version, "shipments": c.sim.shipments}
        return {"stations": len(self.clients), "sent": dict(sent), "acked": dict(acked), "refused": dict(refused),
                "wills": sum(c.tally.wills for c in self.clients),
                "shipments": sum(c.sim.shipments for c in self.clients),
                "docks": sum(c.sim.desk is not None for c in self.clients),
                "docks_open": sum(c.sim.desk is not None and c.sim.desk.shipment is not None for c in self.clients),
                "errors": [e for loop in self.loops for e in loop.errors], "per_station": stations,
                "result_times": [rt for c in self.clients for rt in c.result_times]}


# ---------------------------------------------------------------- command line

def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m agent.sim.fleet",
                                     description="simulated stations that publish what real ones do")
    sub = parser.add_subparsers(dest="command", required=True)
    cred = sub.add_parser("credentials", help="a password per station: the simulator's file and the broker's passwd")
    _fleet_args(cred)
    cred.add_argument("--out", required=True, type=Path, help="folder for stations.credentials and passwd")
    cred.add_argument("--user", action="append", default=[], metavar="NAME:PASSWORD",
                      help="another broker user (central-ingest, dashboard); repeatable")
    run = sub.add_parser("run", help="connect the fleet and publish for --duration seconds")
    _fleet_args(run)
    run.add_argument("--credentials", required=True, type=Path, help="user:password lines (from 'credentials')")
    run.add_argument("--duration", type=float, default=60.0, help="seconds of publishing (default 60)")
    run.add_argument("--results-per-s", type=float, default=1.0, help="results per station per second (default 1)")
    run.add_argument("--stats-interval", type=float, default=10.0, help="seconds between stats (default 10)")
    run.add_argument("--frame-interval", type=float, default=20.0,
                     help="a camera uploads at most one low-confidence frame per this many seconds (default 20)")
    run.add_argument("--offline", type=int, default=0, help="stations that drop off (their will says offline)")
    run.add_argument("--stale", type=int, default=0, help="stations that stop publishing but stay connected")
    run.add_argument("--trouble-after", type=float, default=10.0, help="when those do it, seconds (default 10)")
    run.add_argument("--rollout-share", type=float, default=0.25, help="share of stations moved to the new model")
    run.add_argument("--rollout-over", type=float, default=None, help="seconds the rollout takes (default: --duration)")
    run.add_argument("--bundle", type=Path, default=None, help="take labels, name and thresholds from this bundle")
    run.add_argument("--shipment-items", type=int, default=0,
                     help="receiving stations are docks: items per shipment (default 0: no shipments)")
    run.add_argument("--receipt-interval", type=float, default=0.0,
                     help="a dock's receipts: at most one per this many seconds (default 0: after every item)")
    run.add_argument("--latency-of", action="append", default=[], metavar="SITE/STATION",
                     help="keep the publish time of this station's results for a latency measurement (the report's "
                          "result_times; the newest 20,000 per station); repeatable; default: none")
    run.add_argument("--loops", type=int, default=2, help="threads, each with its share of stations (default 2)")
    run.add_argument("--part", type=int, default=0, help="this process runs stations i with i %% parts == part")
    run.add_argument("--parts", type=int, default=1)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--no-goodbye", action="store_true",
                     help="at the end, leave as crashed stations do: no offline status, the connection lost without "
                          "a DISCONNECT, so the broker publishes each station's last will (offline)")
    run.add_argument("--report", type=Path, default=None, help="write what was published here (JSON)")
    add_broker_args(run)
    return parser


def _fleet_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sites", type=int, default=5, help="sites (default 5)")
    p.add_argument("--per-site", type=int, default=40, help="stations per site (default 40)")


def config_from_args(args: argparse.Namespace) -> FleetConfig:
    extra: dict[str, Any] = {}
    if getattr(args, "bundle", None) is not None:
        from contract.bundle import load_bundle

        bundle = load_bundle(args.bundle, verify_files=False)
        extra = {"labels": tuple(bundle.labels), "model_name": bundle.name, "model_from": bundle.version,
                 "thresholds": dict(bundle.thresholds) or dict(THRESHOLDS),
                 "defect_label": bundle.labels[min(8, len(bundle.labels) - 1)]}
    if not hasattr(args, "duration"):
        return FleetConfig(sites=args.sites, per_site=args.per_site, **extra)
    return FleetConfig(sites=args.sites, per_site=args.per_site, results_per_s=args.results_per_s,
                       stats_interval_s=args.stats_interval, frame_interval_s=args.frame_interval,
                       offline=args.offline, stale=args.stale, trouble_after_s=args.trouble_after,
                       rollout_share=args.rollout_share, rollout_over_s=args.rollout_over or args.duration,
                       loops=args.loops, seed=args.seed, part=args.part, parts=args.parts,
                       shipment_items=args.shipment_items, receipt_interval_s=args.receipt_interval,
                       latency_of=tuple(dict.fromkeys(args.latency_of)), **extra)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    settings = settings_from_args(args).check()
    fleet = Fleet(cfg, settings, read_credentials(args.credentials))
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    began = time.monotonic()
    fleet.start()
    connected_s = time.monotonic() - began
    print(f"fleet: {len(fleet.clients)} stations connected to {settings.where()} in {connected_s:.1f} s", flush=True)
    done.wait(args.duration)
    fleet.stop(goodbye=not args.no_goodbye)
    report = {"config": {k: v for k, v in asdict(cfg).items() if k != "labels"}, "connect_s": round(connected_s, 3),
              **fleet.report()}
    if args.report is not None:
        args.report.write_text(json.dumps(report))
    print(f"fleet: sent {report['sent']}, acknowledged {report['acked']}, refused {report['refused']}, "
          f"wills {report['wills']}", flush=True)
    return 1 if report["errors"] or report["refused"] else 0


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    unknown = unknown_stations(FleetConfig(sites=args.sites, per_site=args.per_site),
                               tuple(getattr(args, "latency_of", ())))
    if unknown:
        parser.error(f"--latency-of: no such station in this fleet: {', '.join(unknown)}")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "credentials":
        extra = dict(u.split(":", 1) for u in args.user)
        plain, passwd = write_credentials(config_from_args(args), args.out, extra)
        print(f"{plain} (for the simulator), {passwd} (for mosquitto's password_file)")
        return 0
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
