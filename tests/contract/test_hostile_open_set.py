"""Hostile open-set blocks and npz files: whatever the manifest's open_set block or its (hash-matching) npz holds,
loading the bundle is a BundleError naming the field or the array, never another exception, and never a bundle
that loads and then fails (or scores NaN or infinity) on its first frame.

Real parts: a real two-output ONNX bundle (tests/agent/agent_support.make_open_set_bundle), real npz files,
manifests on disk, contract.bundle.load_bundle.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "agent"))   # the ONNX bundle builder is shared
from agent_support import make_open_set_bundle  # noqa: E402

from contract import openset  # noqa: E402
from contract.bundle import MANIFEST, ROLE_OPEN_SET, BundleError, load_bundle, sha256_file  # noqa: E402

HUGE = "1" + "0" * 400          # a JSON integer literal no float holds


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    return make_open_set_bundle(tmp_path_factory.mktemp("plain"))


@pytest.fixture(scope="module")
def enrolled(tmp_path_factory) -> Path:
    return make_open_set_bundle(tmp_path_factory.mktemp("enrolled"), enrolled=True)


def _arrays(bundle: Path) -> dict[str, np.ndarray]:
    with np.load(bundle / "open_set.npz") as npz:
        return {k: npz[k] for k in npz.files}


def _copy(bundle: Path, tmp_path: Path, *, arrays: dict[str, np.ndarray] | None = None, block: dict | None = None,
          manifest_text: tuple[str, str] | None = None) -> Path:
    """A copy of ``bundle`` with its npz replaced by ``arrays`` (its hash and size in the manifest updated: a
    swapped npz the hash check cannot catch), its open_set block updated with ``block`` and then, in the
    manifest's text, ``manifest_text[0]`` replaced by ``manifest_text[1]``."""
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    if arrays is not None:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        (copy / "open_set.npz").write_bytes(buf.getvalue())
        entry = next(a for a in manifest["artifacts"] if a["role"] == ROLE_OPEN_SET)
        entry.update(sha256=sha256_file(copy / "open_set.npz"), size=(copy / "open_set.npz").stat().st_size)
    manifest["open_set"].update(block or {})
    text = json.dumps(manifest)
    if manifest_text is not None:
        assert manifest_text[0] in text, manifest_text[0]
        text = text.replace(*manifest_text)
    (copy / MANIFEST).write_text(text)
    return copy


def _refused(folder: Path, match: str) -> str:
    with pytest.raises(BundleError, match=match) as err:
        load_bundle(folder)
    assert str(folder / MANIFEST) in str(err.value)
    return str(err.value)


def test_the_unedited_bundles_load_and_score_finite(plain, enrolled, tmp_path):
    for bundle in (plain, enrolled):
        loaded = load_bundle(_copy(bundle, tmp_path / bundle.parent.parent.name, arrays=_arrays(bundle)))
        emb = np.random.default_rng(0).normal(size=(4, 3))
        logits = loaded.open_set.full_logits(np.zeros((4, len(loaded.model_labels))), emb)
        assert logits.shape == (4, len(loaded.labels))
        assert np.isfinite(loaded.open_set.scores(logits, emb)).all()


@pytest.mark.parametrize("field, block, literal", [
    ("threshold", {"threshold": 123456789}, "123456789"),
    ("threshold_int8", {"threshold_int8": 123456789}, "123456789"),
    (r"keep_thresholds\.fp32\[0\]", {"keep_thresholds": {"fp32": [[0.95, 123456789]]}}, "123456789"),
])
def test_an_integer_no_float_holds_in_the_open_set_block_is_refused_naming_the_field(plain, tmp_path, field, block,
                                                                                      literal):
    """``10**400`` is valid JSON and a number to the schema; ``np.isfinite`` raised a bare TypeError on it. The
    schema's bound on thresholds (+-1e12, contract.openset.SCORE_LIMIT) now refuses it first, naming the field."""
    folder = _copy(plain, tmp_path, block=block, manifest_text=(literal, HUGE))
    schema_field = field.replace(r"\.", "/").replace(r"\[0\]", "/0/1")
    message = _refused(folder, f"field open_set/{schema_field}: 10000.* is greater than the maximum of 1000000000000")
    assert HUGE not in message and len(message) < 600     # the number is cut short in the message


def test_an_integer_no_float_holds_is_refused_by_openset_load_too():
    for block in ({"threshold": 10**400}, {"threshold": 1.0, "threshold_int8": -10**400},
                  {"threshold": 1.0, "keep": 10**400}):
        with pytest.raises(openset.OpenSetError, match="manifest open_set: (threshold|threshold_int8|keep) "):
            openset.load({"score": "msp", "embedding_name": "embedding", **block}, None, ["a", "b"])


@pytest.mark.parametrize("block, field", [
    ({"threshold": 2e12}, "threshold"), ({"threshold": 1.0, "threshold_int8": -2e12}, "threshold_int8"),
    ({"threshold": 1.0, "keep_thresholds": {"int8": [[0.9, 1.0], [0.95, 2e12]]}}, r"keep_thresholds\.int8\[1\]"),
])
def test_a_threshold_beyond_the_carried_score_limit_is_refused_naming_the_field(block, field):
    """Messages carry an unknown score within +-SCORE_LIMIT (carried_score): a threshold beyond it would judge
    scores no message can show, so it is refused; at the limit it loads."""
    with pytest.raises(openset.OpenSetError, match=f"manifest open_set: {field}.*beyond \\+-1e\\+12"):
        openset.load({"score": "msp", **block}, None, ["a", "b"])
    at_limit = json.loads(json.dumps(block).replace("2000000000000.0", "1000000000000.0"))
    assert openset.load({"score": "msp", **at_limit}, None, ["a", "b"]).keep > 0


def test_a_score_is_carried_rounded_and_within_the_limit():
    limit = openset.SCORE_LIMIT
    assert [openset.carried_score(x) for x in (0.1234567, -3.0, limit * 4.3, -1e300, limit)] == \
        [0.123457, -3.0, limit, -limit, limit]


@pytest.mark.parametrize("name", ["means", "centre", "components", "variances", "bank", "bank_labels"])
def test_a_zero_dimensional_statistics_array_is_refused_naming_it(plain, tmp_path, name):
    arrays = {**_arrays(plain), name: np.array(0.5 if name != "bank_labels" else 1)}
    _refused(_copy(plain, tmp_path, arrays=arrays), f"open_set.npz: array {name} has shape \\(\\), expected")


@pytest.mark.parametrize("name, bad", [
    ("enrolled_weights", np.array(1.0)),
    ("enrolled_weights", np.ones((1, 3, 1))),
    ("enrolled_weights", np.ones((1, 7))),
    ("enrolled_weights", np.ones((2, 3))),
    ("enrolled_bias", np.array(0.0)),
    ("enrolled_bias", np.zeros((1, 1))),
])
def test_enrolled_rows_of_the_wrong_shape_are_refused_at_load_not_at_the_first_frame(enrolled, tmp_path, name, bad):
    folder = _copy(enrolled, tmp_path, arrays={**_arrays(enrolled), name: bad})
    _refused(folder, f"open_set.npz: .*array {name} has shape")


def test_enrolled_rows_without_statistics_are_checked_against_the_embedding_dim(enrolled, tmp_path):
    """An msp bundle with an enrolled class and no class statistics: the manifest's embedding_dim is the width."""
    arrays = _arrays(enrolled)
    rows = {"enrolled_weights": arrays["enrolled_weights"], "enrolled_bias": arrays["enrolled_bias"]}
    ok = load_bundle(_copy(enrolled, tmp_path / "ok", arrays=rows, block={"score": "msp"}))
    assert ok.open_set.stats is None and ok.open_set.enrolled.weights.shape == (1, 3)
    wide = {**rows, "enrolled_weights": np.ones((1, 7))}
    _refused(_copy(enrolled, tmp_path / "wide", arrays=wide, block={"score": "msp"}),
             r"array enrolled_weights has shape \(1, 7\), expected \(1, 3\)")


@pytest.mark.parametrize("bad, reason", [
    (lambda labels: labels[:, None], r"array bank_labels has shape \(\d+, 1\), expected 1 dimension"),
    (lambda labels: labels[:-1], r"array bank_labels has shape \(\d+,\), expected \(\d+,\)"),
    (lambda labels: labels + 50, r"array bank_labels holds values other than class indices 0\.\.3"),
    (lambda labels: labels - 1, r"array bank_labels holds values other than class indices 0\.\.3"),
    (lambda labels: labels + 0.5, r"array bank_labels holds values other than class indices 0\.\.3"),
])
def test_bank_labels_of_the_wrong_shape_or_out_of_range_are_refused(plain, tmp_path, bad, reason):
    arrays = _arrays(plain)
    arrays["bank_labels"] = bad(arrays["bank_labels"])
    _refused(_copy(plain, tmp_path, arrays=arrays, block={"score": "knn"}), "open_set.npz: " + reason)


@pytest.mark.parametrize("name, change, reason", [
    ("means", lambda a: a.astype(np.complex128), "array means is of type complex128, expected real numbers"),
    ("bank", lambda a: a.astype("U8"), "array bank is of type <U8, expected real numbers"),
    ("means", lambda a: a.astype(np.float64) * 1e200, r"array means holds a value of magnitude .*e\+200, more than 1e"),
    ("centre", lambda a: a + 1e7, r"array centre holds a value of magnitude"),
    ("variances", lambda a: np.full(a.shape, 1e-320), r"array variances holds 1e-320, expected variances of at least"),
    ("rest_variance", lambda a: np.full(a.shape, 1e-40), r"array rest_variance holds 1e-40, expected variances"),
    ("rest_variance", lambda a: np.ones(3), r"array rest_variance has shape \(3,\), expected one number"),
])
def test_statistics_that_would_score_nan_or_infinity_are_refused(plain, tmp_path, name, change, reason):
    arrays = _arrays(plain)
    arrays[name] = change(arrays[name])
    _refused(_copy(plain, tmp_path, arrays=arrays), "open_set.npz: " + reason)


def test_the_bounds_accept_what_fit_embedding_stats_writes_at_its_extremes(tmp_path):
    """The smallest variance the fit keeps (1e-12, stored float32) and the largest class means real embeddings
    (unit-length parts) have load and score finite."""
    rng = np.random.default_rng(0)
    emb = np.concatenate([np.tile(np.eye(4)[c], (20, 1)) for c in range(4)])       # no spread at all
    stats = openset.fit_embedding_stats(emb, np.repeat(np.arange(4), 20), 4)
    assert stats.variances.min() == pytest.approx(1e-12)
    openset.save_npz(tmp_path / "o.npz", openset.OpenSet("knn", 1.0, 0.95, stats))
    back = openset.load({"score": "mahalanobis", "threshold": 1.0}, tmp_path / "o.npz", list("abcd"), 4)
    assert np.isfinite(back.scores(np.zeros((3, 4)), rng.normal(size=(3, 4)))).all()
    assert openset.load({"score": "knn", "threshold": 1.0}, tmp_path / "o.npz", list("abcd"), 4).stats.dim == 4
