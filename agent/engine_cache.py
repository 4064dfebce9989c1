"""On-device TensorRT engines, built once from the bundle's ONNX and cached on disk.

A TensorRT engine only runs on the TensorRT version and GPU (compute capability)
it was built for, so a station builds its own on first start and keeps it in a
cache folder that survives restarts and image upgrades (a volume or systemd's
CacheDirectory). The cache key is the sha256 of the ONNX file, the TensorRT
version, the compute capability, the precision and the largest batch: any change
gives another key, so a stale engine is never used, and a restart with the same
key never rebuilds.

Layout (one folder per key, created by an atomic rename, so a half-written
entry is never visible)::

    <cache_dir>/
      fp16-sm87-trt10.3.0-<16 hex of the key digest>/
        engine.plan     serialized engine
        key.json        the full key, the engine's sha256, bundle name/version, build time
        used            when it was last asked for: a counter over the cache, not a clock
      .lock-<digest>    flock: two processes never build the same key at once (removed by its holder when done)
      load-failures     how many cached engines TensorRT would not load (each removed and built again)

The cache is bounded: each model update brings an engine of tens of MB, so after a lookup or a build only
the ``MAX_ENTRIES`` engines of this device asked for last are kept (the running model's, the one before it
for a rollback, the configured bundle's); the others go. Use is counted, not timed, so a station whose clock
jumps (no RTC, NTP later) still keeps the engines it used last.

Only the pure parts (key, layout, lookup, atomic write) run without TensorRT;
``build_with_tensorrt`` and ``probe_device`` import TensorRT and cuda-python
lazily and exist only on Jetson/GPU machines. The builder is injectable.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal

from contract.bundle import ROLE_FP32, ROLE_INT8, Artifact, Bundle, process_runs, sha256_file
from contract.events import fsync_dir
from contract.preprocess import InputSpec

log = logging.getLogger(__name__)

Precision = Literal["fp16", "int8"]
ENGINE_FILE = "engine.plan"
KEY_FILE = "key.json"
USED_FILE = "used"
KEY_FORMAT = 2         # 2: the input's height and width in the key (an ONNX model with symbolic H and W)
MAX_ENTRIES = 4        # engines kept per device: the running model's, the previous one, the configured one, one more
KEY_FILE_MAX_BYTES = 64 * 1024      # a key.json is well under 1 kB
_ENTRY_NAME = re.compile(r"(fp16|int8)-sm[0-9A-Za-z]+-trt.+-([0-9a-f]{16})")


class EngineCacheError(Exception):
    """No engine can be had; the message names the file or field and what was wrong."""


class EngineRejected(EngineCacheError):
    """TensorRT refuses to load this engine (another TensorRT or driver built it, or its plan is unreadable)."""


@dataclass(frozen=True)
class DeviceInfo:
    """What an engine is tied to on this machine."""

    tensorrt_version: str
    compute_capability: str  # "8.7" (Orin), "7.2" (Xavier), "9.0" (H100)


@dataclass(frozen=True)
class EngineKey:
    onnx_sha256: str
    tensorrt_version: str
    compute_capability: str
    precision: Precision
    max_batch: int
    input_height: int = 0       # the optimization profile's input (the manifest's), for a model with symbolic H, W
    input_width: int = 0

    def digest(self) -> str:
        """sha256 over the canonical JSON of every field (and the key format)."""
        body = json.dumps({"format": KEY_FORMAT, **asdict(self)}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(body.encode()).hexdigest()

    def folder_name(self) -> str:
        cc = self.compute_capability.replace(".", "")
        return f"{self.precision}-sm{cc}-trt{self.tensorrt_version}-{self.digest()[:16]}"


@dataclass(frozen=True)
class BuildRequest:
    """Everything a builder needs; the builder returns the serialized engine."""

    onnx_path: Path
    key: EngineKey
    input_spec: InputSpec
    workspace_mib: int = 1024


Builder = Callable[[BuildRequest], bytes]
EngineCheck = Callable[[Path], None]       # loads an engine; EngineRejected when TensorRT refuses it


@dataclass(frozen=True)
class EngineResult:
    path: Path
    key: EngineKey
    source: Literal["bundle", "cache", "built"]
    build_seconds: float = 0.0


# ---------------------------------------------------------------- pure parts

def choose_onnx(bundle: Bundle, precision: Precision) -> Artifact:
    """int8 engines come from the QDQ model (scales inside, no calibrator); fp16 from the FP32 model."""
    role = ROLE_INT8 if precision == "int8" else ROLE_FP32
    art = bundle.artifact(role)
    if art is None or not art.deployable:
        why = f" ({art.reason})" if art is not None and art.reason else ""
        raise EngineCacheError(f"{bundle.root / 'manifest.json'}: field artifacts: no deployable {role} "
                               f"artifact to build a {precision} engine from{why}")
    return art


def resolve_precision(bundle: Bundle, precision: Literal["auto", "fp16", "int8"]) -> Precision:
    """auto: INT8 when the bundle's INT8 model passed its accuracy gate, else FP16."""
    if precision != "auto":
        return precision
    art = bundle.artifact(ROLE_INT8)
    return "int8" if art is not None and art.deployable else "fp16"


def engine_key(bundle: Bundle, device: DeviceInfo, precision: Precision, max_batch: int) -> EngineKey:
    """The key hashes the ONNX file itself (not the manifest's claim), so a swapped file gets a new key."""
    if max_batch < 1:
        raise EngineCacheError(f"max_batch: expected >= 1, got {max_batch}")
    onnx = choose_onnx(bundle, precision)
    return EngineKey(onnx_sha256=sha256_file(onnx.path), tensorrt_version=device.tensorrt_version,
                     compute_capability=device.compute_capability, precision=precision, max_batch=max_batch,
                     input_height=bundle.input_spec.height, input_width=bundle.input_spec.width)


def entry_dir(cache_dir: Path, key: EngineKey) -> Path:
    return Path(cache_dir) / key.folder_name()


def lookup(cache_dir: Path, key: EngineKey) -> Path | None:
    """The cached engine for exactly this key, or None. A damaged entry is removed, never used."""
    folder = entry_dir(cache_dir, key)
    if not folder.is_dir():
        return None
    problem = _entry_problem(folder, key)
    if problem is None:
        return folder / ENGINE_FILE
    log.warning("%s: discarding cache entry (%s)", folder, problem)
    _remove(folder)
    return None


def _read_meta(folder: Path) -> dict | str:
    """An entry's key.json, or why it cannot be used: a file that flash wear or a power cut damaged may hold any
    bytes (not UTF-8, not JSON, JSON of another shape), and none of that may stop a start."""
    try:
        with open(folder / KEY_FILE, "rb") as fh:
            raw = fh.read(KEY_FILE_MAX_BYTES + 1)
    except OSError as exc:
        return f"{KEY_FILE} unreadable: {exc.strerror or exc}"
    if len(raw) > KEY_FILE_MAX_BYTES:
        return f"{KEY_FILE} unreadable: more than {KEY_FILE_MAX_BYTES} bytes"
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as exc:        # not UTF-8 (UnicodeDecodeError), not JSON
        return f"{KEY_FILE} unreadable: {exc}"
    if not isinstance(meta, dict) or not isinstance(meta.get("key"), dict):
        return f"{KEY_FILE} unreadable: not a cache entry's record"
    return meta


def _entry_problem(folder: Path, key: EngineKey) -> str | None:
    meta = _read_meta(folder)
    if isinstance(meta, str):
        return meta
    if meta.get("key") != asdict(key):
        return f"{KEY_FILE} records another key"
    engine = folder / ENGINE_FILE
    if not engine.is_file() or engine.stat().st_size != meta.get("engine_size"):
        return f"{ENGINE_FILE} missing or truncated"
    if sha256_file(engine) != meta.get("engine_sha256"):
        return f"{ENGINE_FILE} sha256 does not match {KEY_FILE}"
    return None


def write_entry(cache_dir: Path, key: EngineKey, engine: bytes, *, bundle: Bundle | None = None,
                build_seconds: float = 0.0) -> Path:
    """Write engine + key.json into a temporary folder, fsync, then rename it into place."""
    final = entry_dir(cache_dir, key)
    tmp = Path(cache_dir) / f".tmp-{final.name}-{os.getpid()}"
    _remove(tmp)
    tmp.mkdir(parents=True)
    try:
        _write_synced(tmp / ENGINE_FILE, engine)
        meta = {"key": asdict(key), "digest": key.digest(), "engine_sha256": hashlib.sha256(engine).hexdigest(),
                "engine_size": len(engine), "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "build_seconds": round(build_seconds, 3),
                "bundle": {"name": bundle.name, "version": bundle.version} if bundle else None}
        _write_synced(tmp / KEY_FILE, json.dumps(meta, indent=2).encode())
        _remove(final)
        os.rename(tmp, final)
        fsync_dir(Path(cache_dir), strict=True)
    except BaseException:
        _remove(tmp)
        raise
    return final / ENGINE_FILE


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


@contextlib.contextmanager
def key_lock(cache_dir: Path, key: EngineKey) -> Iterator[None]:
    """An exclusive flock per key: a second process (or thread) waits and then finds the entry built. The lock file
    goes when the lock is let go (``_release``), so no empty ``.lock-<digest>`` stays behind for every key built."""
    lock_path = _lock_path(cache_dir, key.digest()[:16])
    fd = _acquire(lock_path, wait=True)
    assert fd is not None
    try:
        yield
    finally:
        _release(lock_path, fd)


def _lock_path(cache_dir: Path, digest16: str) -> Path:
    return Path(cache_dir) / f".lock-{digest16}"


def _acquire(lock_path: Path, *, wait: bool) -> int | None:
    """An exclusive flock on the lock file linked at ``lock_path`` now; None when another holds it and not ``wait``.

    The holder unlinks the file before it lets go, so a process that opened it earlier may get the lock of a file no
    longer linked: it then takes the one linked now (or creates it), never a lock of its own beside another's."""
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            held, linked = os.fstat(fd), os.stat(lock_path)
            if (held.st_dev, held.st_ino) == (linked.st_dev, linked.st_ino):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _release(lock_path: Path, fd: int) -> None:
    """Unlink the lock file while still holding it, then let go (closing the file ends its flock)."""
    try:
        os.unlink(lock_path)
    except OSError as exc:      # gone already is fine; anything else only leaves an empty file
        if not isinstance(exc, FileNotFoundError):
            log.warning("%s: cannot remove the lock file (%s)", lock_path, exc.strerror or exc)
    finally:
        os.close(fd)


SHIPPED_MAX_BATCH = 32      # the batch profile trainer/export/tensorrt.py builds a bundle's engines with


def bundle_engine(bundle: Bundle, key: EngineKey) -> Path | None:
    """An engine shipped in the bundle for exactly this TensorRT version, GPU and precision.

    The manifest does not record an engine's batch profile (the trainer builds 1..32), so
    a shipped engine is taken for a ``max_batch`` up to that, and never for a larger one (its profile
    would refuse the batch).
    """
    if key.max_batch > SHIPPED_MAX_BATCH:
        return None
    for art in bundle.engines():
        if (art.tensorrt_version == key.tensorrt_version and art.compute_capability == key.compute_capability
                and art.precision == key.precision):
            return art.path
    return None


def ensure_engine(bundle: Bundle, cache_dir: str | Path, precision: Literal["auto", "fp16", "int8"] = "auto", *,
                  max_batch: int = 8, device: DeviceInfo | None = None, builder: Builder | None = None,
                  use_bundle_engines: bool = True, max_entries: int = MAX_ENTRIES,
                  check: EngineCheck | None = None) -> EngineResult:
    """The engine to run for this bundle on this device: from the bundle, the cache, or built now.

    ``device`` defaults to ``probe_device()`` and ``builder`` to ``build_with_tensorrt``
    (both need TensorRT); tests pass their own. After a cache hit or a build the cache keeps the
    ``max_entries`` engines of this device used last (``evict``).

    Every engine is loaded once by ``check`` (default ``check_with_tensorrt``) before it is handed out: a cached
    engine whose bytes match its record but that TensorRT rejects (built under another TensorRT or driver, a plan
    it cannot read) is removed from the cache (logged, counted in ``load_failures``) and built again, a shipped one
    is passed over; else a station pinned to TensorRT failed at every start with the same engine.
    """
    device = device or probe_device()
    check = check or check_with_tensorrt
    cache_dir = Path(cache_dir)
    _ensure_writable(cache_dir)
    key = engine_key(bundle, device, resolve_precision(bundle, precision), max_batch)
    if use_bundle_engines and (shipped := bundle_engine(bundle, key)) is not None:
        if (problem := _load_problem(shipped, check)) is None:
            log.info("using the bundle's engine %s (TensorRT %s, sm %s)", shipped, key.tensorrt_version,
                     key.compute_capability)
            return EngineResult(shipped, key, "bundle")
        log.warning("%s: the bundle's engine cannot be loaded here (%s); using the engine cache", shipped, problem)
    with key_lock(cache_dir, key):
        cached = lookup(cache_dir, key)
        if cached is not None and (problem := _load_problem(cached, check)) is not None:
            _discard_unloadable(cache_dir, cached, problem)
            cached = None
        if cached is not None:
            log.info("engine cache hit %s", cached)
            result = EngineResult(cached, key, "cache")
        else:
            result = _build(bundle, cache_dir, key, builder or build_with_tensorrt)
            if (problem := _load_problem(result.path, check)) is not None:
                _discard_unloadable(cache_dir, result.path, problem, fresh=True)
                raise EngineCacheError(f"{result.path}: TensorRT {key.tensorrt_version} cannot load the engine it "
                                       f"has just built ({problem})")
        _mark_used(cache_dir, result.path.parent)
    for gone in evict(cache_dir, device, keep=key, max_entries=max_entries):
        log.info("engine cache: removed %s (the %d engines used last are kept)", gone, max_entries)
    return result


LOAD_FAILURES_FILE = "load-failures"     # cached engines TensorRT could not load (removed), over the cache's life


def load_failures(cache_dir: str | Path) -> int:
    """How many cache entries were removed because TensorRT could not load their engine."""
    try:
        text = (Path(cache_dir) / LOAD_FAILURES_FILE).read_text(encoding="ascii").strip()
    except (OSError, ValueError):
        return 0
    return int(text) if text.isdigit() and len(text) < 20 else 0


def _load_problem(engine: Path, check: EngineCheck) -> str | None:
    """Why ``check`` rejects the engine, or None when it loads. Only a rejection of the engine itself is a problem;
    anything else (no GPU, TensorRT not starting) is raised: the engine is not to blame, so it is kept."""
    try:
        check(engine)
    except EngineRejected as exc:
        return str(exc)
    return None


def _discard_unloadable(cache_dir: Path, engine: Path, problem: str, *, fresh: bool = False) -> None:
    """Remove a cache entry (the caller holds its key's lock) whose engine TensorRT cannot load; logged, counted."""
    _remove(engine.parent)
    count = load_failures(cache_dir) + 1
    tmp = cache_dir / f".{LOAD_FAILURES_FILE}-{os.getpid()}"
    try:
        tmp.write_text(str(count), encoding="ascii")
        os.replace(tmp, cache_dir / LOAD_FAILURES_FILE)
    except OSError as exc:
        log.warning("%s: cannot count the engine TensorRT rejected (%s)", cache_dir, exc.strerror or exc)
        with contextlib.suppress(OSError):
            tmp.unlink()
    log.error("%s: removed from the engine cache, TensorRT cannot load its engine: %s; %s (engines rejected so far: "
              "%d, counted in %s)", engine.parent, problem, "it was built just now" if fresh else "it is built again",
              count, cache_dir / LOAD_FAILURES_FILE)


def _build(bundle: Bundle, cache_dir: Path, key: EngineKey, builder: Builder) -> EngineResult:
    onnx = choose_onnx(bundle, key.precision)
    log.info("building a %s TensorRT engine from %s (TensorRT %s, sm %s, max batch %d); this takes minutes",
             key.precision, onnx.path, key.tensorrt_version, key.compute_capability, key.max_batch)
    start = time.monotonic()
    engine = builder(BuildRequest(onnx_path=onnx.path, key=key, input_spec=bundle.input_spec))
    if not engine:
        raise EngineCacheError(f"{onnx.path}: the builder returned an empty engine")
    seconds = time.monotonic() - start
    path = write_entry(cache_dir, key, bytes(engine), bundle=bundle, build_seconds=seconds)
    log.info("engine %s built in %.1f s", path, seconds)
    return EngineResult(path, key, "built", seconds)


def _ensure_writable(cache_dir: Path) -> None:
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EngineCacheError(f"{cache_dir}: engine cache folder cannot be created ({exc.strerror})") from exc
    if not os.access(cache_dir, os.W_OK | os.X_OK):
        raise EngineCacheError(f"{cache_dir}: engine cache folder is not writable by uid {os.getuid()}")


def _entry_folders(cache_dir: str | Path) -> list[Path]:
    """The folders named like cache entries (``fp16-sm87-trt10.3.0-<16 hex>``), sorted."""
    try:
        found = sorted(Path(cache_dir).iterdir())
    except OSError:
        return []
    return [p for p in found if _ENTRY_NAME.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]


def entries(cache_dir: str | Path) -> list[dict]:
    """key.json of every complete entry (for status and pruning); a damaged one is left out."""
    out = []
    for folder in _entry_folders(cache_dir):
        meta = _read_meta(folder)
        if isinstance(meta, dict):
            out.append({**meta, "folder": str(folder)})
    return out


def _use_count(folder: Path) -> int:
    try:
        text = (folder / USED_FILE).read_text(encoding="ascii").strip()
    except (OSError, ValueError):
        return 0
    return int(text) if text.isdigit() and len(text) < 20 else 0


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _mark_used(cache_dir: Path, folder: Path) -> None:
    """Number this entry's use after every other entry's: the order ``evict`` keeps by."""
    latest = max((_use_count(f) for f in _entry_folders(cache_dir)), default=0)
    tmp = folder / f".{USED_FILE}-{os.getpid()}"
    try:
        tmp.write_text(str(latest + 1), encoding="ascii")
        os.replace(tmp, folder / USED_FILE)
    except OSError as exc:      # a full disk: the entry still serves, it only looks older to the next evict
        log.warning("%s: cannot record its use (%s)", folder, exc.strerror or exc)
        with contextlib.suppress(OSError):
            tmp.unlink()


def evict(cache_dir: str | Path, device: DeviceInfo, keep: EngineKey | None = None,
          max_entries: int = MAX_ENTRIES) -> list[Path]:
    """Keep at most ``max_entries`` engines of this device, those used last (and always ``keep``'s); remove the
    rest, and entries whose key.json is damaged. An entry another process holds the lock of (a lookup or build
    under way) is left for the next time. Entries of other devices are ``prune``'s."""
    cache_dir = Path(cache_dir)
    keep_name = keep.folder_name() if keep is not None else None
    mine, damaged = [], []
    for folder in _entry_folders(cache_dir):
        meta = _read_meta(folder)
        if isinstance(meta, str):
            damaged.append(folder)
        elif (meta["key"].get("tensorrt_version"), meta["key"].get("compute_capability")) == (
                device.tensorrt_version, device.compute_capability) and folder.name != keep_name:
            mine.append(folder)
    mine.sort(key=lambda f: (_use_count(f), _mtime(f / KEY_FILE)), reverse=True)   # mtime: entries of old caches
    room = max(0, max_entries - (keep_name is not None))
    removed = []
    for folder in damaged + mine[room:]:
        if _remove_unlocked(cache_dir, folder):
            removed.append(folder)
    return removed


def _remove_unlocked(cache_dir: Path, folder: Path) -> bool:
    """Remove an entry under its key's lock, taken without waiting: False when another holds it."""
    digest16 = _ENTRY_NAME.fullmatch(folder.name).group(2)      # type: ignore[union-attr]
    lock_path = _lock_path(cache_dir, digest16)
    try:
        fd = _acquire(lock_path, wait=False)
    except OSError:
        return False
    if fd is None:
        return False
    try:
        _remove(folder)
    finally:
        _release(lock_path, fd)
    return not folder.exists()


def _sweep_locks(cache_dir: Path) -> list[Path]:
    """Lock files no process holds (left by versions that never removed them): removed under their own lock."""
    removed = []
    for lock_path in sorted(Path(cache_dir).glob(".lock-*")):
        try:
            fd = _acquire(lock_path, wait=False)
        except OSError:
            continue
        if fd is not None:
            _release(lock_path, fd)
            removed.append(lock_path)
    return removed


def prune(cache_dir: str | Path, device: DeviceInfo, keep: Iterable[EngineKey] = ()) -> list[Path]:
    """Remove entries this device can never use again (other TensorRT version or GPU) and leftover temp folders.

    Entries for the same device but other models stay (a rollback to the previous
    bundle is then instant) unless ``keep`` is given, in which case only those stay.
    """
    keep_names = {k.folder_name() for k in keep}
    removed = []
    for folder in _entry_folders(cache_dir):
        meta = _read_meta(folder)
        if isinstance(meta, str):           # damaged: no device can use it (a lookup would discard it too)
            log.warning("%s: discarding cache entry (%s)", folder, meta)
            _remove(folder)
            removed.append(folder)
            continue
        key = meta["key"]
        other_device = (key.get("tensorrt_version") != device.tensorrt_version
                        or key.get("compute_capability") != device.compute_capability)
        if other_device or (keep_names and folder.name not in keep_names):
            _remove(folder)
            removed.append(folder)
    for tmp in Path(cache_dir).glob(".tmp-*"):
        if _writer_alive(tmp):      # another process's build, being written now: not a leftover
            continue
        _remove(tmp)
        removed.append(tmp)
    if swept := _sweep_locks(Path(cache_dir)):
        log.info("engine cache: removed %d lock file(s) no process holds", len(swept))
    return removed


def _writer_alive(tmp: Path) -> bool:
    """Whether the process that is writing ``tmp`` (``.tmp-<entry>-<pid>``, ``write_entry``) still runs."""
    pid = tmp.name.rsplit("-", 1)[-1]
    return pid.isdigit() and int(pid) != os.getpid() and process_runs(int(pid))


# ---------------------------------------------------------------- TensorRT (Jetson / GPU only)

def _import_tensorrt():
    try:
        import tensorrt as trt  # type: ignore[import-not-found]
    except ImportError as exc:
        raise EngineCacheError("TensorRT is not installed (it ships with JetPack; the Jetson image has it); "
                               "no engine can be built here") from exc
    return trt


def compute_capability(device_index: int = 0) -> str:
    """'major.minor' of a CUDA GPU: cuda-python (Jetson image), else nvidia-smi (x86 GPU hosts). No torch."""
    try:
        return _cc_from_cuda_python(device_index)
    except ImportError:
        pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        raise EngineCacheError("neither cuda-python nor nvidia-smi is present; cannot read the GPU's compute capability")
    proc = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader", f"--id={device_index}"],
                          capture_output=True, text=True, timeout=30)
    value = proc.stdout.strip()
    if proc.returncode != 0 or not value:
        raise EngineCacheError(f"nvidia-smi: no CUDA GPU {device_index} ({proc.stderr.strip() or proc.returncode})")
    return value


def _cc_from_cuda_python(device_index: int) -> str:
    try:
        from cuda.bindings import runtime as cudart  # type: ignore[import-not-found]
    except ImportError:
        from cuda import cudart  # type: ignore[import-not-found]
    attrs = cudart.cudaDeviceAttr
    values = []
    for attr in (attrs.cudaDevAttrComputeCapabilityMajor, attrs.cudaDevAttrComputeCapabilityMinor):
        err, value = cudart.cudaDeviceGetAttribute(attr, device_index)
        if int(err) != 0:
            raise EngineCacheError(f"no CUDA GPU {device_index} visible ({err}); run the container with --runtime nvidia")
        values.append(value)
    return f"{values[0]}.{values[1]}"


def explicit_batch_flags(trt) -> int:
    """``create_network`` flags: explicit batch, the only mode of TensorRT 10 (where the flag is ignored) and the
    only one the ONNX parser of TensorRT 8.6 (JetPack 6.0) takes, where 0 means the deprecated implicit batch."""
    if int(str(trt.__version__).split(".")[0]) >= 10:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)


def probe_device() -> DeviceInfo:
    """TensorRT version and GPU compute capability of this machine."""
    trt = _import_tensorrt()
    return DeviceInfo(tensorrt_version=str(trt.__version__), compute_capability=compute_capability())


def check_with_tensorrt(engine: Path) -> None:
    """Deserialize the engine with this machine's TensorRT (no execution context, no buffers): a null engine or an
    error of ``deserialize_cuda_engine`` is EngineRejected. Where TensorRT is not importable nothing is checked
    (tests with a stand-in builder; the agent's backend reports it)."""
    try:
        import tensorrt as trt  # type: ignore[import-not-found]
    except ImportError:
        return
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))      # an error here is TensorRT's or the GPU's, raised
    try:
        data = Path(engine).read_bytes()
    except OSError as exc:
        raise EngineRejected(f"unreadable: {exc.strerror or exc}") from exc
    try:
        loaded = runtime.deserialize_cuda_engine(data)
    except Exception as exc:  # noqa: BLE001 - the binding's own error types
        raise EngineRejected(f"TensorRT {trt.__version__}: {type(exc).__name__}: {exc}") from exc
    if loaded is None:
        raise EngineRejected(f"TensorRT {trt.__version__} cannot deserialize it: built by another TensorRT version "
                             f"or driver, or not a plan it can read (TensorRT's log says which)")
    del loaded


def build_with_tensorrt(request: BuildRequest) -> bytes:
    """Parse the ONNX model and serialize an engine with a dynamic batch profile 1..max_batch (TensorRT 10)."""
    key, spec = request.key, request.input_spec
    return serialize_engine(_import_tensorrt(), request.onnx_path, key.precision, spec.height, spec.width,
                            opt_batch=min(key.max_batch, max(1, key.max_batch // 2)), max_batch=key.max_batch,
                            workspace_mib=request.workspace_mib)


def serialize_engine(trt, onnx_path: Path, precision: str, height: int, width: int, *, opt_batch: int,
                     max_batch: int, workspace_mib: int) -> bytes:
    """The one TensorRT build of this project (the station's engine cache and ``trainer export`` both call it): the
    ONNX model parsed into an explicit-batch network, FP16 on (INT8 engines keep their unquantized layers in FP16),
    INT8 on for ``precision`` int8 (scales from the model's Q/DQ nodes, no calibrator), one optimization profile
    of batch 1..``max_batch`` on the network's input. EngineCacheError naming the file when TensorRT cannot parse
    the model or build the engine."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(explicit_batch_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineCacheError(f"{onnx_path}: TensorRT could not parse the model: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    shape = lambda b: (b, 3, height, width)  # noqa: E731
    profile = builder.create_optimization_profile()
    profile.set_shape(network.get_input(0).name, shape(1), shape(opt_batch), shape(max_batch))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineCacheError(f"{onnx_path}: TensorRT failed to build a {precision} engine (see its log)")
    return bytes(serialized)
