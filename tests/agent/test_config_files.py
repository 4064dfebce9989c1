"""Station config files as a warehouse engineer writes fifty of them: YAML that reads two ways, layers of
``extends:``, errors that name the file to fix, settings that cannot work together, and the start-up's reading of
the same file (the TensorRT engine's precision, ``--flush-timeout``).

Real parts only: the real schema and loader, the real CLI entry points; no TensorRT here, so the start-up's engine
step runs on this machine as it would on a station without a GPU (it logs and falls back to ONNX Runtime).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.__main__ import main as agent_main
from agent.config import (
    MAX_CONFIG_VALUES,
    MAX_EXTENDS_DEPTH,
    MAX_EXTENDS_FILES,
    MAX_PROBLEM_LINES,
    load_config,
    validate_file,
)
from agent.startup import ENV_ENGINE_REQUEST, engine_precision
from agent.startup import main as startup_main

STATION = "site: s\nstation: t\nmodel: {bundle: b}\n"
CAMERA = "cameras: [{id: a, uri: x.mp4}]\n"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---------------------------------------------------------------- YAML that reads two ways

@pytest.mark.parametrize("body, key, first, where", [
    (STATION + CAMERA + "cameras: [{id: b, uri: y.mp4}]\n", "cameras", 4, "line 5, column 1"),
    (STATION + "cameras:\n  - id: a\n    uri: x.mp4\n    fps: 5\n    fps: 50\n", "fps", 7, "line 8, column 5"),
    (STATION + CAMERA + "decisions:\n  sorting:\n    lanes:\n      Bag: lane-5\n      Bag: lane-1\n", "Bag", 8,
     "line 9, column 7"),
], ids=["a second cameras list", "a camera's fps twice", "a lane label twice"])
def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path, body, key, first, where, capsys):
    """safe_load keeps the last of two equal keys silently: the first cameras list, fps or lane would be dropped."""
    path = _write(tmp_path / "station.yaml", body)
    assert validate_file(path) == [f"{path}: not valid YAML ({where}: key {key!r} given twice (first on line {first}))"]
    assert agent_main(["run", "--config", str(path)]) == 2
    assert f"key {key!r} given twice" in capsys.readouterr().err


def test_a_merge_key_still_overrides_what_it_merges(tmp_path):
    """``<<: *anchor`` is how one writes two cameras that differ in a field; its keys are not duplicates."""
    path = _write(tmp_path / "station.yaml", STATION + "cameras:\n"
                  "  - &dock {id: a, uri: x.mp4, fps: 5, thresholds: {min_confidence: 0.7}}\n"
                  "  - <<: *dock\n    id: b\n    fps: 10\n")
    cfg = load_config(path)
    assert [(c.id, c.fps, c.thresholds.min_confidence) for c in cfg.cameras] == [("a", 5, 0.7), ("b", 10, 0.7)]


def test_aliases_that_expand_past_the_bound_are_refused_before_anything_is_built(tmp_path):
    """A few hundred bytes of nested aliases expand to millions of values (10^9 at 8 levels: a "billion laughs"
    ran out of memory after a minute); the file is refused by its expanded size, and a value containing itself
    by name."""
    body = "a: &l0 [x, x, x, x, x, x, x, x, x, x]\n"
    for level in range(1, 6):
        body += f"l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * 10) + "]\n"
    path = _write(tmp_path / "laughs.yaml", body + STATION.replace("station: t", "station: *l5") + CAMERA)
    assert path.stat().st_size < 600
    [line] = validate_file(path)
    assert line.startswith(f"{path}: holds ") and f"more than {MAX_CONFIG_VALUES} is not a station config" in line
    cycle = _write(tmp_path / "cycle.yaml", "site: &a [x, *a]\n")
    assert validate_file(cycle) == [f"{cycle}: not valid YAML (an alias refers to a value that contains it)"]


def test_an_alias_used_within_the_bound_is_read_as_written(tmp_path):
    path = _write(tmp_path / "station.yaml", STATION + "cameras:\n  - {id: a, uri: x.mp4, thresholds: &t "
                  "{min_confidence: 0.8}}\n  - {id: b, uri: y.mp4, thresholds: *t}\n")
    assert [c.thresholds.min_confidence for c in load_config(path).cameras] == [0.8, 0.8]


def test_many_problems_give_a_bounded_report(tmp_path, capsys):
    """32 camera entries with 4 wrong values each and a 20 kB wrong value: one line per problem up to a limit, each
    line short, then how many more (it was one line per problem, each quoting the whole value: 12 MB for a 600 kB
    file)."""
    wrong = "{id: '!', uri: '', fps: -1, queue_size: 0, colour: " + "x" * 20_000 + "}"
    path = _write(tmp_path / "station.yaml", STATION.replace("site: s", "site: " + "x!" * 10_000)
                  + "cameras: [" + ", ".join([wrong] * 32) + "]\n")
    lines = validate_file(path)
    assert len(lines) == MAX_PROBLEM_LINES + 1
    assert lines[-1] == f"{path}: and {1 + 5 * 32 - MAX_PROBLEM_LINES} more problems"
    assert all(line.startswith(f"{path}: ") and len(line) < len(str(path)) + 300 for line in lines), \
        max(lines, key=len)[:400]
    assert lines[0].startswith(f"{path}: field site: String should have at most 64 characters")
    assert agent_main(["validate-config", str(path)]) == 1
    assert len(capsys.readouterr().err) < 100 * 300


# ---------------------------------------------------------------- layers

def test_a_site_layer_between_the_fleet_defaults_and_the_stations_validates(tmp_path, capsys):
    """fleet -> site -> station: the site's layer names its site and extends the fleet's, and is checked as a
    layer (its keys and its parents'), not refused as a station without station and cameras."""
    fleet = _write(tmp_path / "fleet.yaml", "mqtt: {port: 8883, keepalive_s: 30}\nlog_level: INFO\n")
    site = _write(tmp_path / "site-ber1.yaml", "extends: fleet.yaml\nsite: ber1\nmqtt: {host: mqtt.ber1.local}\n")
    (tmp_path / "stations").mkdir()
    station = _write(tmp_path / "stations" / "dock-1.yaml", "extends: ../site-ber1.yaml\nstation: dock-1\n"
                     "model: {bundle: b}\n" + CAMERA)
    assert agent_main(["validate-config", str(fleet), str(site), str(station)]) == 0
    out = capsys.readouterr().out
    assert f"{site}: OK (defaults layer" in out and f"{station}: OK\n" in out
    cfg = load_config(station)
    assert (cfg.site, cfg.mqtt.host, cfg.mqtt.port) == ("ber1", "mqtt.ber1.local", 8883)
    # the site layer is checked with what it extends: a bad value in the fleet's file is named there
    fleet.write_text("mqtt: {port: 88830}\n")
    assert validate_file(site) == [f"{site}: field mqtt.port: Input should be less than or equal to 65535 "
                                   f"(got 88830) (set in {fleet})"]


def test_a_value_from_a_parent_layer_is_reported_with_the_file_it_is_in(tmp_path):
    defaults = _write(tmp_path / "defaults.yaml", "health: {stats_interval_s: 0}\nmqtt: {port: 1883}\n")
    station = _write(tmp_path / "station.yaml", "extends: defaults.yaml\n" + STATION + CAMERA
                     + "mqtt: {keepalive_s: 1}\n")
    assert validate_file(station) == [
        f"{station}: field mqtt.keepalive_s: Input should be greater than or equal to 5 (got 1)",
        f"{station}: field health.stats_interval_s: Input should be greater than or equal to 0.1 (got 0) "
        f"(set in {defaults})",
    ]


def test_extends_is_bounded_in_depth_and_in_files_read(tmp_path):
    """A chain of 1,200 layers was reported as "not valid YAML (nested too deeply)" for a valid file deep inside;
    a diamond (each layer extending the next twice) read 2^depth files and never finished."""
    for i in range(MAX_EXTENDS_DEPTH + 2):
        _write(tmp_path / f"c{i}.yaml", f"extends: c{i + 1}.yaml\nlog_level: INFO\n")
    _write(tmp_path / f"c{MAX_EXTENDS_DEPTH + 2}.yaml", "log_level: INFO\n")
    deep = _write(tmp_path / "deep.yaml", "extends: c0.yaml\n" + STATION + CAMERA)
    [line] = validate_file(deep)
    assert line.startswith(f"{deep}: field extends: ") and line.endswith(f"more than {MAX_EXTENDS_DEPTH} files deep "
                                                                         "in extends")
    for i in range(6):
        _write(tmp_path / f"x{i}.yaml", f"extends: [x{i + 1}.yaml, x{i + 1}.yaml]\n")
    _write(tmp_path / "x6.yaml", "log_level: INFO\n")
    wide = _write(tmp_path / "wide.yaml", "extends: x0.yaml\n" + STATION + CAMERA)
    [line] = validate_file(wide)
    assert line.endswith(f"more than {MAX_EXTENDS_FILES} files read through extends")
    # a chain as deep as a fleet needs (fleet -> region -> site -> line -> station) loads
    _write(tmp_path / "c5.yaml", "health: {stats_interval_s: 7}\n")
    cfg = load_config(_write(tmp_path / "ok.yaml", "extends: c1.yaml\n" + STATION + CAMERA))
    assert cfg.health.stats_interval_s == 7


# ---------------------------------------------------------------- settings that cannot work together

@pytest.mark.parametrize("body, expected", [
    (CAMERA.replace("x.mp4}", "x.mp4, reconnect: {initial_s: 60, max_s: 5}}"),
     "field cameras.0.reconnect: Value error, initial_s: 60 is more than max_s (5), the longest wait"),
    (CAMERA + "mqtt: {reconnect: {max_s: 0.1}}\n",
     "field mqtt.reconnect: Value error, initial_s: 0.5 is more than max_s (0.1), the longest wait"),
    (CAMERA.replace("x.mp4}", "x.mp4, width: 640, roi: {x: 600, y: 0, width: 100, height: 10}}"),
     "field cameras.0: Value error, roi: x=600 y=0 width=100 height=10 does not fit the frame's width 640"),
    (CAMERA.replace("x.mp4}", "x.mp4, height: 480, roi: {x: 0, y: 400, width: 10, height: 100}}"),
     "field cameras.0: Value error, roi: x=0 y=400 width=10 height=100 does not fit the frame's height 480"),
    (CAMERA + "decisions: {presence: {mode: background, background_noise_k: 4, background_threshold: 6, "
              "background_min_threshold: 8}}\n",
     "field decisions.presence: Value error, background_min_threshold: 8 is more than background_threshold (6), "
     "the most the threshold from the noise (background_noise_k) may be: it would never adapt"),
], ids=["camera backoff swapped", "mqtt max below the default initial", "roi past the width",
        "roi past the height", "noise threshold floor above its ceiling"])
def test_settings_that_cannot_work_together_are_refused(tmp_path, body, expected):
    path = _write(tmp_path / "station.yaml", STATION + body)
    assert validate_file(path) == [f"{path}: {expected}"]


@pytest.mark.parametrize("body", [
    CAMERA.replace("x.mp4}", "x.mp4, reconnect: {initial_s: 5, max_s: 5}}"),
    CAMERA.replace("x.mp4}", "x.mp4, width: 640, roi: {x: 540, y: 5000, width: 100, height: 10}}"),
    CAMERA + "decisions: {presence: {mode: background, background_threshold: 6, background_min_threshold: 8}}\n",
], ids=["initial equals max", "roi within the one side given", "floor above ceiling without noise_k (unused)"])
def test_the_edges_of_those_rules_are_accepted(tmp_path, body):
    assert validate_file(_write(tmp_path / "station.yaml", STATION + body)) == []


@pytest.mark.parametrize("uri, why", [
    ("rstp://10.20.1.11:554/stream1", "unknown camera URI scheme 'rstp' (file, v4l2, usb, rtsp, csi, gst)"),
    ("usb://front", "usb://front: not a camera URI (invalid literal for int() with base 10: 'front')"),
    ("file://data/belt.mp4", "a file:// URI takes an absolute path after three slashes (file:///data/belt.mp4), "
                             "not a host name ('data')"),
    ("usb://2147483648", "usb://2147483648: not a camera URI (device number 2147483648 is not 0 to 2147483647)"),
    ("99999999999999999999", "not a camera URI (device number 99999999999999999999 is not 0 to 2147483647)"),
    ("csi://4294967296", "csi://4294967296: not a camera URI (device number 4294967296 is not 0 to 2147483647)"),
    ("rtsp:///stream1", "rtsp:///stream1: names no host"),
    ("rtsps://", "rtsps://: names no host"),
    ("gst://", "gst://: names no GStreamer pipeline"),
    ("gst:  ", "gst:  : names no GStreamer pipeline"),
    ("v4l2:///", "v4l2:///: names no device"),
    ("file://", "file://: names no file or folder"),
    ("file://localhost", "file://localhost: names no file or folder"),
], ids=["misspelt scheme", "usb device that is no number", "file URI with a host", "usb index past a C int",
        "bare index past a C int", "CSI sensor past a C int", "RTSP without a host", "RTSPS without anything",
        "empty GStreamer pipeline", "blank GStreamer pipeline", "v4l2 without a device",
        "file URI without a path (was the working folder)", "file URI of localhost without a path"])
def test_a_camera_uri_that_can_never_open_is_refused_by_validate_config_and_run(tmp_path, uri, why, capsys):
    """validate-config said OK, and the station then ran with the camera thread retrying the URI for good (a
    warning every few seconds, no frame ever); the form is checked by the sources' own reading of it."""
    path = _write(tmp_path / "station.yaml", STATION + f"cameras: [{{id: a, uri: '{uri}'}}]\n")
    [line] = validate_file(path)
    assert line.startswith(f"{path}: field cameras.0.uri: Value error, ") and why in line
    assert agent_main(["run", "--config", str(path)]) == 2
    assert why in capsys.readouterr().err


@pytest.mark.parametrize("uri", ["x.mp4", "0", "usb://1", "v4l2:///dev/video0", "rtsp://10.20.1.11:554/stream1",
                                 "csi://0", "gst://videotestsrc ! appsink", "file:///data/belt.mp4",
                                 "file://localhost/data/belt.mp4", "/data/cam:1.mp4"])
def test_every_documented_camera_uri_form_is_accepted_without_opening_it(tmp_path, uri):
    assert validate_file(_write(tmp_path / "station.yaml", STATION + f"cameras: [{{id: a, uri: '{uri}'}}]\n")) == []


@pytest.mark.parametrize("first, second, device", [
    ("usb://0", "usb://0", "/dev/video0"), ("0", "v4l2:///dev/video0", "/dev/video0"),
    ("usb://2", "2", "/dev/video2"), ("v4l2:///dev/video1", "v4l2:///dev/../dev/video1", "/dev/video1"),
    ("csi://1", "csi://1", "CSI sensor 1"),
], ids=["same usb index", "bare index and its v4l2 path", "usb and bare index", "two spellings of a path",
        "same CSI sensor"])
def test_two_cameras_on_one_exclusive_device_are_refused_naming_both(tmp_path, first, second, device, capsys):
    """The second camera would never open (the device serves one capture) and retry for good, while validate-config
    said OK; validate-config and run refuse the file, naming both cameras and the device."""
    path = _write(tmp_path / "station.yaml", STATION + f"cameras: [{{id: top, uri: '{first}'}}, "
                                                      f"{{id: side, uri: '{second}'}}]\n")
    [line] = validate_file(path)
    assert line.startswith(f"{path}: field cameras: Value error, cameras[0] (top, '{first}') and cameras[1] "
                           f"(side, '{second}') both open {device}, which serves one capture at a time"), line
    assert agent_main(["validate-config", str(path)]) == 1
    assert agent_main(["run", "--config", str(path)]) == 2
    assert f"both open {device}" in capsys.readouterr().err


@pytest.mark.parametrize("first, second", [
    ("usb://0", "usb://1"), ("0", "v4l2:///dev/video1"), ("csi://0", "csi://1"), ("csi://0", "usb://0"),
    ("rtsp://10.0.0.5/s1", "rtsp://10.0.0.5/s1"), ("x.mp4", "x.mp4"),
    ("gst://videotestsrc ! appsink", "gst://videotestsrc ! appsink"),
], ids=["two usb indices", "index and another path", "two sensors", "a sensor and a usb camera",
        "one RTSP stream twice (a server serves many)", "one file twice", "one GStreamer pipeline twice (unknown)"])
def test_cameras_that_may_share_a_source_are_accepted(tmp_path, first, second):
    path = _write(tmp_path / "station.yaml", STATION + f"cameras: [{{id: top, uri: '{first}'}}, "
                                                      f"{{id: side, uri: '{second}'}}]\n")
    assert validate_file(path) == []


def test_a_qc_station_without_defect_classes_is_refused(tmp_path):
    """role qc is never a default: a QC station that names no defect class never raises an alert."""
    path = _write(tmp_path / "station.yaml", STATION + CAMERA + "role: qc\n")
    assert validate_file(path) == [f"{path}: field (top level): Value error, role: qc needs "
                                   "decisions.qc.defect_classes (the labels that raise an alert); with none this "
                                   "station never alerts"]
    assert validate_file(_write(tmp_path / "ok.yaml", STATION + CAMERA + "role: qc\n"
                                "decisions: {qc: {defect_classes: [Bag]}}\n")) == []


def test_a_sorting_station_without_presence_is_refused(tmp_path):
    """role sorting is never a default: without presence no item is decided, so none is given a lane."""
    path = _write(tmp_path / "station.yaml", STATION + CAMERA + "role: sorting\n")
    assert validate_file(path) == [f"{path}: field (top level): Value error, role: sorting needs "
                                   "decisions.presence.mode background, empty_class or both; with presence off no "
                                   "item is decided, so none is given a lane"]
    assert validate_file(_write(tmp_path / "ok.yaml", STATION + CAMERA + "role: sorting\n"
                                "decisions: {presence: {mode: background}}\n")) == []


def test_a_receiving_station_without_presence_passes_validation_with_a_warning(tmp_path, capsys):
    """role receiving and presence off are both defaults (refusing them would refuse every config that sets neither):
    validate-config says OK, exit 0, and warns that such a station never decides an item."""
    path = _write(tmp_path / "station.yaml", STATION + CAMERA + "role: receiving\n")
    assert agent_main(["validate-config", str(path)]) == 0
    out = capsys.readouterr()
    assert out.out == f"{path}: OK\n"
    assert (f"{path}: warning: role receiving with decisions.presence.mode off: no item is ever decided, so a "
            "shipment opened by cmd/expect never counts one") in out.err
    for quiet in ("role: sorting\ndecisions: {presence: {mode: background}}\n",
                  "decisions: {presence: {mode: empty_class, empty_class: Bag}}\n"):
        assert agent_main(["validate-config", str(_write(tmp_path / "q.yaml", STATION + CAMERA + quiet))]) == 0
        assert "warning" not in capsys.readouterr().err


# ---------------------------------------------------------------- what the start-up makes of the same file

@pytest.mark.parametrize("model, engine", [
    ("{bundle: b}", "auto"), ("{bundle: b, prefer_int8: false}", "fp16"), ("{bundle: b, precision: fp32}", "fp16"),
    ("{bundle: b, prefer_int8: false, precision: auto}", "auto"), ("{bundle: b, precision: int8}", "auto"),
])
def test_the_engine_precision_follows_the_configs_precision(tmp_path, model, engine):
    """``precision: fp32`` replaces ``prefer_int8: false`` (docs/agent.md) and must not get an INT8 engine."""
    cfg = load_config(_write(tmp_path / "station.yaml", STATION.replace("model: {bundle: b}", f"model: {model}")
                             + CAMERA))
    assert engine_precision(cfg, None) == engine
    assert engine_precision(cfg, "int8") == "int8"      # --precision wins


def test_the_start_up_asks_for_an_fp16_engine_when_the_config_pins_fp32(tmp_path, tiny_bundle):
    """Through ``python -m agent.startup start`` with TensorRT said to be present: this machine has no GPU, so the
    engine step logs and falls back, and the precision passed on for cmd/model bundles is the config's."""
    # a live camera: the start-up opens file and folder cameras (x.mp4 does not exist), not live ones
    path = _write(tmp_path / "station.yaml", f"site: s\nstation: t\nmodel: {{bundle: {tiny_bundle}, precision: fp32, "
                  f"download_dir: {tmp_path / 'dl'}}}\noutbox: {{path: {tmp_path / 'o.sqlite'}}}\n"
                  "cameras: [{id: a, uri: 'rtsp://10.20.1.11:554/stream1'}]\n")
    calls: list[dict[str, str]] = []
    rc = startup_main(["start", "--config", str(path), "--engine-cache", str(tmp_path / "engines")],
                      exec_fn=lambda _path, _argv, env: calls.append(env), tensorrt_present=True)
    assert rc == 0 and calls[0][ENV_ENGINE_REQUEST] == "fp16"


@pytest.mark.parametrize("value, why", [
    ("nan", "expected seconds from 0 to 3600, got 'nan'"), ("inf", "expected seconds from 0 to 3600, got 'inf'"),
    ("-5", "expected seconds from 0 to 3600, got '-5'"), ("3601", "expected seconds from 0 to 3600, got '3601'"),
    ("soon", "expected a number of seconds, got 'soon'"),
])
def test_a_flush_timeout_that_is_not_0_to_3600_seconds_is_a_usage_error(tmp_path, value, why, capsys):
    """It was taken as it was and reached the shutdown only after the whole run: nan and inf ended it in a
    traceback (exit 1) with the outbox not drained, a negative value drained nothing."""
    path = _write(tmp_path / "station.yaml", STATION + CAMERA)
    with pytest.raises(SystemExit) as exc:
        agent_main(["run", "--config", str(path), "--flush-timeout", value])
    assert exc.value.code == 2
    assert f"argument --flush-timeout: {why}" in capsys.readouterr().err


@pytest.mark.parametrize("mqtt, expected", [
    ("{password_env: '', password_file: pw}", "field mqtt.password_env: String should match pattern"),
    ("{password_env: ''}", "field mqtt.password_env: String should match pattern"),
    ("{password_env: 'A=B'}", "field mqtt.password_env: String should match pattern"),
], ids=["empty name beside a file", "empty name", "not a variable name"])
def test_validate_config_refuses_a_password_variable_the_start_up_would_refuse(tmp_path, tiny_bundle, mqtt, expected,
                                                                             caplog):
    """validate-config said OK, and the start-up then refused the same file (two password sources; a variable
    named '' that is never set): they agree now, on the schema's own line."""
    _write(tmp_path / "pw", "secret\n")
    path = _write(tmp_path / "station.yaml", f"site: s\nstation: t\nmodel: {{bundle: {tiny_bundle}, download_dir: "
                  f"{tmp_path / 'dl'}}}\noutbox: {{path: {tmp_path / 'o.sqlite'}}}\nmqtt: {mqtt}\n" + CAMERA)
    [line] = validate_file(path)
    assert line.startswith(f"{path}: {expected}")
    assert startup_main(["start", "--dry-run", "--config", str(path), "--engine-cache", str(tmp_path / "engines")],
                        tensorrt_present=False) == 2
    assert expected in caplog.text
