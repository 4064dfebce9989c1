"""Checkpoint -> verified model bundle (docs/bundle.md)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from contract import openset
from contract.bundle import (
    MANIFEST,
    ROLE_ENGINE,
    ROLE_FP32,
    ROLE_INT8,
    ROLE_OPEN_SET,
    artifact_entry,
    check_model_runs,
    check_name_version,
    load_bundle,
    load_public_key,
    partial_dir,
    process_runs,
    sweep_partials,
)
from contract.messages import dumps_finite
from contract.preprocess import InputSpec
from trainer import data as data_mod
from trainer.data import spread, spread_classes
from trainer.engine import load_checkpoint_model
from trainer.evaluate import (
    CHUNK_IMAGES,
    ChainedInputs,
    ImageFileInputs,
    compute_metrics,
    low_confidence_report,
    onnx_outputs,
    onnx_outputs_each,
    softmax,
    suggest_thresholds,
    within_review_budget,
    write_reports,
)
from trainer.export.onnx import EMBEDDING_NAME, OPSET, export_onnx, parity, written_opset
from trainer.export.quantize import QuantizeConfig, int8_gate, quantize_qdq

log = logging.getLogger(__name__)

EMBEDDING_COSINE_GATE = 0.98    # INT8 embedding vs FP32, median over validation images (0.99+ on our recipes)


@dataclass
class ExportConfig:
    checkpoint: Path
    models_dir: Path = Path("models")
    name: str | None = None
    version: str | None = None
    parity_images: int = 256
    gate_margin_points: float = 1.0
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    tensorrt: str = "auto"  # auto: build where TensorRT and a GPU are present; off; on (fail if absent)
    sign_key: Path | None = None
    workers: int = 2
    val_limit: int | None = None
    station_val_images: int = 1000   # foreground-crop bundles: validation images also seen as a station sees them
    review_budget: float | None = None  # suggested thresholds flag at most this share of the station-view (else
    #                                     val) set; None: no cap (the thresholds also pick the frames for retraining)
    unknown_score: str = openset.DEFAULT_SCORE  # contract.openset.SCORES; chosen by benchmarks/open_set.py
    unknown_keep: float = openset.DEFAULT_KEEP  # share of known items the unknown threshold keeps
    open_set_images: int = 2000          # training images the class statistics are fitted on
    chunk_images: int = CHUNK_IMAGES     # images read and preprocessed (or rendered) at a time: each set of images
    #                                      is streamed, pass by pass, never held whole (the figures do not change)


@dataclass
class ExportResult:
    bundle_dir: Path
    manifest: dict
    fp32_metrics: dict
    int8_metrics: dict | None


def code_version() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _versions(opset: int = OPSET) -> dict:
    """The frameworks' versions, and ``opset``: the one the FP32 file was written with (read from it: the
    TorchScript exporter, export_onnx's fallback, writes 17, not OPSET)."""
    import onnx
    import onnxruntime
    import torchvision

    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "opset": int(opset)}


def _split_samples(run_dir: Path, classes: list[str]) -> tuple[list, list]:
    """Train and val samples of the run, from its saved split (a station's frames marked ``as_seen``).

    Checked before any work: DatasetError naming the file when it cannot be read, is not a saved split (root,
    classes, train and val lists of [path, class index]) or has no validation image (the export evaluates and gates
    on them), or when its images are not the ones the run was trained and split with (its fingerprint:
    ``_check_split_images``); ValueError when its classes are not the checkpoint's."""
    path = run_dir / "split.json"
    split = data_mod.read_split(path)
    try:
        root, seen = Path(split["root"]), set(split.get("as_seen") or ())
        rows = {part: [(p, label) for p, label in split[part]] for part in ("train", "val")}
        split_classes = split["classes"]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise data_mod.DatasetError(f"{path}: not a saved split (expected an object with root, classes, and train "
                                    f"and val lists of [path, label]; {type(exc).__name__}: {exc})") from exc
    if split_classes != classes:
        raise ValueError(f"{path}: classes differ from the checkpoint's")
    bad = next(((part, p, label) for part in rows for p, label in rows[part]
                 if not isinstance(p, str) or type(label) is not int or not 0 <= label < len(classes)), None)
    if bad is not None:
        raise data_mod.DatasetError(f"{path}: {bad[0]} row [{bad[1]!r}, {bad[2]!r}]; expected [path, class index "
                                    f"0..{len(classes) - 1}]")
    if not rows["val"]:
        raise data_mod.DatasetError(f"{path}: no validation image; the export evaluates, gates and calibrates its "
                                    "thresholds on them")
    to_samples = lambda part: [data_mod.Sample(root / p, label, p in seen) for p, label in rows[part]]  # noqa: E731
    train, val = to_samples("train"), to_samples("val")
    _check_split_images(path, root, classes, train + val, split.get("fingerprint"))
    return train, val


def _check_split_images(path: Path, root: Path, classes: list[str], samples: list, saved: object) -> None:
    """The split's images must still be the ones the run was trained and split with (split.json's fingerprint,
    ``Dataset.fingerprint``): an image replaced since by another under the same name would be calibrated on,
    evaluated and gated on, and described by the bundle's figures, as if it were the run's. Read before any work
    (each image's bytes hashed once); a split saved without a fingerprint (before 2026-12-07, or placed by a caller)
    is not checked, one of a form this version does not know is only logged."""
    if saved is None:
        return
    unique = list({s.path: s for s in samples}.values())     # the split's images, as save_split fingerprinted them
    images = data_mod.Dataset(root, classes, unique, "split")
    try:
        matches = images.matches_fingerprint(saved)
    except OSError as exc:
        name = data_mod.shown(images.relative(Path(exc.filename))) if exc.filename else "an image"
        raise data_mod.DatasetError(
            f"{path}: cannot read {name} of this run's split in {root} ({exc.strerror or exc}); restore the "
            f"images the run was trained with, or re-train") from exc
    if matches is None:
        log.warning("%s: fingerprint %r is of a form this version does not read; the images are not checked",
                    path, data_mod.shown(str(saved))[:80])
    elif not matches:
        raise data_mod.DatasetError(
            f"{path}: the {len(unique)} images of this run's split are not all the images it was trained and split "
            f"with: an image in {root} was replaced since the run (the fingerprint differs), so the bundle's "
            f"calibration, figures and gates would describe other images; restore them, or re-train on the images "
            f"as they are")


def _data_report(run_dir: Path) -> dict:
    """The run's data report (the manifest's provenance: dataset, fingerprint, skipped images), read before any
    work; DatasetError naming the file when it cannot be read or lacks those."""
    path = run_dir / "data_report.json"
    try:
        report = json.loads(path.read_bytes().decode("utf-8"))
        report["dataset"], report["fingerprint"], len(report["skipped_images"])
    except OSError as exc:
        raise data_mod.DatasetError(f"{path}: cannot read the run's data report ({exc.strerror or exc})") from exc
    except (ValueError, KeyError, TypeError) as exc:     # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise data_mod.DatasetError(f"{path}: not a data report (expected a JSON object with dataset, fingerprint "
                                    f"and skipped_images; {type(exc).__name__}: {exc})") from exc
    return report


def _calibration_inputs(train_samples: list, spec: InputSpec, count: int, workers: int,
                        chunk: int = CHUNK_IMAGES) -> ImageFileInputs:
    """``count`` training images spread over all classes, preprocessed like at a station, ``chunk`` at a time on
    each of the calibration's passes (512 images at 224 px held at once were 308 MB)."""
    chosen = [train_samples[i] for i in spread_classes([s.label for s in train_samples], count, seed=0)]
    return ImageFileInputs(chosen, spec, workers=workers, chunk=chunk, desc="preprocess calibration images")


def _station_sets(cfg: ExportConfig, spec: InputSpec, train_samples: list, val_samples: list) -> dict | None:
    """For a foreground-crop bundle: validation images and half the calibration images as a station's camera
    shows them, cropped by the station's own localizer (trainer.station_eval); None for a whole-ROI bundle.

    Both are streamed (trainer.station_eval.StationViewInputs): rendered a chunk at a time on each pass.
    A station's own frames (a retrain's reviewed frames, ``as_seen``) are left out: each is already the item crop
    a camera sent, and rendering it again would paste that crop, its surface included, onto another surface."""
    if spec.crop.mode != "foreground" or cfg.station_val_images <= 0:
        return None
    from trainer.station_eval import SceneConfig, StationViewInputs

    rendered = [s for s in val_samples if not s.as_seen]
    val = [rendered[i] for i in spread_classes([s.label for s in rendered], cfg.station_val_images)]
    train_samples = [s for s in train_samples if not s.as_seen]
    rng = np.random.default_rng(1)
    calib = [train_samples[i] for i in spread_classes([s.label for s in train_samples],
                                                      cfg.quantize.calibration_images // 2,
                                                      order=rng.permutation(len(train_samples)), keep_order=True)]
    return {"val": StationViewInputs([s.path for s in val], [s.label for s in val], spec, chunk=cfg.chunk_images),
            "calibration": StationViewInputs([s.path for s in calib], [s.label for s in calib], spec,
                                             SceneConfig(seed=4321), chunk=cfg.chunk_images)}


def _top1(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy; a row with NaN or infinity counts as wrong (its argmax would be class 0 or arbitrary)."""
    return float(((logits.argmax(1) == labels) & np.isfinite(logits).all(axis=1)).mean())


def _station_quality(views, fp32_path: Path, int8_path: Path, margin_points: float
                     ) -> tuple[dict | None, str | None, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None]:
    """Top-1 of both models on the station-view set, the INT8 gate's verdict on it, and both models' outputs
    on it (FP32 logits and embedding, INT8 logits and embedding: the unknown score is calibrated on the same
    run, not a second one). INT8 logits with NaN or infinity fail the gate, as on the validation images.

    An empty set (every validation image a station's own frame, none to render) gives ``(None, None, None)``:
    there is no station-view gate to apply, and the caller records that it was skipped."""
    if not len(views.labels):
        return None, None, None
    (fp32_logits, fp32_emb), (int8_logits, int8_emb) = onnx_outputs_each([fp32_path, int8_path], views)  # one pass
    fp32, int8 = _top1(fp32_logits, views.labels), _top1(int8_logits, views.labels)
    passed, reason = int8_gate(fp32, int8, margin_points)
    if (int8_reason := non_finite_reason("INT8", int8_logits)) is not None:
        passed, reason = False, int8_reason
    log.info("station-view validation (%d scenes, item found in %d): FP32 %.2f%%, INT8 %.2f%%",
             len(views.labels), views.found, fp32 * 100, int8 * 100)
    return ({"images": int(len(views.labels)), "item_found": int(views.found), "val_accuracy": fp32,
             "int8_val_accuracy": int8, "int8_passed": passed,
             "how": "validation images placed on station surfaces at a 300 px ROI, cropped by agent.localize"},
            None if passed else f"station views: {reason}", (fp32_logits, fp32_emb, int8_logits, int8_emb))


def _thresholds(probs: np.ndarray, labels: np.ndarray, source: str, budget: float | None) -> dict:
    """Low-confidence thresholds from the set the station's frames look like, within the review budget if any."""
    suggested = suggest_thresholds(probs, labels)
    thresholds = suggested if budget is None else within_review_budget(probs, suggested, budget)
    log.info("low-confidence thresholds from the %s set (review budget %s): %s", source,
             "none" if budget is None else f"{budget:.0%}", {k: round(v, 4) for k, v in thresholds.items()})
    return {"thresholds": thresholds,
            "how": {"set": source, "images": int(len(labels)), "review_budget": budget,
                    "rule": "median of the mistakes' confidence, margin and entropy" + (
                        "" if budget is None else ", relaxed to flag at most the review budget"),
                    "suggested": suggested,
                    **low_confidence_report(probs, labels, thresholds)}}


ENGINE_SOURCES = (("fp16", "model.fp32.onnx"), ("int8", "model.int8.onnx"))   # engine precision, ONNX it is built from


def _build_engines(cfg: ExportConfig, tmp_dir: Path, spec: InputSpec, fp32_reason: str | None,
                   int8_reason: str | None) -> tuple[list[dict], str | None, dict[str, str]]:
    """TensorRT engines from the ONNX models that passed their gates: the FP16 engine from the FP32 model unless
    ``fp32_reason`` (why it is not deployable: parity), the INT8 one from the INT8 model unless ``int8_reason``.

    A station runs an engine before any ONNX model, so an engine built from a graph a gate refused would put that
    graph back into service: such an engine is not built. Returns the engines, why none was built at all (or
    None), and per precision why its engine was not built because of a gate."""
    from trainer.export import tensorrt as trt_export

    if cfg.tensorrt == "off":
        return [], "disabled (--tensorrt off)", {}
    refused = {precision: f"{source} not deployable ({reason})" for (precision, source), reason
               in zip(ENGINE_SOURCES, (fp32_reason, int8_reason)) if reason is not None}
    wanted = [(precision, source) for precision, source in ENGINE_SOURCES if precision not in refused]
    if not wanted:
        return [], "no engine built: " + "; ".join(refused.values()), refused
    try:
        trt_export.require_tensorrt_gpu()
    except trt_export.TensorRTUnavailable as exc:
        if cfg.tensorrt == "on":
            raise
        return [], str(exc), refused
    engines = []
    for precision, source in wanted:
        built = trt_export.build_engine(tmp_dir / source, tmp_dir,
                                        trt_export.EngineSpec(precision, spec.height, spec.width),
                                        input_name=spec.input_name)
        engines.append({**built, "source": source})
    for precision, why in refused.items():
        log.warning("TensorRT %s engine not built: %s", precision, why)
    return engines, None, refused


def check_export_settings(cfg: ExportConfig) -> None:
    """ValueError naming the setting, before any work: each would otherwise fail only at the end of an export (a
    figure of the manifest not finite) or with an error that names nothing (an empty list of tensors)."""
    if cfg.review_budget is not None and not 0.0 <= cfg.review_budget <= 1.0:
        raise ValueError(f"review budget: expected a share in 0..1, got {cfg.review_budget!r}")
    for flag, count in (("--calibration-images", cfg.quantize.calibration_images),
                        ("--parity-images", cfg.parity_images), ("--open-set-images", cfg.open_set_images),
                        ("chunk_images", cfg.chunk_images)):
        if not (isinstance(count, int) and count >= 1):
            raise ValueError(f"{flag}: expected at least 1 image, got {count!r}")
    if not (math.isfinite(cfg.gate_margin_points) and cfg.gate_margin_points >= 0):
        raise ValueError(f"--gate-margin: expected finite points >= 0, got {cfg.gate_margin_points!r}")
    if not 0.0 < cfg.unknown_keep <= 1.0:
        raise ValueError(f"--unknown-keep: expected a share in (0, 1], got {cfg.unknown_keep!r}")
    check_name_version(cfg.name, cfg.version)
    if cfg.sign_key is not None:
        check_sign_key(Path(cfg.sign_key))


def check_sign_key(path: Path) -> None:
    """ValueError naming --sign-key and the file, before any work, unless it holds an unencrypted ed25519 private
    key that not every user of this host can read: the bundle is signed last, and a key found wrong only then
    threw the whole export away."""
    from trainer.signing import check_private_key

    check_private_key(path, "--sign-key")


def export_bundle(cfg: ExportConfig) -> ExportResult:
    """Export, check and write a bundle; nothing appears under models/ unless all of it succeeded."""
    check_export_settings(cfg)
    checkpoint = Path(cfg.checkpoint)
    run_dir = checkpoint.parent
    try:
        model, ckpt = load_checkpoint_model(checkpoint)
        classes, train_cfg = ckpt["classes"], ckpt["config"]
        spec = InputSpec.from_manifest(ckpt["input"])
        name = cfg.name or train_cfg["name"]
    except (FileNotFoundError, ValueError):
        raise
    except Exception as exc:    # an empty file, a text file, another program's pickle
        raise ValueError(f"{checkpoint}: not a trainer checkpoint ({type(exc).__name__}: {exc})") from None
    version = cfg.version or dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    check_name_version(name, version)
    final_dir = Path(cfg.models_dir) / name / version
    if final_dir.exists():
        raise FileExistsError(f"{final_dir}: bundle version already exists; pass another --version")
    train_samples, val_samples = _split_samples(run_dir, classes)
    data_report = _data_report(run_dir)
    if cfg.val_limit:
        val_samples = [val_samples[i] for i in spread_classes([s.label for s in val_samples], cfg.val_limit)]
    # read and preprocessed a chunk at a time on each pass (FP32, then INT8), never held whole
    val_x = ImageFileInputs(val_samples, spec, workers=cfg.workers, chunk=cfg.chunk_images,
                            desc="preprocess val images")
    val_y = val_x.labels
    # this export's own folder: another export of the same version may be writing its own beside it
    sweep_partials(final_dir.parent)        # what exports killed before their clean-up left here
    sweep_partials(run_dir)                 # and the reports such exports left in the run folder
    tmp_dir = partial_dir(final_dir)
    tmp_dir.mkdir(parents=True)
    reports_tmp = partial_dir(run_dir / f"export-{version}")     # the reports, until the bundle is published
    try:
        _refuse_concurrent_export(final_dir, tmp_dir)
        manifest, fp32_metrics, int8_metrics = _export_into(
            cfg, tmp_dir, model, spec, classes, train_cfg, name, version, train_samples, val_samples, val_x, val_y,
            run_dir, data_report)
        try:
            text = dumps_finite(manifest, indent=1)
        except ValueError as exc:
            raise ValueError(f"{tmp_dir / MANIFEST}: a figure of the manifest is not finite ({exc}); not exported") \
                from exc
        (tmp_dir / MANIFEST).write_text(text)
        if cfg.sign_key:
            from trainer.signing import sign_bundle

            sign_bundle(tmp_dir, cfg.sign_key)
        check_model_runs(load_bundle(tmp_dir))  # the agent's own verification, before anything is published
        # the reports before the bundle is published, in a folder of their own: a report that cannot be written (a
        # full disk) fails the export with nothing under models/, and a rerun with the same version works
        paths = [s.path for s in val_samples]
        write_reports(reports_tmp / "fp32", fp32_metrics, paths, fp32_metrics.pop("_logits"), val_y)
        if int8_metrics is not None:
            write_reports(reports_tmp / "int8", int8_metrics, paths, int8_metrics.pop("_logits"), val_y)
        if final_dir.exists():    # another export of this version finished first (os.replace: "not empty")
            raise FileExistsError(f"{final_dir}: bundle version already exists (written by another export while "
                                  "this one ran); pass another --version")
        _publish(tmp_dir, final_dir, reports_tmp, run_dir / f"export-{version}")
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        shutil.rmtree(reports_tmp, ignore_errors=True)
        raise
    log.info("bundle %s written", final_dir)
    return ExportResult(final_dir, manifest, fp32_metrics, int8_metrics)


def _publish(tmp_dir: Path, final_dir: Path, reports_tmp: Path, reports: Path) -> None:
    """The bundle into ``final_dir`` and its reports into the run's ``reports`` folder, both or neither.

    The reports go in place first (those of an earlier export of this version set aside) and the bundle is renamed
    last; when that rename fails (the version published by another export meanwhile, a models folder this user may
    not write to) the new reports are taken back and the earlier ones put back: the run folder never shows reports
    of an export that did not happen. The earlier reports are deleted only once the bundle is out."""
    earlier = partial_dir(reports) if reports.exists() else None
    if earlier is not None:
        os.replace(reports, earlier)
    try:
        os.replace(reports_tmp, reports)
        try:
            os.replace(tmp_dir, final_dir)
        except BaseException:
            os.replace(reports, reports_tmp)     # removed by the caller with the rest of this export's work
            raise
    except BaseException:
        if earlier is not None:
            os.replace(earlier, reports)
        raise
    if earlier is not None:
        shutil.rmtree(earlier, ignore_errors=True)


def _refuse_concurrent_export(final_dir: Path, own: Path) -> None:
    """FileExistsError, before any work, while another export of this version runs on this host (its partial folder
    beside ``own``, its process alive): only one of them could publish, after both had run to the end, and the
    loser's reports replaced the winner's in the run's ``export-<version>`` folder."""
    prefix = own.name.rsplit("-", 2)[0] + "-"      # .<version>.partial-<host>-  (partial_dir; the host has no "-")
    for path in sorted(final_dir.parent.iterdir()):
        pid = path.name[len(prefix):].split("-", 1)[0] if path.name.startswith(prefix) else ""
        if path != own and pid.isdigit() and (int(pid) == os.getpid() or process_runs(int(pid))):
            raise FileExistsError(f"{final_dir}: another export of this version is running (process {pid}, "
                                  f"writing {path}); wait for it to finish, or pass another --version")


def non_finite_reason(model: str, logits: np.ndarray) -> str | None:
    """Why a model that gives NaN or infinite logits on validation images is not deployable; None when all are finite.

    At the station such a model would publish ``confidence: NaN`` as a confident result."""
    bad = int((~np.isfinite(logits)).any(axis=1).sum()) if len(logits) else 0
    if not bad:
        return None
    return f"{model} model gives non-finite logits (NaN or infinity) on {bad} of {len(logits)} validation images"


def _export_into(cfg, tmp_dir, model, spec, classes, train_cfg, name, version, train_samples, val_samples, val_x, val_y,
                 run_dir, data_report):
    arch = train_cfg["arch"]
    fp32_path = export_onnx(model, tmp_dir / "model.fp32.onnx", spec.height, spec.width,
                            input_name=spec.input_name, output_name=spec.output_name, arch=arch)
    parity_x = ImageFileInputs([val_samples[i] for i in spread(len(val_samples), cfg.parity_images)], spec,
                               workers=cfg.workers, chunk=cfg.chunk_images, desc="preprocess parity images")
    parity_stats = parity(model, fp32_path, parity_x, arch=arch)
    fp32_logits, fp32_emb = onnx_outputs(fp32_path, val_x)
    if (fp32_reason := non_finite_reason("FP32", fp32_logits)) is not None:
        raise ValueError(f"{cfg.checkpoint}: {fp32_reason}; not exported (a model that outputs NaN cannot be "
                         "deployed, nor quantized)")
    fp32_metrics = compute_metrics(fp32_logits, val_y, classes)
    fp32_metrics["_logits"] = fp32_logits
    if not parity_stats["passed"]:
        log.error("FP32 ONNX model kept but not deployable: %s", parity_stats["reason"])
    artifacts = [artifact_entry(fp32_path, tmp_dir, role=ROLE_FP32, precision="fp32", deployable=parity_stats["passed"],
                                reason=parity_stats["reason"])]

    station = _station_sets(cfg, spec, train_samples, val_samples)
    count = cfg.quantize.calibration_images
    # half of the calibration images as the station crops them (the ranges it will see) and half as the dataset
    # shows them, each drawn over every class (before 2026-12-06 the dataset half was the first half of a draw
    # kept in the split's class order: the later classes were left out of it)
    calibration = _calibration_inputs(train_samples, spec, count - count // 2 if station is not None else count,
                                      cfg.workers, cfg.chunk_images)
    if station is not None:
        calibration = ChainedInputs(calibration, station["calibration"])
    int8_path = tmp_dir / "model.int8.onnx"
    calib_info = quantize_qdq(fp32_path, int8_path, calibration, cfg.quantize, input_name=spec.input_name)
    int8_logits, int8_emb = onnx_outputs(int8_path, val_x)
    int8_metrics = compute_metrics(int8_logits, val_y, classes)
    int8_metrics["_logits"] = int8_logits
    passed, reason = int8_gate(fp32_metrics["accuracy"], int8_metrics["accuracy"], cfg.gate_margin_points)
    if (int8_reason := non_finite_reason("INT8", int8_logits)) is not None:
        passed, reason = False, int8_reason
    if not parity_stats["passed"]:  # quantized from a graph that is not the trained model
        passed, reason = False, f"FP32 ONNX parity: {parity_stats['reason']}"
    station_quality = None
    station_outputs = None
    station_skipped = None
    review = None
    if station is not None:
        station_quality, station_reason, station_outputs = _station_quality(station["val"], fp32_path, int8_path,
                                                                            cfg.gate_margin_points)
        if station_outputs is None:
            station_skipped = ("no station-view validation: every validation image is a station's own frame "
                               "(as_seen), none to render; the INT8 gate, thresholds and unknown score use the "
                               "validation images as they are")
            log.warning("%s", station_skipped)
        else:
            if (fp32_station := non_finite_reason("FP32", station_outputs[0])) is not None:
                raise ValueError(f"{cfg.checkpoint}: station views: {fp32_station}; not exported (a model that "
                                 "outputs NaN cannot be deployed, nor quantized)")
            passed, reason = passed and station_reason is None, reason or station_reason
            review = _thresholds(softmax(station_outputs[0]), station["val"].labels, "station_view", cfg.review_budget)
    if review is None:
        review = _thresholds(softmax(fp32_logits), val_y, "val", cfg.review_budget)
    open_set, open_set_arrays, open_set_reason = _open_set(cfg, spec, fp32_path, train_samples, station,
                                                           station_outputs,
                                                           (val_y, fp32_logits, fp32_emb, int8_logits, int8_emb),
                                                           len(classes))
    passed, reason = passed and open_set_reason is None, reason or open_set_reason
    npz_path = tmp_dir / "open_set.npz"
    openset.save_npz(npz_path, open_set_arrays)
    if not passed:
        log.warning("INT8 model kept but not deployable: %s", reason)
    artifacts.append(artifact_entry(int8_path, tmp_dir, role=ROLE_INT8, precision="int8", deployable=passed, reason=reason))

    artifacts.append(artifact_entry(npz_path, tmp_dir, role=ROLE_OPEN_SET, precision="fp32", deployable=True))
    fp32_reason = None if parity_stats["passed"] else f"FP32 ONNX parity: {parity_stats['reason']}"
    engines, no_engine_reason, engines_refused = _build_engines(cfg, tmp_dir, spec, fp32_reason,
                                                                None if passed else reason)
    for engine in engines:   # each from a model that passed its gates (_build_engines)
        artifacts.append(artifact_entry(engine["path"], tmp_dir, role=ROLE_ENGINE, precision=engine["precision"],
                                        deployable=True, tensorrt_version=engine["tensorrt_version"],
                                        compute_capability=engine["compute_capability"], source=engine["source"]))
    manifest = {
        "schema_version": 1,
        "name": name,
        "version": version,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "architecture": train_cfg["arch"],
        "frameworks": _versions(written_opset(fp32_path)),
        "labels": list(classes),
        "input": spec.to_manifest(),
        "artifacts": artifacts,
        "open_set": open_set,
        "quality": {
            "val_images": int(len(val_y)),
            "val_accuracy": fp32_metrics["accuracy"],
            "val_macro_f1": fp32_metrics["macro_f1"],
            "per_class_recall": {c: v["recall"] for c, v in fp32_metrics["per_class"].items()},
            "ece": fp32_metrics["ece"],
            "parity": parity_stats,
            "int8": {
                "val_accuracy": int8_metrics["accuracy"],
                "val_macro_f1": int8_metrics["macro_f1"],
                "delta_top1_points": (int8_metrics["accuracy"] - fp32_metrics["accuracy"]) * 100,
                # a row with NaN or infinity predicts no class (compute_metrics): it agrees with nothing
                "top1_agreement": float(((int8_logits.argmax(1) == fp32_logits.argmax(1))
                                         & np.isfinite(int8_logits).all(axis=1)).mean()),
                "gate_margin_points": cfg.gate_margin_points,
                "passed": passed,
                "reason": reason,
                "calibration": calib_info,
            },
            "station_view": station_quality,
            "station_view_skipped": station_skipped,
            "thresholds": review["thresholds"],
            "thresholds_from": review["how"],
            "low_confidence": low_confidence_report(softmax(fp32_logits), val_y, review["thresholds"]),
            "tensorrt": {"engines": len(engines), "reason": no_engine_reason, "not_built": engines_refused},
        },
        "provenance": {
            "dataset_root": data_report["dataset"],
            "dataset_fingerprint": data_report["fingerprint"],
            "skipped_images": len(data_report["skipped_images"]),
            "split_seed": train_cfg["seed"],
            "run_dir": str(run_dir),
            "checkpoint": str(cfg.checkpoint),
            "training_config": train_cfg,
            "code_version": code_version(),
        },
    }
    return manifest, fp32_metrics, int8_metrics


def _open_set(cfg: ExportConfig, spec: InputSpec, fp32_path: Path, train_samples: list, station: dict | None,
              station_outputs: tuple | None, val: tuple, classes: int) -> tuple[dict, openset.OpenSet, str | None]:
    """The unknown score: class statistics from training images (and their station views), and the thresholds that
    keep ``unknown_keep`` of the known items of the set a station's frames look like (station views, else val), one
    on the FP32 model's scores and one on the INT8 model's. The INT8 gate covers the embedding: its median cosine
    to the FP32 embedding on validation images must reach EMBEDDING_COSINE_GATE."""
    val_y, fp32_logits, fp32_emb, int8_logits, int8_emb = val
    chosen = [train_samples[i] for i in spread_classes([s.label for s in train_samples], cfg.open_set_images, seed=2)]
    fit_x = ImageFileInputs(chosen, spec, workers=cfg.workers, chunk=cfg.chunk_images,
                            desc="preprocess open-set images")
    fit_emb = onnx_outputs(fp32_path, fit_x)[1]
    fit_labels = fit_x.labels
    if station is not None and len(station["calibration"].labels):
        fit_emb = np.concatenate([fit_emb, onnx_outputs(fp32_path, station["calibration"])[1]])
        fit_labels = np.concatenate([fit_labels, station["calibration"].labels])
    stats = openset.fit_embedding_stats(fit_emb, fit_labels, classes)
    if station is not None and station_outputs is not None and len(station["val"].labels):
        source, (cal_logits, cal_emb, int8_cal_logits, int8_cal_emb) = "station_view", station_outputs
    else:
        source, cal_logits, cal_emb, int8_cal_logits, int8_cal_emb = "val", fp32_logits, fp32_emb, int8_logits, int8_emb
    score = cfg.unknown_score
    model = openset.OpenSet(score, 0.0, cfg.unknown_keep, stats)
    fp32_scores = model.scores(cal_logits, cal_emb)
    int8_scores = model.scores(int8_cal_logits, int8_cal_emb)
    threshold = openset.threshold_for_keep(fp32_scores, cfg.unknown_keep)
    cosine = np.sum(openset.unit(fp32_emb) * openset.unit(int8_emb), axis=1) if len(fp32_emb) else np.ones(1)
    reason = int8_threshold = agree = None
    # an INT8 model with NaN or infinite outputs is not deployable (its logits' gate says so too); it gets no
    # threshold of its own, and no figure of it that is not a number enters the manifest
    if (bad := int((~np.isfinite(int8_scores)).sum())):
        reason = (f"INT8 model gives non-finite unknown scores (NaN or infinity) on {bad} of {len(int8_scores)} "
                  f"{source} images")
    else:
        int8_threshold = openset.threshold_for_keep(int8_scores, cfg.unknown_keep)   # its scores shift a little
        agree = float(((fp32_scores > threshold) == (int8_scores > int8_threshold)).mean())
    if (bad := int((~np.isfinite(cosine)).sum())):
        reason = reason or f"INT8 embedding: non-finite (NaN or infinity) on {bad} of {len(cosine)} validation images"
        cosine_median = cosine_min = None
    else:
        cosine_median, cosine_min = float(np.median(cosine)), float(np.min(cosine))
        if cosine_median < EMBEDDING_COSINE_GATE:
            reason = reason or (f"INT8 embedding: median cosine to FP32's {cosine_median:.4f} on validation images, "
                                f"below {EMBEDDING_COSINE_GATE} (the unknown score and enrolled classes read it)")
    log.info("unknown score %s: threshold %.4g (INT8 %s) keeps %.0f%% of the %s set; unknown verdicts agree on "
             "%s; INT8 embedding cosine median %s", score, threshold,
             "none" if int8_threshold is None else f"{int8_threshold:.4g}", cfg.unknown_keep * 100, source,
             "-" if agree is None else f"{agree * 100:.1f}%", "-" if cosine_median is None else f"{cosine_median:.4f}")
    curves = {"fp32": openset.keep_curve(fp32_scores)}
    if int8_threshold is not None:
        curves["int8"] = openset.keep_curve(int8_scores)
    block = {"score": score, "threshold": threshold, "threshold_int8": int8_threshold, "keep": cfg.unknown_keep,
             "keep_thresholds": {k: [list(point) for point in v] for k, v in curves.items()},
             "embedding_name": EMBEDDING_NAME, "embedding_dim": stats.dim, "enrolled": [],
             "calibration": {"set": source, "images": int(len(fp32_scores)), "fit_images": int(len(fit_labels)),
                             "known_kept_fp32": float((fp32_scores <= threshold).mean()),
                             "known_kept_int8": (None if int8_threshold is None
                                                 else float((int8_scores <= int8_threshold).mean())),
                             "int8_fp32_verdicts_agree": agree,
                             "int8_embedding_cosine_median": cosine_median,
                             "int8_embedding_cosine_min": cosine_min, "int8_passed": reason is None}}
    if int8_threshold is None:
        del block["threshold_int8"]   # a number where present (schema); a station then uses the FP32 threshold
    return block, openset.OpenSet(score, threshold, cfg.unknown_keep, stats, int8_threshold=int8_threshold,
                                  keep_thresholds=curves), reason


def verify(bundle_dir: Path, public_key: Path | None = None):
    """The agent's verification of a bundle, from the trainer's CLI: files, hashes, signature, and what each
    deployable model must do (take the manifest's input, one finite output per label on a sample)."""
    bundle = load_bundle(bundle_dir, load_public_key(public_key) if public_key else None)
    check_model_runs(bundle)
    return bundle
