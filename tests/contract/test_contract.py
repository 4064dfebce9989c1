"""The contract package: imports nothing of ours and no torch; topics, broker settings and schema checks."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from contract.broker import (
    BrokerSettings,
    BrokerSettingsError,
    add_broker_args,
    settings_from_args,
)
from contract.messages import (
    ENGINES,
    SchemaError,
    Topics,
    checker,
    fleet_subscription,
    rollout_topic,
    split_station_topic,
    station_root,
    station_topic,
)

REPO = Path(__file__).resolve().parents[2]


def test_contract_imports_nothing_of_ours_and_no_torch():
    code = ("import sys, contract.bundle, contract.preprocess, contract.messages, contract.broker, contract.secrets\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'agent', 'trainer', 'central', 'dashboard', 'torchvision'))\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_topics_are_spelled_once():
    root = station_root("dock-3", "st-7")
    assert root == "inventory/dock-3/st-7"
    topics = Topics(root)
    assert topics.result == "inventory/dock-3/st-7/result"
    assert topics.for_kind("frame") == "inventory/dock-3/st-7/frames"
    assert topics.cmd("model") == "inventory/dock-3/st-7/cmd/model"
    assert station_topic("dock-3/st-7", "cmd/model") == topics.cmd("model")
    assert fleet_subscription("frames", "wh/eu") == "wh/eu/+/+/frames"
    assert rollout_topic("wh/eu/") == "wh/eu/_central/rollout"
    assert split_station_topic(topics.stats) == ("dock-3", "st-7", "stats")
    with pytest.raises(ValueError, match="not a station topic"):
        split_station_topic("inventory/stats")
    with pytest.raises(AttributeError):
        topics.nonsense  # noqa: B018


def test_broker_flags_parse_to_settings_and_errors_name_the_flag(tmp_path):
    parser = argparse.ArgumentParser()
    add_broker_args(parser, required=False, default_host=None)
    assert settings_from_args(parser.parse_args([])) is None           # the broker is optional there
    ca = tmp_path / "ca.crt"
    ca.write_text("not used here")
    args = parser.parse_args(["--mqtt-host", "broker", "--mqtt-port", "8883", "--tls-ca", str(ca), "--username", "u",
                              "--password-file", str(tmp_path / "missing"), "--topic-root", "wh"])
    settings = settings_from_args(args)
    assert (settings.host, settings.port, settings.use_tls, settings.topic_root) == ("broker", 8883, True, "wh")
    assert settings.where() == "mqtts://broker:8883"
    with pytest.raises(BrokerSettingsError, match=r"--password-file: .*missing: no such file"):
        settings.check()
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(BrokerSettingsError, match=r"--password-file: .*the first line \(the secret\) is empty"):
        settings.with_(password_file=tmp_path / "empty").check()
    with pytest.raises(BrokerSettingsError, match="--tls-cert and --tls-key go together"):
        settings.with_(password_file=None, tls_cert=ca).check()
    with pytest.raises(BrokerSettingsError, match="--mqtt-port: 0 is not a port"):
        settings.with_(password_file=None, port=0).check()
    named = BrokerSettings(password_env="NO_SUCH_VARIABLE_X", flags=(("password_env", "mqtt.password_env"),))
    with pytest.raises(BrokerSettingsError, match="mqtt.password_env: environment variable NO_SUCH_VARIABLE_X"):
        named.check()


@pytest.mark.parametrize("engine", ENGINES)
def test_a_schema_check_names_the_field_and_never_changes_the_body(engine):
    body = {"schema": "cmd-capture-empty.v1", "id": "7c1e6a43-7d57-4f0e-9a63-5a3d1f8e2b10",
            "ts": "2026-12-03T08:00:00Z"}
    schema = json.loads((REPO / "contract/schemas/mqtt/cmd-capture-empty.v1.json").read_text())
    before = json.dumps(body, sort_keys=True)
    try:
        checker("cmd-capture-empty.v1", engine).check("t", body)
    except SchemaError:
        pass                      # whether this minimal body passes is the schema's business; it must stay as it was
    assert json.dumps(body, sort_keys=True) == before
    assert "default" in json.dumps(schema)              # the schema does carry a default that must not be filled in
    with pytest.raises(SchemaError, match=r"^cmd/capture-empty: field "):
        checker("cmd-capture-empty.v1", engine).check("cmd/capture-empty", {"schema": "cmd-capture-empty.v1"})
    with pytest.raises(KeyError, match="no schema 'nope.v1'"):
        checker("nope.v1", engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_both_engines_refuse_a_trailing_newline_where_a_pattern_ends_the_string(engine):
    """Python's re lets "$" match before a final newline; fastjsonschema does not. jsonschema now agrees with it,
    so a station and a server never disagree on "PO-4711\\n"."""
    body = {"shipment": "PO-4711", "lines": {"Shirt": 1}}
    assert checker("cmd-expect.v1", engine).error(body) is None
    for odd in ("PO-4711\n", "PO-4711\nX", "\nPO"):
        problem = checker("cmd-expect.v1", engine).error({**body, "shipment": odd})
        assert problem is not None and problem[0] == "shipment", (odd, problem)



def test_a_folder_that_cannot_be_synced_raises_only_when_strict(tmp_path):
    """The engine cache must know its entry's rename is on disk (strict); a publish onto a file system
    that cannot sync folders goes on (the default)."""
    from contract.events import fsync_dir

    fsync_dir(tmp_path, strict=True)                 # a real folder syncs either way
    missing = tmp_path / "gone"
    fsync_dir(missing)
    with pytest.raises(FileNotFoundError):
        fsync_dir(missing, strict=True)


@pytest.mark.parametrize("label", [".", "..", " .. ", "...", ".hidden", "", "   ", "a/b", "../etc", "..\\x",
                                   "\x00", "/", "T-shirt/top"])
def test_a_class_folder_name_stays_one_visible_folder_inside_its_parent(tmp_path, label):
    """``folder_name("..")`` was ``..``: a class folder written there is the dataset root's parent, and ``.``
    the root itself. Dot names (hidden: the trainer skips them) get a ``_`` in front, as the labels export did."""
    from contract.dataset import folder_name

    name = folder_name(label)
    assert name and name not in (".", "..") and not name.startswith("."), (label, name)
    assert "/" not in name and "\\" not in name and "\x00" not in name, (label, name)
    (tmp_path / name).mkdir()
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_class_folder_names_of_any_text_are_safe():
    from hypothesis import given
    from hypothesis import strategies as st

    from contract.dataset import folder_name

    @given(st.text(alphabet=st.sampled_from(". /\\\x00a_-"), max_size=8) | st.text(max_size=20))
    def check(label: str) -> None:
        name = folder_name(label)
        assert name and name not in (".", "..") and not name.startswith("."), (label, name)
        assert not set(name) & {"/", "\\", "\x00"}, (label, name)

    check()
