"""Station start-up for the container entrypoint and the systemd unit, then ``exec python -m agent run``.

``python -m agent.startup start --config FILE`` checks what a station needs
before the agent starts, so a broken station fails at once with one clear
message (exit 2) instead of in a restart loop deep inside the pipeline:

1. the config validates (the same loader as ``python -m agent run``); what the
   station's role promises and its decisions cannot do is logged as a warning;
2. the folders the agent writes (outbox, bundle downloads, engine cache) exist
   and are writable by this user, and every file and folder camera opens (a
   live camera that is not up yet is retried by the agent);
3. the bundle verifies (hashes, signature when a public key is configured);
4. when a TensorRT engine will be used (``backend: tensorrt``, or ``auto`` on a
   machine with TensorRT) the engine for this device is found in the bundle or
   the cache, or built now (``agent.engine_cache``); engines of other TensorRT
   versions or GPUs are pruned;
5. it replaces itself (``exec``) with ``python -m agent run --config FILE``, with
   the engine's path in ``INVENTORY_AGENT_ENGINE``, so signals from Docker or
   systemd go straight to the agent.

``python -m agent.startup healthcheck`` is the container's HEALTHCHECK: the
agent's Prometheus endpoint answers with its metrics (exit 0), else one line on
stderr saying why and exit 1: an endpoint that is down, answers something else
than HTTP, a truncated or oversized body, or no complete answer within
``--timeout`` seconds in all (connect, headers and body together).
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import logging
import math
import os
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from agent.config import AgentConfig, ConfigError, load_config, role_warnings
from agent.engine_cache import (
    Builder,
    DeviceInfo,
    EngineResult,
    ensure_engine,
    probe_device,
    prune,
)
from agent.outbox import OutboxError, check_outbox_path
from agent.sources import SourceError, check_finite_source
from contract.bundle import Bundle, BundleError, load_bundle, load_public_key

log = logging.getLogger(__name__)

ENV_CONFIG = "INVENTORY_AGENT_CONFIG"
ENV_ENGINE_CACHE = "INVENTORY_ENGINE_CACHE"
ENV_ENGINE = "INVENTORY_AGENT_ENGINE"
ENV_ENGINE_PRECISION = "INVENTORY_AGENT_ENGINE_PRECISION"
ENV_ENGINE_CACHE_DIR = "INVENTORY_AGENT_ENGINE_CACHE"      # read by agent.app.EngineCachePolicy (cmd/model)
ENV_ENGINE_REQUEST = "INVENTORY_AGENT_ENGINE_REQUEST"
ENV_HEALTH_URL = "INVENTORY_HEALTH_URL"
DEFAULT_ENGINE_CACHE = Path("/var/cache/inventory-agent/engines")
DEFAULT_HEALTH_URL = "http://127.0.0.1:9108/metrics"
MAX_HEALTH_BODY = 16 << 20      # the metrics of a station are tens of kB; more is not the agent answering
EXIT_CANNOT_START = 2

ExecFn = Callable[[str, list[str], dict[str, str]], None]


class StartupError(Exception):
    """The station cannot start; the message names the file and the field."""


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m agent.startup", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="check config, bundle and folders, ensure the engine, exec the agent")
    start.add_argument("--config", type=Path, default=os.environ.get(ENV_CONFIG),
                       help=f"device YAML (default: ${ENV_CONFIG})")
    start.add_argument("--engine-cache", type=Path,
                       default=Path(os.environ.get(ENV_ENGINE_CACHE, DEFAULT_ENGINE_CACHE)),
                       help=f"engine cache folder, on a volume (default: ${ENV_ENGINE_CACHE} or "
                            f"{DEFAULT_ENGINE_CACHE})")
    start.add_argument("--precision", choices=["auto", "fp16", "int8"], default=None,
                       help="engine precision; default: fp16 when the config's ONNX precision is fp32 "
                            "(model.precision: fp32, or prefer_int8: false without precision), else auto")
    start.add_argument("--dry-run", action="store_true", help="do the checks, print the agent command, do not exec")
    start.add_argument("agent_args", nargs=argparse.REMAINDER,
                       help="after --: extra arguments for python -m agent run")
    health = sub.add_parser("healthcheck", help="exit 0 when the agent's Prometheus endpoint serves its metrics")
    health.add_argument("--url", default=os.environ.get(ENV_HEALTH_URL, DEFAULT_HEALTH_URL))
    health.add_argument("--timeout", type=seconds, default=3.0,
                        help="seconds for the whole check (connect, headers, body); default 3")
    return parser


def seconds(text: str) -> float:
    """An argparse type: a finite number of seconds > 0 (argparse names the option in its error)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds > 0, got {text!r}")
    return value


# ---------------------------------------------------------------- checks

def check_writable_dir(path: Path, field: str, config: Path) -> None:
    """Create the folder if needed; fail naming the config field when this user cannot write it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"{config}: field {field}: cannot create {path} ({exc.strerror})") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise StartupError(f"{config}: field {field}: {path} is not writable by uid {os.getuid()}")


def load_checked(config: Path, engine_cache: Path) -> tuple[AgentConfig, Bundle]:
    """Steps 1 to 3: the config, the folders, the bundle."""
    try:
        cfg = load_config(config)
    except ConfigError as exc:
        raise StartupError(str(exc)) from exc
    for text in role_warnings(cfg):
        log.warning("%s: %s", config, text)
    try:
        check_outbox_path(cfg.outbox.path)
    except OutboxError as exc:
        raise StartupError(f"{config}: field outbox.path: {exc}") from exc
    check_writable_dir(cfg.model.download_dir, "model.download_dir", config)
    check_writable_dir(engine_cache, f"--engine-cache/${ENV_ENGINE_CACHE}", config)
    try:        # the broker's secret and TLS files: before an engine build of minutes, not after it
        cfg.mqtt.check()
    except ConfigError as exc:
        raise StartupError(f"{config}: {exc}") from exc
    for i, cam in enumerate(cfg.cameras):
        try:
            check_finite_source(cam.uri, name=cam.id)
        except (SourceError, OSError, ValueError) as exc:
            raise StartupError(f"{config}: field cameras[{i}].uri: {exc}") from exc
    try:
        key = load_public_key(cfg.model.public_key) if cfg.model.public_key else None
    except BundleError as exc:
        raise StartupError(f"{config}: field model.public_key: {exc}") from exc
    try:
        bundle = load_bundle(cfg.model.bundle, public_key=key)
    except BundleError as exc:
        raise StartupError(f"{config}: field model.bundle: {exc}") from exc
    return cfg, bundle


def tensorrt_importable() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def engine_wanted(cfg: AgentConfig, tensorrt_present: bool) -> bool:
    return cfg.model.backend == "tensorrt" or (cfg.model.backend == "auto" and tensorrt_present)


def engine_precision(cfg: AgentConfig, requested: str | None) -> str:
    """The engine's precision: ``--precision``, else the config's own choice (``model.precision``, which wins over
    the older ``prefer_int8``): FP32 pinned means no INT8 engine either (fp16), auto and int8 mean INT8 where the
    bundle's INT8 model is deployable (the engine cache's auto), as ONNX Runtime would run."""
    return requested or ("fp16" if cfg.model.onnx_precision == "fp32" else "auto")


def prepare_engine(cfg: AgentConfig, bundle: Bundle, cache_dir: Path, precision: str | None, *,
                   device: DeviceInfo | None = None, builder: Builder | None = None) -> EngineResult | None:
    """Step 4. With backend auto a failure is logged and the agent runs ONNX Runtime; with tensorrt it is fatal."""
    precision = engine_precision(cfg, precision)
    try:
        device = device or probe_device()
        result = ensure_engine(bundle, cache_dir, precision, max_batch=cfg.model.batch_size, device=device,
                               builder=builder)
    except Exception as exc:    # EngineCacheError, and the builder's or the disk's own (CUDA, ENOSPC)
        if cfg.model.backend == "tensorrt":
            raise StartupError(f"model.backend tensorrt: {exc}") from exc
        log.warning("no TensorRT engine (%s); the agent will run ONNX Runtime", exc)
        return None
    for removed in prune(cache_dir, device):
        log.info("pruned %s (another TensorRT version or GPU)", removed)
    return result


def agent_command(config: Path, extra: list[str]) -> list[str]:
    extra = extra[1:] if extra[:1] == ["--"] else extra
    return [sys.executable, "-m", "agent", "run", "--config", str(config), *extra]


def agent_environment(engine: EngineResult | None, base: dict[str, str], *,
                      cache_dir: Path | None = None, precision: str | None = None) -> dict[str, str]:
    """The agent's environment: the engine for the configured bundle, and (``cache_dir``) the cache and
    precision that bundles arriving by cmd/model get their engines from."""
    ours = (ENV_ENGINE, ENV_ENGINE_PRECISION, ENV_ENGINE_CACHE_DIR, ENV_ENGINE_REQUEST)
    env = {k: v for k, v in base.items() if k not in ours}
    if engine is not None:
        env[ENV_ENGINE] = str(engine.path)
        env[ENV_ENGINE_PRECISION] = engine.key.precision
    if cache_dir is not None:
        env[ENV_ENGINE_CACHE_DIR] = str(cache_dir)
        env[ENV_ENGINE_REQUEST] = precision or "auto"
    return env


# ---------------------------------------------------------------- commands

def start(args: argparse.Namespace, *, exec_fn: ExecFn = os.execve, device: DeviceInfo | None = None,
          builder: Builder | None = None, tensorrt_present: bool | None = None) -> int:
    if args.config is None:
        raise StartupError(f"no config: pass --config or set {ENV_CONFIG}")
    cfg, bundle = load_checked(args.config, args.engine_cache)
    present = tensorrt_importable() if tensorrt_present is None else tensorrt_present
    engine = None
    wanted = engine_wanted(cfg, present)
    if wanted:
        engine = prepare_engine(cfg, bundle, args.engine_cache, args.precision, device=device, builder=builder)
    argv = agent_command(args.config, args.agent_args)
    env = agent_environment(engine, dict(os.environ), cache_dir=args.engine_cache if wanted else None,
                            precision=engine_precision(cfg, args.precision))
    log.info("station %s/%s: bundle %s %s, engine %s", cfg.site, cfg.station, bundle.name, bundle.version,
             f"{engine.path} ({engine.source})" if engine else "none (ONNX Runtime)")
    if args.dry_run:
        sys.stdout.write(" ".join(argv) + "\n")
        if engine is not None:
            sys.stdout.write(f"{ENV_ENGINE}={engine.path}\n")
        return 0
    exec_fn(argv[0], argv, env)
    return 0  # only reached when exec_fn is a test double


def _fetch(url: str, timeout: float, max_bytes: int) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (local http URL from config)
        body = resp.read(max_bytes + 1)
        if len(body) > max_bytes:
            raise ValueError(f"a body of more than {max_bytes} bytes")
        if resp.length:     # the connection ended before the Content-Length it announced (read(n) does not say)
            raise http.client.IncompleteRead(body, resp.length)
    return body


def healthcheck(url: str, timeout: float, max_bytes: int = MAX_HEALTH_BODY) -> int:
    """0 when the endpoint answers 200 with the agent's metrics within ``timeout`` seconds in all; else 1, with
    the reason on stderr. An MQTT outage is not unhealthy (the outbox holds)."""
    outcome: list[bytes | BaseException] = []

    def fetch() -> None:
        try:
            outcome.append(_fetch(url, timeout, max_bytes))
        except BaseException as exc:  # noqa: BLE001 (reported below, on the main thread)
            outcome.append(exc)

    # A thread bounds the whole exchange: a socket timeout bounds each read only, and an endpoint that drips
    # a byte at a time would keep the check (and Docker's HEALTHCHECK) waiting for as long as it likes.
    worker = threading.Thread(target=fetch, name="healthcheck", daemon=True)
    worker.start()
    worker.join(timeout)
    if not outcome:
        sys.stderr.write(f"unhealthy: {url}: no complete answer within {timeout:g}s\n")
        return 1
    result = outcome[0]
    if isinstance(result, BaseException):
        text = " ".join(str(result).split())[:200]     # one line: a bad status line may hold CR LF
        if isinstance(result, urllib.error.HTTPError):
            why = f"HTTP {result.code} {result.reason}"
        elif isinstance(result, urllib.error.URLError):
            why = str(result.reason)
        elif isinstance(result, http.client.HTTPException):     # a bad status line, a truncated body
            why = f"not a complete HTTP answer ({type(result).__name__}: {text})"
        elif isinstance(result, (OSError, ValueError)):         # refused, reset, timed out; a malformed URL
            why = f"{type(result).__name__}: {text}"
        else:
            why = f"unexpected {type(result).__name__}: {text}"
        sys.stderr.write(f"unhealthy: {url}: {why}\n")
        return 1
    body = result.decode(errors="replace")
    if "agent_model_info" not in body:
        sys.stderr.write(f"unhealthy: {url}: no agent_model_info in the metrics\n")
        return 1
    return 0


def main(argv: list[str] | None = None, **inject) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "healthcheck":
        return healthcheck(args.url, args.timeout)
    try:
        return start(args, **inject)
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_CANNOT_START


if __name__ == "__main__":
    sys.exit(main())
