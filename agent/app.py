"""The one place that wires concrete adapters: cameras, model, outbox, MQTT, health.

``Agent`` is what ``python -m agent run`` starts and what tests start in-process.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import re
import signal
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urljoin

import cv2
from pydantic import ValidationError

from agent.backends import BackendError, create_backend, outputs_of
from agent.config import (
    AgentConfig,
    CameraConfig,
    CaptureEmptyCommand,
    ConfigError,
    ExpectCommand,
    Thresholds,
    ThresholdsCommand,
    format_errors,
    role_warnings,
)
from agent.health import Metrics, PrometheusServer
from agent.mqtt import MqttPublisher
from agent.outbox import Message, Outbox, OutboxError
from agent.pipeline import InferenceStage, ModelHolder, ModelRuntime
from agent.prepare import camera_preparer, load_empty_scene
from agent.receiving import AlreadyClosed, ClosedShipment, ReceiptSaveError, Shipment, ShipmentError, receipt_body
from agent.sources import SourceError, check_finite_source
from agent.sources.base import FrameSource
from agent.sources.camera import CameraWorker, FrameHub, Watchdog
from agent.state import STATE_FILE, StationState
from agent.update import COMMAND_MAX_BYTES as MODEL_COMMAND_MAX_BYTES
from agent.update import FETCH_DEADLINE_S, ModelCommand, fetch_verified, prune_installed
from contract.bundle import (
    MANIFEST,
    NAME_PATTERN,
    Bundle,
    BundleError,
    check_embedding,
    check_outputs,
    load_bundle,
    load_public_key,
    sample_input,
)
from contract.messages import loads_finite
from contract.preprocess import Preprocessor

log = logging.getLogger(__name__)

AGENT_VERSION = "0.1.0"
COMMAND_QUEUE = 16              # commands waiting for the command thread; more are refused (and say so)
MODEL_UPDATE_QUEUE = COMMAND_QUEUE  # cmd/model waiting behind the one being installed; more are refused (and say so)
REASON_MAX_CHARS = 2000         # a refusal's reason in the status (status.v1 allows 16384); longer ones are cut
ECHO_MAX_CHARS = 64             # a value from the payload (a camera id) quoted in a reason
MODEL_BUNDLE_MAX_CHARS = 2048   # cmd/model's bundle, echoed in last_model_update.request (cmd-model.v1, status.v1)
SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
COMMAND_JOIN_S = 5.0            # at shutdown: how long the command threads get to finish what they are doing
COMMAND_MAX_BYTES = 64 * 1024   # cmd/thresholds and cmd/capture-empty: a few fields
# cmd/expect: the largest command the schema allows (contract/schemas/mqtt/cmd-expect.v1.json), as a sender writes
# it: 1,000 lines, each a label of up to 256 characters (12 bytes each at most: a character outside the BMP written
# as an escaped surrogate pair, "\ud83d\ude00"; 4 in raw UTF-8) in quotes, ": ", a count of up to 7 digits and
# ", " -> 1,000 * (2 + 256 * 12 + 2 + 7 + 2) = 3,085,000 bytes; plus the shipment id (64 characters), the keys and
# braces (under 200 bytes) and room for whitespace: 3 MiB (3,145,728), under the broker's 4 MiB message_size_limit
# (deploy/central/mosquitto/mosquitto.conf). The same command with ASCII labels is about 270 kB.
EXPECT_MAX_LINE_BYTES = 2 + 256 * 12 + 2 + 7 + 2
COMMAND_LIMITS = {"expect": 3 * 1024 * 1024}     # per verb where COMMAND_MAX_BYTES is too small
LAST_RESULT = {"model": "last_update", "thresholds": "last_thresholds", "capture-empty": "last_capture_empty",
               "expect": "last_expect"}
RESULT_FIELD = {"thresholds": "applied", "capture-empty": "requested", "expect": "shipment"}  # the refused result's


class StateSaveError(ReceiptSaveError):
    """station-state.json could not be saved before a receipt: that receipt is not stored
    (``Agent._save_for_receipt``)."""


class StartupError(Exception):
    """The agent cannot start; the message names the config field and the problem, on one line (``run`` adds the
    config file)."""


def startup_error(field: str, exc: BaseException) -> StartupError:
    """``exc`` as a StartupError that starts ``field X:``: ``field`` itself, or the field under ``field``'s
    section that the text already begins with (``mqtt.password_file: ...``); on one line (an ONNX Runtime or
    OpenSSL message may run over several)."""
    text = " ".join(str(exc).split())
    section = field.split(".")[0].split("[")[0]
    if text.startswith("field ") or any(f"field {key}{c}" in text for key in AgentConfig.model_fields for c in ".["):
        return StartupError(text)      # names its config field already (a label the bundle lacks: check_labels)
    if text.startswith((f"{section}.", f"{section}[")):
        return StartupError(f"field {text}")
    return StartupError(f"field {field}: {text}")


def check_labels(cfg: AgentConfig, bundle: Bundle) -> None:
    """Labels the config refers to must exist in the bundle, else decisions would silently never fire."""
    check_config_labels(cfg, bundle.labels, str(bundle.root))


def check_config_labels(cfg: AgentConfig, bundle_labels: Any, where: str) -> None:
    """``check_labels`` on a bundle's labels before it is loaded (a manifest just fetched, ``where`` its URL or
    file): a bundle that cannot serve the config's decisions is refused before any artifact is fetched or any
    engine built. ConfigError names ``where`` and each field whose label is missing."""
    labels = set(bundle_labels) if isinstance(bundle_labels, (list, tuple)) else set()
    refs = [(f"decisions.sorting.lanes.{k}", k) for k in cfg.decisions.sorting.lanes]
    refs += [(f"decisions.qc.defect_classes[{i}]", k) for i, k in enumerate(cfg.decisions.qc.defect_classes)]
    if cfg.decisions.presence.empty_class:
        refs.append(("decisions.presence.empty_class", cfg.decisions.presence.empty_class))
    missing = [f"field {where}: label {label!r} is not in the bundle" for where, label in refs if label not in labels]
    if missing:
        raise ConfigError(f"{where}: config and bundle disagree: " + "; ".join(missing))


ENV_ENGINE = "INVENTORY_AGENT_ENGINE"                    # set by agent.startup: engine for this device
ENV_ENGINE_PRECISION = "INVENTORY_AGENT_ENGINE_PRECISION"
ENV_ENGINE_CACHE_DIR = "INVENTORY_AGENT_ENGINE_CACHE"      # set by agent.startup: where cmd/model builds engines
ENV_ENGINE_REQUEST = "INVENTORY_AGENT_ENGINE_REQUEST"      # the precision asked for (auto|fp16|int8)


@dataclass(frozen=True)
class DeviceEngine:
    """A TensorRT engine built for this device outside the bundle; only used with the bundle it was built for."""

    path: Path
    precision: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> "DeviceEngine | None":
        path = environ.get(ENV_ENGINE)
        return cls(Path(path), environ.get(ENV_ENGINE_PRECISION)) if path else None


@dataclass(frozen=True)
class EngineCachePolicy:
    """Where and how bundles that arrive by cmd/model get their device engine (the start-up's cache)."""

    cache_dir: Path
    precision: str = "auto"

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> "EngineCachePolicy | None":
        path = environ.get(ENV_ENGINE_CACHE_DIR)
        return cls(Path(path), environ.get(ENV_ENGINE_REQUEST) or "auto") if path else None

    def engine_for(self, cfg: AgentConfig, bundle: Bundle, *, tensorrt_present: bool | None = None,
                   device: Any = None, builder: Any = None) -> DeviceEngine | None:
        """The cached or freshly built engine for ``bundle``; None where TensorRT is absent or not wanted.

        With ``backend: auto`` a failed build means ONNX Runtime (logged); with ``backend: tensorrt`` it
        rejects the update (BackendError), as it would stop a start. Runs off the hot path: the old model
        keeps classifying while an engine builds (minutes on a Jetson).
        """
        from agent.backends import tensorrt_available
        from agent.engine_cache import ensure_engine, probe_device

        present = tensorrt_available() if tensorrt_present is None else tensorrt_present
        if cfg.model.backend == "onnxruntime" or not (present or cfg.model.backend == "tensorrt"):
            return None
        try:
            result = ensure_engine(bundle, self.cache_dir, self.precision, max_batch=cfg.model.batch_size,
                                   device=device or probe_device(), builder=builder)
        except Exception as exc:    # EngineCacheError, and the builder's or the disk's own (CUDA, ENOSPC)
            if cfg.model.backend == "tensorrt":
                raise BackendError(f"model.backend tensorrt: {exc}") from exc
            log.warning("no TensorRT engine for %s %s (%s); it will run on ONNX Runtime",
                        bundle.name, bundle.version, exc)
            return None
        log.info("engine for %s %s: %s (%s)", bundle.name, bundle.version, result.path, result.source)
        return DeviceEngine(result.path, result.key.precision)


def build_runtime(cfg: AgentConfig, bundle: Bundle, engine: DeviceEngine | None = None) -> ModelRuntime:
    """Backend for the bundle, warmed up (so the first real frame is not the slow one) and checked for what
    it must do: one finite output per label on an image-like sample, else the bundle is refused."""
    check_labels(cfg, bundle)
    backend = create_backend(bundle, cfg.model, engine.path if engine else None, engine.precision if engine else None)
    backend.warmup(cfg.model.batch_size, cfg.model.warmup_runs)
    check_backend(bundle, backend, cfg.model.batch_size)
    return ModelRuntime(bundle, backend, Preprocessor(bundle.input_spec))


def check_backend(bundle: Bundle, backend: Any, batch: int) -> None:
    """The backend on the bundle's sample batch: ``batch`` rows of finite logits, one per trained label, and with
    ``open_set`` one finite embedding of the statistics' size per image (BundleError)."""
    try:
        outputs, embedding = outputs_of(backend, sample_input(bundle.input_spec, batch))
    except BackendError:
        raise
    except Exception as exc:  # a runtime's own exception types
        raise BackendError(f"{bundle.root}: {backend.name} cannot run bundle {bundle.name} {bundle.version} "
                           f"on a sample batch ({exc})") from exc
    check_outputs(bundle, f"{backend.name} ({backend.precision})", outputs, batch)
    if bundle.embedding_name is not None:
        check_embedding(bundle, f"{backend.name} ({backend.precision})", embedding, batch)


def _choice_json(runtime: ModelRuntime | None) -> dict[str, Any] | None:
    """How the running ONNX artifact was chosen (both timings), for the status; None for TensorRT."""
    choice = getattr(runtime.backend, "choice", None) if runtime else None
    return choice.as_json() if choice is not None else None


class Agent:
    def __init__(self, cfg: AgentConfig, *,
                 source_factory: Callable[[CameraConfig], FrameSource] | None = None,
                 engine: DeviceEngine | None = None, engine_cache: EngineCachePolicy | None = None,
                 exit_at_end: bool = False) -> None:
        self.cfg = cfg
        self.exit_at_end = exit_at_end      # a file or folder camera that can no longer be opened ends, not retries
        self.engine = engine
        self.engine_cache = engine_cache
        self.source_factory = source_factory
        self.metrics = Metrics(cfg.health.latency_window)
        self.stop_event = threading.Event()
        self.started_at = time.monotonic()
        self.last_update: dict[str, Any] | None = None
        self.last_thresholds: dict[str, Any] | None = None
        self.last_capture_empty: dict[str, Any] | None = None
        self.last_expect: dict[str, Any] | None = None
        self._shipment_lock = threading.Lock()      # the desk read and the state written as one step
        self.fetch_deadline_s = FETCH_DEADLINE_S        # a bundle download's whole time (agent/update.py)
        self._previous_root: Path | None = None         # the bundle run before the running one (kept installed)
        self.state: StationState | None = None
        self.public_key = None
        self.model: ModelHolder | None = None
        self.outbox: Outbox | None = None
        self.publisher: MqttPublisher | None = None
        self.inference: InferenceStage | None = None
        self.workers: list[CameraWorker] = []
        self.prometheus: PrometheusServer | None = None
        self._commands: queue.Queue[tuple[str, bytes]] = queue.Queue(maxsize=COMMAND_QUEUE)
        self._model_updates: queue.Queue[tuple[str, bytes]] = queue.Queue(maxsize=MODEL_UPDATE_QUEUE)
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------ start

    def load_model(self) -> None:
        """The model cmd/model last installed (station-state.json), else the configured bundle. StartupError
        names the field: model.public_key, model.bundle, or the decisions' field whose label it lacks."""
        if self.cfg.model.public_key is not None:
            try:
                self.public_key = load_public_key(self.cfg.model.public_key)
            except BundleError as exc:
                raise startup_error("model.public_key", exc) from exc
        self.state = StationState.load(Path(self.cfg.outbox.path).parent / STATE_FILE, Path(self.cfg.model.bundle))
        runtime = self._restore_model() if self.state.model else None
        if runtime is None:
            try:
                bundle = load_bundle(self.cfg.model.bundle, self.public_key)
                # The device engine belongs to the configured bundle; others get theirs from the engine cache.
                runtime = build_runtime(self.cfg, bundle, self.engine)
            except (BundleError, BackendError, ConfigError) as exc:
                raise startup_error("model.bundle", exc) from exc
        self.model = ModelHolder(runtime)
        self._count_engine_load_failures()
        bundle = runtime.bundle
        log.info("model %s %s ready on %s", bundle.name, bundle.version, self.model.current.backend.name)

    def _count_engine_load_failures(self) -> None:
        """``agent_engine_cache_load_failures``: the engines TensorRT rejected and the cache removed, over the
        cache's life (``agent.engine_cache.load_failures``); read after each engine lookup (the start-up's, a
        restored model's, cmd/model's). Not set without an engine cache."""
        if self.engine_cache is None:
            return
        from agent.engine_cache import load_failures

        self.metrics.set("engine_cache_load_failures", load_failures(self.engine_cache.cache_dir))

    def _restore_model(self) -> ModelRuntime | None:
        assert self.state is not None and self.state.model is not None
        where, version = self.state.model.get("bundle"), self.state.model.get("version")
        try:
            bundle = load_bundle(str(where), self.public_key)
            if bundle.version != version:
                raise BundleError(f"{where}: field version: {bundle.version!r}, installed as {version!r}")
            pinned = self.state.model.get("sha256")
            if pinned and bundle.manifest_sha256 != pinned:     # its folder was replaced since it was installed
                raise BundleError(f"{where}: manifest sha256 {bundle.manifest_sha256}, installed as {pinned}")
            check_labels(self.cfg, bundle)      # before the engine cache: no engine built for a bundle refused anyway
            engine = self.engine_cache.engine_for(self.cfg, bundle) if self.engine_cache is not None else None
            runtime = build_runtime(self.cfg, bundle, engine)
        except Exception as exc:   # whatever is wrong with it, the configured bundle runs instead
            log.error("the model installed by cmd/model (%s %s) cannot run: %s; running the configured bundle %s",
                      version, where, exc, self.cfg.model.bundle)
            self.state.model = None
            try:
                self.state.save()
            except OSError as save_exc:     # a full disk: the configured bundle runs all the same
                log.error("%s: cannot record that the configured bundle runs (%s); the next start tries %s again",
                          self.state.path, save_exc.strerror or save_exc, where)
            return None
        log.info("running %s %s, installed by cmd/model before the restart (%s)", bundle.name, bundle.version,
                 self.state.path)
        return runtime

    def start(self) -> None:
        """Model first (a bad bundle stops here, before any camera opens), then the threads. Every StartupError
        names the config field it comes from. A start that fails, whatever the error, first stops what it had
        started (``_stop_started``), so the caller gets the error with nothing left running."""
        try:
            self._start()
        except BaseException:
            self._stop_started()
            raise

    def _start(self) -> None:
        for text in role_warnings(self.cfg):
            log.warning("config: %s", text)
        try:
            self.cfg.mqtt.check()             # a missing secret or TLS file is a startup error, not a retry loop
        except ConfigError as exc:
            raise startup_error("mqtt", exc) from exc
        try:
            self.cfg.model.check_download_dir()   # cmd/model's folder: a startup error, not every update refused
        except ConfigError as exc:
            raise startup_error("model.download_dir", exc) from exc
        if self.source_factory is None:       # the real sources (a test's own factory may name no real file)
            check_finite_sources(self.cfg)
        self.load_model()
        try:
            scenes = {cam.id: load_empty_scene(self.cfg, cam) for cam in self.cfg.cameras}
        except ConfigError as exc:
            raise startup_error("decisions.presence.empty_images", exc) from exc
        assert self.model is not None
        self._listen_for_metrics()
        cv2.setNumThreads(self.cfg.model.opencv_threads or -1)        # OpenCV: -1 is its default, 0 would be 1
        self.metrics.info.update(model_name=self.model.current.bundle.name,
                                 model_version=self.model.current.bundle.version)
        ocfg = self.cfg.outbox
        try:
            self.outbox = Outbox(ocfg.path, max_bytes=ocfg.max_bytes, max_age_s=ocfg.max_age_s,
                                 synchronous=ocfg.synchronous)
        except OutboxError as exc:
            raise startup_error("outbox.path", exc) from exc
        self.publisher = MqttPublisher(self.cfg, self.outbox, self.metrics, self.status_body, self._enqueue_command)
        hub = FrameHub(self.metrics)
        keep_full = self.cfg.frames.enabled and not self.cfg.frames.crop_roi
        for cam in self.cfg.cameras:
            hub.add_camera(cam.id, cam.queue_size, cam.backpressure)
            prepare = camera_preparer(self.model, self.cfg.decisions.presence, scenes[cam.id],
                                      watch_empty=self.cfg.frames.enabled)
            self.workers.append(CameraWorker(cam, hub, self.metrics, self.stop_event, self.source_factory, keep_full,
                                             prepare=prepare, nice=self.cfg.model.pipeline_nice,
                                             end_when_unopenable=self.exit_at_end))
        self.hub = hub
        self.inference = InferenceStage(self.cfg, hub, self.model, self.outbox, self.metrics, self.cameras_done)
        self._restore_thresholds()
        self.inference.on_receipt = self._save_for_receipt
        if self.state.last_closed is not None:      # before a closed shipment's restore, which closes a later one
            self.inference.receiving.last_closed = ClosedShipment.from_json(self.state.last_closed)
        self.state.closed_source = self.inference.receiving.saved_closed    # saved with the shipment from now on
        self._restore_shipment()
        self._threads = [self.publisher, self.inference, *self.workers, Watchdog(self.workers, self.stop_event),
                         threading.Thread(target=self._stats_loop, name="stats", daemon=True),
                         threading.Thread(target=self._command_loop, name="commands", daemon=True),
                         threading.Thread(target=self._model_update_loop, name="model-updates", daemon=True)]
        for thread in self._threads:
            thread.start()
        if self.prometheus is not None:
            self.prometheus.start()

    def _stop_started(self) -> None:
        """After a failed start: the threads it started stopped (as ``shutdown`` stops them), the metrics server and
        the outbox closed, none of them left for ``shutdown`` (which then does nothing more). The shipment is saved
        only when the inference stage started (it was restored by then): a desk not restored yet would overwrite
        the saved one."""
        self.stop_event.set()
        started = [thread for thread in self._threads if thread.ident is not None]
        for worker in self.workers:
            if worker.ident is not None:
                worker.join(timeout=5)
        if self.inference is not None and self.inference.ident is not None:
            self.inference.stop()
            self.inference.join(timeout=self.inference.drain_s + 5)
            self._save_shipment()
        self._threads = started
        self._join_command_threads()
        if self.publisher is not None and self.publisher.ident is not None:
            self.publisher.stop(0)
        if self.prometheus is not None:
            self.prometheus.stop()
        if self.outbox is not None:
            self.outbox.close()
        self.workers, self._threads, self.inference, self.publisher, self.outbox = [], [], None, None, None

    def _listen_for_metrics(self) -> None:
        """Bind the metrics port before any thread starts: a port another process holds is a startup error
        naming the field (exit 2), not a traceback after the cameras opened."""
        health = self.cfg.health
        if health.prometheus_port is None:
            return
        try:
            self.prometheus = PrometheusServer(self.metrics, health.prometheus_host, health.prometheus_port)
        except OSError as exc:
            raise StartupError(f"field health.prometheus_port: cannot listen on {health.prometheus_host}:"
                               f"{health.prometheus_port} ({exc.strerror or exc})") from exc

    def _restore_thresholds(self) -> None:
        assert self.inference is not None and self.state is not None
        known = {c.id for c in self.cfg.cameras}
        for cid, values in self.state.thresholds.items():
            try:
                if cid not in known:
                    raise ValueError(f"camera {cid!r} is not in the config")
                self.inference.set_thresholds([cid], Thresholds.model_validate(values))
            except (ValueError, ValidationError) as exc:
                log.error("%s: thresholds for %s not restored: %s", self.state.path, cid, exc)
            else:
                log.info("thresholds for camera %s restored from cmd/thresholds: %s", cid, values)

    def _restore_shipment(self) -> None:
        assert self.inference is not None and self.state is not None
        if self.state.shipment is None:
            return
        try:
            shipment = Shipment.from_json(self.state.shipment)
        except ShipmentError as exc:
            log.error("%s: open shipment not restored: %s", self.state.path, exc)
            return
        if shipment.closed_at is not None:      # saved at its close, before its final receipt was known stored
            log.info("shipment %s was closed before the restart; its final receipt is stored again", shipment.id)
            try:
                self.inference.receiving.restore(shipment)
            except StateSaveError:      # stored, but still saved as closed: the next start stores it once more
                pass
            return
        self.inference.receiving.restore(shipment)
        log.info("shipment %s restored from cmd/expect: %d line(s), %d item(s) received so far", shipment.id,
                 len(shipment.expected), sum(shipment.received.values()) + shipment.review)
        # restored as saved, whatever the model (its tally must not be lost), but a line the running model cannot
        # decide stays short: the model changed since the shipment was opened (cmd/model, or a new bundle)
        assert self.model is not None
        bundle = self.model.current.bundle
        known = set(bundle.labels)
        lacking = [label for label in shipment.expected if label not in known]
        lacking += [label for label in shipment.received if label not in known and label not in shipment.expected]
        if lacking:
            log.warning("shipment %s restored from %s names %d label(s) the running model %s %s lacks: %s; no item "
                        "is received on them (an expected line stays short) until the shipment is closed",
                        shipment.id, self.state.path, len(lacking), bundle.name, bundle.version,
                        ", ".join(map(repr, lacking[:20])) + (" ..." if len(lacking) > 20 else ""))

    def _save_shipment(self) -> None:
        """The open shipment (or none) into station-state.json, as the desk holds it at this moment; a failed save
        is logged (after a receipt was stored, at shutdown: the saved tally is older, never ahead of a receipt)."""
        if self.state is None or self.inference is None:
            return
        with self._shipment_lock:
            self._save_state(lambda: self.state.set_shipment(self.inference.receiving.saved()))

    def _save_for_receipt(self) -> None:
        """``_save_shipment`` before a receipt is stored (the desk's ``persist``). A failed save (a full disk)
        raises StateSaveError, so that receipt is not stored: a periodic one is due again with the next batch
        (the batch's decisions are stored and counted; the inference stage goes on), a cmd/expect is undone and
        refused. Else a crash could restore a tally older than a stored receipt. Counted in
        state_save_errors_total."""
        if self.state is None or self.inference is None:
            return
        with self._shipment_lock:
            try:
                self.state.set_shipment(self.inference.receiving.saved())
            except OSError as exc:
                self.metrics.inc("state_save_errors_total")
                log.error("%s: cannot save the shipment's tally (%s); the receipt after it is not stored (due again "
                          "with the next batch; a cmd/expect is refused)", self.state.path, exc)
                raise StateSaveError(f"{self.state.path}: {exc.strerror or exc}") from exc

    def cameras_done(self) -> bool:
        return all(w.ended.is_set() for w in self.workers)

    # ------------------------------------------------------------ status and stats

    def status_body(self, state: str) -> dict[str, Any]:
        runtime = self.model.current if self.model else None
        return {"schema": "status.v1", "id": str(uuid.uuid4()), "state": state, "ts": round(time.time(), 6),
                "site": self.cfg.site, "station": self.cfg.station, "role": self.cfg.role,
                "agent_version": AGENT_VERSION,
                "uptime_s": round(time.monotonic() - self.started_at, 3) if state == "online" else None,
                "model": runtime.identity if runtime else None,
                "artifact_choice": _choice_json(runtime),
                "cameras": {w.cfg.id: w.connected for w in self.workers},
                "last_model_update": self.last_update, "last_thresholds_update": self.last_thresholds,
                "last_capture_empty": self.last_capture_empty, "last_expect_update": self.last_expect}

    def stats_body(self) -> dict[str, Any]:
        assert self.outbox is not None
        self.metrics.set("outbox_depth", self.outbox.depth())
        self.metrics.set("outbox_bytes", self.outbox.bytes)
        for reason, n in self.outbox.dropped().items():
            self.metrics.set("outbox_dropped", n, reason=reason)
        for cam, depth in self.hub.depths().items():
            self.metrics.set("queue_depth", depth, queue=f"camera:{cam}")
        return {"schema": "stats.v1", "id": str(uuid.uuid4()), "seq": self.outbox.next_seq(),
                "ts": round(time.time(), 6), "site": self.cfg.site, "station": self.cfg.station,
                **self.metrics.snapshot()}

    def _stats_loop(self) -> None:
        while not self.stop_event.wait(self.cfg.health.stats_interval_s):
            try:
                if self.publisher is not None:
                    self.publisher.publish_stats(self.stats_body())
            except Exception:      # one bad round (a full disk, a bug) must not end the stats for good
                self.metrics.inc("stats_errors_total")
                log.exception("stats round failed; the stats thread goes on")

    def _publish_final_stats(self) -> None:
        """At a clean stop, once the cameras, the inference stage and the commands have stopped (the counters are
        final): one last stats message, handed to the publisher before its flush, so a subscriber's last stats
        counts every frame of the run (a periodic one may predate the end by up to ``stats_interval_s``). The stats
        thread is joined first, so a round it had under way cannot arrive after this one."""
        for thread in self._threads:
            if thread.name == "stats":
                thread.join(timeout=COMMAND_JOIN_S)
        if self.publisher is None or self.outbox is None:
            return
        try:
            self.publisher.publish_stats(self.stats_body())
        except Exception:      # a full disk, a bug: the stop goes on (the outbox flush, the offline status)
            self.metrics.inc("stats_errors_total")
            log.exception("final stats message failed; shutting down without it")

    # ------------------------------------------------------------ commands

    def _enqueue_command(self, verb: str, payload: bytes) -> None:
        """Called on the MQTT thread: hand off, never block it; a command that finds the queue full is
        refused in the status like any other refused command."""
        try:
            self._commands.put_nowait((verb, payload))
        except queue.Full:
            self.metrics.inc("commands_dropped_total")
            self._command_failed(verb, f"cmd/{verb}: dropped, {COMMAND_QUEUE} commands already waiting; send it again",
                                 payload)

    def _command_loop(self) -> None:
        self._serve(self._commands, self._run_command)

    def _model_update_loop(self) -> None:
        """cmd/model, one at a time, on a thread of its own: a download has 600 s and an engine build takes minutes
        on a Jetson, and the short commands (cmd/thresholds, cmd/expect) must not wait behind them."""
        self._serve(self._model_updates, lambda _verb, payload: self.reload_model(payload))

    def _serve(self, waiting: queue.Queue[tuple[str, bytes]], run: Callable[[str, bytes], Any]) -> None:
        """Run the commands of one queue in arrival order until the agent stops."""
        while not self.stop_event.is_set():
            try:
                verb, payload = waiting.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                run(verb, payload)
            except Exception as exc:  # a bug in one command must not end the thread that runs them all
                log.exception("command cmd/%s failed; thread %s goes on", verb, threading.current_thread().name)
                self._command_failed(verb, f"cmd/{verb}: failed ({type(exc).__name__}: {exc})", payload)

    def _queue_model_update(self, payload: bytes) -> None:
        """Hand cmd/model to the model-update thread. An update that arrives while one is being installed waits
        behind it, never refused for that alone: each one's outcome is published in turn, so the last outcome in
        the status is that of the last update sent. One that finds MODEL_UPDATE_QUEUE already waiting (as many as
        the command queue holds, so none it hands on is lost) is refused in the status, as a full command queue
        is."""
        try:
            self._model_updates.put_nowait(("model", payload))
        except queue.Full:
            self.metrics.inc("commands_dropped_total")
            self._command_failed("model", f"cmd/model: dropped, {MODEL_UPDATE_QUEUE} model updates already waiting "
                                          "behind the one being installed; send it again once last_model_update "
                                          "shows their outcome", payload)

    def _command_failed(self, verb: str, reason: str, payload: bytes | None = None) -> None:
        """A command refused outside its own handler: the status says so under the command's own field (for
        cmd/model with the ``request`` it answers, read from ``payload``)."""
        reason = reason_text(reason)
        log.error("%s", reason)
        self.metrics.inc("commands_rejected_total", command=verb if verb in LAST_RESULT else "unknown")
        if verb not in LAST_RESULT:
            return
        result: dict[str, Any] = {"ok": False, "reason": reason, "ts": round(time.time(), 6)}
        if verb == "model":
            running = self.model.current.bundle if self.model else None
            result["running"] = {"name": running.name, "version": running.version} if running else None
            result["request"] = model_request(payload)
        else:
            result[RESULT_FIELD[verb]] = None
        setattr(self, LAST_RESULT[verb], result)
        if self.publisher is not None:
            self.publisher.request_status()

    def _run_command(self, verb: str, payload: bytes) -> None:
        if verb == "model":
            self._queue_model_update(payload)
        elif verb == "thresholds":
            self.update_thresholds(payload)
        elif verb == "capture-empty":
            self.capture_empty(payload)
        elif verb == "expect":
            self.expect(payload)
        else:
            log.warning("unknown command cmd/%s ignored", verb)

    def capture_empty(self, payload: bytes) -> bool:
        """cmd/capture-empty: ask the decide thread for empty-scene frames; status says accepted or why not."""
        known = [c.id for c in self.cfg.cameras]
        try:
            cmd = CaptureEmptyCommand.model_validate(command_json("capture-empty", payload or b"{}"))
            unknown = [c for c in cmd.cameras or [] if c not in known]
            if unknown:
                raise ValueError(f"field cameras: {echo_list(unknown)} not among {', '.join(known)}")
            if self.inference is None or self.inference.empty_scenes is None:
                raise ValueError("frames.enabled is false: this station uploads no frames")
        except ValidationError as exc:
            reason = _command_errors("capture-empty", exc)
            return self._capture_empty_result(False, reason, None)
        except ValueError as exc:
            return self._capture_empty_result(False, str(exc), None)
        cameras = cmd.cameras or known
        self.inference.empty_scenes.request(cameras, cmd.count, self.inference.clock())
        return self._capture_empty_result(True, None, {"count": cmd.count, "cameras": cameras})

    def _capture_empty_result(self, ok: bool, reason: str | None, requested: dict[str, Any] | None) -> bool:
        reason = reason_text(reason)
        (log.info if ok else log.error)("cmd/capture-empty %s: %s", "accepted" if ok else "rejected",
                                        requested or reason)
        self.last_capture_empty = {"ok": ok, "reason": reason, "ts": round(time.time(), 6), "requested": requested}
        if not ok:
            self.metrics.inc("commands_rejected_total", command="capture-empty")
        if self.publisher is not None:
            self.publisher.request_status()
        return ok

    def expect(self, payload: bytes) -> bool:
        """cmd/expect: open a shipment (decisions weigh its lines, receipts count against them) or close it with
        a final receipt; the status says which, or why not."""
        assert self.inference is not None and self.model is not None
        desk = self.inference.receiving
        assert self.outbox is not None
        try:
            cmd = ExpectCommand.model_validate(command_json("expect", payload))
        except ValidationError as exc:
            return self._expect_result(False, _command_errors("expect", exc), None)
        except ValueError as exc:
            return self._expect_result(False, str(exc), None)
        # under storing: no receipt the decide thread worked out before this one is stored after it, and no item
        # is being decided meanwhile (it is counted in the shipment open before this command, or after it)
        refused = None
        with desk.storing:
            try:
                with desk.expecting(cmd, self.model.current.bundle.labels) as shipment:
                    # the first receipt (every line short) on opening, the final one on closing
                    body = receipt_body(desk.receipt_of(shipment), site=self.cfg.site, station=self.cfg.station,
                                        ts=time.time(), final=cmd.close)
                    self.outbox.put(Message("receipt", body))
            except AlreadyClosed as exc:    # the close sent again: done already, nothing stored again
                closed = exc.closed
                return self._expect_result(True, str(exc), {"id": closed.id, "state": "closed", "lines": closed.lines})
            except ShipmentError as exc:
                refused = str(exc)
            except (sqlite3.Error, OSError, ValueError) as exc:     # undone: the same command may be sent again
                open_now = repr(desk.shipment.id) if desk.shipment is not None else "none"
                receipt = f"the {'final' if cmd.close else 'first'} receipt"
                what = (f"the station state could not be saved before {receipt} ({exc})"
                        if isinstance(exc, StateSaveError) else
                        f"{receipt} could not be stored in the outbox {self.outbox.path} ({type(exc).__name__}: {exc})")
                refused = f"cmd/expect: {what}; nothing changed (open: {open_now}), send the command again"
        if refused is not None:
            return self._expect_result(False, refused, None)
        self.metrics.inc("receipts_total")
        self._save_shipment()
        summary = {"id": shipment.id, "state": "closed" if cmd.close else "open", "lines": len(shipment.expected)}
        return self._expect_result(True, None, summary)

    def _expect_result(self, ok: bool, reason: str | None, shipment: dict[str, Any] | None) -> bool:
        reason = reason_text(reason)
        (log.info if ok else log.error)("cmd/expect %s: %s", "applied" if ok else "rejected",
                                        f"{shipment} ({reason})" if shipment and reason else shipment or reason)
        self.last_expect = {"ok": ok, "reason": reason, "ts": round(time.time(), 6),
                            "shipment": shipment}
        if not ok:
            self.metrics.inc("commands_rejected_total", command="expect")
        if self.publisher is not None:
            self.publisher.request_status()
        return ok

    def update_thresholds(self, payload: bytes) -> bool:
        """cmd/thresholds: validate with the config schema, apply to one camera or all; status says the outcome."""
        assert self.inference is not None
        known = [c.id for c in self.cfg.cameras]
        try:
            cmd = ThresholdsCommand.model_validate(command_json("thresholds", payload))
            if cmd.camera is not None and cmd.camera not in known:
                raise ValueError(f"field camera: {echo(cmd.camera)} is not one of {', '.join(known)}")
        except ValidationError as exc:
            reason = _command_errors("thresholds", exc)
            return self._thresholds_result(False, reason, None)
        except ValueError as exc:
            return self._thresholds_result(False, str(exc), None)
        thresholds = Thresholds(**cmd.model_dump(exclude={"camera"}))
        self.inference.set_thresholds([cmd.camera] if cmd.camera else known, thresholds)
        if self.state is not None:
            self._save_state(lambda: self.state.set_thresholds(
                {cid: t.model_dump(exclude_none=True) for cid, t in self.inference.threshold_overrides.items()}))
        return self._thresholds_result(True, None, cmd.model_dump())

    def _save_state(self, write: Callable[[], None]) -> None:
        """Persist what a command changed; a full disk is logged, the change still holds until the restart."""
        try:
            write()
        except OSError as exc:
            log.error("%s: cannot save the station state (%s); the change holds until the next restart",
                      self.state.path if self.state else STATE_FILE, exc)

    def _thresholds_result(self, ok: bool, reason: str | None, applied: dict[str, Any] | None) -> bool:
        reason = reason_text(reason)
        (log.info if ok else log.error)("cmd/thresholds %s: %s", "applied" if ok else "rejected", applied or reason)
        self.last_thresholds = {"ok": ok, "reason": reason, "ts": round(time.time(), 6), "applied": applied}
        if not ok:
            self.metrics.inc("commands_rejected_total", command="thresholds")
        if self.publisher is not None:
            self.publisher.request_status()
        return ok

    def reload_model(self, payload: bytes) -> bool:
        """Verify, build and warm the new model off the hot path, then swap; on any failure keep the old one."""
        assert self.model is not None
        old = self.model.current.bundle
        incoming = None
        try:
            cmd = ModelCommand.parse(payload)
            if cmd.sha256 is not None and cmd.sha256 == old.manifest_sha256:
                return self._already_running(old, payload)
            # the config's labels are checked on the manifest: for a download before any artifact is fetched, for a
            # local bundle once verified; either way before an engine is looked up or built (minutes on a Jetson)
            incoming = fetch_verified(cmd, self.cfg.model.download_dir, self.public_key, self.fetch_deadline_s,
                                      check_manifest=self._check_manifest_labels)
            engine = (self.engine_cache.engine_for(self.cfg, incoming.bundle) if self.engine_cache is not None
                      else None)
            runtime = build_runtime(self.cfg, incoming.bundle, engine)
            # a shipment opened while it downloaded or built: refused before it is installed
            where = manifest_location(cmd.bundle, incoming.bundle.root, incoming.downloaded)
            self._check_shipment_labels(incoming.bundle.labels, where)
            # installed only once it runs: a refused bundle never replaces an installed (or the running) copy
            bundle = incoming.install(self.cfg.model.download_dir, self.public_key)
            runtime = replace(runtime, bundle=bundle)
            self._swap_checked(runtime, where)
        except Exception as exc:  # whatever the payload or the bundle does, the old model stays and the status says why
            expected = isinstance(exc, (BundleError, BackendError, ConfigError))
            text = str(exc) if expected else f"cmd/model: {type(exc).__name__}: {exc}"
            if incoming is not None and incoming.downloaded:     # its download folder goes with the refusal
                text = text.replace(str(incoming.bundle.root), cmd.bundle.rstrip("/"))
            reason = reason_text(text)
            (log.error if expected else log.exception)("model update rejected, keeping %s %s: %s", old.name,
                                                        old.version, reason)
            if incoming is not None:
                incoming.discard()
            self.last_update = {"ok": False, "reason": reason, "ts": round(time.time(), 6),
                                "running": {"name": old.name, "version": old.version},
                                "request": model_request(payload)}
            self.metrics.inc("model_updates_rejected_total")
            self.metrics.inc("commands_rejected_total", command="model")
        else:
            if self.state is not None:
                self._save_state(lambda: self.state.set_model(bundle.root, bundle.version))
            if Path(bundle.root).resolve() != Path(old.root).resolve():     # not the running bundle sent again
                self._previous_root = Path(old.root)
            # kept: the running bundle, the one before it (a rollback), the configured one (the fallback at a start)
            keep = [bundle.root, old.root, Path(self.cfg.model.bundle)]
            keep += [self._previous_root] if self._previous_root is not None else []
            for gone in prune_installed(self.cfg.model.download_dir, keep):
                log.info("removed %s: installed by an earlier cmd/model, no longer running", gone)
            self.metrics.info.update(model_name=bundle.name, model_version=bundle.version)
            log.info("model switched from %s to %s %s", old.version, bundle.name, bundle.version)
            self.last_update = {"ok": True, "reason": None, "ts": round(time.time(), 6),
                                "running": {"name": bundle.name, "version": bundle.version},
                                "request": model_request(payload)}
            self.metrics.inc("model_updates_total")
        self._count_engine_load_failures()      # the lookup may have removed (and counted) an engine, either way
        if self.publisher is not None:
            self.publisher.request_status()
        return bool(self.last_update["ok"])

    def _check_manifest_labels(self, manifest: dict[str, Any], where: str) -> None:
        """The ``check_manifest`` hook of ``fetch_verified``: the config's labels, and the open shipment's expected
        lines, against a manifest's."""
        check_config_labels(self.cfg, manifest.get("labels"), where)
        labels = manifest.get("labels")
        self._check_shipment_labels(labels if isinstance(labels, list) else [], where)

    def _check_shipment_labels(self, labels: Any, where: str) -> None:
        """BundleError naming ``where`` (the manifest's URL or file), the open shipment and its expected lines whose
        label ``labels`` (a bundle about to run) lacks: receiving could never match those lines."""
        desk = self.inference.receiving if self.inference is not None else None
        lacking = desk.lacking([label for label in labels if isinstance(label, str)]) if desk is not None else None
        if lacking is None:
            return
        shipment, missing = lacking
        raise BundleError(f"{where}: open shipment {echo(shipment)} expects {len(missing)} label(s) the bundle "
                          f"lacks: {echo_list(missing)}; receiving could never match those lines: close the shipment "
                          "(cmd/expect close) first, or send a bundle with those labels")

    def _swap_checked(self, runtime: ModelRuntime, where: str) -> None:
        """The swap, under the desk's ``storing`` (held by cmd/expect while it opens a shipment against the running
        model's labels), after the open shipment's lines are checked once more against the new model's labels: a
        shipment opened while the update was installed is never left with lines the new model cannot decide."""
        desk = self.inference.receiving if self.inference is not None else None
        if desk is None:
            self.model.swap(runtime)
            return
        with desk.storing:
            self._check_shipment_labels(runtime.bundle.labels, where)
            self.model.swap(runtime)

    def _already_running(self, running: Bundle, payload: bytes) -> bool:
        """A cmd/model whose sha256 is the running bundle's manifest's: nothing to fetch, build or swap (a rollout
        sent twice, a retained command seen again); answered ok, naming the bundle that runs."""
        reason = f"already running {running.name} {running.version}"
        log.info("cmd/model: %s (sha256 %s); nothing fetched", reason, running.manifest_sha256)
        self.last_update = {"ok": True, "reason": reason, "ts": round(time.time(), 6),
                            "running": {"name": running.name, "version": running.version},
                            "request": model_request(payload)}
        if self.publisher is not None:
            self.publisher.request_status()
        return True

    # ------------------------------------------------------------ stop

    def _join_command_threads(self) -> None:
        """The command threads end after the command each is running (they take no new one once stopped), so no
        command writes to the outbox after it is closed. A model update still downloading or building after
        COMMAND_JOIN_S is left to end with the process: a bundle is installed only once verified and warmed, the
        state file names the model the next start runs, and a half-fetched folder goes at the next swap."""
        for thread in self._threads:
            if thread.name not in ("commands", "model-updates"):
                continue
            thread.join(timeout=COMMAND_JOIN_S)
            if thread.is_alive():
                log.warning("thread %s still running a command %g s after the stop; left to end with the process "
                            "(a cmd/model not swapped in yet is lost: send it again)", thread.name, COMMAND_JOIN_S)

    def wait(self, exit_at_end: bool) -> None:
        """Until stopped, or (exit_at_end) until every finite source is processed: a file or folder camera that
        can no longer be opened then ends too (``CameraWorker.end_when_unopenable``), else it would never be."""
        if exit_at_end:
            for worker in self.workers:
                worker.end_when_unopenable = True
        while not self.stop_event.is_set():
            if exit_at_end and self.inference is not None and self.inference.finished.wait(0.2):
                return
            self.stop_event.wait(0.2)

    def shutdown(self, flush_s: float) -> None:
        """Cameras first, then the frames already queued (for at most the stage's ``drain_s``), then the commands
        under way, then the outbox (as far as flush_s allows), then offline."""
        self.stop_event.set()
        for worker in self.workers:
            worker.join(timeout=5)
        if self.inference is not None:
            self.inference.stop()
            self.inference.join(timeout=self.inference.drain_s + 5)
        self._join_command_threads()
        self._save_shipment()     # the items decided since the last receipt (receipt_interval_s) are kept too
        self._publish_final_stats()
        if self.publisher is not None:
            self.publisher.stop(flush_s)
        if self.prometheus is not None:
            self.prometheus.stop()
        if self.outbox is not None:
            left = self.outbox.depth()
            if left:
                log.warning("%d message(s) stay in the outbox %s for the next start", left, self.outbox.path)
            self.outbox.close()


def check_finite_sources(cfg: AgentConfig) -> None:
    """Open and close every file and folder camera once: a video that does not exist or does not decode, a folder
    that does not exist or holds no image, is a StartupError naming ``cameras[i].uri`` instead of a camera thread
    retrying it for good (and ``--exit-at-end`` never ending). Live cameras are not opened here: one that is not
    up yet (a rebooting RTSP camera, a USB camera plugged in later) is retried with backoff once running."""
    for i, cam in enumerate(cfg.cameras):
        try:
            check_finite_source(cam.uri, name=cam.id)
        except (SourceError, OSError, ValueError) as exc:
            raise startup_error(f"cameras[{i}].uri", exc) from exc


def run(cfg: AgentConfig, *, exit_at_end: bool = False, flush_s: float | None = None,
        config_path: Path | None = None) -> int:
    """``python -m agent run``: start, wait for SIGTERM/SIGINT (or the end of input), shut down cleanly.

    0 after a clean stop; 2 when the agent cannot start (one line naming ``config_path`` and the field); 1 when,
    with ``exit_at_end``, a file or folder camera could no longer be opened (its input was not all processed).
    A start that fails stops what it had started first (``Agent.start``); an unexpected error then goes up with
    its traceback."""
    agent = Agent(cfg, engine=DeviceEngine.from_env(os.environ), engine_cache=EngineCachePolicy.from_env(os.environ),
                  exit_at_end=exit_at_end)
    try:
        agent.start()
    except StartupError as exc:
        log.error("cannot start: %s%s", f"{config_path}: " if config_path is not None else "", exc)
        return 2

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        agent.stop_event.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent.wait(exit_at_end)
    agent.shutdown(cfg.shutdown_flush_s if flush_s is None else flush_s)
    lost = [w for w in agent.workers if w.unopenable is not None]
    for worker in lost:
        log.error("camera %s: its input ended early: %s", worker.cfg.id, worker.unopenable)
    return 1 if lost else 0


def manifest_location(location: str, root: Path, downloaded: bool) -> str:
    """Where a cmd/model's manifest came from, as a refusal names it: the URL sent (a download), or the file."""
    if downloaded:
        return urljoin(location if location.endswith("/") else location + "/", MANIFEST)   # as fetch_bundle's
    return str(Path(root) / MANIFEST)


def model_request(payload: bytes | None) -> dict[str, Any] | None:
    """The cmd/model a ``last_model_update`` answers (status.v1 ``request``), read from the payload as it came, so
    that a rollout judges the answer to its own command and not a late one to an earlier command. None when the
    payload names no bundle (not JSON, not an object, no bundle string of cmd-model.v1's length); a sha256 or a
    version not of cmd-model.v1's form is null (the command was refused for it)."""
    if payload is None or len(payload) > MODEL_COMMAND_MAX_BYTES:
        return None
    try:
        data = loads_finite(payload)        # NaN, lone surrogates and non-UTF-8 refused: nothing unsendable echoed
    except (ValueError, RecursionError):
        return None
    bundle = data.get("bundle") if isinstance(data, dict) else None
    if not isinstance(bundle, str) or not 1 <= len(bundle) <= MODEL_BUNDLE_MAX_CHARS:
        return None
    sha, version = data.get("sha256"), data.get("version")
    return {"bundle": bundle,
            "sha256": sha.lower() if isinstance(sha, str) and SHA256_HEX.fullmatch(sha) else None,
            "version": version if isinstance(version, str) and NAME_PATTERN.fullmatch(version) else None}


def reason_text(reason: str | None) -> str | None:
    """A refusal's reason as the status carries it: at most REASON_MAX_CHARS (a reason quotes what was refused,
    and a payload of 64 KiB would make a status that status.v1, and so the dashboard, refuses)."""
    if reason is None or len(reason) <= REASON_MAX_CHARS:
        return reason
    kept = REASON_MAX_CHARS - 40        # room for the note that says how much was cut
    return f"{reason[:kept]} ... ({len(reason) - kept} characters more)"


def echo(value: str) -> str:
    """A value from a command payload, quoted in a reason: at most ECHO_MAX_CHARS of it."""
    if len(value) <= ECHO_MAX_CHARS:
        return repr(value)
    return f"{value[:ECHO_MAX_CHARS]!r}... ({len(value)} characters)"


def echo_list(values: list[str], most: int = 10) -> str:
    """Values from a command payload, quoted in a reason: the first ``most``, each cut by ``echo``."""
    shown = ", ".join(echo(v) for v in values[:most])
    return shown + (f" and {len(values) - most} more" if len(values) > most else "")


def _command_errors(verb: str, exc: ValidationError) -> str:
    """A refused command payload's schema errors, one reason line naming each field."""
    return "; ".join(line.replace(f"cmd/{verb}: field ", "field ", 1) for line in format_errors(Path(f"cmd/{verb}"), exc))


def command_json(verb: str, payload: bytes) -> Any:
    """A command payload as JSON: at most COMMAND_MAX_BYTES of UTF-8 (cmd/expect: COMMAND_LIMITS), no NaN or
    infinity (1e999 included), no key given twice in one object (json.loads would keep the last silently:
    ``{"Dress": 3, "Dress": 5}`` would expect 5 Dresses where the sender may have meant 8).

    Raises ValueError naming the payload or the field, which the command's handler publishes as its refusal."""
    limit = COMMAND_LIMITS.get(verb, COMMAND_MAX_BYTES)
    if len(payload) > limit:
        raise ValueError(f"payload: {len(payload)} bytes, more than {limit}")
    twice: list[tuple[dict[str, Any], str]] = []
    hook = _keys_once(twice)
    try:     # strict UTF-8: json.loads(bytes) guesses UTF-16 and more
        data = json.loads(payload.decode("utf-8"), object_pairs_hook=hook)
    except UnicodeDecodeError as exc:
        raise ValueError(f"payload: not UTF-8 (byte {exc.start}: {exc.reason})") from None
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"payload: not JSON ({exc})") from None
    if twice:
        obj, key = twice[0]
        where = _path_of(data, obj)
        if where == "":
            raise ValueError(f"field {key[:40]}: given twice")
        if where == "lines":
            raise ValueError(f"field lines: label {key[:40]!r} given twice")
        raise ValueError(f"field {where}: key {key[:40]!r} given twice")
    where = _non_finite(data)
    if where is not None:
        raise ValueError(f"field {where or '(top level)'}: not a finite number (NaN, Infinity and 1e999 are refused)")
    return data


def _keys_once(twice: list[tuple[dict[str, Any], str]]) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    """An ``object_pairs_hook`` that builds each object as json.loads does and notes (object, key) in ``twice``
    for an object that gives a key more than once (the first such key)."""
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    twice.append((obj, key))
                    break
                seen.add(key)
        return obj
    return hook


def _path_of(data: Any, target: Any) -> str:
    """The dotted path of the object ``target`` (by identity) in parsed JSON; "" for the top level. Iterative: the
    parser allows nesting deeper than a recursive walk would."""
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        node, where = stack.pop()
        if node is target:
            return where
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        stack.extend((value, f"{where}.{key}" if where else str(key)) for key, value in items)
    return "(somewhere)"


def _non_finite(data: Any, where: str = "") -> str | None:
    """The dotted path of the first NaN or infinity in parsed JSON, None when every number is finite."""
    if isinstance(data, float) and not math.isfinite(data):
        return where
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        found = _non_finite(value, f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None
