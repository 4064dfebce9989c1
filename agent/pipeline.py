"""Inference stage: batches from the frame hub -> model -> decisions -> outbox.

Two threads between the camera threads and the publisher thread: ``inference``
runs the model, ``decide`` turns its probabilities into messages in the outbox.
They are linked by a queue of two batches, so the model runs on the next batch
while the decisions, JSON and SQLite of the previous one are done (the model's
runtime releases the GIL). The stage only ever writes to the outbox (local disk),
so a slow or absent broker never backs up into the cameras. The model is read
once per batch from ``ModelHolder`` and travels with the batch, so a reload
swaps it between two batches, atomically, and every batch is decided with the
model that classified it.

A bundle with ``open_set`` gives each frame an unknown score (contract/openset.py) from its logits and its
embedding; the model's logits get the enrolled classes' appended first, so probabilities cover every label
of the bundle. A frame, or an item (the median of its frames), whose score is above the camera's threshold
is decided ``unknown``: no class, sent to the review lane and uploaded for labelling. With
``decisions.unknown_items`` off the score is not computed (``decisions.unknown_score`` computes and
publishes it anyway). A bundle without ``open_set`` has no score, and decides as before.
"""

from __future__ import annotations

import base64
import functools
import logging
import queue
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import cv2
import numpy as np

from agent.backends import Backend, outputs_of
from agent.config import AgentConfig, CameraConfig, Thresholds, merge_thresholds
from agent.decide import (
    Classification,
    GateOutcome,
    ItemDecision,
    ItemTracker,
    LaneMap,
    LowConfidencePolicy,
    Observation,
    PolicyThresholds,
    QcAlerter,
    UploadGate,
    classify_batch,
    dhash,
    item_present,
    roi_edges,
    softmax,
)
from agent.empty_scene import EmptySceneCapture
from agent.health import Metrics
from agent.localize import cut
from agent.outbox import Message, Outbox, Record
from agent.prepare import camera_preparer, fed_box, load_empty_scene, model_input_image
from agent.priority import lower_this_thread
from agent.receiving import RECEIPT_MAX_BYTES, RECEIPT_ROOM_BYTES, ReceiptSaveError, ReceivingDesk, receipt_body
from agent.sources.base import Frame
from agent.sources.camera import FrameHub
from contract.bundle import Bundle
from contract.openset import carried_score
from contract.preprocess import Preprocessor

log = logging.getLogger(__name__)

CONTEXT_SIDE = 160      # longer side, px, of the ROI JPEG that travels with an uploaded item crop
CONTEXT_QUALITY = 70


@dataclass(frozen=True)
class ModelRuntime:
    """Everything that changes together on a model swap."""

    bundle: Bundle
    backend: Backend
    preprocessor: Preprocessor

    @property
    def identity(self) -> dict[str, str]:
        return {"name": self.bundle.name, "version": self.bundle.version,
                "backend": self.backend.name, "precision": self.backend.precision}


class ModelHolder:
    """One reference, replaced whole; readers take it once per batch."""

    def __init__(self, runtime: ModelRuntime) -> None:
        self._runtime = runtime
        self._lock = threading.Lock()

    @property
    def current(self) -> ModelRuntime:
        return self._runtime

    def swap(self, runtime: ModelRuntime) -> ModelRuntime:
        with self._lock:
            old, self._runtime = self._runtime, runtime
        return old


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


def thumbnail_b64(image: np.ndarray, max_side: int = 128, quality: int = 80) -> str:
    h, w = image.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    small = cv2.resize(image, (max(1, int(w * scale)), max(1, int(h * scale))), interpolation=cv2.INTER_AREA)
    return base64.b64encode(encode_jpeg(small, quality)).decode()


def top_k_json(top_k: Sequence[tuple[str, float]]) -> list[dict[str, Any]]:
    return [{"label": label, "p": p} for label, p in top_k]


def _prepare_seconds(batch: list[Frame]) -> float:
    """Mean time the camera threads spent localizing and preprocessing these frames."""
    spent = [f.prepared.seconds for f in batch if f.prepared is not None]
    return sum(spent) / len(batch) if spent else 0.0


def camera_policy(bundle: Bundle, cam: CameraConfig, override: Thresholds | None,
                  precision: str = "fp32", unknown_items: bool = True) -> LowConfidencePolicy:
    """A camera's policy: cmd/thresholds over the camera's config over the bundle's thresholds (the unknown
    score's: the bundle's open_set threshold calibrated for the precision of the artifact running, or at the
    share kept ``unknown_keep`` asks for; none when ``unknown_items`` is off: the score, if computed at all,
    decides nothing)."""
    merged = merge_thresholds(cam.thresholds, override)
    unknown = None
    if bundle.open_set is not None and unknown_items:
        unknown = bundle.open_set.threshold_for(precision)
        if merged.unknown_keep is not None:
            at_keep = bundle.open_set.threshold_at(merged.unknown_keep, precision)
            if at_keep is None:
                log.warning("camera %s: unknown_keep %g: bundle %s lists no threshold at that share kept; its own "
                            "threshold (keep %g) decides", cam.id, merged.unknown_keep, bundle.version,
                            bundle.open_set.keep)
            unknown = at_keep if at_keep is not None else unknown
    return LowConfidencePolicy(PolicyThresholds.resolve(bundle.thresholds, merged, unknown))


class CameraDecisions:
    """Per-camera decision state: policy and item tracker.

    ``before``: the camera's state under the model running until now (a model swap). When the new bundle has the
    same labels, its tracker goes on with the new policy: the item in view stays one item (its frames from both
    models are probabilities over the same labels) and keeps its track id. With other labels a new tracker
    starts, numbering items after the old one's (the caller decided its open item first): an ``item_seq`` is
    never given twice by one camera in one process."""

    def __init__(self, cam: CameraConfig, cfg: AgentConfig, bundle: Bundle, override: Thresholds | None = None,
                 receiving: ReceivingDesk | None = None, precision: str = "fp32",
                 before: CameraDecisions | None = None) -> None:
        self.policy = camera_policy(bundle, cam, override, precision, cfg.decisions.unknown_items)
        presence = cfg.decisions.presence
        vouched = vouched_threshold(bundle, cfg, receiving, precision)
        kept = before.tracker if before is not None else None
        if presence.mode == "off":
            self.tracker = None
        elif kept is not None and kept.labels == list(bundle.labels):
            kept.policy, kept.vouched_threshold = self.policy, vouched
            self.tracker = kept
        else:
            prior = receiving.prior if receiving is not None else None
            self.tracker = ItemTracker(cam.id, bundle.labels, presence, LaneMap(cfg.decisions.sorting), self.policy,
                                       cfg.decisions.top_k, prior, vouched)
            if kept is not None:
                self.tracker.items_seen = kept.items_seen


def vouched_threshold(bundle: Bundle, cfg: AgentConfig, receiving: ReceivingDesk | None,
                      precision: str) -> Callable[[str], float | None] | None:
    """label -> the bundle's threshold at ``receiving.expected_unknown_keep`` while the open shipment still expects
    the label, else None; None altogether without a shipment desk, an unknown verdict, or the bundle's keep list."""
    keep = cfg.decisions.receiving.expected_unknown_keep
    if receiving is None or keep is None or bundle.open_set is None or not cfg.decisions.unknown_items:
        return None
    looser = bundle.open_set.threshold_at(keep, precision)
    if looser is None:
        return None
    return lambda label: looser if receiving.vouches(label) else None


@dataclass
class Inferred:
    """One batch after the model, on its way to the decide thread."""

    batch: list[Frame]
    runtime: ModelRuntime
    probs: np.ndarray       # one row per frame in ``chosen``, over every label of the bundle
    timings: dict[str, float]
    started: float          # monotonic time the batch was taken from the hub
    chosen: list[int]       # positions in ``batch`` the model ran on (the others had no item)
    unknown_scores: np.ndarray | None = None    # one per row of ``probs``; None for a bundle without open_set


class InferenceStage(threading.Thread):
    """The inference thread (and its decide thread); ends at the end of input or after ``stop``.

    At a stop the frames already queued in the hub are classified and decided before the thread ends, for at
    most ``drain_s`` seconds; frames still queued then are dropped and counted (``frames_dropped_total``)."""

    DECIDE_QUEUE = 2        # batches between the model and the decisions: enough to overlap, little latency
    DRAIN_S = 25.0          # at a stop: time left to the queued frames (the agent's join waits 5 s more)

    def __init__(self, cfg: AgentConfig, hub: FrameHub, model: ModelHolder, outbox: Outbox, metrics: Metrics,
                 cameras_done: Callable[[], bool], clock: Callable[[], float] = time.time,
                 drain_s: float = DRAIN_S) -> None:
        super().__init__(name="inference", daemon=True)
        self.cfg = cfg
        self.hub = hub
        self.model = model
        self.outbox = outbox
        self.metrics = metrics
        self.cameras_done = cameras_done
        self.clock = clock
        self.stop_event = threading.Event()
        self.drain_s = drain_s
        self.finished = threading.Event()
        self.qc = QcAlerter(cfg.decisions.qc)
        self.uploads = UploadGate(cfg.frames.min_interval_s, cfg.frames.dedupe_bits, cfg.frames.dedupe_window)
        fcfg = cfg.frames
        # empty-scene frames for training on this station's backgrounds (agent/empty_scene.py); uploads only
        self.empty_scenes = (EmptySceneCapture([c.id for c in cfg.cameras], interval_s=fcfg.empty_scene_interval_s,
                                               wait_s=fcfg.empty_scene_wait_s, spacing_s=fcfg.empty_scene_spacing_s,
                                               now=clock()) if fcfg.enabled else None)
        # the open shipment (cmd/expect): weighs item decisions, tallied into receipts (agent/receiving.py)
        # a receipt under the broker's limit with room for the station's fields and the MQTT packet's own
        self.receiving = ReceivingDesk(cfg.decisions.receiving, clock,
                                       min(RECEIPT_MAX_BYTES, cfg.mqtt.max_message_bytes - RECEIPT_ROOM_BYTES))
        # before a receipt is stored: the agent saves the shipment (station-state.json), so a crash between the two
        # never restores a tally older than a receipt already stored (agent/receiving.py)
        self.on_receipt: Callable[[], None] | None = None
        self.receiving.persist = self._save_shipment
        self.receiving.store_final = self._store_final
        # a batch's decisions are saved with the seq each can get before it is stored (ReceivingDesk.stage)
        self.receiving.next_seq = lambda: self.outbox.last_seq + 1
        self._runtime: ModelRuntime | None = None
        self.threshold_overrides: dict[str, Thresholds] = {}
        self._cameras: dict[str, CameraDecisions] = {}
        self._policy_lock = threading.Lock()     # the overrides and the per-camera policies built from them
        self._preparers: dict[str, Callable[[np.ndarray], Any]] = {}     # for frames that come unprepared
        self._inferred: queue.Queue[Inferred | None] = queue.Queue(self.DECIDE_QUEUE)

    def stop(self) -> None:
        """Classify what is queued (for at most ``drain_s``), decide the open items, end; the cameras stopped
        first, so nothing new arrives meanwhile."""
        self.stop_event.set()
        self.hub.wake()

    def run(self) -> None:
        decider = threading.Thread(target=self._decide_loop, name="decide", daemon=True)
        decider.start()
        drain_until: float | None = None
        try:
            while True:
                if self.stop_event.is_set():
                    drain_until = drain_until if drain_until is not None else time.monotonic() + self.drain_s
                    if not any(self.hub.depths().values()) or time.monotonic() >= drain_until:
                        break
                # draining, a batch is not held back for frames that no camera will send
                fill_s = 0.0 if drain_until is not None else self.cfg.model.batch_timeout_ms / 1000.0
                batch = self.hub.get_batch(self.cfg.model.batch_size, fill_s)
                if batch:
                    inferred = self._guarded(self.infer, batch, batch)
                    if inferred is not None:
                        self._inferred.put(inferred)
                elif self.cameras_done() and not any(self.hub.depths().values()):
                    break
        finally:
            self._drop_left_behind()
            self._inferred.put(None)      # the decide thread finishes what is queued, then the open items
            decider.join()
            self.finished.set()

    def _drop_left_behind(self) -> None:
        """Frames still in the hub when the stage ends (at a stop, its drain time ran out): dropped, counted,
        logged; never left behind uncounted."""
        dropped = self.hub.drop_queued()
        if dropped:
            log.warning("%d queued frame(s) not classified when the inference stage ended (%s; at a stop it has "
                        "%g s for the frames queued)",
                        sum(dropped.values()), ", ".join(f"{cam} {n}" for cam, n in sorted(dropped.items())),
                        self.drain_s)

    def _decide_loop(self) -> None:
        lower_this_thread(self.cfg.model.pipeline_nice)
        try:
            while (inferred := self._inferred.get()) is not None:
                self._guarded(self.decide, inferred, inferred.batch)
        finally:
            try:
                self._flush_items()
            except Exception:   # logged and counted as a failed batch is, not a traceback that ends the thread
                self.metrics.inc("inference_errors_total")
                log.exception("deciding the items still open at the end of the input failed; their decisions are "
                              "not stored")

    # ------------------------------------------------------------ one batch

    def _guarded(self, step: Callable[[Any], Any], arg: Any, batch: list[Frame]) -> Any:
        """``step(arg)`` for ``batch``; a batch that fails (odd frame, backend error) is logged and counted,
        None is returned, and the next batch still runs."""
        try:
            return step(arg)
        except Exception:
            self.metrics.inc("inference_errors_total")
            cams = sorted({f.camera_id for f in batch})
            log.exception("%s failed on a batch of %d frames from %s; skipped", step.__name__, len(batch),
                          ", ".join(cams))
            return None

    def process(self, batch: list[Frame]) -> None:
        """Model and decisions for one batch, in the caller's thread (the threaded stage splits the two)."""
        inferred = self.infer(batch)
        if inferred is not None:
            self.decide(inferred)

    def infer(self, batch: list[Frame]) -> Inferred | None:
        """The model's probabilities (and unknown scores) for a batch's frames with an item, with the runtime
        that produced them.

        A frame whose logits, embedding or unknown score are not finite is an inference error: counted, logged
        and left out (no result with ``confidence: NaN``); None when no frame of the batch is left."""
        runtime = self.model.current
        t0 = time.monotonic()
        batch = [self._localized(f, runtime) for f in batch]
        chosen = [i for i, f in enumerate(batch) if self._needs_model(f)]
        inputs = self._inputs([batch[i] for i in chosen], runtime) if chosen else None
        t1 = time.monotonic()
        decisions = self.cfg.decisions
        logits, scores = self._model_outputs(runtime, inputs, len(chosen),
                                             with_scores=decisions.unknown_items or decisions.unknown_score,
                                             flip=self.cfg.model.flip_average)
        t2 = time.monotonic()
        timings = {"preprocess": (t1 - t0) / len(batch) + _prepare_seconds(batch),
                   "inference": (t2 - t1) / max(1, len(chosen))}
        finite = np.isfinite(logits).all(axis=1) & (np.isfinite(scores) if scores is not None else True)
        if not finite.all():
            batch, chosen = self._drop_non_finite(batch, chosen, finite, runtime)
            logits = logits[finite]
            scores = scores[finite] if scores is not None else None
            if not batch:
                return None
        return Inferred(batch, runtime, softmax(logits), timings, t0, chosen, scores)

    @staticmethod
    def _model_outputs(runtime: ModelRuntime, inputs: np.ndarray | None, frames: int, *,
                       with_scores: bool, flip: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """One logit per label of the bundle for each frame (the enrolled classes' appended from the embedding),
        and each frame's unknown score (None without open_set or ``with_scores``). A frame whose embedding is not
        finite gets NaN logits and score, so it is dropped like a frame with non-finite logits.

        ``flip`` (model.flip_average): the mirrored inputs run as a second batch of the same shape (an engine's
        batch profile holds it) and the two views' full logits are averaged; the score is the unflipped view's,
        the one its threshold was calibrated on."""
        bundle = runtime.bundle
        where = f"{bundle.name} {bundle.version}"
        trained = len(bundle.model_labels)
        open_set = bundle.open_set
        if inputs is None:
            return np.zeros((0, len(bundle.labels))), (np.zeros(0) if open_set is not None and with_scores else None)
        logits, emb = outputs_of(runtime.backend, inputs)
        if logits.shape != (frames, trained):
            raise ValueError(f"{where}: outputs shape {logits.shape} for {frames} frames and {trained} trained labels")
        mirror = outputs_of(runtime.backend, np.ascontiguousarray(inputs[..., ::-1])) if flip else None
        if open_set is None:
            return logits if mirror is None else (logits + mirror[0]) / 2, None
        if emb is None and open_set.needs_embedding:
            raise ValueError(f"{where}: field open_set needs the model's embedding output "
                             f"{bundle.embedding_name!r}, and the backend gave none")
        if emb is not None and (emb.ndim != 2 or len(emb) != frames):
            raise ValueError(f"{where}: embedding shape {emb.shape} for {frames} frames")
        with np.errstate(all="ignore"):      # a row that is not finite is dropped by the caller, not warned about
            bad = ~np.isfinite(emb).all(axis=1) if emb is not None else np.zeros(frames, bool)
            full = np.asarray(open_set.full_logits(logits, emb), np.float64)
            scores = np.asarray(open_set.scores(full, emb), np.float64) if with_scores else None
            if mirror is not None:
                full = (full + np.asarray(open_set.full_logits(*mirror), np.float64)) / 2
        full[bad] = np.nan
        if scores is not None:
            scores[bad] = np.nan
        return full, scores

    def _drop_non_finite(self, batch: list[Frame], chosen: list[int], finite: np.ndarray,
                         runtime: ModelRuntime) -> tuple[list[Frame], list[int]]:
        """The batch without the frames whose logits are not finite, and the model's rows' new positions."""
        bad = {chosen[i] for i in np.flatnonzero(~finite)}
        for i in sorted(bad):
            self.metrics.inc("inference_errors_total")
            log.error("camera %s frame %d: %s %s gave non-finite logits, embedding or unknown score; frame skipped",
                      batch[i].camera_id, batch[i].seq, runtime.bundle.name, runtime.bundle.version)
        keep = [i for i in range(len(batch)) if i not in bad]
        position = {old: new for new, old in enumerate(keep)}
        return [batch[i] for i in keep], [position[i] for i in chosen if i not in bad]

    def decide(self, inferred: Inferred) -> None:
        """Decisions, uploads and alerts for an inferred batch, stored in the outbox in one transaction.

        Under the desk's ``storing`` from the first frame to the outbox: the batch's items are decided, counted and
        stored with the shipment open now, and cmd/expect opens or closes before the batch or after it is stored
        (agent/receiving.py)."""
        t2 = time.monotonic()
        with self.receiving.storing:
            self._decide_batch(inferred)
        self.metrics.observe("decide", (time.monotonic() - t2) / len(inferred.batch))
        for stage, seconds in inferred.timings.items():
            self.metrics.observe(stage, seconds)

    def _decide_batch(self, inferred: Inferred) -> bool:
        """``decide``'s work, under ``storing``; whether a receipt was stored with the batch."""
        batch, runtime, timings = inferred.batch, inferred.runtime, inferred.timings
        flushed = self._switch(runtime) if runtime is not self._runtime else False
        policies = [self._cameras[batch[i].camera_id].policy for i in inferred.chosen]
        classes = classify_batch(inferred.probs, runtime.bundle.labels, self.cfg.decisions.top_k, policies,
                                 inferred.unknown_scores)
        by_position = dict(zip(inferred.chosen, classes))
        messages: list[Message] = []
        counted: list[tuple[ItemDecision, str]] = []     # the batch's decisions, counted when they are stored
        for i, frame in enumerate(batch):
            messages.extend(self._decide(frame, by_position.get(i), runtime, timings,
                                         inferred.started - frame.captured_mono, counted))
        messages.extend(self._held_uploads())       # a camera's interval ended without another candidate
        return self._store(messages, counted) or flushed

    def _needs_model(self, frame: Frame) -> bool:
        """False only for a frame the localizer saw empty, when presence comes from the localizer."""
        located = frame.located
        return not (self.cfg.decisions.presence.by_localizer and located is not None and not located.present)

    def _localized(self, frame: Frame, runtime: ModelRuntime) -> Frame:
        """A frame no camera thread prepared (built by hand) is localized here when anything needs it."""
        if frame.prepared is not None or frame.located is not None:
            return frame
        if not (self.cfg.decisions.presence.by_localizer or runtime.preprocessor.spec.crop.mode == "foreground"
                or self.empty_scenes is not None):
            return frame
        prepare = self._preparers.get(frame.camera_id)
        if prepare is None:
            cam = next((c for c in self.cfg.cameras if c.id == frame.camera_id), None)
            scene = load_empty_scene(self.cfg, cam) if cam is not None else None
            prepare = self._preparers[frame.camera_id] = camera_preparer(
                self.model, self.cfg.decisions.presence, scene, watch_empty=self.empty_scenes is not None)
        prepared = prepare(frame.image)
        return replace(frame, prepared=prepared, located=prepared.located)

    def _inputs(self, batch: list[Frame], runtime: ModelRuntime) -> np.ndarray:
        """The model input: what the camera threads prepared, unless it was made for another model's input
        (then the same crop rule is applied with this model's policy)."""
        if all(f.prepared is not None and f.prepared.key is runtime.preprocessor and f.prepared.input is not None
               for f in batch):
            return np.stack([f.prepared.input for f in batch])
        policy = runtime.preprocessor.spec.crop
        return runtime.preprocessor.batch([model_input_image(f, policy) for f in batch])

    def _switch(self, runtime: ModelRuntime) -> bool:
        """A new model: new per-camera policies (built from the overrides under ``_policy_lock``, so a
        cmd/thresholds arriving meanwhile is in them or applied after), the item trackers carried over.

        With the same labels (a routine rollout, or cmd/model re-sending the running bundle) an item in view
        across the swap is one item and one decision: it is decided when it leaves, by the new model's policy on
        the frames of both, and its decision names the new model (the one whose thresholds judged it; its frames'
        results name the model that classified each). With other labels the items still open are decided with
        the old model first; item numbers go on either way (``CameraDecisions``). Whether a receipt was stored
        with those."""
        old = self._runtime
        flushed = False
        if old is not None and list(old.bundle.labels) != list(runtime.bundle.labels):
            flushed = self._flush_items()
        with self._policy_lock:
            self._cameras = {c.id: CameraDecisions(c, self.cfg, runtime.bundle, self.threshold_overrides.get(c.id),
                                                   self.receiving, runtime.backend.precision,
                                                   before=self._cameras.get(c.id))
                             for c in self.cfg.cameras}
            self._runtime = runtime
        self.metrics.info.update(model_name=runtime.bundle.name, model_version=runtime.bundle.version)
        return flushed

    def set_thresholds(self, camera_ids: list[str], thresholds: Thresholds) -> None:
        """cmd/thresholds: new policy objects, swapped in by reference (the inference thread reads them per frame).
        Under ``_policy_lock`` with a model swap's rebuild of the per-camera state: never applied to a state the
        swap then throws away, nor to one it has not made yet."""
        with self._policy_lock:
            for cid in camera_ids:
                self.threshold_overrides[cid] = merge_thresholds(self.threshold_overrides.get(cid, Thresholds()),
                                                                 thresholds)
            runtime = self._runtime
            if runtime is None:
                return
            cams = {c.id: c for c in self.cfg.cameras}
            for cid in camera_ids:
                state = self._cameras[cid]
                policy = camera_policy(runtime.bundle, cams[cid], self.threshold_overrides[cid],
                                       runtime.backend.precision, self.cfg.decisions.unknown_items)
                state.policy = policy
                if state.tracker is not None:
                    state.tracker.policy = policy

    def _flush_items(self) -> bool:
        """Decide the items still open (end of input, or a model with other labels), and send the low-confidence
        frame each camera holds (``UploadGate.flush``: none is lost at the end); whether a receipt was stored
        with them."""
        messages: list[Message] = []
        counted: list[tuple[ItemDecision, str]] = []
        for state in self._cameras.values():
            if state.tracker is not None and (decision := state.tracker.flush()) is not None:
                messages.extend(self._decision_messages(decision, counted))
        messages.extend(self._held_uploads(everything=True))
        return self._store(messages, counted)

    def _store(self, messages: list[Message], counted: list[tuple[ItemDecision, str]]) -> bool:
        """A batch's messages, then the receipt due with them; whether a receipt was stored. The open shipment
        counts the batch's decisions (``counted``: each decision and its message's id) that the outbox stored,
        none when the write fails: a receipt counts only items whose decision a subscriber can get. All under the
        desk's ``storing`` lock, as cmd/expect's receipts are (agent/receiving.py). A receipt whose state cannot
        be saved first is not stored and stays due (the saver logs and counts it): the batch itself is stored."""
        with self.receiving.storing:
            try:
                # saved first with the decisions it counts and the seqs they get: a crash once the batch is stored
                # neither loses nor doubles them; no status or stats seq is taken in between (seq_hold)
                with self.outbox.seq_hold:
                    self.receiving.stage(counted, [m.body.get("id") for m in messages])
                    records = self.outbox.put_many(messages) if messages else []
            except Exception as exc:    # a batch larger than one transaction: its chunks stored before are counted
                self._count_stored(counted, getattr(exc, "stored_records", []))
                self._empty_scenes_unsent(messages, getattr(exc, "stored_records", []))
                raise
            self._count_stored(counted, records)
            try:
                return self._store_receipt()
            except ReceiptSaveError:
                return False

    def _empty_scenes_unsent(self, messages: list[Message], stored: list[Record]) -> None:
        """The empty-scene frames of a batch the outbox did not store are wanted again (agent/empty_scene.py): a
        full disk lost a frame an operator asked for by cmd/capture-empty, which still counted as sent."""
        if self.empty_scenes is None:
            return
        kept = {(r.body.get("camera"), r.body.get("frame_seq")) for r in stored if r.kind == "frame"}
        for m in messages:
            body = m.body
            if m.kind == "frame" and body.get("kind") == "empty-scene" and \
                    (body.get("camera"), body.get("frame_seq")) not in kept:
                self.empty_scenes.unsent(body["camera"], body["trigger"], self.clock())
                self.metrics.inc("empty_scenes_unsent_total", camera=body["camera"], trigger=body["trigger"])
                log.warning("camera %s: empty-scene frame %d not stored; wanted again", body["camera"],
                            body["frame_seq"])

    def _count_stored(self, counted: list[tuple[ItemDecision, str]], records: list[Record]) -> None:
        """The open shipment counts the decisions among ``counted`` whose messages the outbox stored."""
        stored = {r.id: r.seq for r in records if r.kind == "decision"}
        for decision, decision_id in counted:
            if decision_id in stored:
                self.receiving.record(decision, decision_id, stored[decision_id])
        self.receiving.settle()

    def _store_receipt(self) -> bool:
        """The open shipment's receipt, when items were counted since the last one and its interval allows, stored
        after the decisions it counts; one the outbox cannot store is due again with the next batch."""
        self.receiving.flush_closing()      # a final receipt a restart could not store yet goes first
        now = self.clock()
        receipt = None
        try:
            with self.receiving.receipt_due(now) as receipt:
                if receipt is None:
                    return False
                self.receiving.save_for_receipt()   # first: the saved tally is never behind a stored receipt
                self.outbox.put(Message("receipt", receipt_body(receipt, site=self.cfg.site,
                                                                station=self.cfg.station, ts=now, final=False)))
        except ReceiptSaveError:
            raise       # logged and counted by the saver (state_save_errors_total)
        except Exception as exc:    # not a failed batch: its decisions are stored and counted
            if receipt is None:
                raise
            self.metrics.inc("receipt_store_errors_total")
            log.error("shipment %s: its receipt could not be stored in the outbox %s (%s: %s); due again with the "
                      "next batch (the items it counts are stored and counted)", receipt["shipment"],
                      self.outbox.path, type(exc).__name__, exc)
            return False
        self.metrics.inc("receipts_total")
        return True

    def _save_shipment(self) -> None:
        """The agent saves the shipment as the desk holds it now (station-state.json), under ``storing``."""
        if self.on_receipt is not None:
            self.on_receipt()

    def _store_final(self, shipment: Any) -> None:
        """The final receipt of a shipment closed before a restart, stored again as it was saved (its id and ts):
        either the first time (the station stopped before storing it) or a duplicate a subscriber drops by id."""
        body = receipt_body(self.receiving.receipt_of(shipment), site=self.cfg.site, station=self.cfg.station,
                            ts=shipment.final_ts, final=True)
        try:
            self.outbox.put(Message("receipt", body))
        except sqlite3.IntegrityError as exc:      # a message of its id is in the outbox: stored, not yet sent
            if "UNIQUE" not in str(exc):
                raise
            log.info("shipment %s: its final receipt %s is in the outbox already", shipment.id, body["id"])
            return
        self.metrics.inc("receipts_total")
        log.warning("shipment %s: its final receipt %s, saved at its close before a restart, is stored again "
                    "(a subscriber drops a duplicate by id)", shipment.id, body["id"])

    def _decide(self, frame: Frame, cls: Classification | None, runtime: ModelRuntime, timings: dict[str, float],
                queue_s: float, counted: list[tuple[ItemDecision, str]]) -> list[Message]:
        """One frame's messages; an item it ends is decided, and its decision added to ``counted``."""
        state = self._cameras[frame.camera_id]
        self.metrics.observe("queue", queue_s)
        empty_scene = self._maybe_empty_scene(frame, runtime)
        located = frame.located.present if frame.located is not None else None
        present = item_present(self.cfg.decisions.presence, located, cls.top_label if cls is not None else None)
        decision, track = None, None
        if state.tracker is not None:        # first, so that the frame's upload carries its item's track
            obs = _observation(frame, cls, self._item_views) if present and cls is not None else None
            decision, track = state.tracker.update(obs, bool(present)), state.tracker.track
        if present is False or cls is None:
            out = self._empty_frame(frame, runtime, timings, queue_s)
        else:
            out = self._item_frame(frame, cls, runtime, timings, queue_s, present, track)
        if decision is not None:
            out.extend(self._decision_messages(decision, counted))
        return out + empty_scene

    def _item_frame(self, frame: Frame, cls: Classification, runtime: ModelRuntime, timings: dict[str, float],
                    queue_s: float, present: bool | None, track: str | None = None) -> list[Message]:
        """A frame with an item (or with presence off): result, low-confidence upload, QC alert. ``track``: the id
        of the item the frame shows (``ItemTracker.track``), carried by its upload."""
        self.metrics.inc("frames_classified_total", camera=frame.camera_id)
        out: list[Message] = []
        if self.cfg.decisions.publish_results:
            out.append(Message("result", self._result_body(frame, cls, runtime, timings, queue_s, present)))
        if cls.class_id is None:
            self.metrics.inc("frames_unknown_total", camera=frame.camera_id)
        if cls.low_confidence:
            self.metrics.inc("frames_low_confidence_total", camera=frame.camera_id)
            out.extend(self._maybe_upload(frame, cls, runtime, track))
        if self.qc.check(frame.camera_id, cls, self.clock()):
            out.append(Message("alert", self._alert_body(frame, cls, runtime)))
        return out

    def _empty_frame(self, frame: Frame, runtime: ModelRuntime, timings: dict[str, float],
                     queue_s: float) -> list[Message]:
        """No item: no product label, never low-confidence, never uploaded; counted, published only on request."""
        self.metrics.inc("frames_empty_total", camera=frame.camera_id)
        if not (self.cfg.decisions.publish_results and self.cfg.decisions.empty_frames == "publish"):
            return []
        body = {"schema": "result.v1", **self._common(frame, runtime), "label": None, "class_id": None,
                "confidence": None, "top_k": [], "low_confidence": False, "reasons": [],
                "latency_ms": self._latency(timings, queue_s, ran_model=False), "present": False,
                **self._localization(frame, runtime)}
        if frame.source_ref is not None:
            body["source_ref"] = frame.source_ref
        return [Message("result", body)]

    # ------------------------------------------------------------ payloads

    def _common(self, frame: Frame, runtime: ModelRuntime) -> dict[str, Any]:
        return {"ts": round(self.clock(), 6), "site": self.cfg.site, "station": self.cfg.station,
                "camera": frame.camera_id, "frame_seq": frame.seq, "captured_at": round(frame.captured_at, 6),
                "model": runtime.identity}

    def _result_body(self, frame: Frame, cls: Classification, runtime: ModelRuntime,
                     timings: dict[str, float], queue_s: float, present: bool | None = None) -> dict[str, Any]:
        body = {"schema": "result.v1", **self._common(frame, runtime), "label": cls.label, "class_id": cls.class_id,
                "confidence": round(cls.confidence, 6), "top_k": top_k_json(cls.top_k),
                "low_confidence": cls.low_confidence, "reasons": list(cls.reasons),
                "latency_ms": self._latency(timings, queue_s, ran_model=True)}
        if cls.unknown_score is not None:
            body["unknown_score"] = carried_score(cls.unknown_score)
        if present is not None:
            body["present"] = present
        body.update(self._localization(frame, runtime))
        if frame.source_ref is not None:
            body["source_ref"] = frame.source_ref
        return body

    @staticmethod
    def _latency(timings: dict[str, float], queue_s: float, ran_model: bool) -> dict[str, float]:
        return {"queue": round(queue_s * 1000, 3), "preprocess": round(timings["preprocess"] * 1000, 3),
                "inference": round(timings["inference"] * 1000, 3) if ran_model else 0.0}

    @staticmethod
    def _localization(frame: Frame, runtime: ModelRuntime) -> dict[str, Any]:
        """Where the item is and what the model was fed (ROI pixels), for localized frames only."""
        located = frame.located
        if located is None:
            return {}
        crop = fed_box(frame, runtime.preprocessor.spec.crop) if located.present else None
        return {"item_box": list(located.box) if located.box else None, "crop_box": list(crop) if crop else None,
                "fg_fraction": round(float(located.fg_fraction), 4)}

    def _alert_body(self, frame: Frame, cls: Classification, runtime: ModelRuntime) -> dict[str, Any]:
        log.warning("QC alert: camera %s saw %s (%.2f)", frame.camera_id, cls.label, cls.confidence)
        return {"schema": "alert.v1", **self._common(frame, runtime), "defect": cls.label,
                "confidence": round(cls.confidence, 6),
                "evidence": {"top_k": top_k_json(cls.top_k), "frame_seq": frame.seq, "source_ref": frame.source_ref,
                             "thumbnail_jpeg_b64": thumbnail_b64(frame.image)}}

    @property
    def _item_views(self) -> bool:
        """Whether the item tracker keeps each item's best view (to upload it when the item is decided unsure)."""
        return self.cfg.frames.enabled and self.cfg.frames.item_views

    def _decision_messages(self, d: ItemDecision, counted: list[tuple[ItemDecision, str]]) -> list[Message]:
        """The decision, its id set here (the outbox keeps it) so the shipment's tally and the item's view can
        name it; then, for an item decided unsure (review or unknown), its best view for labelling. Its ``model``
        is the one running when the item is decided: for an item seen across a swap, the new model (``_switch``).
        The decision joins ``counted``: the open shipment counts it when its message is stored (``_store``)."""
        runtime = self._runtime
        decision_id = str(uuid.uuid4())
        counted.append((d, decision_id))
        body = {"schema": "decision.v1", "id": decision_id, "ts": round(self.clock(), 6), "site": self.cfg.site,
                "station": self.cfg.station, "camera": d.camera_id, "item_seq": d.item_seq, "label": d.label,
                "class_id": d.class_id, "confidence": d.confidence, "agreement": d.agreement, "frames": d.frames,
                "first_seen": round(d.first_seen, 6), "last_seen": round(d.last_seen, 6), "lane": d.lane,
                "low_confidence": d.low_confidence, "reasons": list(d.reasons), "top_k": top_k_json(d.top_k),
                "model": runtime.identity if runtime else None}
        if d.unknown_score is not None:
            body["unknown_score"] = d.unknown_score
        if d.track is not None:
            body["track"] = d.track
        if d.vouched:
            body["vouched"] = True
            self.metrics.inc("items_vouched_total", camera=d.camera_id)
        if d.class_id is None:
            self.metrics.inc("items_unknown_total", camera=d.camera_id)
        self.metrics.inc("items_decided_total", camera=d.camera_id)
        out = [Message("decision", body)]
        if d.low_confidence and d.view is not None and self._item_views and runtime is not None:
            out.extend(self._upload(d.view, runtime, d.label, d.confidence, d.top_k, d.reasons, d.unknown_score,
                                    item={"decision": decision_id, "item_seq": d.item_seq, "frames": d.frames},
                                    track=d.track))
        return out

    def _maybe_upload(self, frame: Frame, cls: Classification, runtime: ModelRuntime,
                      track: str | None = None) -> list[Message]:
        """A low-confidence frame for retraining, unless the upload gate holds it back."""
        return self._upload(frame, runtime, cls.label, cls.confidence, cls.top_k, cls.reasons, cls.unknown_score,
                            track=track)

    def _upload(self, frame: Frame, runtime: ModelRuntime, label: str, confidence: float,
                top_k: Sequence[tuple[str, float]], reasons: Sequence[str], unknown_score: float | None,
                item: dict[str, Any] | None = None, track: str | None = None) -> list[Message]:
        """The frame for retraining: the JPEG is what the model saw (the item crop when it was fed one; else
        the ROI or the whole frame), and an item crop travels with a small ROI JPEG and its box for context.

        ``item``: the frame is the best view of an item decided unsure (``frames.item_views``), sent once per
        item: the rate limit does not hold it back, a near-duplicate of a recent upload does. ``track``: the id of
        the item in view, the same on all its frames and its decision (central keeps an item's frames on one side
        of a retrain's split)."""
        fcfg = self.cfg.frames
        if not fcfg.enabled:
            return []
        box = fed_box(frame, runtime.preprocessor.spec.crop)
        item_crop = box != (0, 0, frame.image.shape[1], frame.image.shape[0])
        if item_crop:
            image = cut(frame.image, box)
        else:
            image = frame.image if fcfg.crop_roi or frame.full_image is None else frame.full_image
        send = functools.partial(self._frame_message, frame, runtime, image, box, item_crop, label, confidence,
                                 top_k, reasons, unknown_score, item, track)
        if item is not None:
            held = self.uploads.admit(frame.camera_id, lambda: dhash(image), self.clock(), rate_limited=False)
            if held is not None:
                self.metrics.inc("frames_upload_suppressed_total", camera=frame.camera_id, why=held)
                return []
            return [send()]
        # the least certain frame of the camera's interval goes when the interval ends (UploadGate.offer)
        return self._gated(frame.camera_id, self.uploads.offer(frame.camera_id, confidence, lambda: dhash(image),
                                                               self.clock(), send))

    def _gated(self, camera_id: str, outcome: GateOutcome) -> list[Message]:
        """The frames the upload gate released, built now; those it held back for good, counted."""
        for why in outcome.held_back:
            self.metrics.inc("frames_upload_suppressed_total", camera=camera_id, why=why)
        return [send() for send in outcome.send]

    def _held_uploads(self, *, everything: bool = False) -> list[Message]:
        """The low-confidence frames held by cameras whose interval has ended (each batch), or all (the end)."""
        out: list[Message] = []
        if self.cfg.frames.enabled:
            now = self.clock()
            for cam in self.cfg.cameras:
                out += self._gated(cam.id, self.uploads.flush(cam.id) if everything
                                   else self.uploads.sweep(cam.id, now))
        return out

    def _frame_message(self, frame: Frame, runtime: ModelRuntime, image: np.ndarray, box: tuple[int, int, int, int],
                       item_crop: bool, label: str, confidence: float, top_k: Sequence[tuple[str, float]],
                       reasons: Sequence[str], unknown_score: float | None, item: dict[str, Any] | None,
                       track: str | None) -> Message:
        """The frame.v1 message of an upload the gate let through (at once, or at the end of its interval)."""
        fcfg = self.cfg.frames
        jpeg = encode_jpeg(image, fcfg.jpeg_quality)
        self.metrics.inc("frames_uploaded_total", camera=frame.camera_id)
        if item is not None:
            self.metrics.inc("item_views_uploaded_total", camera=frame.camera_id)
        body = {"schema": "frame.v1", **self._common(frame, runtime), "label": label,
                "confidence": round(confidence, 6), "top_k": top_k_json(top_k),
                "selected_because": list(reasons), "source_ref": frame.source_ref,
                "jpeg": {"width": int(image.shape[1]), "height": int(image.shape[0]), "quality": fcfg.jpeg_quality,
                         "bytes": len(jpeg), "roi_crop": item_crop or (image is frame.image
                                                                       and self._has_roi(frame.camera_id)),
                         "item_crop": item_crop}}
        if unknown_score is not None:
            body["unknown_score"] = carried_score(unknown_score)
        if item is not None:
            body["item"] = item
        if track is not None:
            body["track"] = track
        if item_crop:
            body["context"] = {"crop_box": list(box), "roi_width": int(frame.image.shape[1]),
                               "roi_height": int(frame.image.shape[0]),
                               "roi_jpeg_b64": thumbnail_b64(frame.image, CONTEXT_SIDE, CONTEXT_QUALITY)}
        return Message("frame", body, jpeg)

    def _maybe_empty_scene(self, frame: Frame, runtime: ModelRuntime) -> list[Message]:
        """The ROI as an empty-scene frame, when one is wanted (command or schedule) and the localizer sees
        nothing in view; never a frame with an item (agent/empty_scene.py)."""
        if self.empty_scenes is None:
            return []
        scene_empty = frame.prepared.scene_empty if frame.prepared is not None else None
        offer = self.empty_scenes.offer(frame.camera_id, scene_empty, self.clock())
        if offer.given_up:
            self.metrics.inc("empty_scenes_given_up_total", offer.given_up, camera=frame.camera_id)
        if offer.trigger is None:
            return []
        quality = self.cfg.frames.jpeg_quality
        jpeg = encode_jpeg(frame.image, quality)
        self.metrics.inc("empty_scenes_sent_total", camera=frame.camera_id, trigger=offer.trigger)
        log.info("camera %s: empty-scene frame %d sent (%s)", frame.camera_id, frame.seq, offer.trigger)
        body = {"schema": "frame.v1", "kind": "empty-scene", "trigger": offer.trigger, **self._common(frame, runtime),
                "source_ref": frame.source_ref,
                "jpeg": {"width": int(frame.image.shape[1]), "height": int(frame.image.shape[0]), "quality": quality,
                         "bytes": len(jpeg), "roi_crop": self._has_roi(frame.camera_id), "item_crop": False}}
        return [Message("frame", body, jpeg)]

    def _has_roi(self, camera_id: str) -> bool:
        return any(c.id == camera_id and c.roi is not None for c in self.cfg.cameras)


def _observation(frame: Frame, cls: Classification, keep_view: bool = False) -> Observation:
    """What the item tracker keeps of a frame: with a localized item, its box and whether all of it is in view;
    with ``keep_view``, the frame itself for the item's best view (the tracker keeps one per item)."""
    view = frame if keep_view else None
    located = frame.located
    if located is None or located.box is None:
        return Observation(frame.seq, frame.captured_at, cls, view=view)
    height, width = frame.image.shape[:2]
    return Observation(frame.seq, frame.captured_at, cls, located.box, roi_edges(located.box, width, height), view)
