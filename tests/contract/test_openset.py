"""contract/openset.py: the unknown scores, the threshold, the npz a bundle carries, and what is refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from contract import openset
from contract.bundle import BundleError, load_bundle, sha256_file


def _clusters(rng, classes=4, dim=6, per_class=200, spread=0.3):
    centres = rng.normal(0, 3, size=(classes, dim))
    y = np.repeat(np.arange(classes), per_class)
    return centres, centres[y] + rng.normal(0, spread, size=(len(y), dim)), y


def test_mahalanobis_equals_the_textbook_distance_when_every_direction_is_kept():
    rng = np.random.default_rng(0)
    _, emb, y = _clusters(rng)
    stats = openset.fit_embedding_stats(emb, y, 4, bank_per_class=0)
    within = emb - stats.means[y]
    cov = within.T @ within / (len(emb) - 4)
    cov = 0.9 * cov + 0.1 * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])
    precision = np.linalg.inv(cov)
    x = rng.normal(0, 3, size=(5, 6))
    want = np.array([[(xi - m) @ precision @ (xi - m) for m in stats.means] for xi in x])
    np.testing.assert_allclose(stats.mahalanobis(x), want, rtol=1e-6)


def test_directions_left_out_still_count_through_the_rest_variance():
    rng = np.random.default_rng(1)
    _, emb, y = _clusters(rng, dim=8)
    few = openset.fit_embedding_stats(emb, y, 4, max_components=3, bank_per_class=0)
    e = np.ones(8)
    off = e - few.components @ (few.components.T @ e)          # orthogonal to every kept direction
    off /= np.linalg.norm(off)
    d = few.mahalanobis(few.means[:1] + 5.0 * off)[0, 0]
    assert d == pytest.approx(25.0 / few.rest_variance, rel=1e-6)


@pytest.mark.parametrize("kind", openset.SCORES)
def test_every_score_ranks_a_far_point_above_the_known_ones(kind):
    rng = np.random.default_rng(2)
    centres, emb, y = _clusters(rng)
    stats = openset.fit_embedding_stats(emb, y, 4)
    head = np.linalg.lstsq(np.c_[emb, np.ones(len(emb))], np.eye(4)[y] * 10, rcond=None)[0]
    logits = lambda e: np.c_[e, np.ones(len(e))] @ head  # noqa: E731
    known = centres[y[::50]] + rng.normal(0, 0.3, size=(len(y[::50]), 6))
    far = centres.mean(0) + rng.normal(0, 0.3, size=(10, 6))      # between the classes: no class claims it
    k = openset.unknown_scores(kind, logits(known), known, stats)
    u = openset.unknown_scores(kind, logits(far), far, stats)
    assert openset.auroc(k, u) > 0.9


def test_auroc_matches_the_pairwise_definition_with_ties():
    rng = np.random.default_rng(3)
    k = rng.integers(0, 5, 40).astype(float)
    u = rng.integers(2, 7, 30).astype(float)
    pairs = (u[:, None] > k[None, :]).mean() + 0.5 * (u[:, None] == k[None, :]).mean()
    assert openset.auroc(k, u) == pytest.approx(pairs)


@pytest.mark.parametrize("side", ["known", "unknown"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_auroc_and_false_accepts_refuse_a_score_that_is_not_finite_naming_the_side(side, bad):
    """A NaN unknown score ranked as the most unknown (auroc 0.75 where the finite scores give 0.5) and counted
    as rejected at any threshold: a model's NaN would flatter the figures. Refused, naming which scores."""
    k, u = np.array([0.0, 0.15, 0.3]), np.array([0.1, 0.2])
    if side == "known":
        k = np.append(k, bad)
    else:
        u = np.append(u, [bad, bad])
    for figure in (lambda: openset.auroc(k, u), lambda: openset.false_accept_rate(k, u, 0.95)):
        with pytest.raises(openset.OpenSetError, match=f"{side}-item scores: .* not finite"):
            figure()


def test_auroc_of_an_empty_side_is_nan_as_before():
    assert np.isnan(openset.auroc(np.array([]), np.array([1.0])))


def test_threshold_keeps_at_least_the_share_asked_for():
    scores = np.random.default_rng(4).normal(size=1001)
    for keep in (0.5, 0.9, 0.95, 1.0):
        t = openset.threshold_for_keep(scores, keep)
        assert (scores <= t).mean() >= keep
    with pytest.raises(openset.OpenSetError):
        openset.threshold_for_keep(np.array([1.0, np.nan]), 0.95)
    with pytest.raises(openset.OpenSetError):
        openset.threshold_for_keep(scores, 0.0)


def test_the_keep_list_gives_the_threshold_that_keeps_at_least_a_share_of_the_calibration_set():
    scores = np.random.default_rng(6).normal(size=2000)
    curve = openset.keep_curve(scores)
    assert [k for k, _ in curve] == list(openset.KEEP_CURVE)
    for keep, t in curve:
        assert t == openset.threshold_for_keep(scores, keep) and (scores <= t).mean() >= keep
    int8 = tuple((k, t + 1.0) for k, t in curve)
    model = openset.OpenSet("msp", curve[1][1], 0.95, None, keep_thresholds={"fp32": curve, "int8": int8})
    assert model.threshold_at(0.999, "fp32") == dict(curve)[0.999]
    assert model.threshold_at(0.999, "int8") == dict(int8)[0.999]          # the INT8 model's own scores
    assert model.threshold_at(0.996, "fp32") == dict(curve)[0.999]         # the listed share at or above it
    assert model.threshold_at(0.95, "fp16") == curve[1][1]                  # FP16 runs on FP32's list
    only_fp32 = openset.OpenSet("msp", 1.0, 0.95, None, keep_thresholds={"fp32": curve[:3]})
    assert only_fp32.threshold_at(0.9, "int8") == curve[0][1]
    assert only_fp32.threshold_at(0.99, "fp32") is None                     # no listed share reaches it
    assert openset.OpenSet("msp", 1.0, 0.95, None).threshold_at(0.9, "fp32") is None   # exported before the list


@pytest.mark.parametrize("curve, reason", [
    ({"fp32": [[0.9, 1.0], [0.95, 0.5]]}, r"keep_thresholds\.fp32\[1\]: shares must rise and thresholds not fall"),
    ({"fp32": [[0.95, 1.0], [0.9, 2.0]]}, r"keep_thresholds\.fp32\[1\]: shares must rise"),
    ({"int8": [[0.9, float("nan")]]}, r"keep_thresholds\.int8\[0\] \[0\.9, nan\] is not a pair of finite numbers"),
    ({"int8": [[1.5, 1.0]]}, r"keep_thresholds\.int8\[0\]: keep 1\.5 is not a share"),
    ({"int8": [[0.9, True]]}, r"keep_thresholds\.int8\[0\] .* not a pair of finite numbers"),
    ({"fp32": []}, r"keep_thresholds\.fp32 must be a list of 1 to"),
    ({"fp16": [[0.9, 1.0]]}, r"keep_thresholds must map fp32 and/or int8"),
    ([[0.9, 1.0]], r"keep_thresholds must map fp32 and/or int8"),
])
def test_a_bad_keep_list_is_refused_by_name(curve, reason):
    block = {"score": "msp", "threshold": 0.5, "keep": 0.95, "embedding_name": "embedding", "keep_thresholds": curve}
    with pytest.raises(openset.OpenSetError, match="manifest open_set: " + reason):
        openset.load(block, None, ["a", "b"], None)


def test_npz_round_trip_with_an_enrolled_class(tmp_path):
    rng = np.random.default_rng(5)
    _, emb, y = _clusters(rng)
    stats = openset.fit_embedding_stats(emb, y, 4)
    head = openset.EnrolledHead().with_class("new", rng.normal(size=6), 0.5)
    model = openset.OpenSet("mahalanobis", 3.0, 0.95, stats.with_class(rng.normal(size=6)), head)
    openset.save_npz(tmp_path / "o.npz", model)
    block = {"score": "mahalanobis", "threshold": 3.0, "keep": 0.95, "embedding_name": "embedding",
             "enrolled": ["new"]}
    back = openset.load(block, tmp_path / "o.npz", ["a", "b", "c", "d", "new"], 6)
    x = rng.normal(size=(3, 6))
    np.testing.assert_allclose(back.full_logits(np.zeros((3, 4)), x)[:, 4], x @ head.weights[0] + 0.5, rtol=1e-5)
    np.testing.assert_allclose(back.scores(np.zeros((3, 5)), x), model.scores(np.zeros((3, 5)), x), rtol=1e-4)
    with pytest.raises(openset.OpenSetError, match="last of the bundle's labels"):
        openset.load(block, tmp_path / "o.npz", ["a", "b", "c", "new", "d"], 6)
    with pytest.raises(openset.OpenSetError, match="5 class means for 4 labels|class means"):
        openset.load({**block, "enrolled": []}, tmp_path / "o.npz", ["a", "b", "c", "d"], 6)


def test_an_npz_with_nan_or_a_pickle_is_refused(tmp_path):
    np.savez(tmp_path / "nan.npz", means=np.array([[np.nan, 1.0]]))
    block = {"score": "mahalanobis", "threshold": 1.0, "keep": 0.95, "embedding_name": "embedding"}
    with pytest.raises(openset.OpenSetError, match="nan.npz: array means holds NaN"):
        openset.load(block, tmp_path / "nan.npz", ["a"], None)
    np.save(tmp_path / "obj.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    shutil.copy(tmp_path / "obj.npy", tmp_path / "obj.npz")
    with pytest.raises(openset.OpenSetError, match="obj.npz: cannot read"):
        openset.load(block, tmp_path / "obj.npz", ["a"], None)


# ---------------------------------------------------------------- the bundle the trainer exports

def _edit(bundle_dir, tmp_path, change):
    copy = tmp_path / "b"
    shutil.copytree(bundle_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    change(copy, manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def test_exported_bundle_carries_an_unknown_score_that_keeps_the_known_share(real_bundle):
    bundle = load_bundle(real_bundle)
    block = bundle.manifest["open_set"]
    assert bundle.open_set is not None and bundle.open_set.score == block["score"]
    assert bundle.embedding_name == "embedding" and block["embedding_dim"] == bundle.open_set.stats.dim
    assert block["calibration"]["known_kept_fp32"] >= block["keep"]
    # the list of thresholds at other shares kept holds the bundle's own, for each precision
    assert bundle.open_set.threshold_at(block["keep"], "fp32") == block["threshold"]
    assert bundle.open_set.threshold_at(block["keep"], "int8") == block["threshold_int8"]
    for precision in ("fp32", "int8"):
        points = block["keep_thresholds"][precision]
        assert [k for k, _ in points] == list(openset.KEEP_CURVE)
        assert all(a[1] <= b[1] for a, b in zip(points, points[1:]))
    assert bundle.artifact("open-set").path.name == "open_set.npz"
    assert bundle.manifest["quality"]["parity"]["max_abs_embedding_diff"] <= \
        bundle.manifest["quality"]["parity"]["embedding_tolerance"]


def test_a_tampered_npz_or_a_bad_open_set_block_fails_verification(real_bundle, tmp_path):
    def tamper(root, manifest):
        with open(root / "open_set.npz", "ab") as fh:
            fh.write(b"x")
    with pytest.raises(BundleError, match="open_set.npz: size"):
        load_bundle(_edit(real_bundle, tmp_path / "1", tamper))

    def bad_score(root, manifest):
        manifest["open_set"]["score"] = "vibes"
    with pytest.raises(BundleError, match="field open_set/score"):
        load_bundle(_edit(real_bundle, tmp_path / "2", bad_score))

    def no_npz(root, manifest):
        manifest["artifacts"] = [a for a in manifest["artifacts"] if a["role"] != "open-set"]
    with pytest.raises(BundleError, match="needs class statistics"):
        load_bundle(_edit(real_bundle, tmp_path / "3", no_npz))

    def falling_list(root, manifest):
        manifest["open_set"]["keep_thresholds"]["int8"][-1][1] = -1e9
    with pytest.raises(BundleError, match=r"field open_set: manifest open_set: keep_thresholds\.int8\[6\]"):
        load_bundle(_edit(real_bundle, tmp_path / "5", falling_list))

    def not_pairs(root, manifest):
        manifest["open_set"]["keep_thresholds"]["fp32"] = [[0.9, 1.0, 2.0]]
    with pytest.raises(BundleError, match="field open_set/keep_thresholds/fp32/0"):
        load_bundle(_edit(real_bundle, tmp_path / "6", not_pairs))

    def wrong_dim(root, manifest):
        manifest["open_set"]["embedding_dim"] = 7
    with pytest.raises(BundleError, match="statistics of .*-d embeddings, the model gives 7-d"):
        load_bundle(_edit(real_bundle, tmp_path / "4", wrong_dim))


def test_a_swapped_npz_with_a_matching_hash_is_checked_against_the_labels(real_bundle, tmp_path):
    def fewer_means(root, manifest):
        with np.load(root / "open_set.npz") as npz:
            arrays = {k: npz[k] for k in npz.files}
        arrays["means"] = arrays["means"][:-1]
        np.savez(root / "open_set.npz", **arrays)
        entry = next(a for a in manifest["artifacts"] if a["role"] == "open-set")
        entry.update(sha256=sha256_file(root / "open_set.npz"), size=(root / "open_set.npz").stat().st_size)
    with pytest.raises(BundleError, match="class means for 10 labels"):
        load_bundle(_edit(real_bundle, tmp_path, fewer_means))


def test_knn_distance_is_the_kth_nearest_cosine_of_the_nearest_class():
    """Against a brute-force float64 reading of the rule (sorted cosines per class, k scaled to the class's
    share of the bank), with classes of unequal size and an enrolled class of 5 examples."""
    rng = np.random.default_rng(11)
    _, emb, y = _clusters(rng, classes=3, per_class=60, spread=0.3)
    keep = np.concatenate([np.flatnonzero(y == 0), np.flatnonzero(y == 1)[:25], np.flatnonzero(y == 2)[:40]])
    stats = openset.fit_embedding_stats(emb[keep], y[keep], 3, bank_per_class=200)
    examples = rng.normal(0, 3, size=6) + rng.normal(0, 0.2, size=(5, 6))
    stats = stats.with_class(examples.mean(0), examples)
    probe = rng.normal(0, 2, size=(30, 6))

    def brute(x: np.ndarray, k: int = openset.KNN_K) -> np.ndarray:
        sims = openset.unit(x) @ stats.bank.T
        counts = {c: int((stats.bank_labels == c).sum()) for c in np.unique(stats.bank_labels)}
        out = np.full(len(x), np.inf)
        for c, n in counts.items():
            kc = min(n, max(1, int(round(k * n / max(counts.values())))))
            out = np.minimum(out, 1.0 - np.sort(sims[:, stats.bank_labels == c], axis=1)[:, -kc])
        return out

    assert sorted(int((stats.bank_labels == c).sum()) for c in range(4)) == [5, 25, 40, 60]
    np.testing.assert_allclose(stats.knn_distance(probe), brute(probe), atol=1e-5)
    np.testing.assert_allclose(stats.knn_distance(probe, k=3), brute(probe, k=3), atol=1e-5)


def test_knn_judges_an_enrolled_class_of_few_examples_by_its_own_examples():
    rng = np.random.default_rng(6)
    _, emb, y = _clusters(rng, classes=3, per_class=100, spread=0.05)
    stats = openset.fit_embedding_stats(emb, y, 3)
    new_centre = rng.normal(0, 3, size=6)
    examples = new_centre + rng.normal(0, 0.05, size=(5, 6))          # 5 examples, fewer than k = 10
    enrolled = stats.with_class(examples.mean(0), examples)
    probe = new_centre + rng.normal(0, 0.05, size=(4, 6))
    assert (enrolled.knn_distance(probe) < 0.05).all()                  # near its own 5th example
    assert (stats.knn_distance(probe) > enrolled.knn_distance(probe)).all()


def test_mahalanobis_judges_an_enrolled_class_that_spreads_where_the_known_ones_do_not_by_its_own_spread(tmp_path):
    # given: known classes tight in the first 3 directions and tighter still in the last 3; a new class that
    # varies along the last 3, where the shared covariance says nothing varies
    rng = np.random.default_rng(7)
    scale = np.array([0.3, 0.3, 0.3, 0.02, 0.02, 0.02])
    centres = rng.normal(0, 3, size=(3, 6))
    y = np.repeat(np.arange(3), 200)
    known = centres[y] + rng.normal(size=(600, 6)) * scale
    stats = openset.fit_embedding_stats(known, y, 3)
    new_centre = rng.normal(0, 3, size=6)
    new_scale = np.array([0.3, 0.3, 0.3, 0.3, 0.3, 0.3])
    examples = new_centre + rng.normal(size=(10, 6)) * new_scale
    probe = new_centre + rng.normal(size=(200, 6)) * new_scale
    threshold = openset.threshold_for_keep(stats.mahalanobis(known).min(1), 0.95)

    plain = stats.with_class(examples.mean(0), examples)
    s = openset.enrolled_scale(stats, examples, known, y)
    scaled = stats.with_class(examples.mean(0), examples, s)
    # then: without the scale nearly all of the new class's items are "unknown"; with it, most pass, like
    # the known items, and the trained classes' distances are untouched
    assert 0 < s < 0.2
    assert (plain.mahalanobis(probe).min(1) <= threshold).mean() < 0.1
    assert (scaled.mahalanobis(probe).min(1) <= threshold).mean() > 0.8
    np.testing.assert_allclose(scaled.mahalanobis(known)[:, :3], stats.mahalanobis(known), rtol=1e-9)
    # a class shaped like the known ones is judged like them: the scale stays at (or is capped to) 1
    like_known = new_centre + rng.normal(size=(10, 6)) * scale
    assert openset.enrolled_scale(stats, like_known, known, y) > 0.5
    assert openset.enrolled_scale(stats, like_known * 0 + new_centre, known, y) == 1.0   # no spread: never stricter

    # the scale travels in the bundle's npz; a negative or misshapen one is refused, naming the file
    model = openset.OpenSet("mahalanobis", threshold, 0.95, scaled)
    openset.save_npz(tmp_path / "o.npz", model)
    back = openset.load({"score": "mahalanobis", "threshold": threshold}, tmp_path / "o.npz", ["a", "b", "c", "n"], 6)
    np.testing.assert_allclose(back.stats.class_scale, [1, 1, 1, s], rtol=1e-6)
    np.testing.assert_allclose(back.scores(np.zeros((5, 4)), probe[:5]), model.scores(np.zeros((5, 4)), probe[:5]),
                               rtol=1e-4)
    arrays = dict(np.load(tmp_path / "o.npz"))
    for bad in (np.array([1.0, 1.0, 1.0, -0.5]), np.array([1.0, 1.0])):
        np.savez(tmp_path / "bad.npz", **{**arrays, "class_scale": bad})
        with pytest.raises(openset.OpenSetError, match="bad.npz: class statistics of inconsistent shapes or values"):
            openset.load({"score": "mahalanobis", "threshold": 1.0}, tmp_path / "bad.npz", ["a", "b", "c", "n"], 6)
