"""Config: every firmware-config file validates; bad files give messages naming the file and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.__main__ import main
from agent.config import ConfigError, load_config, validate_file

REPO = Path(__file__).resolve().parents[2]
FIRMWARE = sorted((REPO / "firmware-config").rglob("*.yaml"))


def test_firmware_config_has_defaults_and_stations():
    names = {p.name for p in FIRMWARE}
    assert {"defaults.yaml", "receiving-01.yaml", "qc-01.yaml"} <= names


@pytest.mark.parametrize("path", FIRMWARE, ids=lambda p: p.name)
def test_every_firmware_config_file_validates(path):
    assert validate_file(path) == []


def test_station_file_inherits_defaults_and_overrides():
    cfg = load_config(REPO / "firmware-config/stations/receiving-01.yaml")
    assert cfg.mqtt.port == 8883 and cfg.mqtt.username == "ber1/receiving-01"
    assert cfg.mqtt.tls is not None and cfg.mqtt.tls.ca_file == Path("/etc/inventory-agent/ca.crt")
    assert cfg.topic_root == "inventory/ber1/receiving-01"
    assert [c.id for c in cfg.cameras] == ["dock-a", "dock-b"]
    assert cfg.cameras[1].thresholds.min_confidence == 0.7


def test_qc_station_reviews_every_flagged_item_and_receiving_keeps_the_budget():
    """A null in a station file overrides a default that is not null: QC's strict thresholds alone decide."""
    qc = load_config(REPO / "firmware-config/stations/qc-01.yaml")
    receiving = load_config(REPO / "firmware-config/stations/receiving-01.yaml")
    assert qc.decisions.sorting.review_budget is None and qc.cameras[0].thresholds.min_confidence == 0.8
    assert receiving.decisions.sorting.review_budget == 0.1
    # the dock decides unknown products (the shipment vouches for sure items it expects); QC does not
    assert receiving.decisions.unknown_items is True and qc.decisions.unknown_items is False
    assert receiving.decisions.receiving.expected_unknown_keep == 0.999
    assert qc.decisions.sorting.review_lane == receiving.decisions.sorting.review_lane == "manual-review"


def test_the_fleet_defaults_turn_flip_average_on_and_the_schema_leaves_it_off(tmp_path):
    """firmware-config/defaults.yaml turns model.flip_average on for every station that extends it; a config
    without it (and so the benchmarks' generated configs) keeps the schema's off."""
    for station in ("qc-01", "receiving-01"):
        assert load_config(REPO / f"firmware-config/stations/{station}.yaml").model.flip_average is True
    assert load_config(_device(tmp_path, "site: s\nstation: t\nmodel: {bundle: b}\ncameras: [{id: a, uri: x}]\n")
                       ).model.flip_average is False


def test_validate_config_cli_ok(capsys):
    assert main(["validate-config", *map(str, FIRMWARE)]) == 0
    assert "OK" in capsys.readouterr().out


def _device(tmp_path: Path, body: str) -> Path:
    (tmp_path / "defaults.yaml").write_text("mqtt: {host: broker.local}\n")
    path = tmp_path / "dev.yaml"
    path.write_text("extends: defaults.yaml\n" + body)
    return path


def test_unknown_key_and_bad_value_are_named(tmp_path, capsys):
    path = _device(tmp_path, "site: s\nstation: t\nmodel: {bundle: b}\n"
                             "cameras: [{id: a, uri: x.mp4, fps: -1, colour: red}]\n")
    assert main(["validate-config", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}: field cameras.0.fps: Input should be greater than 0" in err
    assert f"{path}: field cameras.0.colour: Extra inputs are not permitted" in err


def test_password_in_yaml_is_refused(tmp_path):
    path = _device(tmp_path, "site: s\nstation: t\nmodel: {bundle: b}\ncameras: [{id: a, uri: x}]\n"
                             "mqtt: {password: hunter2}\n")
    with pytest.raises(ConfigError, match=r"dev.yaml: field mqtt: .*secrets are not allowed in the YAML"):
        load_config(path)


def test_password_comes_from_env_or_file(tmp_path, monkeypatch):
    (tmp_path / "pw").write_text("s3cret\n")
    path = _device(tmp_path, "site: s\nstation: t\nmodel: {bundle: b}\ncameras: [{id: a, uri: x}]\n"
                             "mqtt: {password_file: pw}\n")
    assert load_config(path).mqtt.password() == "s3cret"
    path.write_text(path.read_text().replace("password_file: pw", "password_env: AGENT_TEST_PW"))
    cfg = load_config(path)
    with pytest.raises(ConfigError, match="AGENT_TEST_PW is not set"):
        cfg.mqtt.password()
    monkeypatch.setenv("AGENT_TEST_PW", "from-env")
    assert cfg.mqtt.password() == "from-env"


def test_duplicate_camera_ids_and_missing_fields(tmp_path):
    path = _device(tmp_path, "site: s\ncameras: [{id: a, uri: x}, {id: a, uri: y}]\n")
    problems = validate_file(path)
    text = "\n".join(problems)
    assert "field station: Field required" in text
    assert "field model: Field required" in text
    assert "camera ids must be unique, repeated: a" in text


def test_presence_settings_that_could_never_decide_an_item_or_would_split_every_one_are_refused(tmp_path):
    """min_frames above max_frames: every item cut at max_frames and dropped as noise, the station decides
    nothing. regrow_split at or under 1: a box shrinking out of view "regrows" at once, one item split in two."""
    base = "site: s\nstation: t\nmodel: {bundle: b}\ncameras: [{id: a, uri: x}]\n"
    for presence, field in (("{min_frames: 5, max_frames: 4}", "min_frames: 5 is more than max_frames (4)"),
                            ("{regrow_split: 0.5}", "regrow_split: 0.5 must be 0 (off) or more than 1"),
                            ("{regrow_split: 1}", "regrow_split: 1.0 must be 0 (off) or more than 1"),
                            ("{relearn_frames: 2}", "relearn_frames: 2 must be 0 (never) or more than min_frames")):
        path = _device(tmp_path, base + f"decisions: {{presence: {presence}}}\n")
        assert any(field in problem for problem in validate_file(path)), (presence, validate_file(path))
    for fine in ("{min_frames: 4, max_frames: 4}", "{regrow_split: 0}", "{regrow_split: 1.01}", "{relearn_frames: 0}",
                 "{relearn_frames: 3}"):
        assert validate_file(_device(tmp_path, base + f"decisions: {{presence: {fine}}}\n")) == [], fine


def test_a_topic_root_with_a_wildcard_or_an_empty_level_is_refused(tmp_path):
    """A broker refuses to publish to '#' or '+' (the station would retry for good, saying only "no CONNACK"); an
    empty level makes the dashboard read an empty station name."""
    base = "site: s\nstation: t\nmodel: {bundle: b}\ncameras: [{id: a, uri: x}]\n"
    for root in ("inventory/s/#", "inv/+/t", "inventory/s/", "/inventory", "a//b", "''"):
        problems = validate_file(_device(tmp_path, base + f"mqtt: {{host: h, topic_root: {root}}}\n"))
        assert any("field mqtt.topic_root" in p and "is not a topic prefix" in p for p in problems), (root, problems)
    assert validate_file(_device(tmp_path, base + "mqtt: {host: h, topic_root: plant-7/dock/st-1}\n")) == []


def test_defaults_layer_with_a_typo_is_reported(tmp_path):
    path = tmp_path / "defaults.yaml"
    path.write_text("mqtt: {hots: x}\nframes: {jpeg_quality: 5}\nbogus: 1\n")
    text = "\n".join(validate_file(path))
    assert "field mqtt.hots: Extra inputs are not permitted" in text
    assert "field frames.jpeg_quality: Input should be greater than or equal to 10" in text
    assert "field bogus: unknown key" in text


def test_unreadable_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("site: [unclosed\n")
    assert validate_file(path)[0].startswith(f"{path}: not valid YAML")
    assert validate_file(tmp_path / "missing.yaml")[0].startswith(f"{tmp_path / 'missing.yaml'}: cannot read")


def test_docs_config_reference_is_generated_from_the_schema():
    from agent.config import config_reference_markdown

    assert config_reference_markdown() in (REPO / "docs/agent.md").read_text(), \
        "docs/agent.md is stale: paste the output of `python -m agent config-reference`"
