"""Model bundle: read the manifest, verify hashes and signature, pick an artifact.

The trainer writes bundles and verifies them with this module too, so there is
one definition of "a valid bundle" (docs/bundle.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from contract.dataset import class_name_problem
from contract.messages import NotTextError, _strict_patterns, loads_finite
from contract.preprocess import InputSpec

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SIGNATURE = "manifest.json.sig"
MANIFEST_MAX_BYTES = 1 << 20       # a manifest is a few kB; more is not a manifest (and is not read into memory)
SIGNATURE_MAX_BYTES = 4096         # an ed25519 signature is 64 bytes
ROLE_FP32 = "onnx-fp32"
ROLE_INT8 = "onnx-int8"
ROLE_ENGINE = "tensorrt-engine"
ROLE_OPEN_SET = "open-set"      # open_set.npz: class statistics and enrolled rows (contract/openset.py)


class BundleError(Exception):
    """A bundle that must not be used; the message names the file and the problem."""


@lru_cache(maxsize=None)
def manifest_schema() -> dict[str, Any]:
    text = resources.files("contract").joinpath("schemas/bundle/manifest.v1.json").read_text()
    return json.loads(text)


NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")    # a bundle's name and version (manifest schema)


def check_name_version(name: str, version: str | None) -> None:
    """ValueError naming the flag when a bundle name or version could not be a folder and a manifest field:
    checked before any work (the schema would refuse it only at the end, after a whole export)."""
    for flag, value in (("--name", name), ("--version", version)):
        if value is not None and not (isinstance(value, str) and NAME_PATTERN.fullmatch(value)):
            raise ValueError(f"{flag}: {str(value)[:80]!r} is not a bundle {flag[2:]} (a letter or digit, then "
                             f"letters, digits, '.', '_' or '-'; at most 128)")


def read_small_file(path: Path, limit: int, what: str) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (OSError for an unreadable one, BundleError for one
    too large or not a regular file: a FIFO or a link to /dev/zero reports size 0 and would never end a read)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))     # a FIFO opens at once, then is refused
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BundleError(f"{path}: not a regular file")
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise BundleError(f"{path}: more than {what}'s {limit} bytes")
    return data


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Artifact:
    role: str
    path: Path
    sha256: str
    size: int
    precision: str
    deployable: bool
    reason: str | None = None
    tensorrt_version: str | None = None
    compute_capability: str | None = None


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: dict[str, Any]
    artifacts: tuple[Artifact, ...]
    signed: bool = False
    manifest_sha256: str = ""       # of the manifest bytes this bundle was parsed from (what cmd/model pins)
    input_spec: InputSpec = field(init=False)
    open_set: Any = field(init=False)   # contract.openset.OpenSet, or None for a bundle without an open_set block

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_spec", InputSpec.from_manifest(self.manifest["input"]))
        object.__setattr__(self, "open_set", _open_set(self))

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def labels(self) -> list[str]:
        return list(self.manifest["labels"])

    @property
    def model_labels(self) -> list[str]:
        """The labels the model's logits are for: all but the enrolled ones (appended from the embedding)."""
        enrolled = len(self.open_set.enrolled.labels) if self.open_set is not None else 0
        return self.labels[: len(self.labels) - enrolled]

    @property
    def embedding_name(self) -> str | None:
        """The model's embedding output, where the bundle has one (every bundle with an open_set block)."""
        return self.manifest["open_set"].get("embedding_name", "embedding") if self.open_set is not None else None

    @property
    def thresholds(self) -> dict[str, float]:
        return dict(self.manifest.get("quality", {}).get("thresholds", {}))

    def artifact(self, role: str) -> Artifact | None:
        return next((a for a in self.artifacts if a.role == role), None)

    def pick_onnx(self, prefer_int8: bool = True) -> Artifact:
        """The ONNX artifact to run: INT8 when deployable (and preferred), else FP32."""
        order = (ROLE_INT8, ROLE_FP32) if prefer_int8 else (ROLE_FP32, ROLE_INT8)
        for role in order:
            art = self.artifact(role)
            if art is not None and art.deployable:
                return art
        raise BundleError(f"{self.root / MANIFEST}: no deployable ONNX artifact")

    def engines(self) -> list[Artifact]:
        return [a for a in self.artifacts if a.role == ROLE_ENGINE and a.deployable]


def _open_set(bundle: "Bundle"):
    """The manifest's open_set block with its npz (hash-checked like every artifact), or None."""
    block = bundle.manifest.get("open_set")
    if block is None:
        return None
    from contract import openset

    if openset.UNKNOWN_LABEL in bundle.labels:
        raise BundleError(f"{bundle.root / MANIFEST}: field labels: {openset.UNKNOWN_LABEL!r} is the verdict of the "
                          "unknown score (field open_set), not a label a bundle with one may have")
    art = bundle.artifact(ROLE_OPEN_SET)
    try:
        return openset.load(block, art.path if art is not None else None, bundle.labels, block.get("embedding_dim"))
    except openset.OpenSetError as exc:
        raise BundleError(f"{bundle.root / MANIFEST}: field open_set: {exc}") from exc


def _validate_schema(manifest: Any, path: str | Path) -> None:
    # the strict validator: its ``pattern`` does not let "$" match before a final newline ("m\n" is no name)
    validator = _strict_patterns()(manifest_schema())
    errors = sorted(validator.iter_errors(manifest), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        text = err.message      # it quotes the value: a 400-digit number or a 1 MB string is cut in the middle
        if len(text) > 240:
            text = f"{text[:100]} ...({len(text) - 220} characters)... {text[-120:]}"
        raise BundleError(f"{path}: field {where}: {text}")


def parse_manifest(data: bytes, path: str | Path) -> dict[str, Any]:
    """A manifest's bytes as a checked manifest: strict UTF-8 JSON without NaN or infinities, the schema,
    unique labels, a usable input block. Anything else is a BundleError naming ``path`` (the file or URL)."""
    if len(data) > MANIFEST_MAX_BYTES:
        raise BundleError(f"{path}: {len(data)} bytes, more than a manifest's {MANIFEST_MAX_BYTES}")
    try:
        manifest = loads_finite(data.decode("utf-8"))   # strict: json.loads would let lone surrogates through
    except UnicodeDecodeError as exc:
        raise BundleError(f"{path}: not UTF-8 (byte {exc.start}: {exc.reason})") from exc
    except NotTextError as exc:     # valid JSON, but a string in it is no text ("\ud800")
        raise BundleError(f"{path}: {exc}") from exc
    except (ValueError, RecursionError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from exc
    _validate_schema(manifest, path)
    _check_labels_and_input(manifest, path)
    return manifest


def _check_labels_and_input(manifest: dict[str, Any], path: str | Path) -> None:
    labels = manifest["labels"]
    for i, label in enumerate(labels):
        # the rule of every class name (contract.dataset): a label no decision payload can carry (too long,
        # control characters) would make every decision about that class fail its schema at the station
        problem = class_name_problem(label)
        if problem is not None:
            raise BundleError(f"{path}: field labels/{i}: {str(label)[:40]!r} {problem}")
    if len(set(labels)) != len(labels):
        raise BundleError(f"{path}: field labels: class names must be unique")
    try:
        InputSpec.from_manifest(manifest["input"])
    except (TypeError, ValueError, OverflowError) as exc:
        raise BundleError(f"{path}: field input: {exc}") from exc


def load_public_key(path: str | Path):
    """An ed25519 public key from a PEM (SPKI) file or a raw 32-byte file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"{path}: cannot read public key ({exc.strerror or exc})") from exc
    try:
        if data.startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            key = Ed25519PublicKey.from_public_bytes(data)
    except ValueError as exc:
        raise BundleError(f"{path}: not an ed25519 public key ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"{path}: not an ed25519 public key")
    return key


def _check_signature(root: Path, manifest_bytes: bytes, public_key: Any | None) -> bool:
    from cryptography.exceptions import InvalidSignature

    sig_path = root / SIGNATURE
    if not sig_path.exists():
        if public_key is not None:
            raise BundleError(f"{sig_path}: missing, and a public key is configured (unsigned bundles are refused)")
        return False
    if public_key is None:
        log.warning("%s: signature present but no public key configured; not checked", sig_path)
        return False
    try:
        public_key.verify(read_small_file(sig_path, SIGNATURE_MAX_BYTES, "an ed25519 signature"), manifest_bytes)
    except OSError as exc:
        raise BundleError(f"{sig_path}: cannot read ({exc.strerror or exc})") from exc
    except InvalidSignature as exc:
        raise BundleError(f"{sig_path}: signature does not match {root / MANIFEST}") from exc
    return True


def _artifacts(manifest: dict[str, Any], root: Path, verify_files: bool) -> tuple[Artifact, ...]:
    out = []
    for i, entry in enumerate(manifest["artifacts"]):
        rel = Path(entry["path"])
        if rel.is_absolute() or ".." in rel.parts or "\x00" in entry["path"]:
            raise BundleError(f"{root / MANIFEST}: field artifacts/{i}/path: must stay inside the bundle, got {rel}")
        path = root / rel
        if verify_files:
            if not path.is_file():
                raise BundleError(f"{path}: listed in {root / MANIFEST} but missing")
            try:
                size = path.stat().st_size
                digest = sha256_file(path) if size == entry["size"] else ""
            except OSError as exc:
                raise BundleError(f"{path}: cannot read ({exc.strerror or exc})") from exc
            if size != entry["size"]:
                raise BundleError(f"{path}: size {size} bytes, manifest says {entry['size']} (tampered or truncated)")
            if digest != entry["sha256"]:
                raise BundleError(f"{path}: sha256 {digest} does not match the manifest's {entry['sha256']} (tampered)")
        out.append(
            Artifact(
                role=entry["role"],
                path=path,
                sha256=entry["sha256"],
                size=entry["size"],
                precision=entry["precision"],
                deployable=bool(entry.get("deployable", True)),
                reason=entry.get("reason"),
                tensorrt_version=entry.get("tensorrt_version"),
                compute_capability=entry.get("compute_capability"),
            )
        )
    return tuple(out)


def load_bundle(path: str | Path, public_key: Any | None = None, *, verify_files: bool = True) -> Bundle:
    """Load and verify a bundle folder (or its manifest.json); raise BundleError on any problem."""
    path = Path(path)
    root = path.parent if path.name == MANIFEST else path
    manifest_path = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"{root}: bundle folder does not exist")
    try:
        manifest_bytes = read_small_file(manifest_path, MANIFEST_MAX_BYTES, "a manifest")
    except OSError as exc:
        raise BundleError(f"{manifest_path}: cannot read ({exc.strerror or exc})") from exc
    manifest = parse_manifest(manifest_bytes, manifest_path)
    signed = _check_signature(root, manifest_bytes, public_key)
    artifacts = _artifacts(manifest, root, verify_files)
    return Bundle(root=root, manifest=manifest, artifacts=artifacts, signed=signed,
                  manifest_sha256=hashlib.sha256(manifest_bytes).hexdigest())


def artifact_entry(path: Path, root: Path, **fields: Any) -> dict[str, Any]:
    """A manifest artifact entry for a file inside ``root`` (used by the trainer)."""
    return {
        "path": path.relative_to(root).as_posix(),
        "sha256": sha256_file(path),
        "size": path.stat().st_size,
        **fields,
    }


def find_bundles(models_dir: str | Path) -> Iterable[Path]:
    """Every ``<name>/<version>/manifest.json`` folder under a models directory, sorted."""
    return sorted(p.parent for p in Path(models_dir).glob(f"*/*/{MANIFEST}"))


# ---------------------------------------------------------------- bundle folders written beside their place

PARTIAL_MARK = ".partial-"


def _host_tag() -> str:
    import socket

    return re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:32] or "host"


def partial_dir(final: Path) -> Path:
    """Where a bundle folder is written before it is renamed to ``final``: beside it, hidden, and named after this
    host and process (``.<version>.partial-<host>-<pid>-<random>``), so that a later run can tell a leftover of a
    killed writer from another writer's work in progress (sweep_partials). Not created."""
    import uuid

    return final.parent / f".{final.name}{PARTIAL_MARK}{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def sweep_partials(parent: Path) -> list[Path]:
    """Remove what killed writers left in ``parent`` (an export, enrolment or publish stopped by ``kill -9`` or a
    power cut never reaches its clean-up): ``partial_dir`` folders of this host whose process no longer runs.
    Another host's folders (a models folder shared over the network) and live processes' are kept, as are
    folders of another form. Returns what was removed; each removal is logged."""
    import shutil

    removed: list[Path] = []
    prefix = f"{PARTIAL_MARK}{_host_tag()}-"
    try:
        entries = list(Path(parent).iterdir())
    except OSError:         # no such folder yet: nothing left in it
        return removed
    for path in entries:
        head, mark, rest = path.name.partition(prefix)
        pid = rest.split("-", 1)[0]
        if not (head.startswith(".") and mark and pid.isdigit()) or path.is_symlink() or not path.is_dir():
            continue
        if int(pid) == os.getpid() or process_runs(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        log.warning("%s: removed, left by process %s on this host, which no longer runs", path, pid)
        removed.append(path)
    return removed


def process_runs(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (one of another user's included): whether a folder named after
    it (``partial_dir``, the engine cache's builds) is still being written."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:         # it runs, as another user
        return True
    return True


# ---------------------------------------------------------------- what the model must be able to do

def sample_input(spec: InputSpec, batch: int) -> np.ndarray:
    """A fixed image-like batch: uniform pixels normalized as the station does, so ranges are realistic."""
    rng = np.random.default_rng(0)
    pixels = rng.uniform(0.0, 1.0, size=(batch, spec.height, spec.width, 3))
    normalized = (pixels - np.asarray(spec.mean)) / np.asarray(spec.std)
    return np.ascontiguousarray(normalized.transpose(0, 3, 1, 2), dtype=np.float32)


def check_outputs(bundle: Bundle, model: str, outputs: Any, batch: int) -> None:
    """A model's outputs on a sample batch: one finite logit per label for each image, else BundleError.

    A labels list that does not match the model's classes would lose every frame as an inference error; a
    model that outputs NaN would publish ``confidence: NaN`` as a confident result."""
    shape = tuple(getattr(outputs, "shape", ()))
    labels = bundle.model_labels
    want = (batch, len(labels))
    where = f"{bundle.root / MANIFEST}: {model}"
    if len(shape) != 2 or shape[0] != batch:
        raise BundleError(f"{where}: outputs shape {shape} on a batch of {batch}, expected {want}")
    if shape[1] != len(labels):
        enrolled = len(bundle.labels) - len(labels)
        raise BundleError(f"{where}: {shape[1]} outputs per image but field labels has {len(labels)}"
                          + (f" trained labels (and {enrolled} enrolled)" if enrolled else ""))
    if not np.isfinite(outputs).all():
        raise BundleError(f"{where}: non-finite outputs (NaN or infinity) on the sample batch")


def check_embedding(bundle: Bundle, model: str, embedding: Any, batch: int) -> None:
    """A model's embedding output on a sample batch: one finite vector of the statistics' size per image."""
    shape = tuple(getattr(embedding, "shape", ()))
    stats = bundle.open_set.stats if bundle.open_set is not None else None
    dim = bundle.manifest["open_set"].get("embedding_dim") or (stats.dim if stats is not None else None)
    where = f"{bundle.root / MANIFEST}: {model}"
    if len(shape) != 2 or shape[0] != batch or (dim is not None and shape[1] != dim):
        raise BundleError(f"{where}: embedding shape {shape} on a batch of {batch}, expected ({batch}, {dim})")
    if not np.isfinite(embedding).all():
        raise BundleError(f"{where}: non-finite embedding (NaN or infinity) on the sample batch")


def check_input_shape(bundle: Bundle, model: str, shape: Iterable[Any]) -> None:
    """The model's input (N, 3, H, W; symbolic dimensions match anything) against the manifest's field input."""
    dims = list(shape)
    spec = bundle.input_spec
    want = [None, 3, spec.height, spec.width]
    if len(dims) != 4 or any(isinstance(d, int) and w is not None and d != w for d, w in zip(dims, want)):
        raise BundleError(f"{bundle.root / MANIFEST}: {model}: input shape {dims}, but field input says "
                          f"(N, 3, {spec.height}, {spec.width})")


def check_onnx_artifact(bundle: Bundle, artifact: Artifact, batch: int = 2) -> None:
    """Load one ONNX artifact in ONNX Runtime (CPU) and check its input and its outputs on a sample batch."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(artifact.path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise BundleError(f"{artifact.path}: ONNX Runtime cannot load the model ({exc})") from exc
    inputs = {i.name: i for i in session.get_inputs()}
    name = bundle.input_spec.input_name if bundle.input_spec.input_name in inputs else next(iter(inputs))
    check_input_shape(bundle, artifact.path.name, inputs[name].shape)
    fixed = inputs[name].shape[0]
    n = fixed if isinstance(fixed, int) and fixed > 0 else batch
    names = [o.name for o in session.get_outputs()]
    logits_name = bundle.input_spec.output_name if bundle.input_spec.output_name in names else names[0]
    wanted = [logits_name]
    if bundle.embedding_name is not None:
        if bundle.embedding_name not in names:
            raise BundleError(f"{artifact.path}: no output {bundle.embedding_name!r} (the embedding field open_set "
                              f"needs); the model's outputs are {names}")
        wanted.append(bundle.embedding_name)
    try:
        outputs = session.run(wanted, {name: sample_input(bundle.input_spec, n)})
    except Exception as exc:
        raise BundleError(f"{artifact.path}: ONNX Runtime cannot run the model on a sample batch ({exc})") from exc
    check_outputs(bundle, artifact.path.name, outputs[0], n)
    if len(outputs) > 1:
        check_embedding(bundle, artifact.path.name, outputs[1], n)


def check_model_runs(bundle: Bundle) -> None:
    """Every deployable ONNX artifact of ``bundle`` takes the manifest's input and gives one finite output per
    label (``verify`` and the export run this; the station checks the backend it builds the same way)."""
    for artifact in bundle.artifacts:
        if artifact.role in (ROLE_FP32, ROLE_INT8) and artifact.deployable:
            check_onnx_artifact(bundle, artifact)
