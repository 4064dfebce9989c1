"""What a review of the contract package found that the hostile tests before it missed.

- A lone UTF-16 surrogate escaped in a JSON string (``"\\ud800"``) is valid JSON syntax and passed
  ``loads_finite`` and every schema, but is no text: the dashboard applied such a result and then failed to write
  ``/api/state`` as UTF-8 (a 500 for every page while the station's last result was that one).
- JSON Schema's ``integer`` takes ``16.0``: a manifest with ``input.height: 16.0`` loaded, and every frame then
  failed in OpenCV or numpy with a TypeError.
- A TIFF cut to 4-7 bytes raised ``struct.error`` (no ValueError) from ``read_image``.

Real parts: a real ONNX bundle on disk (tests/agent/agent_support), real files, the real dashboard state and
its JSON response.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "agent"))   # the ONNX bundle builder is shared
from agent_support import make_onnx_bundle  # noqa: E402

from contract.bundle import MANIFEST, BundleError, load_bundle  # noqa: E402
from contract.image_header import ImageHeaderError, image_size  # noqa: E402
from contract.messages import NotTextError, checker, loads_finite  # noqa: E402
from contract.preprocess import ImageDecodeError, InputSpec, Preprocessor, read_image  # noqa: E402


@pytest.fixture(scope="module")
def good_bundle(tmp_path_factory) -> Path:
    return make_onnx_bundle(tmp_path_factory.mktemp("good"))


def with_manifest(bundle: Path, folder: Path, text: str) -> Path:
    folder.mkdir()
    for item in bundle.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    (folder / MANIFEST).write_text(text)
    return folder


# ---------------------------------------------------------------- lone surrogates

@pytest.mark.parametrize("text, where", [
    ('{"label": "\\ud800"}', "field label"),
    ('{"label": "ok\\uDFFF"}', "field label"),
    ('{"top_k": [{"label": "a"}, {"label": "\\udc00x"}]}', "field top_k/1/label"),
    ('{"lines": {"Dress\\ud83d": 3}}', "field lines/Dress\\\\ud83d \\(its key\\)"),
    ('["\\ude00\\ud83d"]', "field 0"),                 # a pair in the wrong order is two lone ones
])
def test_an_escaped_lone_surrogate_is_refused_naming_the_field(text, where):
    for data in (text, text.encode(), text.encode("utf-16")):
        with pytest.raises(NotTextError, match=f"{where}: a lone UTF-16 surrogate"):
            loads_finite(data)


def test_raw_surrogate_bytes_are_refused_and_real_text_is_kept():
    """json.loads decodes bytes with ``surrogatepass``: the UTF-8 form of a surrogate (ED A0 80) came through raw."""
    with pytest.raises(NotTextError, match="character 11: a lone UTF-16 surrogate \\(U\\+D800\\)"):
        loads_finite(b'{"label": "\xed\xa0\x80"}')
    with pytest.raises(NotTextError, match="U\\+DC00"):
        loads_finite('{"label": "\udc00"}')
    # a surrogate pair is one character, an escaped backslash is no escape, and other text stays as it was
    assert loads_finite(b'{"a": "\\ud83d\\ude00", "b": "\\\\ud800", "c": "\xc3\xa9\xe2\x82\xac"}') == \
        {"a": "\U0001f600", "b": "\\ud800", "c": "\xe9\u20ac"}
    assert loads_finite(b"\xef\xbb\xbf" + b'{"a": 1}') == {"a": 1} == loads_finite('{"a": 1}'.encode("utf-16"))
    with pytest.raises(UnicodeDecodeError):
        loads_finite(b'{"a": "\xff"}')


def result_body(label: str) -> dict:
    now = round(time.time(), 6)
    return {"schema": "result.v1", "id": str(uuid.uuid4()), "seq": 1, "ts": now, "site": "s1", "station": "st1",
            "camera": "cam0", "frame_seq": 1, "captured_at": now,
            "model": {"name": "m", "version": "1", "backend": "onnxruntime-cpu", "precision": "fp32"},
            "label": label, "class_id": 0, "confidence": 0.9, "top_k": [{"label": label, "p": 0.9}],
            "low_confidence": False, "reasons": [], "latency_ms": {"queue": 1.0, "preprocess": 1.0, "inference": 1.0}}


def test_a_result_with_a_lone_surrogate_is_malformed_and_the_dashboard_keeps_serving():
    """Given a result whose label is an escaped lone surrogate (it follows result.v1: a string of at most 256
    characters), when the dashboard gets it, then it is counted malformed and /api/state still renders."""
    from central.dashboard.server import StrictJSONResponse
    from central.dashboard.state import WarehouseState

    payload = json.dumps(result_body("LABEL")).replace("LABEL", "\\ud800").encode()
    assert checker("result.v1").error(json.loads(payload)) is None        # the schema alone takes it
    state = WarehouseState()
    assert state.ingest("inventory/s1/st1/result", payload) == "malformed"
    assert "lone UTF-16 surrogate" in state.malformed[0]["reason"]
    assert state.ingest("inventory/s1/st1/result", json.dumps(result_body("Dress")).encode()) == "applied"
    StrictJSONResponse(state.snapshot())


def test_a_manifest_field_holding_a_lone_surrogate_is_refused_naming_manifest_and_field(good_bundle, tmp_path):
    manifest = json.loads((good_bundle / MANIFEST).read_text())
    manifest["architecture"] = "resnet\ud800"         # json.dumps writes it as the escape \ud800
    folder = with_manifest(good_bundle, tmp_path / "b", json.dumps(manifest))
    with pytest.raises(BundleError, match="manifest.json: field architecture: a lone UTF-16 surrogate") as err:
        load_bundle(folder)
    assert str(folder / MANIFEST) in str(err.value)


# ---------------------------------------------------------------- whole numbers in the manifest's input block

@pytest.mark.parametrize("field", ["height", "width", "resize_shorter"])
@pytest.mark.parametrize("literal", ["16.0", "1.6e1", "true"])
def test_an_input_side_that_is_not_a_whole_number_is_refused_at_load(good_bundle, tmp_path, field, literal):
    """The schema's "integer" takes 16.0 and 1.6e1 (a float without a fraction); the station then failed on every
    frame (cv2.resize: "Can't parse 'dsize'", numpy: "'float' object cannot be interpreted as an integer")."""
    manifest = json.loads((good_bundle / MANIFEST).read_text())
    assert manifest["input"][field] == 16
    manifest["input"][field] = "@@"
    folder = with_manifest(good_bundle, tmp_path / "b", json.dumps(manifest).replace('"@@"', literal))
    with pytest.raises(BundleError, match=f"field input(/{field})?: .*") as err:
        load_bundle(folder)
    assert str(folder / MANIFEST) in str(err.value)
    if literal != "true":        # the schema refuses a boolean itself; a float is refused by InputSpec
        assert f"input.{field}: expected a whole number of pixels" in str(err.value)


def test_input_spec_takes_integers_of_numpy_too_and_refuses_floats():
    spec = InputSpec(height=np.int64(16), width=16, resize_shorter=np.int32(18))
    assert Preprocessor(spec)(np.zeros((30, 40, 3), np.uint8)).shape == (3, 16, 16)
    for bad in (16.0, np.float32(16), True, 0, -16):
        with pytest.raises(ValueError, match="input.height: expected a whole number of pixels >= 1"):
            InputSpec(height=bad, width=16, resize_shorter=16)


# ---------------------------------------------------------------- image headers

@pytest.mark.parametrize("data", [b"II*\x00", b"MM\x00*", b"II*\x00\x08\x00\x00", b"MM\x00*\x00\x00\x01"])
def test_a_tiff_cut_short_is_an_image_error_naming_the_file(tmp_path, data):
    path = tmp_path / "cut.tif"
    path.write_bytes(data)
    with pytest.raises(ImageHeaderError, match=f"{path}: a TIFF of {len(data)} bytes, too short"):
        image_size(data, str(path))
    with pytest.raises(ImageDecodeError, match=f"{path}: a TIFF of {len(data)} bytes, too short"):
        read_image(path)


# ---------------------------------------------------------------- open_set.npz: bounded as read, not only on disk

def test_an_open_set_npz_that_inflates_past_the_limit_is_refused_before_it_is_read(tmp_path, monkeypatch):
    """NPZ_MAX_BYTES bounded the file only: deflated zeros inflate about 1000-fold (1 MiB of file was 1 GiB of
    memory, /tmp/contract/npz_bomb.py), as every array was read before any check. The limit is lowered to 4 MiB
    here so the bomb is quick to write; the check is the same at 256 MiB."""
    import io
    import zipfile

    from contract import openset

    monkeypatch.setattr(openset, "NPZ_MAX_BYTES", 4 << 20)
    path = tmp_path / "open_set.npz"
    rows = openset.NPZ_MAX_BYTES // (512 * 8) + 1
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        means = io.BytesIO()
        np.save(means, np.eye(2, 512))
        archive.writestr("means.npy", means.getvalue())
        with archive.open("bank.npy", "w", force_zip64=True) as member:     # streamed: never held here either
            np.lib.format.write_array_header_1_0(member, {"descr": "<f8", "fortran_order": False,
                                                          "shape": (rows, 512)})
            zeros = bytes(512 * 8 * 1024)
            for start in range(0, rows, 1024):
                member.write(zeros[:512 * 8 * min(1024, rows - start)])
    assert path.stat().st_size < 64 << 10
    with pytest.raises(openset.OpenSetError, match=f"{path}: its arrays take .* bytes once inflated, more than "
                                                   f"{4 << 20}"):
        openset.load({"score": "msp", "threshold": 0.5}, path, ["a", "b"])
    # the same arrays a few rows short of the limit are read (and then judged as statistics: here, incomplete)
    small = tmp_path / "small.npz"
    np.savez(small, means=np.eye(2, 512), bank=np.zeros((rows - 4, 512)))
    with pytest.raises(openset.OpenSetError, match=f"{small}: array centre is missing"):
        openset.load({"score": "msp", "threshold": 0.5}, small, ["a", "b"])


# ---------------------------------------------------------------- name and version: one limit everywhere

@pytest.mark.parametrize("field", ["name", "version"])
def test_a_name_or_version_longer_than_128_is_refused_as_the_trainer_and_cmd_model_refuse_it(good_bundle, tmp_path,
                                                                                          field):
    """check_name_version and cmd-model.v1 allow 128 characters, payloads 256; the manifest schema allowed any
    length, so a bundle named with 300 loaded and every result it published broke result.v1 at central."""
    from contract.bundle import check_name_version

    manifest = json.loads((good_bundle / MANIFEST).read_text())
    manifest[field] = "v" * 129
    folder = with_manifest(good_bundle, tmp_path / "long", json.dumps(manifest))
    with pytest.raises(BundleError, match=f"manifest.json: field {field}: .* does not match") as err:
        load_bundle(folder)
    assert str(folder / MANIFEST) in str(err.value)
    with pytest.raises(ValueError, match=f"--{field}"):
        check_name_version(**{"name": "m", "version": "1", field: "v" * 129})
    manifest[field] = "v" * 128
    bundle = load_bundle(with_manifest(good_bundle, tmp_path / "at-limit", json.dumps(manifest)))
    check_name_version(bundle.name, bundle.version)
    result = {**result_body("Dress"), "model": {"name": bundle.name, "version": bundle.version,
                                                "backend": "onnxruntime-cpu", "precision": "fp32"}}
    assert checker("result.v1").error(result) is None


# ---------------------------------------------------------------- the topic root of central tools

@pytest.mark.parametrize("root", ["inv/#", "inv/+", "#", "+/x", "", "/", "a//b", "/inventory", "x\x00", "r" * 201])
def test_a_topic_root_no_topic_can_be_built_under_is_refused_naming_the_flag(root):
    """--topic-root 'inv/#' passed check(); the subscription built under it then failed inside paho's on_connect
    and connect() reported "no CONNACK within 15 s" (/tmp/contract/topic_root_wildcard.py, a real mosquitto).
    The rule is a station's mqtt.topic_root's (agent/config.py), whose topics a central root must match."""
    from contract.broker import BrokerSettings, BrokerSettingsError, connect

    with pytest.raises(BrokerSettingsError, match="--topic-root: .* is not a topic root"):
        BrokerSettings(topic_root=root).check()
    with pytest.raises(BrokerSettingsError, match="--topic-root"):      # at once, before any connection
        connect(BrokerSettings(port=1, topic_root=root, connect_timeout_s=60), "probe")


@pytest.mark.parametrize("root", ["inventory", "inventory/", "acme/eu-west", "wh 1/é"])
def test_a_topic_root_of_plain_levels_passes(root):
    from contract.broker import BrokerSettings

    BrokerSettings(topic_root=root).check()


# ---------------------------------------------------------------- gate records

@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "large"])
def test_a_gate_record_that_is_no_small_regular_file_is_refused_at_once_naming_it(tmp_path, kind):
    """read_gate read gate.json with Path.read_bytes(): a FIFO blocked ``publish`` for good, a link to /dev/zero
    read until memory ran out (/tmp/contract/gate_fifo.py)."""
    import os

    from contract.events import GATE_FILE, GATE_MAX_BYTES, RolloutError, read_gate

    path = tmp_path / GATE_FILE
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    else:
        path.write_bytes(b'{"decision": "promoted", "pad": "' + b"x" * GATE_MAX_BYTES + b'"}')
    reason = "more than a gate record's" if kind == "large" else "not a regular file"
    with pytest.raises(RolloutError, match=f"^{path}: cannot read \\({reason}"):
        read_gate(tmp_path)
