"""The inference stage's two threads: the model runs on the next batch while the previous one is decided.

Real parts: a bundle run by ONNX Runtime, real Fashion-MNIST frames, the SQLite outbox. The only
stand-in is a gate inside ``Outbox.put_many`` that holds the decide thread, so the test can see
what the model thread does meanwhile.
"""

from __future__ import annotations

import os
import threading

import numpy as np
from agent_support import (
    as_config,
    bundle_predictions,
    make_tiny_bundle,
    station_config,
)

from agent.backends import create_backend
from agent.health import Metrics
from agent.outbox import Outbox
from agent.pipeline import InferenceStage, ModelHolder, ModelRuntime
from agent.sources.base import Frame
from agent.sources.camera import FrameHub
from contract.bundle import load_bundle
from contract.preprocess import Preprocessor


class CountingBackend:
    """The real backend, counting the batches it has run."""

    def __init__(self, backend) -> None:
        self.backend = backend
        self.name, self.precision = backend.name, backend.precision
        self.runs = 0
        self.ran = threading.Condition()

    def run(self, inputs: np.ndarray) -> np.ndarray:
        self.nice = thread_nice()
        out = self.backend.run(inputs)
        with self.ran:
            self.runs += 1
            self.ran.notify_all()
        return out


class HeldOutbox(Outbox):
    """A real outbox whose first write waits until the test opens the gate."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.writing = threading.Event()

    def put_many(self, messages):
        self.nice = thread_nice()
        self.writing.set()
        assert self.gate.wait(30), "the test never opened the gate"
        return super().put_many(messages)


def thread_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def frames_from(images: np.ndarray, n: int) -> list[np.ndarray]:
    return [np.repeat(images[i][:, :, None], 3, axis=2) for i in range(n)]


def test_the_model_runs_on_later_batches_while_a_batch_is_being_written(tmp_path, tiny_bundle, fmnist_test_images):
    cfg = as_config(station_config(tmp_path, tiny_bundle, str(tmp_path), 1883,
                                   frames={"enabled": False}, model={"batch_size": 4}))
    bundle = load_bundle(tiny_bundle)
    backend = CountingBackend(create_backend(bundle, cfg.model))
    runtime = ModelRuntime(bundle, backend, Preprocessor(bundle.input_spec))
    outbox = HeldOutbox(cfg.outbox.path, max_bytes=cfg.outbox.max_bytes, max_age_s=cfg.outbox.max_age_s)
    metrics = Metrics()
    hub = FrameHub(metrics)
    hub.add_camera("cam-a", 64, "block")
    images = frames_from(fmnist_test_images[0], 24)
    stop = threading.Event()
    for i, image in enumerate(images):
        hub.put(Frame("cam-a", i, 1000.0 + i, 0.0, image), stop)
    stage = InferenceStage(cfg, hub, ModelHolder(runtime), outbox, metrics, cameras_done=lambda: True)

    stage.start()
    try:
        # while the decide thread is held inside the outbox write of the first batch ...
        assert outbox.writing.wait(30)
        with backend.ran:
            # ... the model thread goes on: the batch after it is classified and one more is in flight
            assert backend.ran.wait_for(lambda: backend.runs >= 3, 30), f"model ran {backend.runs} batches"
        assert outbox.depth() == 0
    finally:
        outbox.gate.set()
    assert stage.finished.wait(30)
    stage.join(5)

    # every frame was decided once, in capture order, with the bundle's own prediction
    results = [r.body for r in outbox.pending(limit=1000) if r.kind == "result"]
    assert [b["frame_seq"] for b in results] == list(range(24))
    assert [b["seq"] for b in results] == sorted(b["seq"] for b in results)
    assert [b["label"] for b in results] == bundle_predictions(tiny_bundle, images)
    assert backend.runs == 6 and metrics.counter("inference_errors_total") == 0
    # the decide thread gave way to the model thread (model.pipeline_nice, default 10)
    assert outbox.nice == min(19, backend.nice + cfg.model.pipeline_nice)  # 19: the lowest priority there is
    outbox.close()


def test_a_batch_is_decided_with_the_model_that_classified_it_across_a_swap(tmp_path, tiny_bundle,
                                                                            fmnist_test_images):
    cfg = as_config(station_config(tmp_path, tiny_bundle, str(tmp_path), 1883,
                                   frames={"enabled": False}, model={"batch_size": 4}))
    bundle = load_bundle(tiny_bundle)
    first = ModelRuntime(bundle, create_backend(bundle, cfg.model), Preprocessor(bundle.input_spec))
    renamed = load_bundle(make_tiny_bundle(tmp_path / "models", version="tiny-2"))
    second = ModelRuntime(renamed, create_backend(renamed, cfg.model), Preprocessor(renamed.input_spec))
    outbox = HeldOutbox(cfg.outbox.path, max_bytes=cfg.outbox.max_bytes, max_age_s=cfg.outbox.max_age_s)
    holder = ModelHolder(first)
    metrics = Metrics()
    hub = FrameHub(metrics)
    hub.add_camera("cam-a", 64, "block")
    stage = InferenceStage(cfg, hub, holder, outbox, metrics, cameras_done=lambda: True)
    stop = threading.Event()
    images = frames_from(fmnist_test_images[0], 8)
    for i, image in enumerate(images[:4]):
        hub.put(Frame("cam-a", i, 1000.0 + i, 0.0, image), stop)

    stage.start()
    try:
        assert outbox.writing.wait(30)      # batch 1 (frames 0-3) classified by the first model, held in decide
        holder.swap(second)                 # a cmd/model swap lands while it waits
        for i, image in enumerate(images[4:], start=4):
            hub.put(Frame("cam-a", i, 1000.0 + i, 0.0, image), stop)
    finally:
        outbox.gate.set()
    assert stage.finished.wait(30)
    stage.join(5)

    versions = {r.body["frame_seq"]: r.body["model"]["version"] for r in outbox.pending(limit=100)
                if r.kind == "result"}
    assert versions == {0: "tiny-1", 1: "tiny-1", 2: "tiny-1", 3: "tiny-1",
                        4: "tiny-2", 5: "tiny-2", 6: "tiny-2", 7: "tiny-2"}
    outbox.close()


def test_auto_threads_try_one_half_and_all_cpus_and_keep_the_fastest():
    from agent.backends.onnxruntime import pick_fastest, thread_candidates

    assert [thread_candidates(n) for n in (1, 2, 6, 12)] == [[1], [1, 2], [1, 3, 6], [1, 6, 12]]
    assert pick_fastest([1, 3, 6], {1: 0.004, 3: 0.002, 6: 0.003}.get) == (3, {1: 0.004, 3: 0.002, 6: 0.003})
    assert pick_fastest([1, 2], {1: 0.002, 2: 0.002}.get)[0] == 1          # equals: the fewer threads


def test_auto_threads_time_the_real_model_and_run_it_with_the_fastest_count(tiny_bundle):
    from agent.backends.onnxruntime import OnnxRuntimeBackend

    bundle = load_bundle(tiny_bundle)
    artifact = bundle.pick_onnx(prefer_int8=False)
    auto = OnnxRuntimeBackend(artifact.path, bundle.input_spec, precision="fp32", cpus=4, tune_batch=4)
    assert list(auto.tuning) == [1, 2, 4] and all(t > 0 for t in auto.tuning.values())
    assert auto.threads == min(auto.tuning, key=auto.tuning.get)
    assert auto.session.get_session_options().intra_op_num_threads == auto.threads
    assert auto.run(np.zeros((3, 3, bundle.input_spec.height, bundle.input_spec.width), np.float32)).shape == (3, 10)
    # an explicit count is used as given, without timing
    fixed = OnnxRuntimeBackend(artifact.path, bundle.input_spec, precision="fp32", intra_op_threads=3, cpus=4)
    assert fixed.tuning == {} and fixed.threads == 3


def test_lower_this_thread_changes_only_the_calling_thread():
    from agent.priority import lower_this_thread

    before, seen = thread_nice(), {}

    def worker():
        seen["ok"] = lower_this_thread(4)
        seen["nice"] = thread_nice()

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == {"ok": True, "nice": min(19, before + 4)}
    assert thread_nice() == before
    assert lower_this_thread(0) is False


def test_a_thresholds_command_during_a_model_swap_is_in_force_after_it(tmp_path, monkeypatch):
    """cmd/thresholds (command thread) while a swap (decide thread) rebuilds the per-camera state: the command
    waits for the rebuild and lands on the new state. Without the lock it failed (no camera yet, on the first
    swap) or was applied to the old state the swap then dropped. The rebuild is held open on purpose."""
    import agent.pipeline as pipeline
    from agent_support import inference_stage

    from agent.config import Thresholds

    bundle = make_tiny_bundle(tmp_path / "b")
    stage, _, _, runtime = inference_stage(as_config(station_config(tmp_path, bundle, str(tmp_path), 1)), bundle)
    for first_swap in (True, False):
        if not first_swap:
            stage._switch(runtime)
        building, go = threading.Event(), threading.Event()
        real = pipeline.CameraDecisions

        class Held(real):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                building.set()
                assert go.wait(30)

        monkeypatch.setattr(pipeline, "CameraDecisions", Held)
        swap = threading.Thread(target=stage._switch, args=(runtime,))
        swap.start()
        assert building.wait(30)
        errors = []

        def command_thread():
            try:
                stage.set_thresholds(["cam-a"], Thresholds(min_confidence=0.9 + first_swap * 0.05))
            except Exception as exc:     # noqa: BLE001 - the assertion below names it
                errors.append(exc)

        command = threading.Thread(target=command_thread)
        command.start()
        command.join(0.3)
        go.set()
        swap.join(30)
        command.join(30)
        monkeypatch.setattr(pipeline, "CameraDecisions", real)
        want = 0.9 + first_swap * 0.05
        assert errors == [] and stage._cameras["cam-a"].policy.thresholds.min_confidence == want

