"""Metrics and reports for a model on labelled images, the same for a checkpoint and an ONNX file.

``evaluate`` turns images into the exact station inputs (bundle preprocessing),
runs them through PyTorch or ONNX Runtime, and writes ``metrics.json``,
``confusion_matrix.json/png``, ``reliability.png`` and ``worst_mistakes.png``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import numpy as np

log = logging.getLogger(__name__)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def confidence_stats(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: top-1 probability, top-1 minus top-2 margin (a single class: its probability), entropy (nats)."""
    top2 = np.sort(probs, axis=1)[:, -2:]
    second = top2[:, -2] if top2.shape[1] > 1 else np.zeros(len(probs))
    entropy = -(probs * np.log(np.clip(probs, 1e-12, 1.0))).sum(axis=1)
    return top2[:, -1], top2[:, -1] - second, entropy


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> tuple[float, list[dict]]:
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece, table = 0.0, []
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        n = int(in_bin.sum())
        if n:
            acc, mean_conf = float(correct[in_bin].mean()), float(conf[in_bin].mean())
            ece += n / len(labels) * abs(acc - mean_conf)
            table.append({"low": float(lo), "high": float(hi), "count": n, "accuracy": acc, "confidence": mean_conf})
    return float(ece), table


def suggest_thresholds(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Low-confidence thresholds from the validation set.

    Each threshold is the median of its statistic over the *wrong* predictions,
    so each rule alone flags about half of the model's mistakes; together they
    flag more. The share of frames and of mistakes flagged is reported beside them.
    """
    conf, margin, entropy = confidence_stats(probs)
    wrong = probs.argmax(axis=1) != labels
    if wrong.sum() < 2:  # a near-perfect model: flag the least certain 2% of frames
        return {"min_confidence": float(np.quantile(conf, 0.02)), "min_margin": float(np.quantile(margin, 0.02)),
                "max_entropy": float(np.quantile(entropy, 0.98))}
    return {"min_confidence": float(np.median(conf[wrong])), "min_margin": float(np.median(margin[wrong])),
            "max_entropy": float(np.median(entropy[wrong]))}


def within_review_budget(probs: np.ndarray, thresholds: dict[str, float], budget: float) -> dict[str, float]:
    """``thresholds`` relaxed, where needed, so that at most ``budget`` of these rows are flagged.

    A station sends every flagged item to manual review; the median-of-mistakes rule flags what a model is
    unsure about, and on a hard view that can be a third of all items. The budget finds the quantile level
    q at which flagging conf < q-quantile, margin < q-quantile or entropy > (1-q)-quantile flags ``budget``
    of the rows (bisection: the share grows with q), and each threshold becomes the less strict of the two:
    a rule already within the budget is kept as it is.
    """
    if not 0.0 <= budget <= 1.0:
        raise ValueError(f"review budget: expected a share in 0..1, got {budget!r}")
    if flagged(probs, thresholds).mean() <= budget:
        return dict(thresholds)
    conf, margin, entropy = confidence_stats(probs)

    def at(q: float) -> dict[str, float]:
        return {"min_confidence": float(np.quantile(conf, q)), "min_margin": float(np.quantile(margin, q)),
                "max_entropy": float(np.quantile(entropy, 1 - q))}

    lo, hi = 0.0, budget
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if flagged(probs, at(mid)).mean() <= budget else (lo, mid)
    cap = at(lo)
    return {"min_confidence": min(thresholds["min_confidence"], cap["min_confidence"]),
            "min_margin": min(thresholds["min_margin"], cap["min_margin"]),
            "max_entropy": max(thresholds["max_entropy"], cap["max_entropy"])}


def low_confidence_report(probs: np.ndarray, labels: np.ndarray, thresholds: dict[str, float]) -> dict[str, float]:
    """Share of rows flagged, share of mistakes among them, accuracy of the rest."""
    mask = flagged(probs, thresholds)
    pred = probs.argmax(axis=1)
    wrong = pred != labels
    return {
        "flagged_fraction": float(mask.mean()),
        "errors_caught_fraction": float(mask[wrong].mean()) if wrong.any() else 0.0,
        "accuracy_unflagged": float((pred[~mask] == labels[~mask]).mean()) if (~mask).any() else 0.0,
    }


def flagged(probs: np.ndarray, thresholds: dict[str, float]) -> np.ndarray:
    conf, margin, entropy = confidence_stats(probs)
    return (conf < thresholds["min_confidence"]) | (margin < thresholds["min_margin"]) | (entropy > thresholds["max_entropy"])


def class_f1(tp: np.ndarray, predicted: np.ndarray, support: np.ndarray) -> np.ndarray:
    """Per-class F1, 2 TP / (predictions + images) (equal to 2PR / (P + R), and 0 where TP is 0); NaN for a class
    with neither images nor predictions, whose F1 is undefined."""
    tp, total = np.asarray(tp, dtype=np.float64), np.asarray(predicted) + np.asarray(support)
    return np.divide(2 * tp, total, out=np.full(len(tp), np.nan), where=total > 0)


def macro_f1(tp: np.ndarray, predicted: np.ndarray, support: np.ndarray) -> float:
    """Mean F1 over the classes with images or predictions. A class absent from both (a test folder holding 3 of
    the model's 10 classes) was neither missed nor confused: counted as 0 it pulled a model right on every image
    down to 0.3. With every class present it is the plain mean. The training loop's val_macro_f1 (written into
    manifests) and ``compute_metrics`` both use it, so the two figures agree."""
    f1 = class_f1(tp, predicted, support)
    present = ~np.isnan(f1)
    return float(f1[present].mean()) if present.any() else 0.0


def _figure(value: float, defined: bool) -> float | None:
    """A per-class figure for metrics.json: None (JSON null) where it is undefined, never NaN."""
    return float(value) if defined else None


def compute_metrics(logits: np.ndarray, labels: np.ndarray, classes: Sequence[str], top_k: int = 5) -> dict:
    """Accuracy, top-k, macro-F1, per-class P/R/F1, confusion matrix, ECE, suggested thresholds.

    ``logits``: one row per label, one column per class. A row with NaN or infinity predicts no class: it counts
    as wrong (accuracy, top-k, recall), is in no column of the confusion matrix, is left out of the calibration
    figures and thresholds, and ``non_finite_images`` counts such rows (with none finite, ``ece``, ``thresholds``
    and ``low_confidence`` are None). A class with no image has recall None; one also never predicted has
    precision and F1 None too and is left out of macro-F1 (``macro_f1``). ValueError for no rows, a shape that does
    not match, or a label that is not a class index."""
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    n_cls = len(classes)
    if labels.ndim != 1 or logits.shape != (len(labels), n_cls):
        raise ValueError(f"logits: expected {len(labels)} x {n_cls} (a row per label, a column per class), got "
                         f"shape {logits.shape} for labels of shape {labels.shape}")
    if not len(labels):
        raise ValueError("no images to compute metrics on (0 rows of logits)")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= n_cls:
        raise ValueError(f"labels: expected class indices 0..{n_cls - 1}, got values {labels.min()}..{labels.max()} "
                         f"({labels.dtype})")
    finite = np.isfinite(logits).all(axis=1)
    probs = softmax(np.where(finite[:, None], logits, 0.0))
    pred = np.where(finite, probs.argmax(axis=1), -1)            # -1: no class
    cm = np.zeros((n_cls, n_cls), dtype=np.int64)
    np.add.at(cm, (labels[finite], pred[finite]), 1)
    support = np.bincount(labels, minlength=n_cls)
    tp, predicted = np.diag(cm).astype(float), cm.sum(0)
    precision = np.divide(tp, predicted, out=np.zeros(n_cls), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(n_cls), where=support > 0)
    f1 = class_f1(tp, predicted, support)
    k = min(top_k, n_cls)
    topk = np.argsort(-np.where(finite[:, None], logits, 0.0), axis=1)[:, :k]
    if finite.any():
        fprobs, flabels = probs[finite], labels[finite]
        ece, bins = expected_calibration_error(fprobs, flabels)
        thresholds = suggest_thresholds(fprobs, flabels)
        low_confidence = low_confidence_report(fprobs, flabels, thresholds)
    else:
        ece, bins, thresholds, low_confidence = None, [], None, None
    return {
        "images": int(len(labels)),
        "non_finite_images": int((~finite).sum()),
        "accuracy": float((pred == labels).mean()),
        f"top{k}_accuracy": float(((topk == labels[:, None]).any(axis=1) & finite).mean()),
        "macro_f1": macro_f1(tp, predicted, support),
        "per_class": {
            c: {"precision": _figure(precision[i], support[i] + predicted[i] > 0),
                "recall": _figure(recall[i], support[i] > 0), "f1": _figure(f1[i], support[i] + predicted[i] > 0),
                "support": int(support[i])}
            for i, c in enumerate(classes)
        },
        "confusion_matrix": {"classes": list(classes), "matrix": cm.tolist()},
        "ece": ece,
        "calibration_bins": bins,
        "thresholds": thresholds,
        "low_confidence": low_confidence,
    }


# --- plots ----------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(metrics: dict, out: Path) -> None:
    plt = _plt()
    classes = metrics["confusion_matrix"]["classes"]
    cm = np.array(metrics["confusion_matrix"]["matrix"])
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = max(5, 0.6 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="true", title=f"confusion (accuracy {metrics['accuracy']:.4f})")
    for i in range(len(classes)):
        for j in range(len(classes)):
            if cm[i, j]:
                ax.text(j, i, cm[i, j], ha="center", va="center", fontsize=7, color="white" if norm[i, j] > 0.5 else "black")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_reliability(metrics: dict, out: Path) -> None:
    plt = _plt()
    bins = metrics["calibration_bins"]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", label="perfect")
    centers = [(b["low"] + b["high"]) / 2 for b in bins]
    ax.bar(centers, [b["accuracy"] for b in bins], width=1 / 15, edgecolor="k", alpha=0.7, label="accuracy")
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "ro-", ms=3, label="mean confidence")
    ece = metrics["ece"]
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
           title="reliability (no finite logits)" if ece is None else f"reliability (ECE {ece:.4f})")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_worst_mistakes(paths: Sequence[Path], logits: np.ndarray, labels: np.ndarray, classes: Sequence[str],
                        out: Path, count: int = 16) -> list[dict]:
    """The most confident wrong predictions, with their images; returns them as rows (rows of logits with NaN or
    infinity have no prediction nor confidence: compute_metrics counts them)."""
    from contract.preprocess import read_image

    logits = np.asarray(logits, dtype=np.float64)
    finite = np.isfinite(logits).all(axis=1)
    probs = softmax(np.where(finite[:, None], logits, 0.0))
    pred = probs.argmax(1)
    wrong = np.flatnonzero((pred != labels) & finite)
    worst = wrong[np.argsort(-probs[wrong, pred[wrong]])][:count]
    rows = [{"path": str(paths[i]), "true": classes[labels[i]], "predicted": classes[pred[i]],
             "confidence": float(probs[i, pred[i]])} for i in worst]
    plt = _plt()
    cols = 4
    fig_rows = max(1, (len(worst) + cols - 1) // cols)
    fig, axes = plt.subplots(fig_rows, cols, figsize=(3 * cols, 3.2 * fig_rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, rows):
        ax.imshow(read_image(row["path"]))
        ax.set_title(f"true {row['true']}\npred {row['predicted']} {row['confidence']:.2f}", fontsize=8)
    fig.suptitle("worst mistakes (most confident wrong predictions)")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return rows


def write_reports(out_dir: Path, metrics: dict, paths: Sequence[Path], logits: np.ndarray, labels: np.ndarray) -> dict:
    """metrics.json (strict JSON: a figure that is not finite is a ValueError naming the file, never written as
    NaN), confusion_matrix.json and the plots, in ``out_dir``."""
    from contract.messages import dumps_finite

    out_dir.mkdir(parents=True, exist_ok=True)
    classes = metrics["confusion_matrix"]["classes"]
    metrics = dict(metrics)
    metrics["worst_mistakes"] = plot_worst_mistakes(paths, logits, labels, classes, out_dir / "worst_mistakes.png")
    for name, body in (("metrics.json", metrics), ("confusion_matrix.json", metrics["confusion_matrix"])):
        try:
            text = dumps_finite(body, indent=1)
        except ValueError as exc:
            raise ValueError(f"{out_dir / name}: a figure is not finite ({exc}); not written") from exc
        (out_dir / name).write_text(text)
    plot_confusion(metrics, out_dir / "confusion_matrix.png")
    plot_reliability(metrics, out_dir / "reliability.png")
    return metrics


# --- running a model ------------------------------------------------------------------------------


CHUNK_IMAGES = 64   # images preprocessed at a time where a set is streamed (ModelInputs)


class ModelInputs(Protocol):
    """Model inputs (N x 3 x H x W float32) made ``chunks()`` at a time, again on every pass, never all at once:
    what the export evaluates and calibrates on, whose whole set (thousands of images at 224 px, 0.6 MB each) need
    not fit in memory. A numpy array is accepted wherever these are (one chunk)."""

    def __len__(self) -> int: ...

    def chunks(self) -> Iterator[np.ndarray]: ...


def input_chunks(inputs: np.ndarray | ModelInputs) -> Iterator[np.ndarray]:
    """The chunks of ``inputs``, in order; an array is one chunk."""
    if isinstance(inputs, np.ndarray):
        if len(inputs):
            yield inputs
        return
    yield from inputs.chunks()


def input_batches(inputs: np.ndarray | ModelInputs, batch_size: int) -> Iterator[np.ndarray]:
    """``inputs`` in batches of ``batch_size`` rows (the last one shorter), whatever its chunks are: the batches a
    model runs on are those of the whole array (the same figures), and only one chunk and one batch are held.
    A batch within a chunk is a view of it; one that spans chunks is a copy."""
    size = max(1, int(batch_size))
    pending: list[np.ndarray] = []
    held = 0
    for chunk in input_chunks(inputs):
        start = 0
        if pending:
            start = min(size - held, len(chunk))
            pending.append(chunk[:start])
            held += start
            if held < size:
                continue
            yield np.concatenate(pending)
            pending, held = [], 0
        while len(chunk) - start >= size:
            yield chunk[start : start + size]
            start += size
        if start < len(chunk):
            pending, held = [chunk[start:]], len(chunk) - start
    if pending:
        yield pending[0] if len(pending) == 1 else np.concatenate(pending)


class ChainedInputs:
    """Several ``ModelInputs`` (or arrays) one after the other, as if concatenated."""

    def __init__(self, *parts: np.ndarray | ModelInputs) -> None:
        self.parts = parts

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts)

    def chunks(self) -> Iterator[np.ndarray]:
        for part in self.parts:
            yield from input_chunks(part)


class ImageFileInputs:
    """The station inputs of image files (the manifest's eval preprocessing), read and preprocessed ``chunk`` at a
    time on every pass (``workers`` processes read ahead, at most two chunks each): what ``eval_inputs`` gives, in
    the same order, without holding the whole set."""

    def __init__(self, samples: Sequence, spec, *, workers: int = 0, chunk: int = CHUNK_IMAGES,
                 desc: str = "preprocess images") -> None:
        self.samples = list(samples)
        self.spec = spec
        self.workers = workers
        self.chunk = max(1, int(chunk))
        self.desc = desc
        self.labels = np.asarray([s.label for s in self.samples], np.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def chunks(self) -> Iterator[np.ndarray]:
        import torch
        from tqdm import tqdm

        from contract.preprocess import Preprocessor
        from trainer.augment import load_eval
        from trainer.engine import ImageFiles

        if not self.samples:
            return
        pre = Preprocessor(self.spec)
        loader = torch.utils.data.DataLoader(ImageFiles(self.samples, lambda p: load_eval(p, pre)),
                                             batch_size=self.chunk, num_workers=self.workers)
        for x, _ in tqdm(loader, desc=self.desc, unit="chunk", leave=False):
            yield x.numpy()


def onnx_logits(onnx_path: str | Path, inputs: np.ndarray | ModelInputs, batch_size: int = 256,
                threads: int | None = None) -> np.ndarray:
    """Logits from an ONNX file in ONNX Runtime (CPU), batch by batch."""
    return onnx_outputs(onnx_path, inputs, batch_size, threads)[0]


def onnx_session(onnx_path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session of ``onnx_path``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])


def onnx_outputs(onnx_path: str | Path, inputs: np.ndarray | ModelInputs, batch_size: int = 256,
                 threads: int | None = None) -> list[np.ndarray]:
    """Every output of an ONNX file (logits first, then the embedding where it has one), batch by batch."""
    return onnx_outputs_each([onnx_path], inputs, batch_size, threads)[0]


def onnx_outputs_each(onnx_paths: Sequence[str | Path], inputs: np.ndarray | ModelInputs, batch_size: int = 256,
                      threads: int | None = None) -> list[list[np.ndarray]]:
    """``onnx_outputs`` of several ONNX files in one pass over ``inputs`` (each batch made once, run by each)."""
    sessions = [onnx_session(path, threads) for path in onnx_paths]
    names = [session.get_inputs()[0].name for session in sessions]
    parts: list[list] = [[] for _ in sessions]
    for batch in input_batches(inputs, batch_size):
        for session, name, out in zip(sessions, names, parts):
            out.append(session.run(None, {name: batch}))
    return [joined_outputs(session, out) for session, out in zip(sessions, parts)]


def joined_outputs(session, parts: list) -> list[np.ndarray]:
    """A session's outputs over its batches (``parts``: each ``session.run``'s list), joined output by output."""
    count = len(session.get_outputs())
    if not parts:
        return [np.zeros((0, 0), np.float32)] * count
    return [np.concatenate([p[k] for p in parts]) for k in range(count)]


def torch_logits(model, inputs: np.ndarray | ModelInputs, device, batch_size: int = 256) -> np.ndarray:
    """Logits of a torch model, batch by batch (``input_batches``: those of the whole array, so the same figures),
    holding one chunk and one batch of ``inputs`` at a time."""
    import torch

    from trainer.engine import predict_logits

    parts = [predict_logits(model, torch.from_numpy(batch), device, batch_size).numpy()
             for batch in input_batches(inputs, batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def evaluate(model_path: str | Path, data: str | Path, out_dir: str | Path, *, classes: Sequence[str] | None = None,
             spec_source: str | Path | None = None, workers: int = 2, limit: int | None = None,
             chunk_images: int = CHUNK_IMAGES) -> dict:
    """Evaluate a checkpoint (.pt) or an ONNX file (of a bundle) on a labelled dataset.

    The class list and preprocessing come from the checkpoint, or from the
    bundle's manifest next to the ONNX file (or ``spec_source``). A bundle's enrolled classes (its last labels)
    are scored as a station scores them: their logits from the model's embedding output, appended
    (``open_set.full_logits``). ValueError naming the model file when it gives NaN or infinite logits (nothing
    is written), DatasetError naming ``data`` when it holds no readable image of the classes.

    The images are read and preprocessed ``chunk_images`` at a time and run through the model batch by batch
    (``ImageFileInputs``): only the logits of the whole set are held, never its images (0.6 MB each at 224 px).
    """
    from contract.bundle import load_bundle
    from contract.preprocess import InputSpec
    from trainer import data as data_mod
    from trainer.data import DatasetError
    from trainer.engine import load_checkpoint_model, select_device

    if not (isinstance(chunk_images, int) and chunk_images >= 1):
        raise ValueError(f"chunk_images: expected at least 1 image, got {chunk_images!r}")
    model_path = Path(model_path)
    open_set = None
    if model_path.suffix == ".onnx":
        bundle = load_bundle(spec_source or model_path.parent, verify_files=False)
        spec, classes = bundle.input_spec, classes or bundle.labels
        open_set = bundle.open_set
        model = None
    else:
        model, ckpt = load_checkpoint_model(model_path)
        spec, classes = InputSpec.from_manifest(ckpt["input"]), classes or ckpt["classes"]
    dataset = data_mod.load_dataset(data, classes=classes)
    if limit:
        dataset = data_mod.limit_per_class(dataset, limit, seed=0)
    if not dataset.samples:
        unreadable = f"; {len(dataset.skipped)} unreadable image(s) skipped" if dataset.skipped else ""
        raise DatasetError(f"{data}: no readable image of the classes {list(classes)} to evaluate on{unreadable}")
    x = ImageFileInputs(dataset.samples, spec, workers=workers, chunk=chunk_images,
                        desc=f"preprocess {Path(data).name}")
    y = x.labels
    if model is None:
        outputs = onnx_outputs(model_path, x)
        logits = outputs[0]
        if open_set is not None and open_set.enrolled.labels:   # as a station: the enrolled classes' logits appended
            if len(outputs) < 2:
                raise ValueError(f"{model_path}: the bundle's enrolled classes {list(open_set.enrolled.labels)} "
                                 "are computed from the model's embedding output, and this file has none")
            logits = open_set.full_logits(logits, outputs[1])
    else:
        device = select_device("auto")
        logits = torch_logits(model.to(device), x, device)
    if logits.ndim != 2 or logits.shape[1] != len(classes):
        raise ValueError(f"{model_path}: gives logits of shape {logits.shape}, expected one per class "
                         f"({len(classes)}: {list(classes)})")
    bad = np.flatnonzero(~np.isfinite(logits).all(axis=1))
    if len(bad):
        raise ValueError(f"{model_path}: gives non-finite logits (NaN or infinity) on {len(bad)} of {len(logits)} "
                         f"images of {data} (e.g. {[str(dataset.samples[i].path) for i in bad[:3]]}); "
                         "no metrics written")
    metrics = compute_metrics(logits, y, classes)
    metrics["model"] = str(model_path)
    metrics["data"] = str(data)
    metrics["skipped_images"] = dataset.skipped
    return write_reports(Path(out_dir), metrics, [s.path for s in dataset.samples], logits, y)
