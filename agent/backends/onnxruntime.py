"""ONNX Runtime backend with a configurable execution-provider order.

With an ``embedding_name`` (a bundle with ``open_set``), ``run_outputs`` fetches the logits and the embedding
in one ``session.run``; ``run`` still gives the logits alone.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from agent.backends.base import BackendError, check_warmup_outputs
from agent.config import available_cpus
from contract.preprocess import InputSpec

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"


def _available_providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


def pick_providers(preferred: Sequence[str], available: Sequence[str]) -> list[str]:
    """The preferred providers this build has, in preference order; CPU always last resort."""
    chosen = [p for p in preferred if p in available]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def thread_candidates(cpus: int) -> list[int]:
    """Intra-op thread counts auto mode tries: one, half and all of the CPUs."""
    return sorted({1, max(1, cpus // 2), max(1, cpus)})


def pick_fastest(candidates: Sequence[int], seconds_per_run: Callable[[int], float]) -> tuple[int, dict[int, float]]:
    """The candidate with the shortest time per run (the first of equals), and every candidate's time."""
    timings = {n: seconds_per_run(n) for n in candidates}
    return min(candidates, key=lambda n: timings[n]), timings


class OnnxRuntimeBackend:
    def __init__(self, model_path: Path, spec: InputSpec, *, precision: str,
                 providers: Sequence[str] = ("CPUExecutionProvider",), intra_op_threads: int = 0,
                 spinning: bool = False, tune_batch: int = 8, cpus: int | None = None,
                 embedding_name: str | None = None) -> None:
        """``intra_op_threads`` 0 is auto: on the CPU provider, the model is timed at ``tune_batch`` with
        1, half and all of the ``cpus`` threads and the fastest is kept. A sub-millisecond model runs
        faster on one thread (two threads spend more on handing work over than they save), a ResNet50
        twice as fast on two (docs/agent.md, Benchmark)."""
        self.spec = spec
        self.precision = precision
        self.model_path = model_path
        self.spinning = spinning
        self.embedding_name = embedding_name
        self.chosen = pick_providers(providers, _available_providers())
        self.tuning: dict[int, float] = {}
        self.choice: Any = None  # set by artifact_choice: the ArtifactChoice that picked this model
        self.session = self._accelerated_session(intra_op_threads) if self.chosen[0] != CPU else None
        if self.session is None:
            self.session = self._cpu_session(intra_op_threads, tune_batch, cpus or available_cpus())
        self.threads = self.session.get_session_options().intra_op_num_threads
        self.name = f"onnxruntime:{self.session.get_providers()[0]}"
        log.info("%s: %s (%s), providers %s, %d intra-op thread(s)", model_path.name, self.name, precision,
                 self.session.get_providers(), self.threads)

    def _accelerated_session(self, intra_op_threads: int):
        """A session on the preferred GPU providers, or None where ONNX Runtime could not start them: it raised
        (no GPU visible, its own fallback failed too) or quietly came up on the CPU alone (a provider library
        that does not load). The CPU session is then made as for the CPU provider (threads tuned), with a
        warning: a station on a GPU build must not stop, nor run on the CPU unannounced."""
        wanted = "/".join(p for p in self.chosen if p != CPU)
        try:
            session = self._open(intra_op_threads, self.chosen)
        except BackendError as exc:
            log.warning("%s: ONNX Runtime cannot start %s (%s); trying the CPU alone", self.model_path.name,
                        wanted, exc)
            return None
        if session.get_providers()[0] == CPU:
            log.warning("%s: ONNX Runtime did not start %s (a provider library or the GPU is missing; ONNX "
                        "Runtime's own log says which); running on the CPU", self.model_path.name, wanted)
            return None
        return self._bind(session)

    def _cpu_session(self, intra_op_threads: int, tune_batch: int, cpus: int):
        """A CPU session with ``intra_op_threads``, or with 0 (auto) the fastest of 1, half and all ``cpus``."""
        if intra_op_threads or cpus == 1:
            return self._session(intra_op_threads, [CPU])
        sessions: dict[int, Any] = {}

        def seconds_per_run(threads: int) -> float:
            sessions[threads] = self._session(threads, [CPU])
            try:
                return self._time(sessions[threads], tune_batch)
            except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own errors: this model cannot run here
                raise BackendError(f"{self.model_path}: cannot run a batch of {tune_batch} "
                                   f"({type(exc).__name__}: {exc})") from exc

        best, self.tuning = pick_fastest(thread_candidates(cpus), seconds_per_run)
        log.info("%s: %s ms per batch of %d with %s intra-op threads; using %d", self.model_path.name,
                 "/".join(f"{1000 * t:.2f}" for t in self.tuning.values()), tune_batch,
                 "/".join(str(n) for n in self.tuning), best)
        return sessions[best]

    def _session(self, intra_op_threads: int, providers: Sequence[str]):
        return self._bind(self._open(intra_op_threads, providers))

    def _open(self, intra_op_threads: int, providers: Sequence[str]):
        """An ONNX Runtime session on ``providers``; BackendError naming the file where it cannot load."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        # ORT's pool threads busy-wait between runs by default; on a small CPU that steals the
        # cores the camera, decision and MQTT threads need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        try:
            session = ort.InferenceSession(str(self.model_path), sess_options=options, providers=list(providers))
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BackendError(f"{self.model_path}: ONNX Runtime cannot load the model ({exc})") from exc
        return session

    def _bind(self, session):
        """``session`` with its input and output names resolved and its input checked against the manifest."""
        inputs = {i.name: i for i in session.get_inputs()}
        self.input_name = self.spec.input_name if self.spec.input_name in inputs else next(iter(inputs))
        outputs = [o.name for o in session.get_outputs()]
        self.output_name = self.spec.output_name if self.spec.output_name in outputs else outputs[0]
        self.output_names = [self.output_name]
        if self.embedding_name is not None:
            if self.embedding_name not in outputs or self.embedding_name == self.output_name:
                raise BackendError(f"{self.model_path}: no output {self.embedding_name!r} for the embedding the "
                                   f"manifest's field open_set names; the model's outputs are {outputs}")
            self.output_names.append(self.embedding_name)
        shape = list(inputs[self.input_name].shape)
        want = [None, 3, self.spec.height, self.spec.width]
        if len(shape) != 4 or any(isinstance(d, int) and w is not None and d != w for d, w in zip(shape, want)):
            raise BackendError(f"{self.model_path}: model input {self.input_name!r} has shape {shape}, but the "
                               f"manifest's field input says (N, 3, {self.spec.height}, {self.spec.width})")
        batch_dim = shape[0]
        self.fixed_batch = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else None
        return session

    def _time(self, session, batch_size: int, runs: int = 5, budget_s: float = 2.0) -> float:
        """Seconds per run of ``session`` on a zero batch: the median of up to ``runs`` after one warm-up."""
        n = self.fixed_batch or batch_size
        feed = {self.input_name: np.zeros((n, 3, self.spec.height, self.spec.width), np.float32)}
        session.run(self.output_names, feed)
        times: list[float] = []
        deadline = time.perf_counter() + budget_s
        while len(times) < runs and (not times or time.perf_counter() < deadline):
            start = time.perf_counter()
            session.run(self.output_names, feed)
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits for a batch."""
        return self._run([self.output_name], batch)[0]

    def run_outputs(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits and embedding for a batch from one ``session.run``; no embedding without ``embedding_name``."""
        outputs = self._run(self.output_names, batch)
        return outputs[0], outputs[1] if len(outputs) > 1 else None

    def _run(self, names: list[str], batch: np.ndarray) -> list[np.ndarray]:
        """The named outputs for a batch; a model exported with a fixed batch size is fed in chunks (an empty
        batch as one chunk of padding, so its outputs have zero rows, as a model with a free batch size gives)."""
        if self.fixed_batch is None or len(batch) == self.fixed_batch:
            return self.session.run(names, {self.input_name: batch})
        parts: list[list[np.ndarray]] = []
        for start in range(0, max(1, len(batch)), self.fixed_batch):
            chunk = batch[start:start + self.fixed_batch]
            pad = self.fixed_batch - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
            outs = self.session.run(names, {self.input_name: chunk})
            parts.append([out[: self.fixed_batch - pad] for out in outs])
        return [np.concatenate([p[i] for p in parts]) for i in range(len(names))]

    def warmup(self, batch_size: int, runs: int) -> None:
        """First runs allocate and (with TensorRT EP) build engines; do it before reporting ready."""
        dummy = np.zeros((batch_size, 3, self.spec.height, self.spec.width), np.float32)
        for _ in range(runs):
            try:
                logits, embedding = self.run_outputs(dummy)
            except Exception as exc:  # onnxruntime raises its own exception types
                raise BackendError(f"{self.model_path}: ONNX Runtime cannot run the warm-up batch ({exc})") from exc
            check_warmup_outputs(str(self.model_path), logits, batch_size, embedding)
