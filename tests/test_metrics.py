"""Metrics of training/metrics.py against hand-computed values (paper Table II)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from scipy import ndimage

from training.metrics import (
    PAPER_TABLE_II,
    ClassificationScores,
    ScanResult,
    Stat,
    absolute_error_points,
    average_ranks,
    classification_scores,
    confusion_matrix,
    dice_coefficient,
    format_table,
    normalised_surface_dice,
    plot_report,
    plot_roc,
    rms_surface_distance,
    roc_auc,
    roc_curve,
    segmentation_scores,
    summarise,
    surface_distances,
    surface_mask,
)

SPACING = (2.0, 1.0, 0.5)  # dz, dy, dx in mm: anisotropic on purpose


def _cubes() -> tuple[np.ndarray, np.ndarray]:
    """Truth: a 3^3 cube; prediction: the same cube one voxel (2 mm) further along z."""
    truth = np.zeros((8, 8, 8), dtype=bool)
    truth[2:5, 2:5, 2:5] = True
    pred = np.zeros_like(truth)
    pred[3:6, 2:5, 2:5] = True
    return pred, truth


# ---------------------------------------------------------------------- segmentation


def test_offset_cubes_overlap_metrics() -> None:
    pred, truth = _cubes()
    scores = segmentation_scores(pred, truth, SPACING)
    # overlap 2 x 3 x 3 = 18 of 27 + 27
    assert scores.dsc == pytest.approx(36 / 54)
    assert scores.sensitivity == pytest.approx(18 / 27)
    # 512 voxels, 27 true, 9 false positives
    assert scores.specificity == pytest.approx((485 - 9) / 485)
    assert scores.pred_voxels == scores.truth_voxels == 27
    assert scores.truth_volume_ml == pytest.approx(27 * 1.0 / 1000)


def test_offset_cubes_surface_distances_by_hand() -> None:
    pred, truth = _cubes()
    # 6-connected erosion of a 3^3 cube leaves its centre: 26 surface voxels each.
    assert surface_mask(truth).sum() == 26
    d_pred, d_truth = surface_distances(pred, truth, SPACING)
    # dP -> dT: 16 voxels lie on dT (0 mm); P's face centre (3,3,3) is T's centre, 0.5 mm
    # (one x step) from dT; the far z layer of P (9 voxels) is one z step = 2 mm away.
    expected = sorted([0.0] * 16 + [0.5] + [2.0] * 9)
    assert sorted(d_pred.tolist()) == pytest.approx(expected)
    assert sorted(d_truth.tolist()) == pytest.approx(expected)  # mirror image
    rmsd = math.sqrt(2 * (0.25 + 9 * 4.0) / 52)
    assert rms_surface_distance(pred, truth, SPACING) == pytest.approx(rmsd)
    assert segmentation_scores(pred, truth, SPACING).rmsd_mm == pytest.approx(rmsd)


def test_nsd_tolerance_behaviour() -> None:
    pred, truth = _cubes()
    nsd = normalised_surface_dice
    assert nsd(pred, truth, SPACING, tolerance_mm=0.4) == pytest.approx(32 / 52)
    assert nsd(pred, truth, SPACING, tolerance_mm=0.5) == pytest.approx(34 / 52)  # inclusive
    assert nsd(pred, truth, SPACING, tolerance_mm=1.0) == pytest.approx(34 / 52)
    assert nsd(pred, truth, SPACING, tolerance_mm=1.99) == pytest.approx(34 / 52)
    assert nsd(pred, truth, SPACING, tolerance_mm=2.0) == pytest.approx(1.0)
    assert segmentation_scores(pred, truth, SPACING).nsd == pytest.approx(34 / 52)


def test_spacing_order_matters() -> None:
    pred, truth = _cubes()
    # Same shift but along a 0.5 mm axis: every surface voxel is within 0.5 mm.
    assert normalised_surface_dice(pred, truth, (0.5, 1.0, 2.0), 0.5) == pytest.approx(1.0)
    assert normalised_surface_dice(pred, truth, SPACING, 0.5) < 1.0


def test_crop_matches_full_array_computation_at_the_border() -> None:
    rng = np.random.default_rng(0)
    truth = ndimage.binary_dilation(rng.random((10, 12, 14)) > 0.97, iterations=1)
    pred = ndimage.binary_dilation(rng.random((10, 12, 14)) > 0.97, iterations=1)
    truth[0, :3, :3] = True  # touches the array border
    structure = ndimage.generate_binary_structure(3, 1)
    s_p = pred & ~ndimage.binary_erosion(pred, structure)
    s_t = truth & ~ndimage.binary_erosion(truth, structure)
    full_p = ndimage.distance_transform_edt(~s_t, sampling=SPACING)[s_p]
    full_t = ndimage.distance_transform_edt(~s_p, sampling=SPACING)[s_t]
    d_pred, d_truth = surface_distances(pred, truth, SPACING)
    np.testing.assert_allclose(d_pred, full_p)
    np.testing.assert_allclose(d_truth, full_t)


def test_empty_mask_conventions() -> None:
    empty = np.zeros((4, 4, 4), dtype=bool)
    cube = empty.copy()
    cube[1:3, 1:3, 1:3] = True
    both = segmentation_scores(empty, empty, SPACING)
    assert (both.dsc, both.nsd, both.rmsd_mm) == (1.0, 1.0, 0.0)
    assert math.isnan(both.sensitivity) and both.specificity == 1.0
    for pred, truth in ((empty, cube), (cube, empty)):
        one = segmentation_scores(pred, truth, SPACING)
        assert (one.dsc, one.nsd) == (0.0, 0.0)
        assert math.isnan(one.rmsd_mm)
    assert segmentation_scores(empty, cube, SPACING).sensitivity == 0.0
    assert math.isnan(segmentation_scores(cube, empty, SPACING).sensitivity)
    assert dice_coefficient(empty, empty) == 1.0
    assert math.isnan(rms_surface_distance(cube, empty, SPACING))
    with pytest.raises(ValueError):
        surface_distances(cube, empty, SPACING)


def test_specificity_within_lung_mask() -> None:
    pred, truth = _cubes()
    lung = np.zeros_like(truth)
    lung[1:7, 1:7, 1:7] = True  # 216 voxels, 27 of them lesion
    scores = segmentation_scores(pred, truth, SPACING, lung_mask=lung)
    assert scores.specificity == pytest.approx((189 - 9) / 189)
    assert scores.dsc == pytest.approx(36 / 54)  # the lung mask touches specificity only


def test_bad_inputs_are_rejected() -> None:
    pred, truth = _cubes()
    with pytest.raises(ValueError):
        segmentation_scores(pred, truth[:-1], SPACING)
    with pytest.raises(ValueError):
        segmentation_scores(pred, truth, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError):
        segmentation_scores(pred[0], truth[0], SPACING)


# -------------------------------------------------------------------- classification


def test_confusion_matrix_and_f1_by_hand() -> None:
    y_true = [0, 0, 1, 2, 2, 2]
    y_pred = [0, 1, 1, 2, 0, 2]
    matrix = confusion_matrix(y_true, y_pred, 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    probs = np.eye(3)[y_pred] * 0.8 + 0.1  # argmax = y_pred
    scores = classification_scores(y_true, probs)
    assert scores.accuracy == pytest.approx(4 / 6)
    covid, cap, non = scores.per_class
    assert (covid.sensitivity, covid.specificity, covid.f1) == pytest.approx((0.5, 0.75, 0.5))
    assert (cap.sensitivity, cap.specificity, cap.f1) == pytest.approx((1.0, 0.8, 2 / 3))
    assert (non.sensitivity, non.specificity, non.f1) == pytest.approx((2 / 3, 1.0, 0.8))
    assert scores.macro_f1 == pytest.approx((0.5 + 2 / 3 + 0.8) / 3)
    assert scores.macro_sensitivity == pytest.approx((0.5 + 1.0 + 2 / 3) / 3)
    assert scores.confusion == ((1, 1, 0), (0, 1, 0), (1, 0, 2))
    assert [c.support for c in scores.per_class] == [2, 1, 3]


def test_auc_with_ties_by_hand() -> None:
    y = [1, 1, 0, 0, 1, 0]
    s = [0.9, 0.5, 0.5, 0.1, 0.7, 0.7]
    # pairs (pos, neg) won: 0.9 -> 3; 0.5 -> 0.5 (tie) + 1; 0.7 -> 1 + 1 + 0.5 (tie): 7 / 9
    assert roc_auc(y, s) == pytest.approx(7 / 9)
    assert average_ranks(s).tolist() == [6.0, 2.5, 2.5, 1.0, 4.5, 4.5]
    fpr, tpr, thresholds = roc_curve(y, s)
    assert fpr.tolist() == pytest.approx([0, 0, 1 / 3, 2 / 3, 1])
    assert tpr.tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1, 1])
    assert thresholds.tolist() == [math.inf, 0.9, 0.7, 0.5, 0.1]
    assert np.trapezoid(tpr, fpr) == pytest.approx(7 / 9)


def test_auc_edge_cases() -> None:
    assert roc_auc([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1]) == 1.0
    assert roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]) == 0.0
    assert roc_auc([1, 0, 1, 0], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert math.isnan(roc_auc([1, 1], [0.3, 0.4]))


def test_auc_agrees_with_roc_trapezoid_on_random_ties() -> None:
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 200)
    s = rng.integers(0, 10, 200) / 10  # many ties
    fpr, tpr, _ = roc_curve(y, s)
    assert roc_auc(y, s) == pytest.approx(np.trapezoid(tpr, fpr))


def test_roc_curve_keeps_a_tie_of_infinite_scores_together() -> None:
    """inf - inf is NaN: a tie of infinite scores was split into two points (area 0.5,
    where the pairwise count gives 0.25)."""
    fpr, tpr, thresholds = roc_curve([1, 0, 1], [np.inf, np.inf, 0.0])
    assert fpr.tolist() == [0.0, 1.0, 1.0] and tpr.tolist() == [0.0, 0.5, 1.0]
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc([1, 0, 1], [np.inf, np.inf, 0.0]))
    assert thresholds.tolist() == [np.inf, np.inf, 0.0]


@pytest.mark.parametrize("function", [roc_auc, roc_curve])
def test_nan_scores_are_refused(function) -> None:
    with pytest.raises(ValueError, match="NaN"):
        function([1, 0], [0.3, math.nan])


def test_dice_refuses_masks_of_different_shapes() -> None:
    """Broadcast, a one-slice prediction against a four-slice truth gave DSC 1.6."""
    with pytest.raises(ValueError, match="shape"):
        dice_coefficient(np.ones((1, 4, 4)), np.ones((4, 4, 4)))


def test_class_absent_from_evaluation_set() -> None:
    y_true = [0, 0, 1, 1]
    probs = [[0.7, 0.2, 0.1], [0.4, 0.5, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1]]
    scores = classification_scores(y_true, probs)
    non = scores.per_class[2]
    assert math.isnan(non.sensitivity) and math.isnan(non.auc) and math.isnan(non.f1)
    assert scores.per_class[0].auc == 1.0
    assert scores.macro_auc == pytest.approx(1.0)  # mean over the defined classes
    assert scores.macro_sensitivity == pytest.approx((0.5 + 1.0) / 2)


def test_absolute_error_points() -> None:
    errors = absolute_error_points([0.15, 0.60, math.nan], [0.143, 0.624, 0.2])
    assert errors[:2].tolist() == pytest.approx([0.7, 2.4])
    assert math.isnan(errors[2])
    stat = Stat.of(errors)
    assert (stat.n, stat.n_undefined) == (2, 1)
    assert (stat.mean, stat.std) == pytest.approx((1.55, 0.85))


# ---------------------------------------------------------------------- aggregation


def _results() -> list[ScanResult]:
    pred, truth = _cubes()
    empty = np.zeros_like(truth)
    cube_scores = segmentation_scores(pred, truth, SPACING)
    perfect = segmentation_scores(truth, truth, SPACING)
    missed = segmentation_scores(empty, truth, SPACING)
    clean = segmentation_scores(empty, empty, SPACING)
    false_pos = segmentation_scores(pred, empty, SPACING)
    return [
        ScanResult("a", 0, (0.8, 0.1, 0.1), cube_scores, 0.10, 0.12, 0.6, 0.5),
        ScanResult("b", 0, (0.3, 0.6, 0.1), perfect, 0.20, 0.20, 0.7, 0.7),
        ScanResult("c", 1, (0.2, 0.7, 0.1), missed, 0.00, 0.05, math.nan, 0.3),
        ScanResult("d", 2, (0.1, 0.1, 0.8), clean, 0.0, 0.0),
        ScanResult("e", 2, (0.2, 0.2, 0.6), false_pos),
    ]


def test_summary_statistics_and_conventions() -> None:
    summary = summarise(_results())
    seg = summary.segmentation
    # lesion scans a, b, c: DSC 2/3, 1, 0
    assert seg["dsc"].n == 3 and seg["dsc"].mean == pytest.approx((2 / 3 + 1) / 3)
    assert seg["dsc"].std == pytest.approx(np.std([2 / 3, 1.0, 0.0]))
    assert seg["nsd"].mean == pytest.approx((34 / 52 + 1 + 0) / 3)
    # RMSD undefined for the missed scan: left out of the mean, counted
    assert (seg["rmsd_mm"].n, seg["rmsd_mm"].n_undefined) == (2, 1)
    assert seg["rmsd_mm"].mean == pytest.approx(math.sqrt(72.5 / 52) / 2)
    assert summary.empty_truth["n"] == 2
    assert summary.empty_truth["fraction_with_false_positive"] == 0.5
    assert summary.empty_truth["mean_false_positive_ml"] == pytest.approx(27 * 0.001 / 2)
    cls = summary.classification
    assert isinstance(cls, ClassificationScores) and cls.n == 5
    assert cls.accuracy == pytest.approx(4 / 5)
    assert summary.lvr_abs_error_points.n == 4
    assert summary.lvr_abs_error_points.mean == pytest.approx((2 + 0 + 5 + 0) / 4)
    assert (summary.plr_abs_error_points.n, summary.plr_abs_error_points.n_undefined) == (2, 1)
    everything = summarise(_results(), include_empty_truth=True).segmentation
    # d (both empty): DSC 1, NSD 1, RMSD 0; e (false positives only): DSC 0, NSD 0, RMSD
    # undefined; sensitivity undefined for both
    assert everything["dsc"].n == 5 and everything["dsc"].mean == pytest.approx((2 / 3 + 2) / 5)
    assert everything["nsd"].mean == pytest.approx((34 / 52 + 2) / 5)
    assert (everything["rmsd_mm"].n, everything["rmsd_mm"].n_undefined) == (3, 2)
    assert everything["rmsd_mm"].mean == pytest.approx(math.sqrt(72.5 / 52) / 3)
    assert (everything["sensitivity"].n, everything["sensitivity"].n_undefined) == (3, 2)


def test_a_scan_is_called_as_its_operating_point_says() -> None:
    """`predicted` (a diagnosis at disease thresholds) overrides the arg-max."""
    results = _results()
    at_argmax = summarise(results).classification
    called = [dataclasses.replace(r, predicted=0) if r.case_id == "e" else r for r in results]
    at_threshold = summarise(called).classification
    assert at_argmax is not None and at_threshold is not None
    assert at_threshold.accuracy == pytest.approx(at_argmax.accuracy - 1 / 5)
    assert list(at_threshold.confusion[2]) == [1, 0, 1]
    assert at_threshold.macro_auc == at_argmax.macro_auc  # scores, not calls


def test_to_dict_is_strict_json() -> None:
    data = summarise(_results()).to_dict()
    text = json.dumps(data, allow_nan=False)
    back = json.loads(text)
    assert back["segmentation"]["rmsd_mm"]["n_undefined"] == 1
    assert back["scans"][2]["segmentation"]["rmsd_mm"] is None
    assert back["classification"]["per_class"][0]["name"] == "COVID-19"
    assert back["scans"][0]["segmentation"]["truth_volume_ml"] == pytest.approx(0.027)


def test_format_table_layout() -> None:
    text = format_table(summarise(_results()), label="lite", include_paper=True)
    lines = text.splitlines()
    header = lines[0]
    for column in ("DSC (%)", "Sensitivity (%)", "Specificity (%)", "NSD@1mm (%)", "RMSD (mm)"):
        assert column in header
    assert lines[1].startswith("lite") and "55.6 (" in lines[1]  # DSC mean 5/9
    assert "73.3 (8.5)" in text and f"{PAPER_TABLE_II['classification']['auc'][0]}" in text
    for column in ("Accuracy (%)", "F1-score (%)", "AUC (%)"):
        assert column in text
    per_class = lines[: lines.index("Confusion matrix (rows: truth, columns: prediction)")]
    for name, support, sensitivity, f1 in (("COVID-19", 2, "50.0", "66.7"),
                                           ("CAP", 1, "100.0", "66.7"),
                                           ("non-pneumonia", 2, "100.0", "100.0")):
        row = next(line.split() for line in per_class if line.startswith(f"  {name} "))
        assert row[1:4] == [str(support), "-", sensitivity] and row[5] == f1
    assert "LVR absolute error" in text


def test_plot_report_writes_png(tmp_path) -> None:
    rng = np.random.default_rng(5)
    image = rng.normal(-700, 100, (32, 32))
    truth = np.zeros((32, 32), dtype=bool)
    truth[10:20, 10:20] = True
    pred = np.roll(truth, 2, axis=1)
    overlays = [(image, truth, pred), (image, truth, np.zeros_like(truth))]
    out = plot_report(summarise(_results()), tmp_path / "sub" / "report.png", overlays)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    raw = plot_report(([0, 1, 2, 1], np.eye(3)[[0, 1, 2, 0]]), tmp_path / "raw.png")
    assert raw.stat().st_size > 1000


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_surface_distances_equal_all_pairs_on_random_masks(seed: int) -> None:
    """The k-d tree's nearest surface voxel against every pair, anisotropic spacing."""
    rng = np.random.default_rng(seed)
    pred = ndimage.gaussian_filter(rng.normal(size=(10, 12, 14)), 1.5) > 0.1
    truth = ndimage.gaussian_filter(rng.normal(size=(10, 12, 14)), 1.5) > 0.1
    spacing = (2.5, 0.7, 0.8)
    d_pred, d_truth = surface_distances(pred, truth, spacing)
    scale = np.asarray(spacing)
    a, b = np.argwhere(surface_mask(pred)) * scale, np.argwhere(surface_mask(truth)) * scale
    pairs = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=2))
    assert d_pred == pytest.approx(pairs.min(axis=1), abs=1e-12)
    assert d_truth == pytest.approx(pairs.min(axis=0), abs=1e-12)


def test_a_distance_of_exactly_the_tolerance_is_within() -> None:
    """3 columns of 0.7 mm is 2.1 mm, whatever the floats make of it."""
    pred, truth = np.zeros((1, 1, 5), dtype=bool), np.zeros((1, 1, 5), dtype=bool)
    pred[0, 0, 0] = truth[0, 0, 3] = True
    assert normalised_surface_dice(pred, truth, (1.0, 1.0, 0.7), tolerance_mm=2.1) == 1.0
    assert normalised_surface_dice(pred, truth, (1.0, 1.0, 0.7), tolerance_mm=2.09) == 0.0


def test_each_roc_point_says_its_probability_threshold() -> None:
    """Picking an operating point off the ROC curve needs the score at each point."""
    y_true = [0, 0, 1, 2]
    probs = [[0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.4, 0.5, 0.1], [0.2, 0.1, 0.7]]
    covid = classification_scores(y_true, probs).per_class[0]
    assert covid.roc_thresholds == (math.inf, 0.9, 0.6, 0.4, 0.2)
    assert len(covid.roc_thresholds) == len(covid.roc_fpr) == len(covid.roc_tpr)
    results = [ScanResult(case_id=f"s{i}", label=y, probabilities=tuple(p))
               for i, (y, p) in enumerate(zip(y_true, probs, strict=True))]
    dumped = json.loads(json.dumps(summarise(results).to_dict(), allow_nan=False))
    assert dumped["classification"]["per_class"][0]["roc_thresholds"] == [
        None, 0.9, 0.6, 0.4, 0.2]


def test_roc_curves_that_coincide_stay_distinguishable() -> None:
    """A perfect classifier's three curves lie on one another: drawn alike, only the last
    showed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probs = [[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.05, 0.05, 0.9]]
    fig, ax = plt.subplots()
    try:
        plot_roc(ax, classification_scores([0, 1, 2], probs))
        curves = ax.lines[1:]  # after the chance diagonal
        assert len(curves) == 3
        assert len({(line.get_linestyle(), line.get_linewidth()) for line in curves}) == 3
    finally:
        plt.close(fig)
