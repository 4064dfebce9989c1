"""Hostile bundles: whatever a manifest holds, loading it is a BundleError naming the manifest, never another
exception; a bundle whose model cannot do its job (labels != outputs, wrong input shape, NaN) is refused.

Real parts: real ONNX models built with onnx.helper, real ONNX Runtime, manifests on disk.
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "agent"))   # the ONNX bundle builder is shared
from agent_support import make_onnx_bundle  # noqa: E402

from contract.bundle import MANIFEST, BundleError, check_model_runs, load_bundle  # noqa: E402

# JSON values of every type, non-finite floats included (json.dumps writes them as NaN / Infinity)
scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=20)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)


@pytest.fixture(scope="module")
def good_bundle(tmp_path_factory) -> Path:
    return make_onnx_bundle(tmp_path_factory.mktemp("good"))


def manifest_of(bundle: Path) -> dict:
    return json.loads((bundle / MANIFEST).read_text())


def load_with(bundle: Path, manifest_bytes: bytes):
    """``load_bundle`` on a copy of ``bundle`` whose manifest is ``manifest_bytes``; the copy's manifest path."""
    folder = Path(tempfile.mkdtemp(prefix="hostile-")) / "b"
    folder.mkdir()
    for item in bundle.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    (folder / MANIFEST).write_bytes(manifest_bytes)
    return folder / MANIFEST


def assert_refused_or_loaded(manifest_path: Path) -> None:
    try:
        bundle = load_bundle(manifest_path.parent)
    except BundleError as exc:
        assert str(manifest_path) in str(exc) or str(manifest_path.parent) in str(exc), str(exc)
    else:       # a mutation that happens to be valid loads whole
        assert bundle.labels and bundle.input_spec.height >= 8


# every place a field can be: top level, the input block, the first artifact, the quality thresholds
PLACES = [(), ("input",), ("artifacts", 0), ("quality", "thresholds")]


def _at(manifest: dict, place: tuple) -> dict:
    node = manifest
    for key in place:
        node = node[key]
    return node


@settings(max_examples=150)
@given(place=st.sampled_from(PLACES), data=st.data())
def test_a_manifest_field_of_any_type_is_a_bundle_error_naming_the_manifest(good_bundle, place, data):
    manifest = copy.deepcopy(manifest_of(good_bundle))
    node = _at(manifest, place)
    key = data.draw(st.sampled_from(sorted(node) + ["extra"]), label="field")
    if data.draw(st.booleans(), label="delete"):
        node.pop(key, None)
    else:
        node[key] = data.draw(json_values, label="value")
    assert_refused_or_loaded(load_with(good_bundle, json.dumps(manifest).encode()))


@settings(max_examples=100)
@given(raw=st.binary(max_size=300))
def test_manifest_bytes_of_any_kind_are_a_bundle_error_naming_the_manifest(good_bundle, raw):
    path = load_with(good_bundle, raw)
    with pytest.raises(BundleError) as err:
        load_bundle(path.parent)
    assert str(path) in str(err.value)


@settings(max_examples=40)
@given(position=st.integers(0, 400), byte=st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80"]))
def test_invalid_utf8_anywhere_in_a_manifest_is_refused_naming_it(good_bundle, position, byte):
    text = (good_bundle / MANIFEST).read_bytes()
    path = load_with(good_bundle, text[:position] + byte + text[position:])
    with pytest.raises(BundleError, match="not UTF-8|not valid JSON") as err:
        load_bundle(path.parent)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_in_a_manifest_are_refused(good_bundle, literal):
    text = json.dumps(manifest_of(good_bundle)).replace('"min_confidence": 0.5', f'"min_confidence": {literal}')
    assert literal in text
    path = load_with(good_bundle, text.encode())
    with pytest.raises(BundleError, match="not valid JSON") as err:
        load_bundle(path.parent)
    assert str(path) in str(err.value)


def test_a_key_given_twice_in_a_manifest_is_refused_naming_the_key(good_bundle):
    """json.loads keeps the last of two equal keys: a manifest giving two thresholds would run on one of them
    without a word. Every JSON the product reads refuses it (contract.messages.loads_finite)."""
    from contract.messages import DuplicateKeyError, loads_finite

    text = json.dumps(manifest_of(good_bundle)).replace('"min_confidence": 0.5',
                                                        '"min_confidence": 0.5, "min_confidence": 0.9')
    path = load_with(good_bundle, text.encode())
    with pytest.raises(BundleError, match="not valid JSON.*key 'min_confidence' given twice") as err:
        load_bundle(path.parent)
    assert str(path) in str(err.value)
    for raw, key in [('{"a": 1, "a": 1}', "a"), ('[{"x": {"b": 2, "c": 3, "b": 2}}]', "b")]:
        with pytest.raises(DuplicateKeyError, match=f"key '{key}' given twice in one object"):
            loads_finite(raw)
    assert loads_finite('{"a": {"a": 1}, "b": [{"a": 2}, {"a": 3}]}') == {"a": {"a": 1}, "b": [{"a": 2}, {"a": 3}]}


def test_huge_and_deeply_nested_manifests_are_refused(good_bundle):
    path = load_with(good_bundle, b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(path.parent)
    path = load_with(good_bundle, b" " * (2 << 20) + b"{}")
    with pytest.raises(BundleError, match="more than a manifest's"):
        load_bundle(path.parent)


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_a_manifest_or_signature_that_is_not_a_regular_file_is_refused_at_once(good_bundle, kind):
    """A FIFO or a link to /dev/zero reports size 0, so a size check passes and a read would never end (a hung
    command thread, memory without bound): refused naming the file, before any read."""
    import os

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    for name in (MANIFEST, "manifest.json.sig"):
        path = load_with(good_bundle, (good_bundle / MANIFEST).read_bytes()).parent / name
        path.unlink(missing_ok=True)
        os.mkfifo(path) if kind == "fifo" else path.symlink_to("/dev/zero")
        key = Ed25519PrivateKey.generate().public_key() if name != MANIFEST else None
        with pytest.raises(BundleError, match=f"{path}: not a regular file"):
            load_bundle(path.parent, key)


def test_an_input_size_no_station_can_allocate_is_refused(good_bundle):
    manifest = manifest_of(good_bundle)
    manifest["input"]["height"] = 10**12
    path = load_with(good_bundle, json.dumps(manifest).encode())
    with pytest.raises(BundleError, match="field input/height"):
        load_bundle(path.parent)


def test_a_good_bundle_loads_and_its_model_runs(good_bundle):
    check_model_runs(load_bundle(good_bundle))


def test_labels_count_not_equal_to_the_model_outputs_is_refused(tmp_path):
    bundle = load_bundle(make_onnx_bundle(tmp_path, classes=4, labels=5))
    with pytest.raises(BundleError, match="4 outputs per image but field labels has 5") as err:
        check_model_runs(bundle)
    assert str(bundle.root / MANIFEST) in str(err.value)


def test_a_model_input_shape_other_than_the_manifest_is_refused(tmp_path):
    bundle = load_bundle(make_onnx_bundle(tmp_path, size=16, model_size=8))
    with pytest.raises(BundleError, match=r"input shape .*8, 8.* field input says \(N, 3, 16, 16\)"):
        check_model_runs(bundle)


def test_a_model_that_outputs_nan_is_refused(tmp_path):
    bundle = load_bundle(make_onnx_bundle(tmp_path, nan="always"))
    with pytest.raises(BundleError, match="non-finite outputs") as err:
        check_model_runs(bundle)
    assert "model.fp32.onnx" in str(err.value)


def test_verify_runs_the_model(tmp_path):
    """``python -m trainer verify`` refuses what the station would refuse (trainer.export.bundle.verify)."""
    pytest.importorskip("torch")
    from trainer.export.bundle import verify

    verify(make_onnx_bundle(tmp_path / "ok"))
    with pytest.raises(BundleError, match="outputs per image but field labels has"):
        verify(make_onnx_bundle(tmp_path / "bad", classes=3, labels=4))


@pytest.mark.parametrize("field, value", [("name", "onnx-tiny\n"), ("version", "tiny-1\n"), ("name", "onnx-tiny\nX")])
def test_a_name_or_version_with_a_newline_is_refused_naming_the_field(good_bundle, field, value):
    """Python's re lets "$" match before a final newline: the manifest schema is checked with the strict pattern
    the MQTT schemas use (contract.messages), so "m\\n" is no bundle name (it would be no folder name either)."""
    manifest = manifest_of(good_bundle)
    manifest[field] = value
    path = load_with(good_bundle, json.dumps(manifest).encode())
    with pytest.raises(BundleError, match=f"field {field}: .* does not match") as err:
        load_bundle(path.parent)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("label, problem", [
    ("x" * 300, "is 300 characters long, more than 128"),
    ("tab\there", "is empty or holds control characters"),
    ("line\n", "is empty or holds control characters"),
    ("   ", "is empty or holds control characters"),
    ("\ud800", "a lone UTF-16 surrogate"),     # refused as it is read (contract.messages.loads_finite)
])
def test_a_label_no_decision_could_carry_is_refused_naming_it(good_bundle, label, problem):
    """The class-name rule of the trainer's datasets and enrolment (contract.dataset.class_name_problem): a label
    that breaks it would make every decision about that class fail decision.v1 at the station."""
    manifest = manifest_of(good_bundle)
    manifest["labels"][2] = label
    path = load_with(good_bundle, json.dumps(manifest).encode())
    with pytest.raises(BundleError, match=f"field labels/2: .*{problem}") as err:
        load_bundle(path.parent)
    assert str(path) in str(err.value)
    manifest["labels"][2] = "T-shirt/top (a label with room: 128 characters at most)".ljust(128, ".")
    load_bundle(load_with(good_bundle, json.dumps(manifest).encode()).parent)
