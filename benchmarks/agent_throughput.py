"""Agent throughput vs the bare model, in one run, with the same batch size and ONNX artifact.

1. bare: ONNX Runtime on the bundle's deployable model, pre-made batches of ``--batch-size``; the artifact
   (INT8 or FP32) chosen as the agent's ``model.precision: auto`` chooses it, timed at that batch size.
2. agent: the full station (video file camera -> preprocess -> model -> decisions -> SQLite outbox ->
   MQTT QoS 1 -> PUBACK) against a local mosquitto; counted as PUBACK'd results per second. Its
   ``model.precision`` is pinned to the artifact the bare baseline ran, so both run the same model; the
   precision and threads the agent's backend ran with are printed and written to the JSON.

Prints images/s of both (the bare model before and after the agent run; the fastest bare figure is
the baseline), their ratio, p50/p95 capture->PUBACK latency and resident memory growth
between the end of warm-up and the end of the run.

With ``--crop foreground`` the station localizes the item on every frame (its background model, on the
camera thread) and feeds the model the item's square crop; the video then starts with two empty frames
(the localizer's empty scene) and every frame holds an item, so each frame is classified and the ratio
shows what localizing costs. ``--crop roi`` feeds the whole frame (no localizer), the old path. The
bundle's own crop policy is overridden in a copy of the bundle (same artifacts).

    .venv/bin/python benchmarks/agent_throughput.py --bundle models/fashion-mnist/<version> --duration 60
    .venv/bin/python benchmarks/agent_throughput.py --bundle B --crop foreground --duration 60
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.app import Agent  # noqa: E402
from agent.backends import create_backend  # noqa: E402
from agent.backends.onnxruntime import thread_candidates  # noqa: E402
from agent.config import AgentConfig, ModelConfig, available_cpus  # noqa: E402
from agent.demo import fashion_mnist_test, local_mosquitto, write_video  # noqa: E402
from contract.bundle import find_bundles, load_bundle  # noqa: E402
from contract.preprocess import Preprocessor  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def cpu_s() -> float:
    """CPU seconds (user + system) of this process, all threads."""
    t = os.times()
    return t.user + t.system


class Bare(NamedTuple):
    ips: float
    backend: str            # name and precision, e.g. "onnxruntime:CPUExecutionProvider fp32"
    cpu_ms: float           # CPU per image, this process, all threads
    precision: str          # the artifact that ran (int8, fp32)
    choice: dict | None     # what the backend measured when it chose the artifact (its batch among them)


def bare_model_config(bundle_dir: Path, batch_size: int, threads: int, precision: str = "auto") -> ModelConfig:
    """The bare model's settings: the agent's batch size (the artifact choice is timed at it) and threads."""
    return ModelConfig(bundle=bundle_dir, backend="onnxruntime", intra_op_threads=threads, batch_size=batch_size,
                       precision=precision)


def bare_throughput(bundle_dir: Path, batch_size: int, seconds: float, threads: int,
                    precision: str = "auto") -> Bare:
    """Images/s of the deployable model on real preprocessed images, nothing else."""
    bundle = load_bundle(bundle_dir)
    backend = create_backend(bundle, bare_model_config(bundle_dir, batch_size, threads, precision))
    images, _ = fashion_mnist_test(n=batch_size)
    batch = Preprocessor(bundle.input_spec).batch([np.repeat(i[:, :, None], 3, axis=2) for i in images])
    backend.warmup(batch_size, 5)
    n, start, cpu0 = 0, time.perf_counter(), cpu_s()
    while time.perf_counter() - start < seconds:
        backend.run(batch)
        n += batch_size
    choice = getattr(backend, "choice", None)
    return Bare(n / (time.perf_counter() - start), f"{backend.name} {backend.precision}", 1000 * (cpu_s() - cpu0) / n,
                backend.precision, choice.as_json() if choice is not None else None)


def agent_config(bundle: Path, video: Path, workdir: Path, port: int, batch_size: int, threads: int,
                 cameras: int = 1, queue_size: int | None = None, pipeline_nice: int = 10,
                 localize: bool = False, flip_average: bool = False, precision: str = "auto") -> AgentConfig:
    # block: no frame is dropped, the agent runs flat out; each camera may read ahead by queue_size frames.
    # precision: the artifact the bare baseline ran, so the ratio compares one model with itself.
    return AgentConfig.model_validate({
        "site": "bench", "station": "st-01",
        "model": {"bundle": str(bundle), "backend": "onnxruntime", "batch_size": batch_size,
                  "batch_timeout_ms": 5, "intra_op_threads": threads, "pipeline_nice": pipeline_nice,
                  "flip_average": flip_average, "precision": precision},
        "cameras": [{"id": f"cam-{i + 1}", "uri": str(video), "loop": True, "backpressure": "block",
                     "queue_size": queue_size or 2 * batch_size} for i in range(cameras)],
        "mqtt": {"host": "127.0.0.1", "port": port},
        "outbox": {"path": str(workdir / "outbox.sqlite")},
        "health": {"stats_interval_s": 5},
        "log_level": "WARNING",
        **({"decisions": {"presence": {"mode": "background", "warmup_frames": 2}}} if localize else {}),
    })


def with_crop(bundle: Path, mode: str, workdir: Path) -> Path:
    """A copy of the bundle whose manifest asks for ``mode`` (``bundle``: the bundle as it is)."""
    if mode == "bundle":
        return bundle
    import json
    import shutil

    copy = workdir / "bundle"
    shutil.copytree(bundle, copy)
    (copy / "manifest.json.sig").unlink(missing_ok=True)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["input"]["crop"] = {**manifest["input"].get("crop", {}), "mode": mode}
    (copy / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return copy


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of another process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def agent_throughput(cfg: AgentConfig, seconds: float, warmup_s: float, broker_pid: int | None = None) -> dict[str, float]:
    agent = Agent(cfg)
    agent.start()
    backend = agent.model.current.backend
    threads = getattr(backend, "threads", 0)
    try:
        agent.publisher.wait_connected(10)
        time.sleep(warmup_s)
        acked0 = agent.metrics.counter("mqtt_published_total", kind="result")
        rss0, start, cpu0 = rss_mib(), time.perf_counter(), cpu_s()
        broker0 = process_cpu_s(broker_pid) if broker_pid else 0.0
        agent.metrics._latency.clear()          # percentiles over the measured window only
        time.sleep(seconds)
        elapsed = time.perf_counter() - start
        acked = agent.metrics.counter("mqtt_published_total", kind="result") - acked0
        cpu_ms = 1000 * (cpu_s() - cpu0) / max(acked, 1)
        broker_ms = 1000 * (process_cpu_s(broker_pid) - broker0) / max(acked, 1) if broker_pid else float("nan")
        rss1 = rss_mib()
        lat = agent.metrics.percentiles("capture_to_ack") or {"p50_ms": float("nan"), "p95_ms": float("nan")}
        dropped = sum(agent.metrics.counters_by("frames_dropped_total", "camera").values())
        depth = agent.outbox.depth()
    finally:
        agent.shutdown(10)
    return {"ips": acked / elapsed, "p50": lat["p50_ms"], "p95": lat["p95_ms"], "rss0": rss0, "rss1": rss1,
            "dropped": dropped, "outbox_depth": depth, "acked": acked, "cpu_ms": cpu_ms, "broker_ms": broker_ms,
            "threads": threads, "backend": backend.name, "precision": backend.precision}


def broker_pid(workdir: Path) -> int | None:
    """The local mosquitto's pid, found by its config file (for its CPU time)."""
    conf = str(workdir / "mosquitto.conf")
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and conf.encode() in (proc / "cmdline").read_bytes():
                return int(proc.name)
        except OSError:
            continue
    return None


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=None, help="bundle folder; default: the last one under models/")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of measured agent run (600 for the RSS target)")
    p.add_argument("--bare-seconds", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=0,
                   help="the agent's ONNX Runtime intra-op threads (0: the agent's auto); the bare model is measured "
                        "with 1, half and all CPUs' threads (and these), and the fastest is the baseline")
    p.add_argument("--pipeline-nice", type=int, default=10, help="model.pipeline_nice of the agent (0: equal priority)")
    p.add_argument("--cameras", type=int, default=1, help="cameras reading the looped video, batched together")
    p.add_argument("--queue-size", type=int, default=None, help="frames each camera may read ahead (default 2x batch)")
    p.add_argument("--images", type=int, default=300, help="Fashion-MNIST test images in the looped video")
    p.add_argument("--crop", choices=["roi", "foreground", "bundle"], default="bundle",
                   help="the station's crop: whole frame, or the localizer's item crop (default: the bundle's)")
    p.add_argument("--flip-average", action="store_true",
                   help="model.flip_average of the agent: each crop and its mirror through the model (the bare "
                        "baseline stays one run per image)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    bundle = args.bundle or next(iter(reversed(list(find_bundles(Path(__file__).resolve().parents[1] / "models")))),
                                 None)
    if bundle is None:
        print("no bundle given and none under models/", file=sys.stderr)
        return 2
    # The baseline is the fastest bare model over every thread count the agent's auto mode may pick
    # (and --threads), so the ratio never flatters the agent.
    counts = sorted(set(thread_candidates(available_cpus())) | ({args.threads} if args.threads else set()))
    bare = {t: bare_throughput(bundle, args.batch_size, args.bare_seconds, t) for t in counts}
    best = max(bare, key=lambda t: bare[t].ips)
    bare_ips, backend, bare_cpu_ms, precision = bare[best].ips, bare[best].backend, bare[best].cpu_ms, \
        bare[best].precision
    with tempfile.TemporaryDirectory(prefix="agent-bench-") as tmp:
        workdir = Path(tmp)
        images, _ = fashion_mnist_test(n=args.images)
        video = workdir / "bench.avi"
        station_bundle = with_crop(bundle, args.crop, workdir)
        localize = load_bundle(station_bundle).input_spec.crop.mode == "foreground"
        write_video(images, video, size=112, lead_blank=2 if localize else 0)
        with local_mosquitto(workdir) as port:
            cfg = agent_config(station_bundle, video, workdir, port, args.batch_size, args.threads, args.cameras,
                               args.queue_size, args.pipeline_nice, localize, args.flip_average, precision)
            res = agent_throughput(cfg, args.duration, args.warmup, broker_pid(workdir))
    # The bare model once more after the agent run: a machine whose speed drifted during the run shows,
    # and the faster of the two bare figures is the baseline.
    after_ips = bare_throughput(bundle, args.batch_size, args.bare_seconds, best, precision).ips
    bare_ips = max(bare_ips, after_ips)
    agent_threads = res["threads"]
    growth = 100.0 * (res["rss1"] - res["rss0"]) / res["rss0"]
    print(f"bundle            {bundle} ({backend}), batch size {args.batch_size}, {os.cpu_count()} CPUs, "
          f"crop {'foreground (localizer on every frame)' if localize else 'roi (whole frame)'}")
    for t, b in bare.items():
        print(f"bare ORT          {b.ips:10.1f} images/s with {t} intra-op thread(s), {b.precision}, "
              "before the agent run")
    print(f"bare ORT          {after_ips:10.1f} images/s with {best} intra-op thread(s), after it")
    print(f"baseline          {bare_ips:10.1f} images/s (the fastest bare figure)")
    print(f"agent end-to-end  {res['ips']:10.1f} results/s acknowledged by the broker (PUBACK) over {args.duration:g}s, "
          f"{args.cameras} camera(s), {res['precision']}, {agent_threads} intra-op thread(s), "
          f"pipeline nice {args.pipeline_nice}"
          + (", flip average" if args.flip_average else ""))
    print(f"ratio agent/bare  {res['ips'] / bare_ips:10.3f}")
    print(f"CPU per image     bare {bare_cpu_ms:.3f} ms, agent {res['cpu_ms']:.3f} ms (agent process, all threads), "
          f"broker {res['broker_ms']:.3f} ms (mosquitto on the same cores)")
    print(f"capture->PUBACK   p50 {res['p50']:.1f} ms, p95 {res['p95']:.1f} ms")
    print(f"RSS               {res['rss0']:.1f} MiB -> {res['rss1']:.1f} MiB ({growth:+.2f}%)")
    print(f"frames dropped    {res['dropped']:.0f}; outbox depth at end {res['outbox_depth']}")
    if args.json:
        import json

        args.json.write_text(json.dumps({
            "command": "python " + " ".join(sys.argv), "bundle": str(bundle), "backend": backend,
            "crop": "foreground" if localize else "roi", "flip_average": args.flip_average,
            "batch_size": args.batch_size, "duration_s": args.duration,
            "bare_images_per_s": {str(t): b.ips for t, b in bare.items()}, "bare_after": after_ips,
            "bare_precision": {str(t): b.precision for t, b in bare.items()}, "baseline_precision": precision,
            "agent_backend": {"name": res["backend"], "precision": res["precision"], "threads": agent_threads},
            "baseline_images_per_s": bare_ips, "agent_results_per_s": res["ips"], "ratio": res["ips"] / bare_ips,
            "cpu_ms_per_image": {"bare": bare_cpu_ms, "agent": res["cpu_ms"], "broker": res["broker_ms"]},
            "capture_to_puback_ms": {"p50": res["p50"], "p95": res["p95"]}, "rss_mib": [res["rss0"], res["rss1"]],
            "frames_dropped": res["dropped"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
