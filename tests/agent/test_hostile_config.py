"""Hostile input to a station: config files, the outbox path, station-state.json, and what a camera delivers.

Every case ends in a refusal that names the file and the field (exit 2 from ``python -m agent run``, never a
traceback), or, for a camera, in a counted and logged error while the camera thread goes on.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import numpy as np
import pytest
import yaml
from agent_support import station_config, write_yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from agent.__main__ import main
from agent.config import AgentConfig, CameraConfig, ConfigError, load_config, load_layers, validate_file
from agent.health import Metrics
from agent.outbox import Outbox, OutboxError
from agent.sources.base import EndOfStream, SourceError
from agent.sources.camera import BAD_FRAMES_BEFORE_RECONNECT, CameraWorker, FrameHub, Watchdog
from agent.state import STATE_FILE, StationState

REPO = Path(__file__).resolve().parents[2]
STATIONS = sorted((REPO / "firmware-config" / "stations").glob("*.yaml"))
# The firmware-config station files, each merged with its defaults: the valid documents the mutations start from.
BASES = [load_layers(path) for path in STATIONS] + [yaml.safe_load((REPO / "firmware-config/defaults.yaml").read_text())]


def _device(tmp_path: Path, body: str, name: str = "dev.yaml") -> Path:
    path = tmp_path / name
    path.write_text("site: s\nstation: t\nmodel: {bundle: b}\ncameras: [{id: a, uri: x.mp4}]\n" + body)
    return path


def _refused(path: Path) -> list[str]:
    """validate_file's lines for a file that must be refused; each names the file."""
    problems = validate_file(path)
    assert problems, f"{path} was accepted"
    assert all(line.startswith(str(path)) for line in problems), problems
    return problems


# ---------------------------------------------------------------- files that are not a station config

@pytest.mark.parametrize("body, expected", [
    (b"site: s\xff\xfe\n", "not UTF-8 text"),
    (b"", "empty file"),
    (b"# only a comment\n", "empty file"),
    (b"- a\n- b\n", "expected a mapping at the top level, got list"),
    (b"just text\n", "expected a mapping at the top level, got str"),
    (b"site: [unclosed\n", "not valid YAML (line 2"),
    (b"[" * 1500, "not valid YAML"),
], ids=["non-utf8", "empty", "comment-only", "list", "scalar", "broken", "deeply-nested"])
def test_a_file_that_is_no_config_is_refused_by_name(tmp_path, body, expected, capsys):
    path = tmp_path / "station.yaml"
    path.write_bytes(body)
    assert expected in _refused(path)[0]
    with pytest.raises(ConfigError, match="station.yaml"):
        load_config(path)
    assert main(["validate-config", str(path)]) == 1
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(path) in err


def test_validate_config_refuses_a_station_without_cameras(tmp_path, capsys):
    path = tmp_path / "no-cameras.yaml"
    path.write_text("site: s\nstation: t\nmodel: {bundle: b}\n")
    assert _refused(path) == [f"{path}: field cameras: Field required"]
    (tmp_path / "empty-list.yaml").write_text("site: s\nstation: t\nmodel: {bundle: b}\ncameras: []\n")
    assert "field cameras: List should have at least 1 item" in _refused(tmp_path / "empty-list.yaml")[0]
    assert main(["validate-config", str(path)]) == 1 and "OK" not in capsys.readouterr().out


def test_a_missing_parent_layer_is_named_with_the_file_that_extends_it(tmp_path):
    path = tmp_path / "dev.yaml"
    path.write_text("extends: nowhere.yaml\nsite: s\n")
    assert _refused(path) == [f"{path}: field extends: {tmp_path / 'nowhere.yaml'}: cannot read "
                              "(No such file or directory)"]


# ---------------------------------------------------------------- numbers

def _float_fields(model: type[BaseModel], prefix: tuple = ()) -> list[tuple]:
    """Every float field of the schema as a path into a config mapping (cameras as cameras[0])."""
    out = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        args = get_args(ann) if get_origin(ann) in (Union, types.UnionType) else (ann,)
        if float in args:
            out.append(prefix + (name,))
        for arg in args:
            if get_origin(arg) is list and isinstance(get_args(arg)[0], type) and issubclass(get_args(arg)[0], BaseModel):
                out += _float_fields(get_args(arg)[0], prefix + (name, 0))
            elif isinstance(arg, type) and not isinstance(arg, types.GenericAlias) and issubclass(arg, BaseModel):
                out += _float_fields(arg, prefix + (name,))
    return out


FLOAT_FIELDS = _float_fields(AgentConfig)


def _set(data: Any, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        if isinstance(key, int):
            data = data[key]
        else:
            data = data.setdefault(key, {})
    data[path[-1]] = value


def _dotted(path: tuple) -> str:
    return ".".join(map(str, path))


def test_the_schema_has_the_float_fields_the_probe_named():
    named = {_dotted(p) for p in FLOAT_FIELDS}
    assert {"health.stats_interval_s", "cameras.0.thresholds.min_confidence", "mqtt.reconnect.max_s",
            "cameras.0.reconnect.factor", "decisions.presence.background_threshold"} <= named
    assert len(FLOAT_FIELDS) > 30


@pytest.mark.parametrize("literal", [".inf", "-.inf", ".nan", "1e999", "-1e999"])
@pytest.mark.parametrize("field", FLOAT_FIELDS, ids=_dotted)
def test_no_float_field_accepts_a_non_finite_number(tmp_path, field, literal):
    data = station_config(tmp_path, tmp_path / "bundle", "x.mp4", 1883)
    _set(data, field, "@@")
    path = tmp_path / "dev.yaml"
    path.write_text(yaml.safe_dump(data).replace("'@@'", literal))
    assert any(line.startswith(f"{path}: field {_dotted(field)}: ") for line in _refused(path))


@pytest.mark.parametrize("body, expected", [
    ("shutdown_flush_s: .inf\n", "field shutdown_flush_s: Input should be a finite number (got inf)"),
    ("shutdown_flush_s: -5\n", "field shutdown_flush_s: Input should be greater than or equal to 0 (got -5)"),
    ("health: {stats_interval_s: .nan}\n", "field health.stats_interval_s: Input should be a finite number (got nan)"),
], ids=["inf", "negative", "nested-nan"])
def test_a_defaults_layer_is_held_to_the_same_bounds(tmp_path, body, expected):
    path = tmp_path / "defaults.yaml"
    path.write_text("log_level: INFO\n" + body)
    assert _refused(path) == [f"{path}: {expected}"]


@pytest.mark.parametrize("field, value", [
    ("health.stats_interval_s", 1e9), ("health.stats_interval_s", 1e-300), ("health.latency_window", 10**12),
    ("mqtt.reconnect.max_s", 1e12), ("mqtt.reconnect.factor", 1e6), ("mqtt.keepalive_s", 10**9),
    ("cameras.0.queue_size", 10**6), ("cameras.0.stall_timeout_s", 1e12), ("cameras.0.fps", 1e9),
    ("cameras.0.width", 10**7), ("outbox.max_bytes", 10**20), ("outbox.max_age_s", 1e15),
    ("shutdown_flush_s", 1e10), ("frames.dedupe_window", 10**9), ("decisions.presence.max_frames", 10**9),
])
def test_huge_values_where_a_bound_makes_sense_are_refused(tmp_path, field, value):
    data = station_config(tmp_path, tmp_path / "bundle", "x.mp4", 1883)
    _set(data, tuple(int(k) if k.isdigit() else k for k in field.split(".")), value)
    path = write_yaml(tmp_path / "dev.yaml", data)
    assert any(line.startswith(f"{path}: field {field}: ") for line in _refused(path))


@pytest.mark.parametrize("camera", [
    "{id: a, uri: x, width: 640, height: 480, roi: {x: 700, y: 0, width: 10, height: 10}}",
    "{id: a, uri: x, width: 640, height: 480, roi: {x: 600, y: 400, width: 100, height: 100}}",
    "{id: a, uri: x, roi: {x: 0, y: 0, width: 0, height: 10}}",
    "{id: a, uri: x, roi: {x: -1, y: 0, width: 10, height: 10}}",
], ids=["outside", "partly-outside", "zero-area", "negative"])
def test_an_roi_outside_the_configured_frame_or_of_no_area_is_refused(tmp_path, camera):
    path = tmp_path / "dev.yaml"
    path.write_text(f"site: s\nstation: t\nmodel: {{bundle: b}}\ncameras: [{camera}]\n")
    assert any(line.startswith(f"{path}: field cameras.0") and "roi" in line for line in _refused(path))


def _cameras(n: int) -> str:
    return "cameras:\n" + "".join(f"  - {{id: c{i}, uri: 'rtsp://10.20.1.11:554/{i}'}}\n" for i in range(n))


def test_a_station_runs_at_most_max_cameras_and_more_is_refused_in_one_line(tmp_path):
    """Each camera is a capture thread and a decoder on one Jetson (1 to 8 of them at a station): a damaged or
    generated file with thousands is refused naming the field and the count, once, not per camera."""
    from agent.config import MAX_CAMERAS

    ok = tmp_path / "ok.yaml"
    ok.write_text("site: s\nstation: t\nmodel: {bundle: b}\n" + _cameras(MAX_CAMERAS))
    assert len(load_config(ok).cameras) == MAX_CAMERAS == 32
    for n in (MAX_CAMERAS + 1, 5000):
        path = tmp_path / f"dev{n}.yaml"
        path.write_text("site: s\nstation: t\nmodel: {bundle: b}\n" + _cameras(n))
        (line,) = _refused(path)
        assert line.startswith(f"{path}: field cameras: Value error, {n} cameras; one station runs at most 32 "), line
        assert len(line) < len(str(path)) + 1000      # the input quoted cut short (six entries)


def test_the_camera_bound_stays_within_what_the_stats_and_status_schemas_take():
    from agent.config import MAX_CAMERAS
    from contract.messages import mqtt_schema

    for name, key in [("stats.v1", "fps"), ("stats.v1", "latency"), ("status.v1", "cameras")]:
        assert MAX_CAMERAS <= mqtt_schema(name)["properties"][key]["maxProperties"]


@pytest.mark.parametrize("head, cam, field", [
    ("site: " + "s" * 65 + "\nstation: t\n", "a", "site"),
    ("site: s\nstation: " + "t" * 65 + "\n", "a", "station"),
    ("site: s\nstation: t\n", "c" * 65, "cameras.0.id"),
], ids=["site", "station", "camera"])
def test_ids_longer_than_every_payload_schema_takes_are_refused(tmp_path, head, cam, field):
    """site, station and camera go into every message; the payload schemas (and so the dashboard, ingest and the
    rollout link) take at most 64 characters: a longer id made a station whose every message is refused."""
    path = tmp_path / "dev.yaml"
    path.write_text(head + f"model: {{bundle: b}}\ncameras: [{{id: {cam}, uri: 'rtsp://10.0.0.1/x'}}]\n")
    (line,) = _refused(path)
    assert line.startswith(f"{path}: field {field}: String should have at most 64 characters"), line
    path.write_text(path.read_text().replace("s" * 65, "s" * 64).replace("t" * 65, "t" * 64)
                    .replace("c" * 65, "c" * 64))
    assert validate_file(path) == []


def test_the_id_bounds_are_the_payload_schemas():
    from agent.config import MAX_ID_CHARS, MAX_LANE_CHARS
    from contract.messages import mqtt_schema

    for name in ("result.v1", "decision.v1", "alert.v1", "frame.v1"):
        props = mqtt_schema(name)["properties"]
        assert props["site"]["maxLength"] == props["station"]["maxLength"] == props["camera"]["maxLength"] \
            == MAX_ID_CHARS
    lane = mqtt_schema("decision.v1")["properties"]["lane"]
    assert (lane["minLength"], lane["maxLength"]) == (1, MAX_LANE_CHARS)


@pytest.mark.parametrize("sorting, field, why", [
    ("{review_lane: ''}", "decisions.sorting.review_lane", "at least 1 character"),
    ("{default_lane: ''}", "decisions.sorting.default_lane", "at least 1 character"),
    ("{default_lane: " + "x" * 257 + "}", "decisions.sorting.default_lane", "at most 256 characters"),
    ("{lanes: {Bag: ''}}", "decisions.sorting.lanes.Bag", "at least 1 character"),
    ("{lanes: {Bag: " + "x" * 257 + "}}", "decisions.sorting.lanes.Bag", "at most 256 characters"),
], ids=["review-empty", "default-empty", "default-long", "lane-empty", "lane-long"])
def test_a_lane_the_decision_schema_refuses_is_refused(tmp_path, sorting, field, why):
    """decision.v1 and receipt.v1 take a lane of 1 to 256 characters: an empty review lane made every unsure item's
    decision one the dashboard refuses, and a saved shipment one the station cannot restore."""
    path = _device(tmp_path, f"decisions: {{sorting: {sorting}}}\n")
    (line,) = _refused(path)
    assert line.startswith(f"{path}: field {field}: String should have {why}"), line


def test_an_empty_broker_host_is_refused(tmp_path):
    """paho refuses to connect to '' (Invalid host.): the station logged a traceback and retried it for good."""
    path = _device(tmp_path, "mqtt: {host: ''}\n")
    assert _refused(path) == [f"{path}: field mqtt.host: String should have at least 1 character (got '')"]


@pytest.mark.parametrize("field", ["client_id", "username"])
@pytest.mark.parametrize("value, why", [
    ("a\x00b", "MQTT strings cannot hold a NUL character"),
    ("\u00e9" * 32768, "65536 bytes as UTF-8; MQTT takes at most 65535"),
    ("a\ud800", "not UTF-8 text"),
], ids=["nul", "too-long", "lone-surrogate"])
def test_an_mqtt_string_connect_cannot_carry_is_refused(tmp_path, field, value, why):
    """mosquitto closes the connection on a NUL in the client id or user name (no CONNACK) and paho cannot pack one
    of more than 65535 bytes (struct.error): the station retried its connect for good."""
    data = station_config(tmp_path, tmp_path / "bundle", "rtsp://10.0.0.1/x", 1883)
    data["mqtt"][field] = value
    path = tmp_path / "dev.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=False))
    (line,) = _refused(path)
    assert line.startswith(f"{path}: field mqtt.{field}: Value error, {why}"), line[:300]
    data["mqtt"][field] = "\u00e9" * 32767 + "a"      # 65535 bytes
    path.write_text(yaml.safe_dump(data, allow_unicode=False))
    assert validate_file(path) == []


NUL_PATHS = ["model.bundle", "model.public_key", "model.download_dir", "outbox.path", "mqtt.password_file",
             "mqtt.tls.ca_file", "decisions.presence.empty_images.cam-a"]


@pytest.mark.parametrize("field", NUL_PATHS)
def test_a_path_with_a_nul_character_is_refused_naming_the_field(tmp_path, field):
    """Path takes a NUL ("\\0" in YAML) and every open of it then raises ValueError: a traceback at start."""
    data = station_config(tmp_path, tmp_path / "bundle", "rtsp://10.0.0.1/x", 1883)
    _set(data, tuple(field.split(".")), "a\x00b")
    path = write_yaml(tmp_path / "dev.yaml", data)
    (line,) = _refused(path)
    assert line.startswith(f"{path}: field {field}: Value error, ") and "a path cannot hold a NUL character" in line


def test_run_with_a_nul_in_the_bundle_path_exits_2_naming_the_field(tmp_path):
    """It was a ValueError traceback (embedded null byte) and exit 1."""
    path = write_yaml(tmp_path / "dev.yaml", station_config(tmp_path, "b\x00x", "rtsp://10.0.0.1/x", 1))
    proc = subprocess.run([sys.executable, "-m", "agent", "run", "--config", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"{path}: field model.bundle: Value error, ") and "NUL" in line


def test_run_with_a_non_finite_interval_exits_2_with_one_line_naming_file_and_field(tmp_path):
    path = _device(tmp_path, "health: {stats_interval_s: .inf}\n")
    proc = subprocess.run([sys.executable, "-m", "agent", "run", "--config", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"{path}: field health.stats_interval_s: Input should be a finite number (got inf)"]


# ---------------------------------------------------------------- property: mutated station configs

HOSTILE_VALUES = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, "1e999", "-1e999", "NaN", 1e308, -1e308, 0, -1, 2**63, -(2**70),
                     "", "\x00", True, None, [], {}, [None], {"x": 1}]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.text(max_size=12),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


def _paths(data: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key and list index of a document, as paths."""
    out = []
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        out.append(prefix + (key,))
        out += _paths(value, prefix + (key,))
    return out


def _mutate(data: Any, draw: Any) -> Any:
    import copy

    data = copy.deepcopy(data)
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(data)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "delete", "extra"]))
        if action == "replace":
            parent[path[-1]] = draw(HOSTILE_VALUES)
        elif action == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(HOSTILE_VALUES)
    return data


def _all_finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_all_finite(v) for v in value)
    return True


def _loads_or_refuses_by_name(path: Path) -> None:
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        assert str(path) in str(exc).splitlines()[0], str(exc)
    else:
        assert _all_finite(cfg.model_dump())
        for cam in cfg.cameras:
            if cam.roi is not None and cam.width and cam.height:
                assert cam.roi.fits(cam.width, cam.height)
    problems = validate_file(path)
    assert all(line.startswith(str(path)) for line in problems), problems


@settings(max_examples=200)
@given(data=st.data())
def test_a_mutated_station_config_loads_or_is_refused_by_name(tmp_path, data):
    base = data.draw(st.sampled_from(BASES))
    doc = _mutate(base, data.draw)
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    path = folder / "station.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=False))
    _loads_or_refuses_by_name(path)


@settings(max_examples=150)
@given(body=st.binary(max_size=300), cut=st.integers(0, 2000), splice=st.binary(min_size=1, max_size=8))
def test_random_bytes_and_damaged_documents_are_refused_by_name(tmp_path, body, cut, splice):
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    (folder / "random.yaml").write_bytes(body)
    _loads_or_refuses_by_name(folder / "random.yaml")
    valid = yaml.safe_dump(BASES[0]).encode()
    cut %= len(valid)
    (folder / "damaged.yaml").write_bytes(valid[:cut] + splice + valid[cut:])
    _loads_or_refuses_by_name(folder / "damaged.yaml")


# ---------------------------------------------------------------- the outbox path

@pytest.fixture
def outbox_cases(tmp_path) -> dict[str, Path]:
    (tmp_path / "a-folder.sqlite").mkdir()
    (tmp_path / "a-file").write_text("")
    return {"path is a folder": tmp_path / "a-folder.sqlite",
            "parent is a file": tmp_path / "a-file" / "outbox.sqlite",
            "parent not creatable": tmp_path / "a-file" / "deeper" / "outbox.sqlite"}


@pytest.mark.parametrize("case", ["path is a folder", "parent is a file", "parent not creatable"])
def test_an_outbox_path_that_cannot_hold_the_database_is_a_startup_error(tmp_path, tiny_bundle, outbox_cases, case,
                                                                         capsys):
    outbox = outbox_cases[case]
    config = write_yaml(tmp_path / "station.yaml", station_config(tmp_path, tiny_bundle, "x.mp4", 1,
                                                                  outbox={"path": str(outbox)}))
    assert main(["run", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{config}: field outbox.path: {outbox}: ") and "Traceback" not in err
    with pytest.raises(OutboxError, match=str(outbox)):
        Outbox(outbox, max_bytes=10**6, max_age_s=60)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write any folder")
def test_an_outbox_folder_this_user_cannot_write_is_named(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    with pytest.raises(OutboxError, match=f"{folder} is not writable"):
        Outbox(folder / "outbox.sqlite", max_bytes=10**6, max_age_s=60)


def test_a_file_that_is_not_an_outbox_database_is_refused_and_kept(tmp_path):
    path = tmp_path / "outbox.sqlite"
    path.write_bytes(b"this is not SQLite" * 100)
    with pytest.raises(OutboxError, match=f"{path}: cannot open the outbox database"):
        Outbox(path, max_bytes=10**6, max_age_s=60)
    assert path.read_bytes() == b"this is not SQLite" * 100


# ---------------------------------------------------------------- station-state.json

STATE_DOCS = st.one_of(
    st.binary(max_size=200),
    st.sampled_from([b'{"schema": "station-state.v1", "configured_sha256": null, "thresholds": []}',
                     b'{"schema": "station-state.v1", "configured_sha256": null, "thresholds": {"a": NaN}}',
                     b'{"schema": "station-state.v1", "configured_sha256": null, "model": {"bundle": 5}}',
                     b'{"schema": "station-state.v1", "configured_sha256": null, "model": "x"}',
                     b'{"schema": "station-state.v1", "configured_sha256": 7}',
                     b'{"schema": "station-state.v1", "configured_sha256": null, "model": {"bundle": "b", '
                     b'"version": "1", "sha256": Infinity}}',
                     b'{"schema": "station-state.v1", "configured_sha256": null, "thresholds": {"a": 1e999}}',
                     b'[1, 2]', b'"\xff\xfe"', b'{"schema": "station-state.v1"']),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                 lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
                 max_leaves=8).map(lambda v: yaml.safe_dump({"schema": "station-state.v1", "configured_sha256": None,
                                                             "model": v, "thresholds": v}).encode()),
)


@settings(max_examples=150)
@given(body=STATE_DOCS)
def test_a_damaged_station_state_is_set_aside_and_the_station_starts_from_its_config(tmp_path, body):
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    path = folder / STATE_FILE
    path.write_bytes(body)
    state = StationState.load(path, folder / "no-bundle")
    if state.model is None and not state.thresholds:
        return      # fresh: the configured bundle and thresholds run
    # Kept: only a well-formed state with finite numbers and the right types.
    assert isinstance(state.model, (dict, type(None))) and isinstance(state.thresholds, dict)
    if state.model is not None:
        assert isinstance(state.model["bundle"], str) and isinstance(state.model["version"], str)
    assert all(isinstance(v, dict) and _all_finite(v) for v in state.thresholds.values())


@pytest.mark.parametrize("body", [b"\xff\xfe not json", b'{"schema": "station-state.v1", "configured_sha256": null, '
                                  b'"thresholds": [1]}',
                                  b'{"schema": "station-state.v1", "configured_sha256": null, '
                                  b'"thresholds": {"a": {"min_confidence": NaN}}}'],
                         ids=["non-utf8", "wrong-type", "nan"])
def test_a_damaged_station_state_is_logged_and_kept_as_bad(tmp_path, body, caplog):
    path = tmp_path / STATE_FILE
    path.write_bytes(body)
    state = StationState.load(path, tmp_path / "no-bundle")
    assert state.model is None and state.thresholds == {}
    assert (tmp_path / f"{STATE_FILE}.bad").read_bytes() == body and not path.exists()
    assert f"{path}: " in caplog.text and "kept as station-state.json.bad" in caplog.text


# ---------------------------------------------------------------- the camera thread

GOOD = np.zeros((8, 8, 3), np.uint8)
STEPS = {
    "good": lambda: (GOOD, None),
    "none": lambda: (None, None),
    "no-tuple": lambda: GOOD,
    "float-frame": lambda: (GOOD.astype(np.float32), None),
    "gray-frame": lambda: (GOOD[:, :, 0], None),
    "empty-frame": lambda: (np.zeros((0, 8, 3), np.uint8), None),
    "small-frame": lambda: (np.zeros((2, 2, 3), np.uint8), None),     # the ROI (4x4) does not fit
    "raise-runtime": lambda: (_ for _ in ()).throw(RuntimeError("decoder crashed")),
    "raise-source": lambda: (_ for _ in ()).throw(SourceError("stream lost")),
    "raise-value": lambda: (_ for _ in ()).throw(ValueError("odd frame")),
}
ERROR_KIND = {"none": "frame", "no-tuple": "frame", "float-frame": "frame", "gray-frame": "frame",
              "empty-frame": "frame", "small-frame": "roi", "raise-runtime": "source", "raise-value": "source"}


class ScriptedSource:
    """A finite camera that does what its script says, one step per read, across reconnects; then ends."""

    finite = True

    def __init__(self, script: list[str], close_raises: bool = False) -> None:
        self.name = "scripted"
        self.script = list(script)
        self.opens = 0
        self.close_raises = close_raises

    def open(self) -> None:
        self.opens += 1

    def read(self):
        if not self.script:
            raise EndOfStream(self.name)
        return STEPS[self.script.pop(0)]()

    def close(self) -> None:
        if self.close_raises:
            raise OSError("device busy")


def _run_camera(source: ScriptedSource, roi: dict | None = None) -> tuple[CameraWorker, Metrics, FrameHub]:
    metrics, stop = Metrics(), threading.Event()
    hub = FrameHub(metrics)
    cfg = CameraConfig(id="cam", uri="scripted", roi=roi, backpressure="block", queue_size=256,
                       reconnect={"initial_s": 0.001, "max_s": 0.001})
    hub.add_camera("cam", cfg.queue_size, cfg.backpressure)
    worker = CameraWorker(cfg, hub, metrics, stop, lambda c: source)
    worker.start()
    assert worker.ended.wait(30), "the camera thread did not reach the end of its input"
    stop.set()
    worker.join(5)
    return worker, metrics, hub


@settings(max_examples=40)
@given(script=st.lists(st.sampled_from(sorted(STEPS)), max_size=25), close_raises=st.booleans())
def test_the_camera_thread_counts_every_bad_frame_and_exception_and_goes_on(script, close_raises):
    source = ScriptedSource(script, close_raises)
    worker, metrics, hub = _run_camera(source, roi={"x": 2, "y": 2, "width": 4, "height": 4})
    frames = hub.get_batch(256, 0.0, wait_s=0.1)
    assert len(frames) == script.count("good") and all(f.image.shape == (4, 4, 3) for f in frames)
    for kind in ("frame", "roi"):
        assert metrics.counter("camera_errors_total", camera="cam", kind=kind) == \
            sum(ERROR_KIND.get(step) == kind for step in script)
    raised = sum(step.startswith("raise") for step in script)
    assert metrics.counter("camera_reconnects_total", camera="cam") == raised
    assert source.opens == raised + 1
    closes = raised + 1 if close_raises else 0
    assert metrics.counter("camera_errors_total", camera="cam", kind="source") == \
        sum(ERROR_KIND.get(step) == "source" for step in script) + closes


def test_an_roi_outside_the_delivered_frame_refuses_its_frames_and_says_so_once(caplog):
    source = ScriptedSource(["good"] * 5)
    worker, metrics, hub = _run_camera(source, roi={"x": 4, "y": 4, "width": 8, "height": 8})
    assert hub.get_batch(256, 0.0, wait_s=0.1) == []           # never the whole frame instead
    assert metrics.counter("camera_errors_total", camera="cam", kind="roi") == 5
    lines = [r.getMessage() for r in caplog.records if "does not fit the 8x8 frame" in r.getMessage()]
    assert len(lines) == 1 and "camera cam: roi x=4 y=4 width=8 height=8" in lines[0]
    assert worker.last_error.startswith("roi: ")


def test_a_camera_returning_only_bad_frames_is_reconnected_not_spun_on():
    source = ScriptedSource(["none"] * (BAD_FRAMES_BEFORE_RECONNECT + 3) + ["good"])
    _, metrics, hub = _run_camera(source)
    assert metrics.counter("camera_reconnects_total", camera="cam") == 1 and source.opens == 2
    assert len(hub.get_batch(8, 0.0, wait_s=0.1)) == 1


def test_a_preprocessing_error_skips_the_frame_and_the_camera_goes_on():
    metrics, stop = Metrics(), threading.Event()
    hub = FrameHub(metrics)
    cfg = CameraConfig(id="cam", uri="scripted", backpressure="block", queue_size=16)
    hub.add_camera("cam", 16, "block")
    calls = []

    def prepare(image):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("the model's preprocessing cannot take this frame")
        return None

    worker = CameraWorker(cfg, hub, metrics, stop, lambda c: ScriptedSource(["good"] * 4), prepare=prepare)
    worker.start()
    assert worker.ended.wait(30)
    assert len(hub.get_batch(16, 0.0, wait_s=0.1)) == 3
    assert metrics.counter("camera_errors_total", camera="cam", kind="prepare") == 1


class StallingCamera:
    """A live camera that hangs on its first connection (a fake: no camera device here); the hung read gives up
    after 0.5 s, as a capture opened with a read timeout does (the watchdog never closes a source itself: its
    camera thread does, after the read returned). Its close() raises."""

    finite = False

    def __init__(self) -> None:
        self.name = "stalling"
        self.opens = 0
        self.released = threading.Event()

    def open(self) -> None:
        self.opens += 1
        self.released.clear()

    def read(self):
        if self.opens == 1:
            self.released.wait(0.5)
            raise SourceError("no frame within the read timeout")
        time.sleep(0.01)
        return GOOD, None

    def close(self) -> None:
        self.released.set()
        raise RuntimeError("driver refused to close")


def test_the_watchdog_survives_a_camera_whose_close_raises():
    metrics, stop = Metrics(), threading.Event()
    hub = FrameHub(metrics)
    camera = StallingCamera()
    cfg = CameraConfig(id="cam", uri="stalling", stall_timeout_s=0.2, reconnect={"initial_s": 0.01})
    hub.add_camera("cam", 2, "drop_oldest")
    worker = CameraWorker(cfg, hub, metrics, stop, lambda c: camera)
    dog = Watchdog([worker], stop, period_s=0.05)
    worker.start()
    dog.start()
    deadline = time.monotonic() + 30
    while metrics.counter("frames_captured_total", camera="cam") < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    alive = dog.is_alive() and worker.is_alive()
    stop.set()
    worker.join(5)
    dog.join(5)
    assert alive and camera.opens >= 2 and metrics.counter("camera_stalls_total", camera="cam") >= 1
    assert metrics.counter("camera_errors_total", camera="cam", kind="source") >= 1
