"""Station messages for a fleet, in the shapes ``agent.app.Agent`` and ``agent.pipeline`` build them, each checked
against the contract's schema (jsonschema, the reference engine) before it is returned.

``FleetStation`` is one station's message factory with an explicit clock (``ts``): the aggregation tests set
exact times and the browser tests and ``benchmarks/dashboard_browser.py`` feed a thousand stations with it.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from contract.messages import checker

LABELS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
LANES = {"T-shirt/top": "tops", "Shirt": "tops", "Pullover": "tops", "Coat": "outerwear", "Trouser": "bottoms",
         "Dress": "dresses", "Sandal": "shoes", "Sneaker": "shoes", "Ankle boot": "shoes", "Bag": "bags"}
REVIEW_LANE = "manual-review"


def checked(body: dict[str, Any]) -> dict[str, Any]:
    checker(body["schema"], "jsonschema").check(body["schema"], body, AssertionError)
    return body


@dataclass
class FleetStation:
    site: str
    station: str
    role: str = "receiving"
    model: dict[str, str] = field(default_factory=lambda: {"name": "fashion-mnist", "version": "1",
                                                           "backend": "onnxruntime-cpu", "precision": "fp32"})
    cameras: tuple[str, ...] = ("dock-a",)
    seq: int = 0
    classified: int = 0
    low: int = 0
    items: int = 0

    @property
    def key(self) -> str:
        return f"{self.site}/{self.station}"

    def topic(self, kind: str, root: str = "inventory") -> str:
        return f"{root}/{self.site}/{self.station}/{kind}"

    def _head(self, schema: str, ts: float) -> dict[str, Any]:
        self.seq += 1
        return {"schema": schema, "id": str(uuid.uuid4()), "seq": self.seq, "ts": round(ts, 6), "site": self.site,
                "station": self.station}

    def status(self, ts: float, state: str = "online", *, cameras: dict[str, bool] | None = None,
               update: dict[str, Any] | None = None, uptime_s: float = 60.0) -> dict[str, Any]:
        return checked({**self._head("status.v1", ts), "state": state, "role": self.role, "agent_version": "0.1.0",
                        "uptime_s": uptime_s if state == "online" else None, "model": dict(self.model),
                        "artifact_choice": None,
                        "cameras": cameras if cameras is not None else dict.fromkeys(self.cameras, True),
                        "last_model_update": update, "last_thresholds_update": None, "last_capture_empty": None})

    def refused_update(self, ts: float, version: str) -> dict[str, Any]:
        return {"ok": False, "ts": round(ts, 6), "running": {"name": self.model["name"],
                                                             "version": self.model["version"]},
                "reason": f"models/{self.model['name']}/{version}/manifest.json: sha256 does not match the command's"}

    def installed(self, ts: float, version: str) -> dict[str, Any]:
        self.model = {**self.model, "version": version}
        return {"ok": True, "reason": None, "ts": round(ts, 6),
                "running": {"name": self.model["name"], "version": version}}

    def stats(self, ts: float, *, frames: int = 0, low: int = 0, outbox_depth: int = 0,
              fps: float = 10.0) -> dict[str, Any]:
        """Cumulative counters as the agent's ``Metrics.snapshot``: ``frames``/``low`` more since the last stats."""
        self.classified += frames
        self.low += low
        latency = {stage: {"p50_ms": 2.0, "p95_ms": 4.0, "p99_ms": 6.0, "n": 100}
                   for stage in ("queue", "preprocess", "inference", "decide")}
        return checked({**self._head("stats.v1", ts), "fps": dict.fromkeys(self.cameras, fps),
                        "frames_captured": dict.fromkeys(self.cameras, float(self.classified)),
                        "frames_dropped": {}, "camera_reconnects": {}, "latency": latency,
                        "queue_depths": {f"camera:{c}": 0 for c in self.cameras},
                        "outbox": {"depth": outbox_depth, "bytes": 400 * outbox_depth, "dropped": {}},
                        "low_confidence_rate": round(self.low / self.classified, 4) if self.classified else 0.0,
                        "frames_classified": self.classified, "frames_low_confidence": self.low, "frames_empty": 0,
                        "inference_errors": 0, "frames_uploaded": 0, "empty_scenes_sent": 0,
                        "empty_scenes_given_up": 0, "model_version": self.model["version"]})

    def decision(self, ts: float, label: str, *, review: bool = False, lane: str | None = None) -> dict[str, Any]:
        self.items += 1
        class_id = LABELS.index(label) if label in LABELS else 0
        confidence = 0.41 if review else 0.93
        return checked({**self._head("decision.v1", ts), "camera": self.cameras[0], "item_seq": self.items,
                        "label": label, "class_id": class_id, "confidence": confidence, "agreement": 1.0,
                        "frames": 4, "first_seen": round(ts - 1.0, 6), "last_seen": round(ts - 0.2, 6),
                        "lane": lane or (REVIEW_LANE if review else LANES.get(label, "default")),
                        "low_confidence": review, "reasons": ["confidence 0.41 < 0.5"] if review else [],
                        "top_k": [{"label": label, "p": confidence}],
                        "model": dict(self.model)})

    def alert(self, ts: float, defect: str = "Bag") -> dict[str, Any]:
        return checked({**self._head("alert.v1", ts), "camera": self.cameras[0], "frame_seq": self.seq,
                        "captured_at": round(ts - 0.05, 6), "model": dict(self.model), "defect": defect,
                        "confidence": 0.8,
                        "evidence": {"top_k": [{"label": defect, "p": 0.8}],
                                     "frame_seq": self.seq, "source_ref": None, "thumbnail_jpeg_b64": ""}})

    def message(self, kind: str, body: dict[str, Any]) -> tuple[str, bytes]:
        """(topic, payload) as the broker delivers it."""
        return self.topic(kind), json.dumps(body).encode()
