"""The station runs the fastest deployable ONNX artifact of its bundle, measured on its own hardware.

Choosing is tested with injected timings (timing itself would make tests flaky); the real measurement is
tested once for positive, finite figures. Sessions are real ONNX Runtime sessions on a real bundle.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from agent.backends import BackendError, create_backend
from agent.backends.artifact_choice import choose_onnx_backend, pick_precision
from agent.backends.onnxruntime import OnnxRuntimeBackend
from agent.config import ModelConfig
from contract.bundle import load_bundle


@pytest.fixture(scope="module")
def both_deployable(real_bundle, tmp_path_factory) -> Path:
    """The real bundle with its INT8 model marked deployable (a tiny 32 px model may miss the gate)."""
    root = tmp_path_factory.mktemp("both") / "fashion-mnist" / "1"
    shutil.copytree(real_bundle, root)
    manifest = json.loads((root / "manifest.json").read_text())
    for art in manifest["artifacts"]:
        if art["role"] == "onnx-int8":
            art["deployable"], art["reason"] = True, None
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def int8_refused(real_bundle, tmp_path_factory) -> Path:
    """The real bundle with its INT8 model marked not deployable, whatever the gate said."""
    root = tmp_path_factory.mktemp("refused") / "fashion-mnist" / "1"
    shutil.copytree(real_bundle, root)
    manifest = json.loads((root / "manifest.json").read_text())
    for art in manifest["artifacts"]:
        if art["role"] == "onnx-int8":
            art["deployable"], art["reason"] = False, "INT8 top-1 is 2.00 points below FP32"
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _builder(bundle, built: list[str]):
    def build(artifact):
        built.append(artifact.precision)
        return OnnxRuntimeBackend(artifact.path, bundle.input_spec, precision=artifact.precision, intra_op_threads=1,
                                  embedding_name=bundle.embedding_name)     # as create_backend builds it
    return build


def _timings(**ms: float):
    return lambda backends, sample: {p: ms[p] for p in backends}


class NanBackend:
    """A model that loads but whose logits are not finite (e.g. a broken INT8 export)."""

    name = "fake:nan"

    def __init__(self, precision: str) -> None:
        self.precision = precision

    def run(self, batch: np.ndarray) -> np.ndarray:
        return np.full((len(batch), 10), np.nan, np.float32)

    def warmup(self, batch_size: int, runs: int) -> None:
        pass


def test_pick_precision_from_injected_timings():
    assert pick_precision("auto", {"fp32": 0.25, "int8": 0.61}) == "fp32"  # 4,001 vs 1,649 img/s, no VNNI
    assert pick_precision("auto", {"fp32": 2.0, "int8": 1.0}) == "int8"
    assert pick_precision("auto", {"fp32": 1.0, "int8": 1.0}) == "fp32"  # a tie: no rounding error
    assert pick_precision("auto", {"fp32": 1.0, "int8": math.inf}) == "fp32"
    assert pick_precision("auto", {"int8": 1.0}) == "int8"
    assert pick_precision("int8", {"fp32": 0.1, "int8": 5.0}) == "int8"
    assert pick_precision("fp32", {"fp32": 5.0, "int8": 0.1}) == "fp32"
    assert pick_precision("int8", {"fp32": 1.0}) == "fp32"
    with pytest.raises(BackendError, match="no usable ONNX artifact"):
        pick_precision("auto", {"fp32": math.nan})


@pytest.mark.parametrize(("fp32_ms", "int8_ms", "expected"), [(3.0, 1.0, "int8"), (1.0, 3.0, "fp32")])
def test_auto_runs_the_faster_deployable_artifact_and_reports_both(both_deployable, fp32_ms, int8_ms, expected):
    bundle = load_bundle(both_deployable)
    built: list[str] = []
    backend = choose_onnx_backend(bundle, "auto", 4, _builder(bundle, built), _timings(fp32=fp32_ms, int8=int8_ms))
    assert backend.precision == expected and backend.model_path.name == f"model.{expected}.onnx"
    assert backend.choice.ms_per_batch == {"fp32": fp32_ms, "int8": int8_ms}
    assert backend.choice.precision == expected and backend.choice.mode == "auto" and backend.choice.batch == 4
    assert sorted(built) == ["fp32", "int8"]
    assert backend.run(np.zeros((2, 3, 32, 32), np.float32)).shape == (2, 10)


@pytest.mark.parametrize("pinned", ["int8", "fp32"])
def test_pinned_precision_is_obeyed_and_the_other_is_not_loaded(both_deployable, pinned):
    bundle = load_bundle(both_deployable)
    built: list[str] = []
    slower_pinned = _timings(fp32=9.0 if pinned == "fp32" else 1.0, int8=9.0 if pinned == "int8" else 1.0)
    backend = choose_onnx_backend(bundle, pinned, 4, _builder(bundle, built), slower_pinned)
    assert backend.precision == pinned and built == [pinned] and backend.choice.mode == pinned


@pytest.mark.parametrize("mode", ["auto", "int8"])
def test_a_non_deployable_int8_is_never_loaded(int8_refused, mode):
    bundle = load_bundle(int8_refused)
    built: list[str] = []
    backend = choose_onnx_backend(bundle, mode, 4, _builder(bundle, built), _timings(fp32=9.0, int8=0.1))
    assert backend.precision == "fp32" and built == ["fp32"]
    assert "not deployable per the manifest (INT8 top-1 is 2.00 points below FP32)" in backend.choice.skipped["int8"]


def test_non_finite_logits_make_a_candidate_unusable(both_deployable, caplog):
    bundle = load_bundle(both_deployable)
    real = _builder(bundle, [])

    def nan_int8(artifact):
        return NanBackend("int8") if artifact.precision == "int8" else real(artifact)

    backend = choose_onnx_backend(bundle, "int8", 4, nan_int8)
    assert backend.precision == "fp32" and "non-finite logits" in backend.choice.skipped["int8"]
    assert "precision int8 pinned but that artifact cannot run here; running fp32" in caplog.text


def test_a_bundle_with_no_usable_artifact_is_refused_by_name(both_deployable):
    bundle = load_bundle(both_deployable)
    with pytest.raises(BackendError, match=r"no ONNX artifact of bundle fashion-mnist 1 can run here .*non-finite"):
        choose_onnx_backend(bundle, "auto", 4, lambda artifact: NanBackend(artifact.precision))


def test_real_measurement_gives_positive_finite_figures_for_both(both_deployable):
    """Through create_backend as the station calls it: both artifacts timed, the faster one running."""
    cfg = ModelConfig(bundle=both_deployable, backend="onnxruntime", batch_size=4, intra_op_threads=1)
    backend = create_backend(load_bundle(both_deployable), cfg)
    ms = backend.choice.ms_per_batch
    assert set(ms) == {"fp32", "int8"} and all(math.isfinite(v) and v > 0 for v in ms.values())
    assert backend.precision == backend.choice.precision == min(ms, key=ms.get)


def test_precision_config_and_the_older_prefer_int8(tmp_path):
    assert ModelConfig(bundle=tmp_path).onnx_precision == "auto"
    assert ModelConfig(bundle=tmp_path, prefer_int8=True).onnx_precision == "auto"
    assert ModelConfig(bundle=tmp_path, prefer_int8=False).onnx_precision == "fp32"
    assert ModelConfig(bundle=tmp_path, prefer_int8=False, precision="int8").onnx_precision == "int8"
    with pytest.raises(ValueError, match="precision"):
        ModelConfig(bundle=tmp_path, precision="fp16")


def test_the_status_says_which_artifact_runs_and_both_timings(both_deployable, tmp_path):
    from agent_support import as_config, station_config, validate_message

    from agent.app import Agent, build_runtime
    from agent.pipeline import ModelHolder

    cfg = as_config(station_config(tmp_path, both_deployable, "unused.avi", 1883,
                                   model={"precision": "auto", "intra_op_threads": 1}))
    agent = Agent(cfg)
    agent.model = ModelHolder(build_runtime(cfg, load_bundle(both_deployable)))
    status = {**agent.status_body("online"), "seq": 1}  # the publisher numbers messages
    validate_message("status.v1", status)
    choice = status["artifact_choice"]
    assert set(choice["ms_per_batch"]) == {"fp32", "int8"} and choice["batch"] == 4 and choice["mode"] == "auto"
    assert status["model"]["precision"] == choice["precision"]
    agent.model = None
    validate_message("status.v1", {**agent.status_body("offline"), "seq": 2})


# ---------------------------------------------------------------- candidates whose outputs do not fit the manifest

def _with_int8(folder: Path, int8_model: Path) -> Path:
    """``folder``'s bundle with ``int8_model`` added as its deployable onnx-int8 artifact."""
    from contract.bundle import artifact_entry

    shutil.copy(int8_model, folder / "model.int8.onnx")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["artifacts"].append(artifact_entry(folder / "model.int8.onnx", folder, role="onnx-int8",
                                                precision="int8", deployable=True))
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _wider_embedding(model_path: Path, out: Path) -> Path:
    """The open-set bundle's model with an embedding twice the manifest's ``embedding_dim`` (the colour, twice)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(model_path))
    graph = model.graph
    identity = next(n for n in graph.node if n.output[0] == "embedding")
    graph.node.remove(identity)
    graph.node.append(helper.make_node("Concat", ["flat", "flat"], ["embedding"], axis=1))
    emb = next(o for o in graph.output if o.name == "embedding")
    emb.type.tensor_type.shape.dim[1].dim_value = 6
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return out


@pytest.mark.parametrize("precision", ["int8", "auto"])
def test_an_int8_whose_logits_do_not_fit_the_labels_is_passed_over_for_fp32(tmp_path, precision):
    """Checked only after the choice, it made the station refuse a bundle whose FP32 model runs."""
    from agent_support import as_config, make_onnx_bundle, station_config

    from agent.app import build_runtime

    # given: a 4-label bundle whose deployable INT8 model gives 5 outputs (an export gone wrong)
    five = make_onnx_bundle(tmp_path / "five", classes=5) / "model.fp32.onnx"
    folder = _with_int8(make_onnx_bundle(tmp_path / "bundle", classes=4), five)
    cfg = as_config(station_config(tmp_path, folder, "unused.avi", 1883,
                                   model={"precision": precision, "intra_op_threads": 1}))
    # when: the station builds its runtime, pinned to INT8 or choosing
    runtime = build_runtime(cfg, load_bundle(folder))
    # then: FP32 runs, and the status says why INT8 does not
    assert runtime.backend.precision == "fp32" and set(runtime.backend.choice.ms_per_batch) == {"fp32"}
    assert "model.int8.onnx: 5 outputs per image but field labels has 4" in runtime.backend.choice.skipped["int8"]


def test_an_int8_whose_embedding_is_not_the_manifests_size_is_passed_over_for_fp32(tmp_path):
    from agent_support import make_open_set_bundle

    folder = make_open_set_bundle(tmp_path / "bundle")
    folder = _with_int8(folder, _wider_embedding(folder / "model.fp32.onnx", tmp_path / "wide.onnx"))
    bundle = load_bundle(folder)

    def build(artifact):
        return OnnxRuntimeBackend(artifact.path, bundle.input_spec, precision=artifact.precision, intra_op_threads=1,
                                  embedding_name=bundle.embedding_name)

    backend = choose_onnx_backend(bundle, "int8", 4, build, _timings(fp32=9.0, int8=0.1))
    assert backend.precision == "fp32"
    assert "model.int8.onnx: embedding shape (4, 6) on a batch of 4, expected (4, 3)" in backend.choice.skipped["int8"]


def test_a_candidate_that_fails_while_timed_is_passed_over_and_the_other_runs(tmp_path, caplog):
    """No GPU here: the INT8 session is real, and a subclass fails its runs from the third on, as a GPU provider
    running out of memory does. Before, the runtime's own exception stopped the choice (and the start)."""
    from agent_support import make_onnx_bundle

    folder = make_onnx_bundle(tmp_path / "bundle")
    folder = _with_int8(folder, folder / "model.fp32.onnx")
    bundle = load_bundle(folder)

    class FailsLater(OnnxRuntimeBackend):
        runs = 0

        def run_outputs(self, batch):
            FailsLater.runs += 1
            if FailsLater.runs > 2:                 # the check on the sample and the untimed warm-up pass
                raise RuntimeError("CUDA failure 2: out of memory")
            return super().run_outputs(batch)

    def build(artifact):
        kind = FailsLater if artifact.precision == "int8" else OnnxRuntimeBackend
        return kind(artifact.path, bundle.input_spec, precision=artifact.precision, intra_op_threads=1)

    backend = choose_onnx_backend(bundle, "auto", 4, build)
    assert backend.precision == "fp32" and set(backend.choice.ms_per_batch) == {"fp32"}
    assert backend.choice.ms_per_batch["fp32"] > 0
    assert backend.choice.skipped["int8"].startswith("no finite time per batch when timed")
    assert "(int8): a run failed while it was timed (RuntimeError: CUDA failure 2: out of memory)" in caplog.text


def test_a_timing_that_is_not_finite_leaves_the_other_candidate(both_deployable):
    bundle = load_bundle(both_deployable)
    backend = choose_onnx_backend(bundle, "auto", 4, _builder(bundle, []), _timings(fp32=math.nan, int8=2.0))
    assert backend.precision == "int8" and backend.choice.ms_per_batch == {"int8": 2.0}
    assert "no finite time per batch when timed (nan ms)" in backend.choice.skipped["fp32"]
    with pytest.raises(BackendError, match=r"gave a timing .*fp32: no finite time.*int8: no finite time"):
        choose_onnx_backend(bundle, "auto", 4, _builder(bundle, []), _timings(fp32=math.inf, int8=-1.0))
