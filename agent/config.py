"""Typed, strict station configuration loaded from firmware-config/ YAML.

A device file names a shared defaults file with ``extends:``; the two are deep
merged (device wins) and validated as one ``AgentConfig``. Unknown keys are
errors, so a typo never silently falls back to a default. Secrets never live in
the YAML: the MQTT password comes from an environment variable or a file.
"""

from __future__ import annotations

import numbers
import os
import reprlib
import types
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from contract.broker import BrokerSettings, BrokerSettingsError
from contract.messages import station_root


class ConfigError(Exception):
    """A config file that cannot be used; the message names the file and the field."""


MAX_FRAME_SIDE = 16384      # pixels: larger than any camera a station has; bounds ROIs and capture sizes
HOUR_S = 3600.0
DAY_S = 24 * HOUR_S
MQTT_MAX_PAYLOAD = 268_435_455 - 64 * 1024   # MQTT's largest packet, less room for topic and properties
# One station is one Jetson with 1 to 8 cameras. Each camera is a capture thread, a decoder session and a bounded
# frame queue, and all of them share the one model: 32 is four times the largest station and more 1080p30 streams
# than the largest Jetson decodes in hardware (a couple of dozen), so more is a damaged or generated file, not a
# station (the stats and status schemas take at most 256 cameras).
MAX_CAMERAS = 32
MQTT_MAX_STRING = 65535     # bytes of UTF-8 in one MQTT string (client id, user name)
MAX_ID_CHARS = 64           # site, station and camera ids: the MQTT payload schemas' maxLength (contract/schemas/mqtt)
MAX_LANE_CHARS = 256        # a sort lane: decision.v1's and receipt.v1's lane, 1 to 256 characters


def _no_nul(path: Path | None) -> Path | None:
    """A path the operating system can open: a NUL character (``"\\0"`` in YAML) is accepted by ``Path`` and then
    fails every open with a ValueError, a traceback at start or a bundle update that can never be stored."""
    if path is not None and "\x00" in str(path):
        raise ValueError(f"{printable(str(path))[:120]}: a path cannot hold a NUL character")
    return path


class _Strict(BaseModel):
    # allow_inf_nan=False: NaN and infinity (``.nan``, ``.inf``, ``1e999`` in YAML) pass every bound check by
    # comparison and then break the threads that wait on them, so no float field anywhere accepts them.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Roi(_Strict):
    x: int = Field(0, ge=0, le=MAX_FRAME_SIDE, title="Left", description="Left edge of the region of interest, in pixels.")
    y: int = Field(0, ge=0, le=MAX_FRAME_SIDE, title="Top", description="Top edge of the region of interest, in pixels.")
    width: int = Field(..., gt=0, le=MAX_FRAME_SIDE, title="Width",
                       description="Width of the region of interest, in pixels.")
    height: int = Field(..., gt=0, le=MAX_FRAME_SIDE, title="Height",
                        description="Height of the region of interest, in pixels.")

    def fits(self, width: int, height: int) -> bool:
        """The whole region lies inside a ``width`` x ``height`` frame."""
        return self.x + self.width <= width and self.y + self.height <= height

    def describe(self) -> str:
        return f"x={self.x} y={self.y} width={self.width} height={self.height}"


MAX_UNKNOWN_SCORE = 1e6   # no unknown score comes near it (probabilities, logits, distances of a few thousand)


class Thresholds(_Strict):
    min_confidence: float | None = Field(
        None, ge=0, le=1, title="Minimum confidence",
        description="A frame whose top-1 probability is below this is low-confidence. None: the bundle's value.",
    )
    min_margin: float | None = Field(
        None, ge=0, le=1, title="Minimum margin",
        description="A frame whose top-1 minus top-2 probability is below this is low-confidence.",
    )
    max_entropy: float | None = Field(
        None, ge=0, title="Maximum entropy",
        description="A frame whose softmax entropy (natural log) is above this is low-confidence.",
    )
    max_unknown_score: float | None = Field(
        None, ge=-MAX_UNKNOWN_SCORE, le=MAX_UNKNOWN_SCORE, strict=True, title="Maximum unknown score",
        description="A frame (an item: the median of its frames) whose unknown score is above this is decided "
                    "'unknown' and goes to review. The score's scale is the bundle's open_set score (energy and "
                    "max_logit are negative numbers). None: the bundle's calibrated threshold; ignored for a "
                    "bundle without open_set. Not with unknown_keep (each sets the unknown threshold).",
    )
    unknown_keep: float | None = Field(
        None, gt=0, le=1, strict=True, title="Known items kept",
        description="The unknown threshold as the share of known items it keeps: the bundle's threshold at this "
                    "share of its calibration set (open_set.keep_thresholds, the listed share at or above it), "
                    "looked up again for every bundle the station runs, so it carries over a model update as a "
                    "raw score cannot. A bundle without the list keeps its own threshold. Not with "
                    "max_unknown_score.",
    )

    @model_validator(mode="after")
    def _one_unknown_threshold(self) -> "Thresholds":
        if self.max_unknown_score is not None and self.unknown_keep is not None:
            raise ValueError("field unknown_keep: not with max_unknown_score (each sets the unknown threshold; "
                             "give one)")
        return self


UNKNOWN_THRESHOLD_FIELDS = ("max_unknown_score", "unknown_keep")   # one setting, as a score or as a share kept


def merge_thresholds(base: Thresholds, over: Thresholds | None) -> Thresholds:
    """``over``'s set fields win over ``base``'s; the unknown threshold set in one form clears the other."""
    if over is None:
        return base
    update = {k: v for k, v in over.model_dump().items() if v is not None}
    if any(k in update for k in UNKNOWN_THRESHOLD_FIELDS):
        update = {**{k: None for k in UNKNOWN_THRESHOLD_FIELDS}, **update}
    return base.model_copy(update=update)


class ThresholdsCommand(Thresholds):
    """Payload of cmd/thresholds: new low-confidence thresholds for one camera or all."""

    camera: str | None = Field(None, title="Camera", description="Camera id; None: every camera.")


class CaptureEmptyCommand(_Strict):
    """Payload of cmd/capture-empty: send empty-scene frames (the ROI with nothing in view) for training."""

    count: int = Field(1, ge=1, le=50, strict=True, title="Frames per camera",   # as the schema: not true, not "3"
                       description="Empty-scene frames to send from each camera named.")
    cameras: list[str] | None = Field(None, min_length=1, title="Cameras",
                                      description="Camera ids; None: every camera.")

    @field_validator("cameras")
    @classmethod
    def _each_once(cls, cameras: list[str] | None) -> list[str] | None:
        """A camera named twice is asked once (count frames, not count per mention)."""
        return list(dict.fromkeys(cameras)) if cameras is not None else None


SHIPMENT_ID = r"^[A-Za-z0-9_.:-]+$"
MAX_SHIPMENT_LINES = 1000           # expected labels of one shipment (contract/schemas/mqtt/cmd-expect.v1.json)
MAX_LINE_COUNT = 1_000_000          # items expected of one label


def _json_integer(value: Any) -> int:
    """An expected count as the cmd-expect schema reads one: a JSON integer (``3``, also ``3.0``, which JSON Schema
    counts as one), never a string (``"3"``) nor a boolean (``true``), which pydantic's lax mode would turn into 3
    and 1."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, float)):
        kind = {bool: "a boolean", str: "a string", type(None): "null", list: "an array", dict: "an object"}
        raise ValueError(f"expected an integer, not {kind.get(type(value), type(value).__name__)}")
    if isinstance(value, float) and not value.is_integer():      # NaN, an infinity or a fraction
        raise ValueError("expected an integer, not a number with a fraction")
    return int(value)


ExpectedCount = Annotated[int, BeforeValidator(_json_integer)]


class ExpectCommand(_Strict):
    """Payload of cmd/expect: open a shipment with its expected lines (label -> count), or close it.

    Types as the schema (contract/schemas/mqtt/cmd-expect.v1.json) has them, not pydantic's lax reading:
    counts are integers (no ``"3"``, no ``true``), ``close`` a boolean (no ``"true"``, no ``1``). A label given
    twice in one payload is refused before this (``agent.app.command_json``): a dict cannot hold both."""

    shipment: str = Field(..., min_length=1, max_length=64, pattern=SHIPMENT_ID, title="Shipment",
                          description="The shipment's id, as the dock's system knows it.")
    lines: dict[str, ExpectedCount] | None = Field(
        None, min_length=1, max_length=MAX_SHIPMENT_LINES, title="Expected lines",
        description="Label -> items expected; required to open, absent to close.")
    close: StrictBool = Field(False, title="Close", description="True: close the open shipment of this id.")

    @model_validator(mode="after")
    def _open_or_close(self) -> "ExpectCommand":
        if self.close and self.lines is not None:
            raise ValueError("field lines: not allowed with close: true (a close names only the shipment)")
        if not self.close and self.lines is None:
            raise ValueError("field lines: required to open a shipment (or send close: true)")
        for label, count in (self.lines or {}).items():
            if not 0 < len(label) <= 256:
                raise ValueError(f"field lines: label {label[:40]!r} must be 1 to 256 characters")
            if not 1 <= count <= MAX_LINE_COUNT:
                raise ValueError(f"field lines.{label}: {count} is not between 1 and {MAX_LINE_COUNT}")
        return self


class Backoff(_Strict):
    initial_s: float = Field(0.5, gt=0, le=HOUR_S, title="Initial delay", description="First wait before a retry, seconds.")
    max_s: float = Field(30.0, gt=0, le=HOUR_S, title="Maximum delay", description="Cap of the exponential backoff, seconds.")
    factor: float = Field(2.0, ge=1, le=10, title="Factor", description="Each failed retry multiplies the delay by this.")

    @model_validator(mode="after")
    def _initial_within_max(self) -> "Backoff":
        """The cap bounds every wait: an initial delay above it (the two swapped) would wait longer first."""
        if self.initial_s > self.max_s:
            raise ValueError(f"initial_s: {self.initial_s:g} is more than max_s ({self.max_s:g}), the longest wait")
        return self


class CameraConfig(_Strict):
    id: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$", max_length=MAX_ID_CHARS, title="Camera id",
                    description="Short unique name (at most 64 characters), used in topics, payloads and metrics.")
    uri: str = Field(..., min_length=1, title="Source URI", description=(
        "file:///path.mp4 or a plain path (video), a folder of images, v4l2:///dev/video0, usb://0 or a bare "
        "integer, rtsp://..., csi://0 (Jetson GStreamer nvarguscamerasrc), or gst://<pipeline>. A relative file "
        "or folder path (a plain one or file:name) is relative to the config file that sets it."))
    loop: bool = Field(False, title="Loop", description="File and folder sources: start again at the end.")
    fps: float | None = Field(None, gt=0, le=1000, title="Target frame rate",
                              description="Frames per second handed to the model; None: as fast as the source.")
    roi: Roi | None = Field(None, title="Region of interest",
                            description="Crop applied to every frame; it must lie inside the frame (inside "
                                        "width x height when both are set), else the frame is refused and counted.")
    queue_size: int = Field(2, ge=1, le=256, title="Queue size",
                            description="Bounded frame queue; when full, the oldest frame is dropped and counted.")
    backpressure: Literal["drop_oldest", "block"] = Field(
        "drop_oldest", title="Backpressure",
        description="drop_oldest: latest-frame semantics for live cameras; block: file sources wait (no drops).",
    )
    stall_timeout_s: float = Field(5.0, gt=0, le=HOUR_S, title="Stall timeout",
                                   description="No frame for this long: the watchdog reports the camera down and reconnects it; a "
                                               "read still running 15 s later is given up and the camera opened "
                                               "anew.")
    reconnect: Backoff = Field(default_factory=Backoff, title="Reconnect backoff",
                               description="Backoff between reconnect attempts of a lost camera; each wait is drawn between "
                                           "half the delay and the delay, so cameras (and stations) do not "
                                           "reconnect in step.")
    thresholds: Thresholds = Field(default_factory=Thresholds, title="Threshold overrides",
                                   description="Per-camera low-confidence thresholds; unset ones come from the bundle.")
    width: int | None = Field(None, gt=0, le=MAX_FRAME_SIDE, title="Capture width",
                              description="Requested capture width (live cameras).")
    height: int | None = Field(None, gt=0, le=MAX_FRAME_SIDE, title="Capture height",
                               description="Requested capture height.")

    @field_validator("uri")
    @classmethod
    def _a_camera_uri(cls, uri: str) -> str:
        """The URI's form as the camera thread reads it (``agent.sources.open_source``, which opens nothing): one
        that can never open (a misspelt scheme, usb://front, file://host/x) is a config error here, not a camera
        thread retrying it for good while validate-config said OK."""
        from agent.sources import SourceError, open_source  # OpenCV: only once a camera is checked

        try:
            open_source(uri, name="config")
        except (SourceError, OSError, ValueError) as exc:
            raise ValueError(str(exc)) from None
        return uri

    @model_validator(mode="after")
    def _roi_in_frame(self) -> "CameraConfig":
        """With the frame size known here, an ROI outside it is a config error (at run time, a refused frame); with
        only one side given, the ROI must fit that side."""
        roi = self.roi
        if roi is None:
            return self
        if self.width and self.height and not roi.fits(self.width, self.height):
            raise ValueError(f"roi: {roi.describe()} does not fit the {self.width}x{self.height} frame "
                             "(width, height)")
        if self.width and roi.x + roi.width > self.width:
            raise ValueError(f"roi: {roi.describe()} does not fit the frame's width {self.width}")
        if self.height and roi.y + roi.height > self.height:
            raise ValueError(f"roi: {roi.describe()} does not fit the frame's height {self.height}")
        return self


class ModelConfig(_Strict):
    bundle: Path = Field(..., title="Bundle", description="Model bundle folder (or its manifest.json).")
    public_key: Path | None = Field(None, title="Public key",
                                    description="ed25519 public key; when set, unsigned bundles are refused.")
    backend: Literal["auto", "onnxruntime", "tensorrt"] = Field(
        "auto", title="Backend", description="auto: a deployable TensorRT engine when tensorrt is importable, else ONNX Runtime.")
    prefer_int8: bool = Field(True, title="Prefer INT8 (old)",
                              description="Kept for old configs; precision replaces it and wins when set. "
                                          "true: precision auto; false: precision fp32.")
    precision: Literal["auto", "int8", "fp32"] | None = Field(
        None, title="ONNX precision",
        description="Which ONNX artifact ONNX Runtime runs. auto: every deployable one is timed at batch_size when the "
                    "model loads and the fastest is kept (INT8 is slower than FP32 on CPUs without VNNI); int8 or "
                    "fp32: pinned (INT8 only where the manifest marks it deployable, else FP32). "
                    "Unset: from prefer_int8.")
    providers: list[Literal["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]] = Field(
        default_factory=lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
        min_length=1, title="ONNX Runtime providers",
        description="Preference order; the ones this onnxruntime build has are used. Where ONNX Runtime cannot "
                    "start the TensorRT/CUDA providers (it raises, or comes up on the CPU alone because a provider "
                    "library or the GPU is missing), the model runs on the CPU provider with a warning naming them, "
                    "its threads chosen as for the CPU.")
    batch_size: int = Field(8, ge=1, le=256, title="Batch size", description="Most frames per inference call, across cameras.")
    batch_timeout_ms: float = Field(5.0, ge=0, le=10_000, title="Batch timeout",
                                    description="How long to wait for a batch to fill once one frame is ready, ms.")
    intra_op_threads: int = Field(0, ge=0, le=1024, title="Intra-op threads",
                                  description="ONNX Runtime threads; 0: auto: on the CPU the model is timed with 1, half "
                                              "and all of the CPUs when it loads, and the fastest is kept.")
    opencv_threads: int = Field(1, ge=0, le=1024, title="OpenCV threads",
                                description="Threads OpenCV may split one call across (decoding, resizing, "
                                            "localizing a frame); 0: OpenCV's default, all CPUs. 1: each camera "
                                            "thread works on one core and leaves the rest to the model: OpenCV's "
                                            "parallel loops on a 300 px ROI cost more CPU than they save.")
    flip_average: bool = Field(
        False, title="Flip average",
        description="Classify each crop and its mirror image and average the two views' logits (two model runs per "
                    "batch). The unknown score stays the unflipped view's, as its threshold was calibrated.")
    warmup_runs: int = Field(2, ge=0, le=1000, title="Warm-up runs", description="Inference runs before the station reports ready.")
    pipeline_nice: int = Field(10, ge=0, le=19, title="Pipeline nice",
                               description="Nice value the camera, decide and MQTT threads add to their own, so on a "
                                           "busy CPU the model's thread runs first; 0: all threads equal.")
    download_dir: Path = Field(Path("/tmp/agent-bundles"), title="Download folder",
                               description="Where bundles named by a cmd/model URL are fetched to. Only the versions "
                                           "cmd/model installed here (marked) are ever removed.")

    _paths_open = field_validator("bundle", "public_key", "download_dir")(_no_nul)

    def check_download_dir(self) -> None:
        """ConfigError naming ``model.download_dir`` when the folder cannot be made or written by this user (a file
        in its way, a parent this user cannot write, a read-only file system): the station would start and then
        refuse every cmd/model. Creates nothing: it finds the nearest part of the path that exists and asks of it
        what ``mkdir -p`` would need (``agent.startup`` makes the folder)."""
        path = Path(os.path.abspath(self.download_dir))
        uid = os.getuid()
        if path.is_dir():
            if not os.access(path, os.W_OK | os.X_OK):
                raise ConfigError(f"model.download_dir: {path} is not writable by uid {uid}")
            return
        here = path
        while not os.path.lexists(here):       # a dangling symlink is in the way too: mkdir cannot replace it
            here = here.parent
        if not here.is_dir():
            what = "a dangling link" if here.is_symlink() and not here.exists() else "not a folder"
            raise ConfigError(f"model.download_dir: cannot create {path} ({here} is {what})")
        if not os.access(here, os.W_OK | os.X_OK):
            raise ConfigError(f"model.download_dir: cannot create {path} ({here} is not writable by uid {uid})")

    @property
    def onnx_precision(self) -> Literal["auto", "int8", "fp32"]:
        """precision, or what the older prefer_int8 meant: INT8 where it helps (auto), or FP32."""
        if self.precision is not None:
            return self.precision
        return "auto" if self.prefer_int8 else "fp32"


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's cpuset), else all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class TlsConfig(_Strict):
    ca_file: Path | None = Field(None, title="CA file", description="CA certificate(s) that signed the broker's cert.")
    cert_file: Path | None = Field(None, title="Client certificate", description="Client certificate for mutual TLS.")
    key_file: Path | None = Field(None, title="Client key", description="Client private key file (a path, never the key).")
    insecure: bool = Field(False, title="Skip hostname check", description="Do not check the broker's hostname. Lab use only.")

    _paths_open = field_validator("ca_file", "cert_file", "key_file")(_no_nul)

    @model_validator(mode="after")
    def _pair(self) -> "TlsConfig":
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        return self

    def check(self) -> None:
        """Load the files as the MQTT client's TLS set-up does (ConfigError naming ``mqtt.tls.*``): a CA file
        without a certificate, or a certificate and key that are no PEM or no pair, would otherwise fail every
        connect for good while the station runs. An encrypted key is refused (no password is ever configured)."""
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if self.cert_file is not None:
            try:
                context.load_cert_chain(str(self.cert_file), str(self.key_file), password=_no_key_password)
            except (ssl.SSLError, OSError, ValueError) as exc:
                raise ConfigError(f"mqtt.tls.cert_file/key_file: {self.cert_file}, {self.key_file}: not a PEM "
                                  f"certificate and its unencrypted key ({_ssl_reason(exc)})") from None
        if self.ca_file is not None:
            try:
                context.load_verify_locations(cafile=str(self.ca_file))
            except (ssl.SSLError, OSError, ValueError) as exc:
                raise ConfigError(f"mqtt.tls.ca_file: {self.ca_file}: no PEM CA certificate in it "
                                  f"({_ssl_reason(exc)})") from None


def _no_key_password() -> bytes:
    """Asked for only by an encrypted key: none is configured, and OpenSSL must not prompt on a terminal."""
    raise ValueError("the key is encrypted")


def _ssl_reason(exc: BaseException) -> str:
    return " ".join(str(getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc).split())


class MqttConfig(_Strict):
    host: str = Field("127.0.0.1", min_length=1, title="Broker host", description="MQTT broker host name or address.")
    port: int = Field(1883, ge=1, le=65535, title="Broker port", description="1883 plain, 8883 usually TLS.")
    protocol: Literal["auto", "v5", "v311"] = Field(
        "auto", title="Protocol", description="auto: MQTT v5, falling back to 3.1.1 when the broker refuses v5.")
    client_id: str | None = Field(None, title="Client id", description="None: agent-<site>-<station>.")
    keepalive_s: int = Field(30, ge=5, le=65535, title="Keepalive", description="MQTT keepalive, seconds.")
    username: str | None = Field(None, title="User name", description="MQTT user name.")
    password_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", title="Password variable",
                                     description="Environment variable holding the password.")
    password_file: Path | None = Field(None, title="Password file", description="File holding the password (first line).")
    tls: TlsConfig | None = Field(None, title="TLS", description="Enables TLS when set.")
    topic_root: str | None = Field(
        None, title="Topic root",
        description="The whole prefix of the station's topics. None: inventory/<site>/<station>. Central services "
                    "take a root before <site>/<station> (--topic-root): with theirs at 'acme', set "
                    "'acme/<site>/<station>'.")
    reconnect: Backoff = Field(default_factory=Backoff, title="Reconnect backoff",
                               description="Backoff between connect attempts; each wait is drawn between half the "
                                           "delay and the delay, so stations do not reconnect in step.")
    max_inflight: int = Field(64, ge=1, le=1000, title="In-flight window", description="QoS 1 messages awaiting PUBACK at once.")
    max_message_bytes: int = Field(
        4 * 1024 * 1024, ge=64 * 1024, le=MQTT_MAX_PAYLOAD, title="Largest message",
        description="The largest message the broker takes (mosquitto's message_size_limit; deploy/central: 4 MiB). "
                    "A message larger as published (on 3.1.1 a frame's JPEG goes in base64, 4/3 of its size; "
                    "protocol auto counts the larger) is refused when stored and counted as dropped too-large: "
                    "the broker would refuse it at every try (v5) or acknowledge and discard it (3.1.1).")

    _paths_open = field_validator("password_file")(_no_nul)

    @field_validator("client_id", "username")
    @classmethod
    def _an_mqtt_string(cls, text: str | None) -> str | None:
        """What CONNECT can carry (MQTT: UTF-8 of at most 65535 bytes, no U+0000): a broker closes the connection on
        a NUL and paho cannot pack a longer string, so the station would retry the connect for good."""
        if text is None:
            return text
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError:
            raise ValueError("not UTF-8 text (a lone surrogate)") from None
        if "\x00" in text:
            raise ValueError("MQTT strings cannot hold a NUL character")
        if size > MQTT_MAX_STRING:
            raise ValueError(f"{size} bytes as UTF-8; MQTT takes at most {MQTT_MAX_STRING}")
        return text

    @field_validator("topic_root")
    @classmethod
    def _a_topic_prefix(cls, root: str | None) -> str | None:
        """A prefix every topic is published under: no wildcard (a broker refuses to publish to it, and the station
        would retry for good), no empty level, at most 200 characters."""
        if root is not None and (not root or len(root) > 200 or any(c in root for c in "+#\x00")
                                 or "" in root.split("/")):
            raise ValueError(f"{root[:80]!r} is not a topic prefix: levels of text between single '/', no '+', '#' "
                             f"or NUL, no '/' at either end")
        return root

    @model_validator(mode="before")
    @classmethod
    def _no_inline_secret(cls, data: Any) -> Any:
        if isinstance(data, dict) and "password" in data:
            raise ValueError("password: secrets are not allowed in the YAML; use password_env or password_file")
        return data

    @model_validator(mode="after")
    def _one_password_source(self) -> "MqttConfig":
        if self.password_env is not None and self.password_file is not None:     # as the start-up checks them
            raise ValueError("give password_env or password_file, not both")
        return self

    def broker_settings(self) -> BrokerSettings:
        """These settings as the contract's ``BrokerSettings`` (errors name the ``mqtt.*`` key)."""
        tls = self.tls
        return BrokerSettings(
            host=self.host, port=self.port, username=self.username, password_file=self.password_file,
            password_env=self.password_env, tls=tls is not None, tls_ca=tls.ca_file if tls else None,
            tls_cert=tls.cert_file if tls else None, tls_key=tls.key_file if tls else None,
            tls_insecure=bool(tls and tls.insecure),
            client_id=self.client_id, keepalive_s=self.keepalive_s,
            flags=(("host", "mqtt.host"), ("port", "mqtt.port"), ("username", "mqtt.username"),
                   ("password_file", "mqtt.password_file"), ("password_env", "mqtt.password_env"),
                   ("tls_ca", "mqtt.tls.ca_file"), ("tls_cert", "mqtt.tls.cert_file"),
                   ("tls_key", "mqtt.tls.key_file")))

    def check(self) -> None:
        """Every file readable, the password there, and the TLS files what they must be (a CA file with a
        certificate, a client certificate and its key that load together): a startup error, not a retry loop
        (names the key)."""
        try:
            self.broker_settings().check()
        except BrokerSettingsError as exc:
            raise ConfigError(str(exc)) from None
        if self.tls is not None:
            self.tls.check()

    def password(self) -> str | None:
        """The password from its variable or file, read when connecting (never stored in config)."""
        try:
            return self.broker_settings().password()
        except BrokerSettingsError as exc:
            raise ConfigError(str(exc)) from None


class OutboxConfig(_Strict):
    path: Path = Field(Path("/var/lib/inventory-agent/outbox.sqlite"), title="Database file",
                       description="SQLite file of the durable outbox.")
    max_bytes: int = Field(256 * 1024 * 1024, ge=1024, le=1 << 40, title="Byte quota",
                           description="The most the outbox's files (database, -wal, -shm) take on disk, 4 MiB at the least; "
                                       "when full, frames then the oldest messages are dropped and counted. One message "
                                       "may take at most an eighth of it.")
    max_age_s: float = Field(7 * DAY_S, gt=0, le=366 * DAY_S, title="Age quota", description="Messages older than this are dropped and counted.")
    synchronous: Literal["normal", "full"] = Field(
        "normal", title="SQLite synchronous",
        description="normal: survives process crash (kill -9); full: also power loss, slower.")

    _paths_open = field_validator("path")(_no_nul)


def _finite(default: Any, **kw: Any) -> Any:
    """A float field that refuses NaN and infinity (they would pass every bound check by comparison)."""
    return Field(default, allow_inf_nan=False, **kw)


class PresenceConfig(_Strict):
    """Is an item in view, and where (agent/localize.py): the camera threads' background model of the empty scene.

    With ``background`` or ``both`` the localizer decides presence before the model runs, and a frame with
    no item is not classified at all (``background``) and never published as a product.
    """

    mode: Literal["off", "empty_class", "background", "both"] = Field(
        "off", title="Presence detection",
        description="How an item in view is seen: an 'empty' class of the model, the localizer's background "
                    "model (agent/localize.py), or both (item when the localizer sees one and the model does not "
                    "say empty).")
    empty_class: str | None = Field(None, title="Empty class", description="Label meaning no item in view.")
    background_threshold: float = _finite(
        25.0, gt=0, le=255, title="Foreground threshold",
        description="Per-pixel colour difference (largest channel, 0..255) of the blurred, light-corrected frame "
                    "from the background above which a pixel is foreground; with background_noise_k, the "
                    "most it may be.")
    background_noise_k: float = _finite(
        0.0, ge=0, le=50, title="Threshold from the scene's noise",
        description="0: the fixed background_threshold. Above 0: each frame's threshold is this many times the "
                    "scene's own residual noise (from the lower quartile of the difference image), between "
                    "background_min_threshold and background_threshold: a dark, quiet belt gets a lower one, so "
                    "dark items on it are found whole.")
    background_min_threshold: float = _finite(
        8.0, gt=0, le=255, title="Lowest threshold from the noise",
        description="The lowest threshold background_noise_k may give.")
    background_grow_threshold: float = _finite(
        12.0, ge=0, le=255, title="Grow threshold",
        description="Below background_threshold: pixels differing by more than this that connect to a foreground "
                    "part large enough to be an item by itself (min_area) are foreground too (hysteresis), so a "
                    "dark item on a dark belt is found whole from its brighter parts, while dim differences with "
                    "no such part (noise, light residue) stay background: growing never makes an item out of an "
                    "empty scene. 0 (or at least the threshold): off.")
    background_grow_relative: float = _finite(
        0.12, ge=0, le=1, title="Grow threshold, relative to the light",
        description="A pixel grows (background_grow_threshold) only where its difference is also over this "
                    "share of the lit background's brightness there: light residue is proportional to the "
                    "light, so a light bench needs more than a dark belt. 0: the grow threshold alone.")
    background_alpha: float = _finite(0.05, gt=0, le=1, title="Background learning rate",
                                      description="How fast the background follows the scene while it is empty.")
    busy_alpha: float = _finite(0.005, ge=0, le=1, title="Background learning rate with an item",
                                description="While an item is in view the background learns at this rate outside "
                                            "the item's box (0: not at all).")
    work_size: int = Field(96, ge=24, le=512, title="Working size",
                           description="Longer side, px, of the shrunk copy of the ROI the background model works on.")
    texture_px: float = _finite(12.0, ge=0, le=200, title="Texture period",
                                description="Blur width in ROI px: about the period of the belt's ribs or texture, so "
                                            "a moving belt and sensor noise do not read as an item (0: no blur).")
    min_area: float = _finite(0.005, gt=0, le=1, title="Minimum item area",
                              description="Foreground parts smaller than this share of the ROI are ignored.")
    join_px: float = _finite(8.0, ge=0, le=1000, title="Join distance",
                             description="Foreground parts within this many ROI px of the largest one belong to the "
                                         "same item; farther parts are another item (the largest is reported).")
    max_gain: float = _finite(1.6, ge=1, le=10, title="Light drift bound",
                              description="Global light changes up to this ratio (either way) are divided out "
                                          "before comparing with the background.")
    max_local_gain: float = _finite(1.4, ge=1, le=10, title="Local light bound",
                                    description="Smooth local light changes (a spot light that moved, a gradient "
                                                "that turned) up to this ratio either side of the global one are "
                                                "divided out as a fitted gain field (1: one global gain only).")
    warmup_frames: int = Field(1, ge=1, le=1000, title="Warm-up frames",
                               description="The first frames of each camera are taken as the empty scene (start with "
                                           "the belt empty), unless an empty-scene image is given.")
    relearn_frames: int = Field(1800, ge=0, le=10_000_000, title="Relearn after",
                                description="An item in view this many frames in a row is taken as a changed scene: the "
                                            "background restarts from the current frame; the replaced one is "
                                            "restored when the view shows it again (the item taken away) (0: never).")
    empty_images: dict[str, Annotated[Path, AfterValidator(_no_nul)]] = Field(
        default_factory=dict, title="Empty-scene images",
        description="Camera id -> an image of that camera's empty ROI (or a whole frame that holds the ROI, "
                    "cropped by it; any other size is refused at the start); replaces the warm-up frames.")
    min_frames: int = Field(2, ge=1, le=10_000, title="Minimum frames", description="Frames an item must be seen to count as an item.")
    gap_frames: int = Field(2, ge=1, le=10_000, title="Gap frames", description="Empty frames that end an item.")
    max_frames: int = Field(300, ge=1, le=100_000, title="Maximum frames", description="An item seen longer is decided anyway.")
    split_overlap: float = _finite(0.2, ge=0, le=1, title="Split overlap",
                                   description="With the localizer: when an item's box overlaps the previous frame's by "
                                               "less than this share of the smaller box, it is another item (one "
                                               "taken away as the next is put down, with no empty frame between); "
                                               "0: never split.")
    regrow_split: float = _finite(2.0, ge=0, le=100, title="Regrow split",
                                  description="With the localizer: once an item's box, under half its largest "
                                              "area, reaches an ROI edge its largest box did not (it is going out), "
                                              "a box cut by the edge and this many times the smallest since, back "
                                              "over a quarter of the largest, is another item coming in as the "
                                              "first goes out, with no empty frame between; 0: never split this way "
                                              "(else more than 1).")
    whole_views: bool = Field(True, title="Decide on whole views",
                              description="With the localizer: an item is decided on its frames whose box stays off "
                                          "the ROI's edge (all of it in view), when it has any; else on all its "
                                          "frames.")

    @model_validator(mode="after")
    def _empty_class_needed(self) -> "PresenceConfig":
        if self.mode in ("empty_class", "both") and not self.empty_class:
            raise ValueError(f"empty_class: required when mode is {self.mode!r}")
        if self.min_frames > self.max_frames:       # every item would be cut at max_frames and dropped as noise
            raise ValueError(f"min_frames: {self.min_frames} is more than max_frames ({self.max_frames}): no item "
                             f"could ever be decided")
        if 0 < self.relearn_frames <= self.min_frames:     # a resting item learned into the scene before it counts
            raise ValueError(f"relearn_frames: {self.relearn_frames} must be 0 (never) or more than min_frames "
                             f"({self.min_frames}): an item at rest would become the background before it is one")
        if self.background_noise_k > 0 and self.background_min_threshold > self.background_threshold:
            # the threshold from the noise is clamped to [min, max]: with the two swapped it is always the maximum
            raise ValueError(f"background_min_threshold: {self.background_min_threshold:g} is more than "
                             f"background_threshold ({self.background_threshold:g}), the most the threshold from "
                             f"the noise (background_noise_k) may be: it would never adapt")
        if 0 < self.regrow_split <= 1:      # a box shrinking out of view would "regrow" at once: one item split
            raise ValueError(f"regrow_split: {self.regrow_split} must be 0 (off) or more than 1 (the box grows back "
                             f"to that many times its smallest)")
        return self

    @property
    def by_localizer(self) -> bool:
        """Presence comes (at least partly) from the localizer, before the model."""
        return self.mode in ("background", "both")


Lane = Annotated[str, Field(min_length=1, max_length=MAX_LANE_CHARS)]


class SortingConfig(_Strict):
    lanes: dict[str, Lane] = Field(default_factory=dict, title="Lanes by label",
                                   description="Label -> sort lane/bin (1 to 256 characters, as every lane).")
    default_lane: str = Field("default", min_length=1, max_length=MAX_LANE_CHARS, title="Default lane",
                              description="Lane for labels not listed.")
    review_lane: str = Field("manual-review", min_length=1, max_length=MAX_LANE_CHARS, title="Review lane",
                             description="Lane for items decided with low confidence.")
    min_agreement: float = Field(0.5, ge=0, le=1, title="Minimum agreement",
                                 description="Share of an item's frames that must agree with its decision, else review.")
    review_budget: float | None = _finite(
        0.1, gt=0, le=1, title="Review budget",
        description="At most about this share of items to the review lane: an item the thresholds flag goes there "
                    "only while fewer than this share of the camera's last review_window items were less certain; "
                    "the others are sorted by their label (an unknown item always goes to review). null: every "
                    "flagged item goes to review, however many (15-45% of the station-view benchmark's items, "
                    "docs/benchmarks.md).")
    review_window: int = Field(200, ge=10, le=100_000, title="Review budget window",
                               description="Recent items per camera the review budget ranks an item among.")


class ReceivingConfig(_Strict):
    """Receiving against a shipment's expected lines (cmd/expect, agent/receiving.py)."""

    expected_weight: float = _finite(
        2.0, ge=1, le=1000, title="Expected-label weight",
        description="While a shipment is open, an item's consensus probabilities are multiplied by this for "
                    "labels the shipment still expects (1 for the others) and renormalized before it is decided. "
                    "1: the shipment does not sway decisions.")
    expected_unknown_keep: float | None = _finite(
        0.999, gt=0, le=1, title="Unknown verdict on expected items",
        description="While a shipment is open, an item decided sure (no low-confidence reason) on a label the "
                    "shipment still expects is decided 'unknown' only when its score is above the bundle's threshold "
                    "that keeps this share of known items (the export's keep_thresholds, at or above it; the "
                    "camera's own threshold when that is higher): the shipment vouches for it, so the 5% of known "
                    "items the usual threshold rejects are not reported as discrepancies. null, or a bundle exported "
                    "without keep_thresholds: the camera's threshold for every item.")
    receipt_interval_s: float = _finite(
        0.0, ge=0, le=HOUR_S, title="Receipt interval",
        description="0: a receipt after every decided item; above 0: at most one receipt in this time (the "
                    "items between are in the next one). Closing a shipment always publishes the final receipt.")
    max_refs: int = Field(50, ge=1, le=100, title="References per line",
                          description="Decisions listed behind each discrepancy of a receipt (a line's most "
                                      "doubtful, review and unknown items the newest; the others are counted in "
                                      "refs_left_off).")


class QcConfig(_Strict):
    defect_classes: list[str] = Field(default_factory=list, title="Defect classes", description="Labels that raise an alert.")
    min_confidence: float = Field(0.5, ge=0, le=1, title="Alert confidence", description="Minimum probability of a defect to alert.")
    cooldown_s: float = Field(10.0, ge=0, le=DAY_S, title="Cooldown", description="Per camera and label, at most one frame alert in this time.")


class DecisionsConfig(_Strict):
    top_k: int = Field(3, ge=1, le=20, title="Top-k", description="Classes reported per result.")
    presence: PresenceConfig = Field(default_factory=PresenceConfig, title="Presence", description="Item presence.")
    sorting: SortingConfig = Field(default_factory=SortingConfig, title="Sorting", description="Lane mapping.")
    qc: QcConfig = Field(default_factory=QcConfig, title="QC", description="Defect alerts.")
    receiving: ReceivingConfig = Field(default_factory=ReceivingConfig, title="Receiving",
                                       description="Decisions and receipts while a shipment is open (cmd/expect).")
    unknown_items: bool = Field(
        False, title="Unknown items",
        description="Decide a frame or item whose unknown score is above the threshold 'unknown' (the review lane, "
                    "uploaded for labelling, counted apart in receipts). Off: the score is not computed (unless "
                    "unknown_score asks for it) and never changes a decision. Off by default: at the bundle's 95% "
                    "keep it costs the documented recipe's bundle 3-4.5 points of item accuracy on the 200-item "
                    "station-view scenes (its Mahalanobis score; 6-11 with knn; docs/open-set.md); turn it on "
                    "where unknown products arrive, e.g. receiving docks.")
    unknown_score: bool = Field(
        False, title="Unknown score when off",
        description="With unknown_items off, still compute each frame's unknown score and publish it "
                    "(unknown_score), to watch it before turning the verdict on. Off by default: on a CPU station "
                    "with a small model an embedding score (knn, mahalanobis) costs about as much as the model's "
                    "forward pass (docs/agent.md). With unknown_items on the score is always computed.")
    publish_results: bool = Field(True, title="Publish results", description="Publish every per-frame result.")
    empty_frames: Literal["skip", "publish"] = Field(
        "skip", title="Empty frames",
        description="A frame in which presence sees no item: skip (no result) or publish a result with "
                    "present: false and no label. Either way it is counted (frames_empty_total), never "
                    "low-confidence and never uploaded.")


class FramesConfig(_Strict):
    enabled: bool = Field(True, title="Upload frames", description="Send low-confidence frames back for retraining.")
    jpeg_quality: int = Field(90, ge=10, le=100, title="JPEG quality", description="Encoder quality 10..100.")
    crop_roi: bool = Field(True, title="Crop to ROI", description="Send the ROI crop (True) or the full frame.")
    min_interval_s: float = Field(2.0, ge=0, le=DAY_S, title="Rate limit",
                                  description="Per camera, at most one frame per this many seconds: the least certain "
                                              "of each interval, sent when it ends.")
    dedupe_bits: int = Field(6, ge=0, le=64, title="Duplicate distance",
                             description="dHash Hamming distance at or below which a frame counts as a near-duplicate.")
    dedupe_window: int = Field(32, ge=0, le=4096, title="Duplicate memory", description="Recent hashes per camera compared against.")
    item_views: bool = Field(
        True, title="Item views",
        description="With item decisions: also send the best view of each item decided unsure (review or unknown), "
                    "all of it in view where a frame shows it so, once per item and not held back by the rate limit "
                    "(a near-duplicate of a recent upload is); it names the item's decision.")
    empty_scene_interval_s: float = _finite(
        3600.0, ge=0, le=7 * DAY_S, title="Empty-scene interval",
        description="Per camera, send one empty-scene frame (the ROI when the localizer sees nothing in view) this "
                    "often, for training on the station's real background; 0: only on cmd/capture-empty.")
    empty_scene_wait_s: float = _finite(
        600.0, gt=0, le=DAY_S, title="Empty-scene wait",
        description="A requested or scheduled empty-scene frame waits at most this long for an empty scene; then it "
                    "is given up and counted.")
    empty_scene_spacing_s: float = _finite(
        2.0, ge=0, le=HOUR_S, title="Empty-scene spacing",
        description="Per camera, at least this many seconds between the empty-scene frames of one command.")


class HealthConfig(_Strict):
    stats_interval_s: float = Field(10.0, ge=0.1, le=HOUR_S, title="Stats interval",
                                    description="Seconds between stats messages (one more is sent at a clean stop).")
    prometheus_port: int | None = Field(None, ge=0, le=65535, title="Prometheus port",
                                        description="Serve /metrics on this port; None: off; 0: any free port.")
    prometheus_host: str = Field("127.0.0.1", title="Prometheus address", description="Address the endpoint binds to.")
    latency_window: int = Field(2048, ge=16, le=1_000_000, title="Latency window", description="Recent samples used for percentiles.")


class AgentConfig(_Strict):
    site: str = Field(..., pattern=r"^[A-Za-z0-9_-]+$", max_length=MAX_ID_CHARS, title="Site",
                      description="Warehouse site id (at most 64 characters).")
    station: str = Field(..., pattern=r"^[A-Za-z0-9_-]+$", max_length=MAX_ID_CHARS, title="Station",
                         description="Station id, unique per site (at most 64 characters).")
    role: Literal["receiving", "sorting", "qc"] = Field("receiving", title="Role", description="What this station does.")
    model: ModelConfig = Field(..., title="Model", description="Bundle and backend.")
    cameras: list[CameraConfig] = Field(..., min_length=1, max_length=MAX_CAMERAS, title="Cameras",
                                        description="One or more camera sources, at most 32 (one station).")
    mqtt: MqttConfig = Field(default_factory=MqttConfig, title="MQTT", description="Broker connection.")
    outbox: OutboxConfig = Field(default_factory=OutboxConfig, title="Outbox", description="Durable queue.")
    decisions: DecisionsConfig = Field(default_factory=DecisionsConfig, title="Decisions", description="Per-item logic.")
    frames: FramesConfig = Field(default_factory=FramesConfig, title="Frames", description="Low-confidence uploads.")
    health: HealthConfig = Field(default_factory=HealthConfig, title="Health", description="Stats and metrics.")
    shutdown_flush_s: float = Field(5.0, ge=0, le=HOUR_S, title="Shutdown flush", description="On SIGTERM, time allowed to drain the outbox.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", title="Log level", description="Root log level.")

    @model_validator(mode="after")
    def _empty_images_name_cameras(self) -> "AgentConfig":
        unknown = sorted(set(self.decisions.presence.empty_images) - {c.id for c in self.cameras})
        if unknown:
            raise ValueError(f"decisions.presence.empty_images: no camera with id {', '.join(unknown)}")
        return self

    @field_validator("cameras", mode="before")
    @classmethod
    def _at_most_max_cameras(cls, cameras: Any) -> Any:
        """Counted before any camera is checked: a file of thousands is refused in one line, not one per camera."""
        if isinstance(cameras, list) and len(cameras) > MAX_CAMERAS:
            raise ValueError(f"{len(cameras)} cameras; one station runs at most {MAX_CAMERAS} (each is a capture "
                             f"thread and a decoder on the one device)")
        return cameras

    @field_validator("cameras")
    @classmethod
    def _unique_ids(cls, cameras: list[CameraConfig]) -> list[CameraConfig]:
        ids = [c.id for c in cameras]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"camera ids must be unique, repeated: {', '.join(dupes)}")
        return cameras

    @field_validator("cameras")
    @classmethod
    def _one_camera_per_device(cls, cameras: list[CameraConfig]) -> list[CameraConfig]:
        """A V4L2 device or a CSI sensor serves one capture at a time: a second camera on it would never open
        (or steal the first one's frames), retrying for good while validate-config said OK."""
        first: dict[str, int] = {}
        for i, cam in enumerate(cameras):
            device = exclusive_device(cam.uri)
            if device is None:
                continue
            if device in first:
                j = first[device]
                other = cameras[j]
                raise ValueError(f"cameras[{j}] ({other.id}, {other.uri!r}) and cameras[{i}] ({cam.id}, {cam.uri!r}) "
                                 f"both open {device}, which serves one capture at a time; give each camera its "
                                 f"own device")
            first[device] = i
        return cameras

    @model_validator(mode="after")
    def _role_can_be_done(self) -> "AgentConfig":
        """A role set against the decisions it needs (roles qc and sorting are never the default): a QC station
        that names no defect class never alerts; a sorting station without presence decides no item, so gives no
        item a lane. (role receiving with presence off is the default pair: warned about, ``role_warnings``.)"""
        if self.role == "qc" and not self.decisions.qc.defect_classes:
            raise ValueError("role: qc needs decisions.qc.defect_classes (the labels that raise an alert); with "
                             "none this station never alerts")
        if self.role == "sorting" and self.decisions.presence.mode == "off":
            raise ValueError("role: sorting needs decisions.presence.mode background, empty_class or both; with "
                             "presence off no item is decided, so none is given a lane")
        return self

    @property
    def topic_root(self) -> str:
        return self.mqtt.topic_root or station_root(self.site, self.station)

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or f"agent-{self.site}-{self.station}"


def exclusive_device(uri: str) -> str | None:
    """The device a camera URI holds for itself, the same name for every spelling of it (``0``, ``usb://0`` and
    ``v4l2:///dev/video0`` are one V4L2 device, a symlink such as /dev/v4l/by-id/... resolved where it exists);
    None for sources many cameras may share (files, folders, RTSP) or cannot be told apart (``gst://``)."""
    from urllib.parse import unquote, urlparse

    if uri.isdigit():
        return f"/dev/video{int(uri)}"
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    number = parsed.netloc or parsed.path.strip("/") or "0"
    if scheme == "usb" and number.isdigit():
        return f"/dev/video{int(number)}"
    if scheme == "v4l2":
        return os.path.realpath(unquote(parsed.path))
    if scheme == "csi" and number.isdigit():
        return f"CSI sensor {int(number)}"
    return None


def role_warnings(cfg: AgentConfig) -> list[str]:
    """What the station's role promises and its decisions cannot do. Not refused: ``role: receiving`` and
    ``decisions.presence.mode: off`` are both defaults, so every config that sets neither is such a station."""
    warnings = []
    if cfg.role == "receiving" and cfg.decisions.presence.mode == "off":
        warnings.append("role receiving with decisions.presence.mode off: no item is ever decided, so a shipment "
                        "opened by cmd/expect never counts one (set decisions.presence.mode to background, "
                        "empty_class or both)")
    return warnings


# ---------------------------------------------------------------- loading

MAX_CONFIG_BYTES = 1 << 20      # a station config is a few kB; a larger "config" is the wrong file
# Values (mappings, lists, scalars) one file may hold, an alias (*name) counted at every use: a station config holds
# a few hundred (a sorting station's lanes one per label). Without the bound, 500 bytes of nested aliases ("billion
# laughs") expand to 10^9 values that the validator walks and an error message quotes until memory runs out.
MAX_CONFIG_VALUES = 100_000


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s reading, except that a key given twice in one mapping is an error: safe_load keeps the
    last one silently, so a second ``cameras:`` would drop the first list and a second ``fps:`` the first value.
    Merge keys (``<<: *base``) still override what they merge, as YAML defines."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    mark = first.setdefault(key, key_node.start_mark)
                except TypeError:       # an unhashable key: the base class refuses it with its own message
                    continue
                if mark is not key_node.start_mark:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"key {printable(repr(key)[:80])} given twice (first on line {mark.line + 1})",
                        key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


class _AliasCycle(Exception):
    pass


def _expanded_values(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """How many values ``node`` holds with every alias expanded (each node's count is computed once, so this is
    linear in the file however far the aliases expand); _AliasCycle for a value that contains itself."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise _AliasCycle
    open_nodes.add(key)
    if isinstance(node, yaml.SequenceNode):
        count = 1 + sum(_expanded_values(child, sizes, open_nodes) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        count = 1 + sum(_expanded_values(k, sizes, open_nodes) + _expanded_values(v, sizes, open_nodes)
                        for k, v in node.value)
    else:
        count = 1
    open_nodes.discard(key)
    sizes[key] = count
    return count


def _parse_yaml(path: Path, text: str) -> Any:
    """The document of ``text``: duplicate keys refused, and its size with aliases expanded bounded before any
    value is built from it."""
    loader = _ConfigLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        try:
            values = _expanded_values(node, {}, set())
        except _AliasCycle:
            raise ConfigError(f"{path}: not valid YAML (an alias refers to a value that contains it)") from None
        if values > MAX_CONFIG_VALUES:
            raise ConfigError(f"{path}: holds {values} values, aliases (*name) counted at every use; more than "
                              f"{MAX_CONFIG_VALUES} is not a station config")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _read_yaml(path: Path) -> dict[str, Any]:
    """One YAML file as a mapping; anything else (unreadable, not UTF-8, empty, a list, a key given twice, more
    than MAX_CONFIG_VALUES values with its aliases expanded) is a ConfigError."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes; not a station config")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}: {raw[exc.start:exc.start + 1]!r})") from None
    try:
        data = _parse_yaml(path, text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML ({where}{exc.problem or exc.context})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML (nested too deeply)") from None
    if data is None:
        raise ConfigError(f"{path}: empty file (expected a mapping of config keys)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; anything else (lists included) is replaced by ``over``."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _resolve_paths(data: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """Relative file paths in a layer are relative to that layer's file, not the working dir."""
    pairs = [("model", "bundle"), ("model", "public_key"), ("model", "download_dir"),
             ("outbox", "path"), ("mqtt", "password_file")]
    out = dict(data)
    for section, key in pairs:
        block = out.get(section)
        if isinstance(block, dict) and isinstance(block.get(key), str) and not Path(block[key]).is_absolute():
            out[section] = {**block, key: str(base_dir / block[key])}
    presence = (out.get("decisions") or {}).get("presence") if isinstance(out.get("decisions"), dict) else None
    if isinstance(presence, dict) and isinstance(presence.get("empty_images"), dict):
        images = {k: str(base_dir / v) if isinstance(v, str) and not Path(v).is_absolute() else v
                  for k, v in presence["empty_images"].items()}
        out["decisions"] = {**out["decisions"], "presence": {**presence, "empty_images": images}}
    tls = out.get("mqtt", {}).get("tls") if isinstance(out.get("mqtt"), dict) else None
    if isinstance(tls, dict):
        fixed = {k: str(base_dir / v) if k.endswith("_file") and isinstance(v, str) and not Path(v).is_absolute() else v
                 for k, v in tls.items()}
        out["mqtt"] = {**out["mqtt"], "tls": fixed}
    if isinstance(out.get("cameras"), list):
        out["cameras"] = [{**cam, "uri": camera_uri_from(cam["uri"], base_dir)}
                          if isinstance(cam, dict) and isinstance(cam.get("uri"), str) else cam
                          for cam in out["cameras"]]
    return out


def camera_uri_from(uri: str, base_dir: Path) -> str:
    """``uri`` with a relative file or folder path (``belt.mp4``, ``frames/``, ``file:belt.mp4``) made absolute under
    ``base_dir`` (the config file's folder), as every other path of the file is; anything else (a device number, an
    absolute path, a live camera, a URI the validator will refuse) as it is."""
    from urllib.parse import quote, urlparse, urlunparse

    if not uri or uri.isdigit():        # a bare device number (usb://N)
        return uri
    try:
        parsed = urlparse(uri)
    except ValueError:                  # e.g. an unclosed [ in a host: refused by the URI check, naming it
        return uri
    scheme = parsed.scheme.lower()
    if scheme == "" and not Path(uri).is_absolute():
        return str(base_dir / uri)
    if scheme == "file" and not parsed.netloc and parsed.path and not parsed.path.startswith("/"):
        path = f"{quote(str(base_dir))}/{parsed.path}"
        return urlunparse((parsed.scheme, "", path, parsed.params, parsed.query, parsed.fragment))
    return uri


MAX_EXTENDS_DEPTH = 8     # fleet -> site -> line -> station is 4; a chain twice that long is a mistake
MAX_EXTENDS_FILES = 32    # files read for one config through extends (a file two layers extend counts twice)

class Origins:
    """Which file each key path of a merged config comes from: the last layer that set it, as ``deep_merge`` keeps
    it (a tree of key paths, so marking a layer is linear in its size)."""

    def __init__(self) -> None:
        self.file: Path | None = None
        self.below: dict[Any, Origins] = {}

    def mark(self, layer: dict[Any, Any], path: Path) -> None:
        """``layer`` (from ``path``) merged over what this describes: below a value that is not a mapping, nothing of
        an earlier layer is left."""
        for key, value in layer.items():
            node = self.below.setdefault(key, Origins())
            node.file = path
            if isinstance(value, dict):
                node.mark(value, path)
            else:
                node.below = {}

    def files(self, loc: tuple[Any, ...]) -> set[Path]:
        """The files the value at ``loc`` comes from: the deepest key path of ``loc`` found, and when that is ``loc``
        itself (a mapping merged from several layers), every file under it. Empty for the top level."""
        node = self
        for key in loc:
            child = node.below.get(key) if isinstance(key, (str, int, float, bool)) or key is None else None
            if child is None:
                return {node.file} if node.file is not None else set()
            node = child
        if node is self:
            return set()
        found: set[Path] = set()
        stack = [node]
        while stack:
            here = stack.pop()
            if here.file is not None:
                found.add(here.file)
            stack.extend(here.below.values())
        return found


def load_layers(path: str | Path, _seen: tuple[Path, ...] = (), *, origins: Origins | None = None,
                _read: list[int] | None = None) -> dict[str, Any]:
    """The merged raw mapping of a file and the files it ``extends`` (paths relative to each file). ``origins``,
    when given, gets the file each key path of the result comes from, so an error can name the file to fix."""
    read = [0] if _read is None else _read
    try:
        path = Path(path).resolve()
    except (OSError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"{path}: cannot read ({exc})") from exc
    if path in _seen:
        raise ConfigError(f"{path}: extends itself (cycle: {' -> '.join(map(str, _seen + (path,)))})")
    if len(_seen) >= MAX_EXTENDS_DEPTH:
        raise ConfigError(f"{path}: more than {MAX_EXTENDS_DEPTH} files deep in extends")
    read[0] += 1
    if read[0] > MAX_EXTENDS_FILES:
        raise ConfigError(f"{path}: more than {MAX_EXTENDS_FILES} files read through extends")
    data = _read_yaml(path)
    parents = data.pop("extends", None)
    if isinstance(parents, str):
        parents = [parents]
    if parents is not None and not (isinstance(parents, list) and all(isinstance(p, str) for p in parents)):
        raise ConfigError(f"{path}: field extends: expected a path or a list of paths")
    merged: dict[str, Any] = {}
    for parent in parents or []:
        try:
            layer = load_layers(path.parent / parent, _seen + (path,), origins=origins, _read=read)
        except ConfigError as exc:
            raise ConfigError(f"{path}: field extends: {exc}") from None
        merged = deep_merge(merged, layer)
    own = _resolve_paths(data, path.parent)
    if origins is not None:
        origins.mark(own, path)
    return deep_merge(merged, own)


def printable(text: str) -> str:
    """``text`` on one line: control characters (a key such as ``"a\\nb"`` in a file) escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _short_repr() -> reprlib.Repr:
    """repr() cut short: an error quotes what it got, and that may be a list of 100,000 items."""
    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxtuple, short.maxdict = 3, 6, 6, 6
    short.maxstring, short.maxlong, short.maxother = 80, 40, 80
    return short


_SHORT = _short_repr()
MAX_PROBLEM_LINES = 50      # one line per problem; past this, a last line says how many more there are


def _set_in(loc: tuple[Any, ...], origins: Origins | None, top: Path | None) -> str:
    """`` (set in FILE)`` when the value at ``loc`` comes from a file other than ``top`` (a parent layer)."""
    if origins is None or top is None:
        return ""
    files = origins.files(loc)
    if not files or files == {top}:
        return ""
    return f" (set in {', '.join(sorted(map(str, files)))})"


def format_errors(path: Path, exc: ValidationError, origins: Origins | None = None,
                  prefix: tuple[Any, ...] = ()) -> list[str]:
    """One line per problem: file, dotted field path (under ``prefix``), what was expected; with ``origins``
    (``load_layers``), the layer a value comes from when it is not ``path`` itself."""
    lines = []
    try:
        top = Path(path).resolve() if origins is not None else None
    except (OSError, ValueError, RuntimeError):
        top = None
    for err in exc.errors():
        loc = prefix + tuple(err["loc"])
        where = ".".join(str(p) for p in loc) or "(top level)"
        got = err.get("input")
        if isinstance(got, str):
            from agent.sources.base import redact_uri     # here: agent.sources imports agent.config

            got = redact_uri(got)      # a camera URI's password is not echoed into a log or a terminal
        got_text = "" if isinstance(got, dict) or err["type"] == "missing" else f" (got {_SHORT.repr(got)})"
        lines.append(f"{path}: field {printable(where)}: {printable(err['msg'] + got_text)}"
                     f"{_set_in(loc, origins, top)}")
    return lines


def _at_most(path: Path, lines: list[str], most: int = MAX_PROBLEM_LINES) -> list[str]:
    if len(lines) <= most:
        return lines
    return lines[:most] + [f"{path}: and {len(lines) - most} more problems"]


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> AgentConfig:
    """Load, merge and validate a device config; raise ConfigError listing every problem."""
    path = Path(path)
    origins = Origins()
    data = deep_merge(load_layers(path, origins=origins), overrides or {})
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("\n".join(_at_most(path, format_errors(path, exc, origins)))) from exc


DEVICE_KEYS = ("station", "cameras")


def is_defaults_layer(path: str | Path) -> bool:
    """A layer other files extend (the fleet's defaults, a site's: ``extends`` and ``site`` allowed): it names no
    station and no cameras, so it is only partly checkable. A file with either is a station's file and must be
    complete (cameras included)."""
    data = _read_yaml(Path(path))
    return not any(key in data for key in DEVICE_KEYS)


def validate_layer(path: str | Path) -> list[str]:
    """Check a layer: every key it (and what it extends) has must be a known section with valid values."""
    path = Path(path)
    origins = Origins()
    data = load_layers(path, origins=origins)
    problems: list[str] = []
    fields = AgentConfig.model_fields
    for key, value in data.items():
        if key not in fields:
            problems.append(f"{path}: field {printable(str(key))}: unknown key (expected one of {', '.join(fields)})"
                            f"{_set_in((key,), origins, Path(path).resolve())}")
            continue
        try:
            _layer_adapter(key).validate_python(value)
        except ValidationError as exc:
            problems += format_errors(path, exc, origins, prefix=(key,))
    return problems


def _is_model(annotation: Any) -> bool:
    """A pydantic model class. On Python 3.10 (the Jetson image's) ``list[str]`` passes ``isinstance(_, type)`` and
    then fails ``issubclass``: a generic alias is never a model."""
    return (isinstance(annotation, type) and not isinstance(annotation, types.GenericAlias)
            and issubclass(annotation, BaseModel))


def _layer_adapter(key: str) -> TypeAdapter:
    """A validator for one top-level key with the field's own bounds (and, like the models, no NaN or infinity)."""
    info = AgentConfig.model_fields[key]
    ann = info.annotation
    is_model = _is_model(ann)
    return TypeAdapter(Annotated[ann, info], config=None if is_model else ConfigDict(allow_inf_nan=False))


def validate_file(path: str | Path) -> list[str]:
    """Problems of one file (empty list: valid). Device files are merged with what they extend."""
    return check_file(path)[0]


def check_file(path: str | Path) -> tuple[list[str], list[str]]:
    """(problems, warnings) of one file: problems as ``validate_file``; warnings (``role_warnings``, each line
    naming the file) for a valid device file."""
    path = Path(path)
    try:
        if is_defaults_layer(path):
            return _at_most(path, validate_layer(path)), []
        cfg = load_config(path)
    except ConfigError as exc:
        return str(exc).splitlines(), []
    return [], [f"{path}: warning: {text}" for text in role_warnings(cfg)]


def _type_name(ann: Any) -> str:
    import types
    from typing import Union, get_args, get_origin

    origin, args = get_origin(ann), get_args(ann)
    if origin is Literal:
        return " / ".join(f"`{a}`" for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return "mapping"
    return "null" if ann is type(None) else getattr(ann, "__name__", str(ann))


def _default_text(value: Any) -> str:
    if isinstance(value, Path):
        return f"`{value}`"
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{json_default(value)}`"


def json_default(value: Any) -> str:
    import json

    try:
        return json.dumps(value)
    except TypeError:
        return str(value)


def config_reference_markdown() -> str:
    """The config reference for docs/agent.md, from the same titles and descriptions the validator uses."""
    lines = ["| key | type | default | description |", "|---|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            key = f"{prefix}{name}"
            ann = info.annotation
            nested = next((a for a in (ann, *getattr(ann, "__args__", ())) if _is_model(a)), None)
            default = "required" if info.is_required() else _default_text(info.get_default(call_default_factory=True))
            type_name = _type_name(ann)
            # a section's own row too: it says whether the section may be left out (cameras[].roi: null)
            lines.append(f"| `{key}` | {type_name.replace('|', '&#124;')} | {default.replace('|', '&#124;')} | "
                         f"{info.description or info.title or ''} |")
            if nested is not None:
                walk(nested, f"{key}[]." if key == "cameras" else f"{key}.")

    walk(AgentConfig, "")
    return "\n".join(lines)
