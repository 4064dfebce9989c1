"""``python -m trainer import-fashion-mnist | train | evaluate | export | verify | keygen | demo | retrain | enroll``.

All of the trainer's argparse lives here; library modules take typed configs. The central services
(ingest, review, labels, backgrounds, publish, serve-bundles, rollout, rollback, dashboard) are
``python -m central <verb>``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from contract import openset
from contract.broker import add_broker_args
from trainer.augment import AugmentConfig
from trainer.config import TrainConfig
from trainer.station_view import StationViewConfig

log = logging.getLogger("trainer")

BOOL = argparse.BooleanOptionalAction

# The train flags a resume takes from its command line: where and how fast the run computes (another machine, a
# GPU it lacks, more decoding processes), never what (trainer.engine.RESUME_MAY_CHANGE).
RESUME_RUNTIME_FLAGS = ("device", "workers", "cache_images")


def _add_train_args(p: argparse.ArgumentParser, *, data: bool = True) -> None:
    if data:  # retrain builds its dataset from --base-data and --reviewed
        p.add_argument("--data", default=None, help="class folders, <class>_*.ext files, or a path,label CSV "
                                                    "(required, but with --resume: the run's own config names it)")
    p.add_argument("--out-dir", default="runs", help="runs are written to OUT_DIR/NAME")
    p.add_argument("--name", default="model", help="run and bundle name")
    p.add_argument("--arch", default="resnet50", choices=["resnet50", "resnet18", "mobilenet_v2"])
    p.add_argument("--weights", default="imagenet", help="imagenet | none | PATH to a state dict (one of our checkpoints also gives "
                                                          "its head rows to the classes it knows)")
    p.add_argument("--image-size", type=int, default=224, help="model input (square)")
    p.add_argument("--resize-shorter", type=int, default=None, help="eval resize before centre crop (default size*256/224)")
    p.add_argument("--interpolation", default="bilinear", choices=["bilinear", "area"])
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--limit-per-class", type=int, default=None, help="use at most N images per class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--optimizer", default="adam", choices=["adam", "adamw", "sgd"])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--schedule", default="cosine", choices=["cosine", "step", "constant"])
    p.add_argument("--warmup-epochs", type=float, default=0.0)
    p.add_argument("--step-size", type=int, default=5, help="epochs between decays (--schedule step)")
    p.add_argument("--gamma", type=float, default=0.1, help="decay factor (--schedule step)")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--balance-classes", action=BOOL, default=False,
                   help="draw every class equally often in each epoch (with replacement within a class); for "
                        "training sets skewed towards the classes a station was unsure of")
    p.add_argument("--station-frame-repeat", type=int, default=1,
                   help="draw each frame a station sent (a CSV's view=station rows: retrain's reviewed frames) this "
                        "many times per epoch")
    p.add_argument("--freeze-epochs", type=int, default=0, help="train only the head for the first N epochs")
    p.add_argument("--frozen-bn", action=BOOL, default=False,
                   help="BatchNorm keeps its (ImageNet) statistics: for small batches per process, and the setting "
                        "where a distributed CPU run equals one process exactly")
    p.add_argument("--amp", action=BOOL, default=True, help="mixed precision on CUDA")
    p.add_argument("--channels-last", action=BOOL, default=True, help="channels_last memory format")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--workers", type=int, default=2, help="image decoding processes (default 2)")
    p.add_argument("--cache-images", action=BOOL, default=True,
                   help="decode training images once into memory (default on)")
    p.add_argument("--patience", type=int, default=None, help="early stop after N epochs without improvement")
    p.add_argument("--metric", default="accuracy", choices=["accuracy", "macro_f1"], help="selects best.pt")
    p.add_argument("--max-steps-per-epoch", type=int, default=None)
    aug = AugmentConfig()
    p.add_argument("--scale", type=float, nargs=2, default=aug.scale, help="random-resized-crop area range")
    p.add_argument("--hflip", type=float, default=aug.hflip)
    sv = StationViewConfig()
    p.add_argument("--rotation", type=float, default=sv.rotation,
                   help="max degrees of in-plane rotation (station views; the plain path too unless --plain-rotation)")
    p.add_argument("--plain-rotation", type=float, default=None,
                   help="max degrees of rotation on the plain path (default: --rotation)")
    p.add_argument("--jitter", type=float, default=aug.brightness, help="brightness/contrast/saturation strength")
    p.add_argument("--erasing", type=float, default=aug.erasing, help="random erasing probability")
    p.add_argument("--station-view", default="on", choices=["on", "off"],
                   help="render training images as the station's item crop (background, light, blur, ...)")
    p.add_argument("--station-view-share", type=float, default=sv.share,
                   help="share of training images rendered as station views; the rest take the plain path")
    p.add_argument("--backgrounds", type=Path, default=None,
                   help="folder of empty-scene frames from a station (jpg/png) to draw items on")
    p.add_argument("--crop-margin", type=float, default=TrainConfig.crop_margin,
                   help="the station's item crop: foreground box grown by this x its longer side on every side "
                        "(default 0: the box itself, squared)")


def _add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models-dir", default="models")
    p.add_argument("--version", default=None, help="bundle version (default: UTC timestamp)")
    p.add_argument("--calibration-images", type=int, default=512)
    p.add_argument("--calibration-method", default="percentile", choices=["minmax", "percentile", "entropy"])
    p.add_argument("--gate-margin", type=float, default=1.0, help="INT8 may lose at most this many top-1 points")
    p.add_argument("--parity-images", type=int, default=256)
    p.add_argument("--station-val-images", type=int, default=1000,
                   help="foreground-crop bundles: validation images also evaluated (and half the calibration "
                        "images drawn) as a station camera shows them, cropped by the station's localizer; 0: off")
    p.add_argument("--review-budget", type=float, default=None,
                   help="the suggested low-confidence thresholds flag at most this share (0..1) of the station-view "
                        "set (of the validation set for a whole-ROI bundle); default: no cap. The thresholds also "
                        "choose the frames stations send back for retraining, so a cap sends fewer")
    p.add_argument("--unknown-score", default=openset.DEFAULT_SCORE, choices=openset.SCORES,
                   help="the unknown score the bundle carries (docs/open-set.md; chosen by benchmarks/open_set.py)")
    p.add_argument("--unknown-keep", type=float, default=openset.DEFAULT_KEEP,
                   help="share of known items the unknown threshold keeps (calibrated on the station-view or val set)")
    p.add_argument("--open-set-images", type=int, default=2000,
                   help="training images the unknown score's class statistics are fitted on")
    p.add_argument("--tensorrt", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--sign-key", type=Path, default=None, help="ed25519 private key to sign the manifest")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("import-fashion-mnist", help="write Fashion-MNIST as PNG class folders")
    p.add_argument("--out", default="data/fashion-mnist")
    p.add_argument("--source", default="/usr/share/datasets/fashion-mnist")

    p = sub.add_parser("train", help="fine-tune a model on labelled images")
    _add_train_args(p)
    p.add_argument("--resume", type=Path, default=None, help="continue the run in this folder (its config wins, but "
                                                               "for --device, --workers and --cache-images)")
    # None: not given. A resume takes these from its command line when given, else from the run's config
    p.set_defaults(**{name: None for name in RESUME_RUNTIME_FLAGS})

    p = sub.add_parser("evaluate", help="metrics and plots for a checkpoint or an ONNX file of a bundle")
    p.add_argument("model", type=Path, help="best.pt/last.pt, or a bundle's .onnx")
    p.add_argument("--data", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--limit-per-class", type=int, default=None)

    p = sub.add_parser("export", help="checkpoint -> verified model bundle")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--name", default=None)
    _add_export_args(p)

    p = sub.add_parser("verify", help="check a bundle's schema, hashes and signature")
    p.add_argument("bundle", type=Path)
    p.add_argument("--public-key", type=Path, default=None)

    p = sub.add_parser("keygen", help="write an ed25519 key pair for signing bundles")
    p.add_argument("--private", type=Path, default=Path("keys/bundle-signing.key"))
    p.add_argument("--public", type=Path, default=Path("keys/bundle-signing.pub"))

    p = sub.add_parser("demo", help="import Fashion-MNIST, fine-tune MobileNetV2, export a bundle (the README's main job)")
    p.add_argument("--data-dir", default="data/fashion-mnist")
    p.add_argument("--out-dir", default="runs")
    p.add_argument("--models-dir", default="models")
    p.add_argument("--limit-per-class", type=int, default=2000, help="training images per class (default 2000)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--image-size", type=int, default=48)
    p.add_argument("--arch", default="mobilenet_v2", choices=["resnet50", "resnet18", "mobilenet_v2"])

    _add_retrain_parser(sub)
    _add_enroll_parser(sub)
    return parser


def _augment_flag(field: str, args: argparse.Namespace) -> str | None:
    """The train flag that set an augmentation config field (``station_view.rotation``, ``augment.scale``)."""
    plain_rotation = "--rotation" if args.plain_rotation is None else "--plain-rotation"
    return {"station_view.rotation": "--rotation", "station_view.share": "--station-view-share",
            "augment.rotation": plain_rotation, "augment.scale": "--scale", "augment.hflip": "--hflip",
            "augment.brightness": "--jitter", "augment.contrast": "--jitter", "augment.saturation": "--jitter",
            "augment.erasing": "--erasing"}.get(field)


def train_config_from_args(args: argparse.Namespace):
    """The TrainConfig of a train command line; a refused augmentation value names its flag and its field."""
    plain_rotation = args.rotation if args.plain_rotation is None else args.plain_rotation
    try:
        station = StationViewConfig(enabled=args.station_view == "on", share=args.station_view_share,
                                    rotation=args.rotation,
                                    backgrounds=str(args.backgrounds) if args.backgrounds else None)
        augment = AugmentConfig(scale=tuple(args.scale), hflip=args.hflip, rotation=plain_rotation,
                                brightness=args.jitter, contrast=args.jitter, saturation=args.jitter,
                                erasing=args.erasing, station_view=station)
    except ValueError as exc:
        flag = _augment_flag(str(exc).split(":", 1)[0], args)
        if flag is None:
            raise
        raise ValueError(f"{flag}: {exc}") from exc
    keys = [f for f in TrainConfig.__dataclass_fields__ if f != "augment" and hasattr(args, f)
            and not (f in RESUME_RUNTIME_FLAGS and getattr(args, f) is None)]     # not given: TrainConfig's default
    try:
        return TrainConfig(**{k: getattr(args, k) for k in keys}, augment=augment)
    except ValueError as exc:
        field = str(exc).split(":", 1)[0]
        if field not in keys:
            raise
        raise ValueError(f"--{field.replace('_', '-')}: {exc}") from exc


def flags_given(args: argparse.Namespace, leave_out: tuple[str, ...] = ()) -> list[str]:
    """The train flags of a command line that differ from their defaults, as ``--flag value``, but those of the
    settings in ``leave_out``: with ``--resume`` the run's config.json decides every other setting, and a flag given
    beside it (--epochs 3 to extend a run) would otherwise be dropped without a word."""
    defaults = argparse.ArgumentParser(add_help=False)
    _add_train_args(defaults)
    given = []
    for action in defaults._actions:
        value = getattr(args, action.dest, action.default)
        if not action.option_strings or action.dest in leave_out or value is None or _same(value, action.default):
            continue
        flag = action.option_strings[0]
        if isinstance(value, bool):                         # --amp / --no-amp
            given.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, (list, tuple)):              # --scale LOW HIGH
            given.append(f"{flag} {' '.join(map(str, value))}")
        else:
            given.append(f"{flag} {value}")
    return given


def _same(value: object, default: object) -> bool:
    """A value equals its default (argparse gives a list where the default is a tuple)."""
    if isinstance(default, tuple) and isinstance(value, (list, tuple)):
        return list(value) == list(default)
    return value == default


def resume_config(args: argparse.Namespace, path: Path) -> TrainConfig:
    """The config of a run to resume, with the runtime flags given on the command line (--device, --workers,
    --cache-images): a run started with --device cuda resumed on a host without CUDA was told to use --device cpu,
    and --device cpu given with --resume was ignored."""
    cfg = TrainConfig.load(path)
    runtime = {name: getattr(args, name) for name in RESUME_RUNTIME_FLAGS if getattr(args, name, None) is not None}
    if runtime:
        log.info("--resume %s: this resume runs with %s", path.parent,
                 ", ".join(f"{name} {value!r}" for name, value in runtime.items()))
        try:
            cfg = dataclasses.replace(cfg, **runtime)
        except ValueError as exc:      # --workers -1: the flag, then the field and what it expects
            raise ValueError(f"--{str(exc).split(':', 1)[0].replace('_', '-')}: {exc}") from exc
    return cfg


def cmd_train(args) -> int:
    from trainer.engine import Trainer

    if args.resume:
        run_dir = args.resume if args.resume.is_dir() else args.resume.parent
        if not (run_dir / "config.json").is_file():
            log.error("--resume %s: no run there (%s does not exist)", args.resume, run_dir / "config.json")
            return 2
        cfg = resume_config(args, run_dir / "config.json")
        ignored = flags_given(args, leave_out=RESUME_RUNTIME_FLAGS)
        if ignored:
            log.warning("--resume %s continues with the run's own settings (%s); ignoring %s. To train with other "
                        "settings start a new run (another --name)", args.resume, run_dir / "config.json",
                        ", ".join(ignored))
    elif args.data is None:
        log.error("--data: required (the training images), unless --resume continues a run")
        return 2
    else:
        cfg = train_config_from_args(args)
        run_dir = Path(cfg.out_dir) / cfg.name
        if (run_dir / "last.pt").exists():
            log.error("%s already holds a run; pass --resume %s to continue it, or another --name", run_dir, run_dir)
            return 2
        if (run_dir / "best.pt").exists():      # a trained model kept without last.pt: a new run would replace it
            log.error("%s holds best.pt of an earlier run (without last.pt, it cannot be resumed); pass another "
                      "--name, or move the folder away", run_dir)
            return 2
    result = Trainer(cfg, run_dir).fit()
    print(f"best val {cfg.metric} {result.best_metric:.4f} at epoch {result.best_epoch}; "
          f"checkpoint {run_dir / 'best.pt'}")
    return 0


def _export_config(args, checkpoint: Path):
    from trainer.export.bundle import ExportConfig
    from trainer.export.quantize import QuantizeConfig

    return ExportConfig(
        checkpoint=checkpoint, models_dir=Path(args.models_dir), name=getattr(args, "name", None), version=args.version,
        parity_images=args.parity_images, gate_margin_points=args.gate_margin, tensorrt=args.tensorrt,
        quantize=QuantizeConfig(calibration_images=args.calibration_images, method=args.calibration_method),
        sign_key=args.sign_key, station_val_images=args.station_val_images, review_budget=args.review_budget,
        unknown_score=args.unknown_score, unknown_keep=args.unknown_keep, open_set_images=args.open_set_images,
    )


def print_export_summary(result) -> None:
    q = result.manifest["quality"]
    int8 = q["int8"]
    print(f"bundle        {result.bundle_dir}")
    print(f"FP32 val top-1 {q['val_accuracy'] * 100:.2f}%  macro-F1 {q['val_macro_f1']:.4f}  "
          f"(ONNX vs PyTorch max |dlogit| {q['parity']['max_abs_logit_diff']:.2e}, top-1 agreement {q['parity']['top1_agreement']:.4f}"
          f"{'' if q['parity'].get('passed', True) else ', parity FAILED'})")
    th = q.get("thresholds_from")
    if th:
        print(f"thresholds    from the {th['set']} set: flag {th['flagged_fraction'] * 100:.1f}% of it "
              f"(review budget {'none' if th['review_budget'] is None else format(th['review_budget'], '.0%')}), "
              f"catching {th['errors_caught_fraction'] * 100:.0f}% "
              f"of its mistakes")
    print(f"INT8 val top-1 {int8['val_accuracy'] * 100:.2f}%  delta {int8['delta_top1_points']:+.2f} points  "
          f"gate {'passed' if int8['passed'] else 'FAILED: ' + int8['reason']}")
    if q.get("station_view"):
        sv = q["station_view"]
        print(f"station views {sv['images']} validation images on station surfaces, cropped by the station's localizer "
              f"(item found in {sv['item_found']}): FP32 {sv['val_accuracy'] * 100:.2f}%, INT8 {sv['int8_val_accuracy'] * 100:.2f}%")
    print(f"TensorRT      {q['tensorrt']['engines']} engine(s)" + (f" ({q['tensorrt']['reason']})" if q["tensorrt"]["reason"] else ""))


def cmd_export(args) -> int:
    from trainer.export.bundle import export_bundle

    result = export_bundle(_export_config(args, args.checkpoint))
    print_export_summary(result)
    parity = result.manifest["quality"]["parity"]
    if not parity.get("passed", True):
        print(f"export: the bundle in {result.bundle_dir} is not deployable: {parity['reason']}", file=sys.stderr)
        return 1
    return 0


def cmd_evaluate(args) -> int:
    from trainer.evaluate import evaluate

    m = evaluate(args.model, args.data, args.out, limit=args.limit_per_class)
    print(f"top-1 {m['accuracy'] * 100:.2f}%  macro-F1 {m['macro_f1']:.4f}  ECE {m['ece']:.4f}  "
          f"on {m['images']} images; reports in {args.out}")
    return 0


def cmd_verify(args) -> int:
    from contract.bundle import BundleError
    from trainer.export.bundle import verify

    try:
        bundle = verify(args.bundle, args.public_key)
    except BundleError as exc:
        print(f"INVALID: {exc}", file=sys.stderr)
        return 1
    print(f"OK {bundle.name} {bundle.version}: {len(bundle.artifacts)} artifacts verified"
          + (", signature valid" if bundle.signed else ""))
    return 0


def cmd_keygen(args) -> int:
    from trainer.signing import generate_keypair

    generate_keypair(args.private, args.public)
    print(f"private key {args.private} (keep it on the training server)\npublic key  {args.public} (give it to stations)")
    return 0


def cmd_import(args) -> int:
    from trainer.data import import_fashion_mnist

    counts = import_fashion_mnist(args.out, args.source)
    print(f"Fashion-MNIST: {counts['train']} train and {counts['test']} test images in {args.out}/{{train,test}}")
    return 0


def cmd_demo(args) -> int:
    from trainer.pipeline import DemoConfig, run_demo

    run_demo(DemoConfig(data_dir=Path(args.data_dir), out_dir=Path(args.out_dir), models_dir=Path(args.models_dir),
                        limit_per_class=args.limit_per_class, epochs=args.epochs, image_size=args.image_size,
                        arch=args.arch))
    return 0


COMMANDS = {"import-fashion-mnist": cmd_import, "train": cmd_train, "evaluate": cmd_evaluate, "export": cmd_export,
            "verify": cmd_verify, "keygen": cmd_keygen, "demo": cmd_demo}


RETRAIN_STATION_FRAME_REPEAT = 10


def _add_retrain_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("retrain", help="train the next version from base + reviewed frames, and gate it")
    p.add_argument("--base-data", type=Path, required=True, help="the base dataset (any trainer layout)")
    p.add_argument("--reviewed", type=Path, required=True,
                   help="reviewed frames: the CSV (or folder) 'central labels export' writes, or any path,label CSV")
    p.add_argument("--current", type=Path, required=True, help="the current version's bundle, models/<name>/<version>")
    p.add_argument("--report", type=Path, required=True, help="report path (.json; a .md is written beside it)")
    p.add_argument("--finetune-from-current", action="store_true",
                   help="start from the current version's checkpoint (where it is on this machine)")
    p.add_argument("--holdout", type=Path, default=None, help="held-out images for the overall comparison")
    p.add_argument("--holdout-fraction", type=float, default=0.1,
                   help="share of --base-data held out when neither --holdout nor the current's split is there")
    p.add_argument("--reviewed-holdout-fraction", type=float, default=0.3,
                   help="share of the reviewed items held out for the comparison, with all their frames "
                        "(by the labels export's track column; stratified by label, seeded)")
    p.add_argument("--overall-tolerance", type=float, default=0.0,
                   help="overall top-1 points the candidate may lose and still be promoted, beyond the noise")
    p.add_argument("--overall-confidence", type=float, default=0.95,
                   help="the candidate may also lose this one-sided bound of the paired comparison's noise "
                        "(0.95: 1.645 standard errors of the per-image difference; 0.5: no noise allowance)")
    p.add_argument("--reviewed-confidence", type=float, default=0.5,
                   help="the candidate's gain on the held-out reviewed frames must also clear this one-sided bound "
                        "of its noise, by item (0.95: 1.645 item-clustered standard errors; 0.5, the default: "
                        "more frames right is enough)")
    p.add_argument("--prefer-int8", action=argparse.BooleanOptionalAction, default=True,
                   help="evaluate the INT8 model where deployable (what a station runs by default)")
    p.add_argument("--public-key", type=Path, default=None, help="check the current bundle's signature")
    _add_train_args(p, data=False)
    p.set_defaults(name=None, arch=None, image_size=None, weights=None, interpolation=None, station_view=None, lr=None,
                   # the recipe (trainer.retrain.RECIPE_FIELDS): left open, it is the current run's where known
                   scale=None, hflip=None, rotation=None, jitter=None, erasing=None, station_view_share=None,
                   label_smoothing=None,
                   # a few hundred reviewed frames among thousands of base images: drawn once an epoch they barely
                   # teach (docs/notes/benchmark-history.md, "A bench round with its labels")
                   station_frame_repeat=RETRAIN_STATION_FRAME_REPEAT)
    _add_export_args(p)
    add_broker_args(p, default_host=None, title="broker (the gate event is published when --mqtt-host is given)")


def _current_station_view(current: Path) -> str:
    """``--station-view`` left open: the next version is trained for the crop the current one is fed (station
    views for a foreground-crop bundle, the plain path for a whole-ROI one). An unreadable manifest is
    reported when the bundle is loaded."""
    try:
        crop = json.loads((Path(current) / "manifest.json").read_text())["input"].get("crop") or {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "off"
    return "on" if crop.get("mode") == "foreground" else "off"


def retrain_train_settings(args: argparse.Namespace) -> dict:
    """The TrainConfig dict a retrain command line asks for, with what it left open as None: architecture,
    input, weights and learning rate (trainer.retrain.OPEN_FIELDS), and the recipe (RECIPE_FIELDS), which
    fine-tuning takes from the current run. The plain path's rotation follows a given --rotation, as in train."""
    from trainer.retrain import OPEN_FIELDS, RECIPE_FIELDS, open_recipe

    left_open = {k: getattr(args, k) for k in OPEN_FIELDS}
    recipe_open = {k for k in RECIPE_FIELDS if getattr(args, k) is None}
    if args.rotation is not None:
        recipe_open.discard("plain_rotation")
    training = argparse.ArgumentParser(add_help=False)
    _add_train_args(training, data=False)
    filled = argparse.Namespace(**{**vars(args), **{k: v if v is not None else OPEN_FIELDS[k] for k, v in left_open.items()},
                                   **{k: training.get_default(k) for k in recipe_open},
                                   "data": "", "station_view": args.station_view or _current_station_view(args.current)})
    train = open_recipe(train_config_from_args(filled).to_dict(), recipe_open)
    train.update(left_open, name=args.name)
    return train


def cmd_retrain(args: argparse.Namespace) -> int:
    from contract.broker import settings_from_args
    from trainer.retrain import ExportSettings, RetrainConfig, render_markdown, retrain

    cfg = RetrainConfig(
        base_data=args.base_data, reviewed=args.reviewed, current=args.current, report=args.report,
        train=retrain_train_settings(args),
        export=ExportSettings(models_dir=Path(args.models_dir), version=args.version,
                              calibration_images=args.calibration_images, calibration_method=args.calibration_method,
                              gate_margin_points=args.gate_margin, parity_images=args.parity_images,
                              tensorrt=args.tensorrt, sign_key=args.sign_key),
        name=args.name, holdout=args.holdout, holdout_fraction=args.holdout_fraction,
        reviewed_holdout_fraction=args.reviewed_holdout_fraction, overall_tolerance_points=args.overall_tolerance,
        overall_confidence=args.overall_confidence,
        reviewed_confidence=args.reviewed_confidence,
        finetune_from_current=args.finetune_from_current, prefer_int8=args.prefer_int8, public_key=args.public_key,
        mqtt=settings_from_args(args))
    result = retrain(cfg)
    print(render_markdown(result.report))
    print(f"bundle {result.bundle_dir} ({result.decision.decision}); report {result.report_json} and {result.report_md}")
    return 0 if result.decision.promoted else 1


COMMANDS["retrain"] = cmd_retrain


def _add_enroll_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("enroll", help="add a class to a bundle from a few images of it (no training; docs/enrol.md)")
    p.add_argument("--bundle", type=Path, required=True, help="the bundle to extend, models/<name>/<version>")
    p.add_argument("--class", dest="label", required=True, help="the new class's label")
    p.add_argument("--images", type=Path, required=True, help="folder of its images (item crops, as a station sees them)")
    p.add_argument("--models-dir", type=Path, default=None, help="default: the bundle's own models dir")
    p.add_argument("--version", default=None, help="the new bundle version (default: UTC timestamp)")
    signing = p.add_mutually_exclusive_group()
    signing.add_argument("--sign-key", type=Path, default=None,
                         help="ed25519 private key to sign the new manifest (needed when the source bundle is signed; "
                              "the private half of --public-key when that is given)")
    signing.add_argument("--unsigned", action="store_true",
                         help="write the new version unsigned although the source bundle is signed (stations "
                              "configured with a public key refuse it)")
    p.add_argument("--public-key", type=Path, default=None, help="check the source bundle's signature")
    p.add_argument("--gate-data", type=Path, default=None,
                   help="class folders of the old classes' images for the gate (default: the validation split of the "
                        "run the bundle was exported from)")
    p.add_argument("--gate-images", type=int, default=2000, help="gate images used (half fit, half held out)")
    p.add_argument("--max-drop", type=float, default=0.5,
                   help="top-1 points the old classes may lose on the held-out gate images")
    p.add_argument("--min-examples", type=int, default=5)
    p.add_argument("--mirror", choices=["auto", "on", "off"], default="auto",
                   help="fit on the examples' mirror images too (auto: when the model was trained with flips)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the figures (the recall and the old classes' loss at each allowance) and write nothing")


def cmd_enroll(args: argparse.Namespace) -> int:
    import time

    from trainer.enroll import EnrolConfig, EnrolError, enroll

    started = time.monotonic()
    cfg = EnrolConfig(bundle=args.bundle, label=args.label, images=args.images, models_dir=args.models_dir,
                      version=args.version, sign_key=args.sign_key, public_key=args.public_key, unsigned=args.unsigned,
                      gate_data=args.gate_data, gate_images=args.gate_images, max_drop_points=args.max_drop,
                      min_examples=args.min_examples, mirror={"auto": None, "on": True, "off": False}[args.mirror],
                      dry_run=args.dry_run)
    try:
        result = enroll(cfg)
    except EnrolError as exc:
        if exc.report:
            _print_enrolment(exc.report)
        print(f"enroll: {exc}", file=sys.stderr)
        return 1
    _print_enrolment(result.report)
    if result.bundle_dir is None:
        print(f"dry run       nothing written ({time.monotonic() - started:.1f} s); enrol with the --max-drop chosen")
        return 0
    print(f"bundle        {result.bundle_dir} ({len(result.manifest['labels'])} labels, verified"
          + (", signed" if args.sign_key else "") + f") in {time.monotonic() - started:.1f} s")
    return 0


def _print_enrolment(report: dict) -> None:
    gate = report["gate"]
    print(f"new class     recall {report['recall_examples'] * 100:.1f}% on its {report['examples']} examples "
          f"(leave-one-out {report['recall_leave_one_out'] * 100:.1f}%)"
          + (", fitted with their mirror images" if report.get("mirrored") else ""))
    print(f"old classes   {gate['accuracy_before'] * 100:.2f}% -> {gate['accuracy_after'] * 100:.2f}% on "
          f"{gate['held_out_images']} held-out gate images ({gate['drop_points']:+.2f} points lost, at most "
          f"{gate['max_drop_points']}): {'passed' if gate['passed'] else 'FAILED'}")
    int8 = report.get("int8")
    if int8:        # what a station with VNNI or an INT8 TensorRT engine runs
        g8 = int8["gate"]
        print(f"on INT8       {g8['accuracy_before'] * 100:.2f}% -> {g8['accuracy_after'] * 100:.2f}% on "
              f"{g8['held_out_images']} held-out gate images ({g8['drop_points']:+.2f} points lost, at most "
              f"{g8['max_drop_points']}): {'passed' if g8['passed'] else 'FAILED'}; new class leave-one-out "
              f"{int8['recall_leave_one_out'] * 100:.1f}% ({int8['model']})")
    curve = report.get("allowances") or []
    if curve:      # for a product like a trained one, the allowance decides its recall (docs/enrol.md)
        print("by --max-drop  " + "; ".join(
            f"{c['max_drop_points']:g}{'*' if c['max_drop_points'] == gate['max_drop_points'] else ''}: "
            f"{c['recall_leave_one_out'] * 100:.0f}% leave-one-out, {c['drop_points']:+.2f} points" for c in curve))


COMMANDS["enroll"] = cmd_enroll


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx", "root"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for ours in ("trainer", "agent"):   # the root logger is quietened above; our own INFO lines stay
        logging.getLogger(ours).setLevel(logging.DEBUG if args.verbose else logging.INFO)
    from contract.bundle import BundleError
    from trainer.data import DatasetError
    from trainer.export.tensorrt import TensorRTUnavailable
    from trainer.model import WeightsError

    try:
        return COMMANDS[args.command](args)
    except (DatasetError, WeightsError, BundleError, TensorRTUnavailable, ValueError, OSError) as exc:
        # OSError: a folder or file given on the command line that cannot be read or written (it names the path)
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
