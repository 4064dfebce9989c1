"""Which ONNX artifact of a bundle a station runs: the fastest deployable one, on its own hardware.

INT8 is not faster everywhere: on a 2-core CPU without VNNI the documented recipe's INT8 model ran at
1,649 img/s and its FP32 model at 4,001 (batch 1). So with ``model.precision: auto`` every deployable
ONNX artifact is loaded, run on a fixed image-like sample at the configured batch size (logits or an embedding
that are not finite, or not of the manifest's size, make it unusable) and timed, the candidates in turns for
about a second (one whose run fails while timed is left out); the fastest is kept, FP32 on a tie. ``int8``
or ``fp32`` pin the choice: the pinned artifact is loaded and checked, the other only if it cannot run. An artifact the
manifest does not mark deployable is never loaded. When none can run, the bundle is refused with an
error naming it (the station keeps the model it had).

The figures and the choice are logged and kept on the backend (``choice``) for the station's status.
Choosing is a pure function of the measurements (``pick_precision``), so tests inject timings.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from agent.backends.base import Backend, BackendError, outputs_of
from contract.bundle import (
    ROLE_FP32,
    ROLE_INT8,
    Artifact,
    Bundle,
    BundleError,
    check_embedding,
    check_outputs,
    sample_input,
)
from contract.preprocess import InputSpec

log = logging.getLogger(__name__)

CANDIDATE_ORDER = ("fp32", "int8")  # the first of equals wins: at the same speed FP32 has no rounding error
_ROLES = {"fp32": ROLE_FP32, "int8": ROLE_INT8}


@dataclass(frozen=True)
class ArtifactChoice:
    """What was measured and chosen when the model loaded."""

    mode: str                                  # auto, int8, fp32 (model.precision, resolved)
    precision: str                             # the artifact running
    batch: int                                 # batch size the timings are for
    ms_per_batch: dict[str, float]             # precision -> median milliseconds per batch, usable ones
    skipped: dict[str, str] = field(default_factory=dict)  # precision -> why it was not a candidate

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


CLEARLY_FASTER = 0.05     # the share of FP32's time INT8 must save to be chosen under precision auto


def pick_precision(mode: str, ms_per_batch: Mapping[str, float]) -> str:
    """The precision to run among the usable candidates (those with a finite time).

    auto: the fastest, where a later candidate (INT8) must be faster than FP32 by more than ``CLEARLY_FASTER``:
    two models of equal speed measure apart by noise, and a choice made by noise flips between restarts;
    int8 or fp32: that one when usable, else the other."""
    usable = [p for p in CANDIDATE_ORDER if p in ms_per_batch and math.isfinite(ms_per_batch[p])]
    if not usable:
        raise BackendError("no usable ONNX artifact")
    if mode != "auto":
        return mode if mode in usable else usable[0]
    best = usable[0]
    for precision in usable[1:]:
        if ms_per_batch[precision] < (1.0 - CLEARLY_FASTER) * ms_per_batch[best]:
            best = precision
    return best


def onnx_candidates(bundle: Bundle) -> tuple[dict[str, Artifact], dict[str, str]]:
    """The bundle's deployable ONNX artifacts by precision, and why any other one is left out."""
    deployable: dict[str, Artifact] = {}
    skipped: dict[str, str] = {}
    for precision in CANDIDATE_ORDER:
        art = bundle.artifact(_ROLES[precision])
        if art is None:
            continue
        if art.deployable:
            deployable[precision] = art
        else:
            skipped[precision] = f"{art.path.name}: not deployable per the manifest ({art.reason or 'no reason given'})"
    return deployable, skipped


def sample_batch(spec: InputSpec, batch: int) -> np.ndarray:
    """A fixed image-like batch: uniform pixels normalized as the station does, so ranges are realistic."""
    return sample_input(spec, batch)


def check_finite(backend: Backend, sample: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The warm-up run on the sample, its logits and embedding; logits or an embedding that are not finite (or a
    model that cannot take the sample) make the model unusable here."""
    try:
        logits, embedding = outputs_of(backend, sample)
    except BackendError:
        raise
    except Exception as exc:  # onnxruntime raises its own exception types, e.g. for a wrong input shape
        raise BackendError(f"{backend.name} ({backend.precision}): cannot run the warm-up sample ({exc})") from exc
    if not np.isfinite(logits).all():
        raise BackendError(f"{backend.name} ({backend.precision}): non-finite logits on the warm-up sample")
    if embedding is None:
        return logits, None
    if embedding.ndim != 2 or len(embedding) != len(sample):
        raise BackendError(f"{backend.name} ({backend.precision}): embedding shape {embedding.shape} on the warm-up "
                           f"sample of {len(sample)}, expected ({len(sample)}, dim)")
    if not np.isfinite(embedding).all():
        raise BackendError(f"{backend.name} ({backend.precision}): non-finite embedding on the warm-up sample")
    return logits, embedding


def measure_ms(backends: Mapping[str, Backend], sample: np.ndarray, budget_s: float = 1.0, min_runs: int = 5,
               max_runs: int = 2000) -> dict[str, float]:
    """Median milliseconds per batch of each backend, timed in turns (A, B, A, B...) so that a neighbour's
    burst on a shared CPU slows both alike; at least ``min_runs`` each, then until ``budget_s`` is spent.
    Five separate runs each were not enough: a 0.3 ms model read 0.8 ms and INT8 won on noise.

    A backend whose run fails while it is timed (a GPU provider out of memory) gets NaN, logged, and the
    others go on being timed: one candidate's failure does not stop the choice."""
    times: dict[str, list[float]] = {p: [] for p in backends}
    failed: set[str] = set()

    def seconds(precision: str, backend: Backend) -> float | None:
        start = time.perf_counter()
        try:
            outputs_of(backend, sample)             # what the pipeline runs: with the embedding, where there is one
        except Exception as exc:  # noqa: BLE001 - a runtime's own error: this candidate gets no timing
            failed.add(precision)
            log.warning("%s (%s): a run failed while it was timed (%s: %s); not a candidate", backend.name,
                        precision, type(exc).__name__, exc)
            return None
        return time.perf_counter() - start

    for precision, backend in backends.items():  # warm-up, untimed
        seconds(precision, backend)
    deadline = time.perf_counter() + budget_s
    while turns := [(p, b) for p, b in backends.items() if p not in failed]:
        runs = min(len(times[p]) for p, _ in turns)
        if runs >= max_runs or (runs >= min_runs and time.perf_counter() > deadline):
            break
        # A, B then B, A: the one timed second in a turn runs on caches the first warmed (measured: of two
        # identical models the second won every time); alternating leaves neither ahead
        for precision, backend in turns if runs % 2 == 0 else reversed(turns):
            took = seconds(precision, backend)
            if took is not None:
                times[precision].append(took)
    return {p: math.nan if p in failed or not t else 1000.0 * float(np.median(t)) for p, t in times.items()}


def check_candidate(bundle: Bundle, backend: Backend, sample: np.ndarray, model: str) -> None:
    """``backend`` (of the file ``model``) run on the sample: finite logits, one per trained label, and with
    ``open_set`` a finite embedding of the manifest's size, else BackendError and the model is not a candidate.
    Checked after the choice only, a chosen model of the wrong size made the station refuse a bundle whose other
    model runs."""
    logits, embedding = check_finite(backend, sample)
    try:
        check_outputs(bundle, model, logits, len(sample))
        if bundle.embedding_name is not None:
            check_embedding(bundle, model, embedding, len(sample))
    except BundleError as exc:
        raise BackendError(str(exc)) from exc


def _load_candidate(bundle: Bundle, art: Artifact, build: Callable[[Artifact], Backend],
                    sample: np.ndarray) -> Backend:
    backend = build(art)
    check_candidate(bundle, backend, sample, art.path.name)
    return backend


def choose_onnx_backend(bundle: Bundle, mode: str, batch: int, build: Callable[[Artifact], Backend],
                        measure: Callable[[Mapping[str, Backend], np.ndarray], dict[str, float]] = measure_ms) -> Backend:
    """Load, check and time the bundle's deployable ONNX artifacts; the chosen backend, with ``choice`` set."""
    artifacts, skipped = onnx_candidates(bundle)
    order = sorted(artifacts, key=lambda p: (mode != "auto" and p != mode, CANDIDATE_ORDER.index(p)))
    sample = sample_batch(bundle.input_spec, batch)
    backends: dict[str, Backend] = {}
    for precision in order:
        try:
            backends[precision] = _load_candidate(bundle, artifacts[precision], build, sample)
        except BackendError as exc:
            skipped[precision] = str(exc)
            continue
        if mode != "auto":
            break
    for precision, reason in skipped.items():
        log.warning("%s %s: %s artifact skipped: %s", bundle.name, bundle.version, precision, reason)
    if not backends:
        raise BackendError(f"{bundle.root}: no ONNX artifact of bundle {bundle.name} {bundle.version} can run here ("
                           + "; ".join(f"{p}: {r}" for p, r in skipped.items()) + ")")
    measured = measure(backends, sample)
    ms = {p: v for p, v in measured.items() if p in backends and math.isfinite(v) and v > 0}
    for precision in (p for p in backends if p not in ms):
        skipped[precision] = f"no finite time per batch when timed ({measured.get(precision)} ms)"
        log.warning("%s %s: %s artifact skipped: %s", bundle.name, bundle.version, precision, skipped[precision])
    if not ms:
        raise BackendError(f"{bundle.root}: no ONNX artifact of bundle {bundle.name} {bundle.version} gave a timing ("
                           + "; ".join(f"{p}: {r}" for p, r in skipped.items()) + ")")
    chosen = pick_precision(mode, ms)
    choice = ArtifactChoice(mode=mode, precision=chosen, batch=batch, ms_per_batch={p: round(v, 4) for p, v in ms.items()},
                            skipped=skipped)
    log.info("%s %s: %s per batch of %d on this machine; running %s (precision %s)", bundle.name, bundle.version,
             ", ".join(f"{p} {v:.3f} ms" for p, v in ms.items()), batch, chosen, mode)
    if mode != "auto" and chosen != mode:
        log.warning("%s %s: precision %s pinned but that artifact cannot run here; running %s", bundle.name,
                    bundle.version, mode, chosen)
    backend = backends[chosen]
    backend.choice = choice  # type: ignore[attr-defined]
    return backend
