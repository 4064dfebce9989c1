"""Which ONNX artifact a station runs (``model.precision: auto``), against each artifact's throughput here.

For each bundle and batch size: the FP32 and INT8 models' throughput measured at length (every artifact,
deployable or not, with the station's own thread tuning), and the choice ``create_backend`` makes from
its short timing at load. INT8 needs VNNI (or a GPU) to pay off; the CPU flags are recorded.

    OMP_NUM_THREADS=2 nice -n 10 python benchmarks/artifact_choice.py --bundle models/fashion-mnist/<version>
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.backends import create_backend  # noqa: E402
from agent.backends.artifact_choice import measure_ms, sample_batch  # noqa: E402
from agent.backends.onnxruntime import OnnxRuntimeBackend  # noqa: E402
from agent.config import ModelConfig, available_cpus  # noqa: E402
from contract.bundle import ROLE_FP32, ROLE_INT8, load_bundle  # noqa: E402


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if "vnni" in f or f in ("avx2", "avx512f"))


def throughput(bundle, batch: int, seconds: float) -> dict[str, dict]:
    """Each ONNX artifact (deployable or not) with the station's thread tuning, timed in turns for ``seconds``."""
    backends = {}
    for role in (ROLE_FP32, ROLE_INT8):
        art = bundle.artifact(role)
        if art is not None:
            backends[art.precision] = OnnxRuntimeBackend(art.path, bundle.input_spec, precision=art.precision,
                                                         tune_batch=batch)
    ms = measure_ms(backends, sample_batch(bundle.input_spec, batch), budget_s=seconds, max_runs=100000)
    return {p: {"deployable": bundle.artifact(ROLE_FP32 if p == "fp32" else ROLE_INT8).deployable,
                "threads": b.threads, "ms_per_batch": round(ms[p], 4), "images_per_s": round(1000.0 * batch / ms[p], 1)}
            for p, b in backends.items()}


def int8_marked_deployable(path: Path, tmp: Path) -> Path:
    """A copy of an unsigned bundle whose INT8 model passes, to see what auto would pick by speed alone."""
    copy = tmp / path.parent.name / path.name
    shutil.copytree(path, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for art in manifest["artifacts"]:
        if art["role"] == ROLE_INT8:
            art["deployable"], art["reason"] = True, None
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def bench_bundle(path: Path, batches: list[int], seconds: float) -> dict:
    bundle = load_bundle(path)
    rows = []
    for batch in batches:
        measured = throughput(bundle, batch, seconds)
        choice = create_backend(bundle, ModelConfig(bundle=path, backend="onnxruntime", batch_size=batch)).choice
        faster = max(measured, key=lambda p: measured[p]["images_per_s"])
        row = {"batch": batch, "measured": measured, "choice": choice.as_json(), "fastest_measured": faster}
        if "int8" in choice.skipped and "int8" in measured:
            with tempfile.TemporaryDirectory() as tmp:
                copy = int8_marked_deployable(path, Path(tmp))
                row["choice_if_int8_were_deployable"] = create_backend(load_bundle(copy), ModelConfig(
                    bundle=copy, backend="onnxruntime", batch_size=batch)).choice.as_json()
        rows.append(row)
        print(f"{bundle.name} {bundle.version} {bundle.manifest['architecture']} {bundle.input_spec.height}px batch {batch}: "
              + ", ".join(f"{p} {m['images_per_s']} img/s" + ("" if m["deployable"] else " (not deployable)")
                          for p, m in measured.items())
              + f"; station runs {choice.precision}"
              + (f" (with INT8 deployable: {row['choice_if_int8_were_deployable']['precision']})"
                 if "choice_if_int8_were_deployable" in row else ""), flush=True)
    return {"bundle": str(path), "architecture": bundle.manifest["architecture"], "input": bundle.input_spec.height,
            "runs": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, action="append", required=True)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--seconds", type=float, default=3.0, help="timing budget per artifact and batch size")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "artifact_choice.json")
    args = p.parse_args()
    import onnxruntime

    report = {"cpus": available_cpus(), "cpu_flags": cpu_flags(), "onnxruntime": onnxruntime.__version__,
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
              "bundles": [bench_bundle(b, args.batch, args.seconds) for b in args.bundle],
              "command": "python benchmarks/artifact_choice.py " + " ".join(sys.argv[1:])}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
