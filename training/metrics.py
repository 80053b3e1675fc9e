"""Evaluation metrics of DeepSC-COVID (paper Table II; docs/training.md, "Metrics").

Segmentation, per scan, spacing-aware: DSC, sensitivity, specificity, NSD (normalised
surface Dice at a tolerance, default 1 mm) and RMSD (root-mean-square symmetric surface
distance, mm). Classification: accuracy, confusion matrix, per-class and macro
sensitivity, specificity, F1, one-vs-rest ROC AUC (rank-based, ties averaged) and ROC
curves. LVR / PLR absolute errors in percentage points. :func:`summarise` aggregates
per-scan :class:`ScanResult` records into an :class:`EvaluationSummary`;
:func:`format_table` prints it in the layout of Table II and :func:`plot_report` draws
ROC curves and example overlays to a PNG.

Conventions (docs/training.md): arrays are (z, y, x) and spacing is (dz, dy, dx) in
mm. Empty masks: both empty -> DSC 1, NSD 1, RMSD 0; exactly one empty -> DSC 0, NSD 0,
RMSD NaN (undefined: no surface to measure from), which aggregation leaves out of the
mean and counts as ``n_undefined``. Undefined ratios (0/0) are NaN. JSON output writes
NaN and inf as null.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from ai.labels import CLASS_NAMES

logger = logging.getLogger(__name__)

Spacing = tuple[float, float, float]
"""Voxel size in mm along the array axes (dz, dy, dx)."""

DEFAULT_TOLERANCE_MM = 1.0
"""NSD tolerance tau (deepsc.md "Metrics")."""

SEG_METRICS: tuple[str, ...] = ("dsc", "sensitivity", "specificity", "nsd", "rmsd_mm")

PAPER_TABLE_II: dict[str, dict[str, tuple[float, float]]] = {
    "segmentation": {
        "dsc": (73.3, 8.5),
        "sensitivity": (80.2, 6.8),
        "specificity": (95.6, 0.7),
        "nsd": (71.8, 2.6),
        "rmsd_mm": (2.8, 1.6),
    },
    "classification": {
        "accuracy": (94.5, 0.3),
        "sensitivity": (94.7, 0.2),
        "specificity": (97.3, 0.5),
        "f1": (94.2, 0.6),
        "auc": (98.8, 0.1),
    },
}
"""DeepSC-COVID's row of the paper's Table II, mean (std), % or mm, 3DLSC-COVID data."""


# --------------------------------------------------------------------------- helpers


def _ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN when the denominator is 0 (undefined)."""
    return float(numerator) / float(denominator) if denominator > 0 else math.nan


def _as_bool(mask: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(mask)
    if array.ndim != 3:
        raise ValueError(f"{name}: expected a 3D (z, y, x) mask, got shape {array.shape}")
    return array.astype(bool, copy=False)


def _check_spacing(spacing: Sequence[float]) -> Spacing:
    values = tuple(float(s) for s in spacing)
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing must be three positive mm values (dz, dy, dx), got {spacing}")
    return values  # type: ignore[return-value]


# ---------------------------------------------------------------------- segmentation


def surface_mask(mask: np.ndarray, connectivity: int = 1) -> np.ndarray:
    """Surface voxels: the mask minus its 3D erosion (outside the array counts as empty).

    ``connectivity`` 1 (default) erodes with the 6-neighbourhood, so a voxel is on the
    surface when one of its face neighbours is background; 2 or 3 use the 18- or
    26-neighbourhood (thicker surfaces).
    """
    binary = np.asarray(mask, dtype=bool)
    structure = ndimage.generate_binary_structure(3, connectivity)
    return binary & ~ndimage.binary_erosion(binary, structure=structure, border_value=0)


def _union_crop(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to the bounding box of their union plus one empty voxel each side.

    Outside that box both masks are empty, so erosion and distances are exactly those of
    the full arrays, at a fraction of the cost on a 512 x 512 x 300 scan.
    """
    box = ndimage.find_objects((pred | truth).astype(np.uint8))[0]
    return np.pad(pred[box], 1), np.pad(truth[box], 1)


def surface_distances(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float], connectivity: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each surface voxel of ``pred`` to the surface of ``truth``, and back.

    Euclidean distances between voxel centres. The nearest surface voxel is found with a
    k-d tree over the surface voxels only (a distance map of the masks' box would take
    several GB on a 512 x 512 x 300 scan with scattered lesions), and the distance is
    then computed from the integer offset, as ``distance_transform_edt`` with
    ``sampling=spacing`` computes it. Both masks must be non-empty.
    """
    sampling = _check_spacing(spacing)
    pred_b, truth_b = _as_bool(pred, "pred"), _as_bool(truth, "truth")
    if pred_b.shape != truth_b.shape:
        raise ValueError(f"pred shape {pred_b.shape} differs from truth shape {truth_b.shape}")
    if not pred_b.any() or not truth_b.any():
        raise ValueError("surface_distances needs two non-empty masks")
    pred_c, truth_c = _union_crop(pred_b, truth_b)
    surf_pred = surface_mask(pred_c, connectivity)
    surf_truth = surface_mask(truth_c, connectivity)
    at_pred, at_truth = np.argwhere(surf_pred), np.argwhere(surf_truth)
    return _nearest(at_pred, at_truth, sampling), _nearest(at_truth, at_pred, sampling)


def _nearest(points: np.ndarray, surface: np.ndarray, sampling: Sequence[float]) -> np.ndarray:
    """Distance (mm) from each voxel index in ``points`` to the nearest in ``surface``."""
    scale = np.asarray(sampling, dtype=np.float64)
    _, index = cKDTree(surface * scale).query(points * scale)
    offset = (points - surface[index]).astype(np.float64) * scale
    return np.sqrt(np.sum(offset**2, axis=1))


def _nsd_from(d_pred: np.ndarray, d_truth: np.ndarray, tolerance_mm: float) -> float:
    # Inclusive: a distance of exactly the tolerance, computed a rounding error above it
    # (0.7 mm x 3 vs 2.1 mm), is within.
    reach = tolerance_mm * (1.0 + 1e-9)
    within = np.count_nonzero(d_pred <= reach) + np.count_nonzero(d_truth <= reach)
    return float(within / (d_pred.size + d_truth.size))


def _rmsd_from(d_pred: np.ndarray, d_truth: np.ndarray) -> float:
    squared = np.sum(d_pred**2) + np.sum(d_truth**2)
    return float(np.sqrt(squared / (d_pred.size + d_truth.size)))


def dice_coefficient(pred: np.ndarray, truth: np.ndarray) -> float:
    """DSC = 2 |P & T| / (|P| + |T|); 1 when both are empty. Masks of different shapes
    are refused (broadcast, they would give a DSC above 1)."""
    p, t = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if p.shape != t.shape:
        raise ValueError(f"prediction {p.shape} and truth {t.shape} differ in shape")
    total = np.count_nonzero(p) + np.count_nonzero(t)
    return 1.0 if total == 0 else float(2.0 * np.count_nonzero(p & t) / total)


def normalised_surface_dice(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float],
    tolerance_mm: float = DEFAULT_TOLERANCE_MM,
    connectivity: int = 1,
) -> float:
    """NSD: fraction of both surfaces within ``tolerance_mm`` of the other (inclusive).

    (|{p in dP: d(p, dT) <= tau}| + |{t in dT: d(t, dP) <= tau}|) / (|dP| + |dT|),
    counted in surface voxels. Both empty: 1; one empty: 0.
    """
    p, t = _as_bool(pred, "pred"), _as_bool(truth, "truth")
    if not p.any() and not t.any():
        return 1.0
    if not p.any() or not t.any():
        return 0.0
    d_pred, d_truth = surface_distances(p, t, spacing, connectivity)
    return _nsd_from(d_pred, d_truth, tolerance_mm)


def rms_surface_distance(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float], connectivity: int = 1
) -> float:
    """RMSD (mm): sqrt of the mean squared distance over both surfaces' voxels, pooled.

    Both empty: 0; one empty: NaN (undefined).
    """
    p, t = _as_bool(pred, "pred"), _as_bool(truth, "truth")
    if not p.any() and not t.any():
        return 0.0
    if not p.any() or not t.any():
        return math.nan
    return _rmsd_from(*surface_distances(p, t, spacing, connectivity))


@dataclass(frozen=True)
class SegmentationScores:
    """Per-scan segmentation metrics (fractions in [0, 1]; RMSD in mm; NaN = undefined)."""

    dsc: float
    sensitivity: float
    specificity: float
    nsd: float
    rmsd_mm: float
    pred_voxels: int
    truth_voxels: int
    voxel_volume_ml: float
    tolerance_mm: float = DEFAULT_TOLERANCE_MM

    @property
    def pred_volume_ml(self) -> float:
        return self.pred_voxels * self.voxel_volume_ml

    @property
    def truth_volume_ml(self) -> float:
        return self.truth_voxels * self.voxel_volume_ml


def segmentation_scores(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float],
    lung_mask: np.ndarray | None = None,
    tolerance_mm: float = DEFAULT_TOLERANCE_MM,
    connectivity: int = 1,
) -> SegmentationScores:
    """All per-scan segmentation metrics of Table II, sharing one distance computation.

    Sensitivity = TP / (TP + FN), NaN when the truth is empty. Specificity = TN / (TN + FP)
    counted over the whole array, or only inside ``lung_mask`` when given (the lung is
    what the model segments; over the whole body TN swamps FP). ``lung_mask`` affects
    specificity only: DSC, sensitivity and the surfaces use the full masks, so lesions the
    lung mask missed still count.
    """
    sampling = _check_spacing(spacing)
    p, t = _as_bool(pred, "pred"), _as_bool(truth, "truth")
    if p.shape != t.shape:
        raise ValueError(f"pred shape {p.shape} differs from truth shape {t.shape}")
    n_pred, n_truth = int(np.count_nonzero(p)), int(np.count_nonzero(t))
    tp = int(np.count_nonzero(p & t))
    negatives = ~t
    if lung_mask is not None:
        lung = _as_bool(lung_mask, "lung_mask")
        if lung.shape != p.shape:
            raise ValueError(f"lung_mask shape {lung.shape} differs from mask shape {p.shape}")
        negatives &= lung
    fp = int(np.count_nonzero(p & negatives))
    tn = int(np.count_nonzero(negatives)) - fp
    if n_pred == 0 and n_truth == 0:
        nsd, rmsd = 1.0, 0.0
    elif n_pred == 0 or n_truth == 0:
        nsd, rmsd = 0.0, math.nan
    else:
        d_pred, d_truth = surface_distances(p, t, sampling, connectivity)
        nsd, rmsd = _nsd_from(d_pred, d_truth, tolerance_mm), _rmsd_from(d_pred, d_truth)
    return SegmentationScores(
        dsc=dice_coefficient(p, t),
        sensitivity=_ratio(tp, n_truth),
        specificity=_ratio(tn, tn + fp),
        nsd=nsd,
        rmsd_mm=rmsd,
        pred_voxels=n_pred,
        truth_voxels=n_truth,
        voxel_volume_ml=float(np.prod(sampling)) / 1000.0,
        tolerance_mm=float(tolerance_mm),
    )


# -------------------------------------------------------------------- classification


def confusion_matrix(
    y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, n_classes: int
) -> np.ndarray:
    """Counts C[i, j] of scans of true class i predicted as j (rows truth, columns prediction)."""
    true = np.asarray(y_true, dtype=np.int64).reshape(-1)
    predicted = np.asarray(y_pred, dtype=np.int64).reshape(-1)
    if true.shape != predicted.shape:
        raise ValueError(f"{true.size} labels but {predicted.size} predictions")
    for name, values in (("y_true", true), ("y_pred", predicted)):
        if values.size and (values.min() < 0 or values.max() >= n_classes):
            raise ValueError(f"{name} outside [0, {n_classes - 1}]")
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (true, predicted), 1)
    return matrix


def average_ranks(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """1-based ranks with ties given the mean of the ranks they span."""
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if np.isnan(array).any():
        raise ValueError("scores contain NaN")
    order = np.argsort(array, kind="mergesort")
    _, first, counts = np.unique(array[order], return_index=True, return_counts=True)
    ranks = np.empty(array.size, dtype=np.float64)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    return ranks


def _binary_inputs(
    y_true: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    positive = np.asarray(y_true).reshape(-1).astype(bool)
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    if positive.shape != values.shape:
        raise ValueError(f"{positive.size} labels but {values.size} scores")
    if np.isnan(values).any():
        raise ValueError("scores hold NaN: no rank or threshold for it")
    return positive, values


def roc_auc(y_true: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic (ties count 1/2).

    AUC = (sum of positive ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg): the probability
    that a random positive scores above a random negative. NaN without both classes.
    """
    positive, values = _binary_inputs(y_true, scores)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    rank_sum = float(average_ranks(values)[positive].sum())
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(
    y_true: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points (fpr, tpr, thresholds), one per distinct score, from (0, 0) to (1, 1).

    Point k predicts positive for score >= thresholds[k]; the first point has threshold
    +inf. Tied scores move in one diagonal step, so the trapezoidal area equals
    :func:`roc_auc`. Rates are NaN when a class is absent.
    """
    positive, values = _binary_inputs(y_true, scores)
    if values.size == 0:
        return np.array([math.nan]), np.array([math.nan]), np.array([np.inf])
    order = np.argsort(-values, kind="mergesort")
    sorted_values, sorted_positive = values[order], positive[order]
    # Compared, not subtracted: inf - inf is NaN and would split a tie of infinite scores.
    last_of_group = np.r_[np.flatnonzero(sorted_values[1:] != sorted_values[:-1]),
                          sorted_values.size - 1]
    tps = np.cumsum(sorted_positive)[last_of_group]
    fps = (last_of_group + 1) - tps
    tps, fps = np.r_[0, tps], np.r_[0, fps]
    thresholds = np.r_[np.inf, sorted_values[last_of_group]]
    n_pos, n_neg = tps[-1], fps[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        fpr = fps / n_neg if n_neg else np.full(fps.shape, np.nan)
        tpr = tps / n_pos if n_pos else np.full(tps.shape, np.nan)
    return fpr.astype(np.float64), tpr.astype(np.float64), thresholds


@dataclass(frozen=True)
class ClassScores:
    """One-vs-rest metrics of one class (NaN = undefined)."""

    name: str
    support: int
    sensitivity: float
    specificity: float
    precision: float
    f1: float
    auc: float
    roc_fpr: tuple[float, ...] = ()
    roc_tpr: tuple[float, ...] = ()
    roc_thresholds: tuple[float, ...] = ()
    """The probability of this class from which a scan counts positive at each ROC point
    (the first is +inf, None in JSON: none positive): where to read an operating point
    (`--disease-thresholds`, `[ai] disease_thresholds`) off the curve."""


@dataclass(frozen=True)
class ClassificationScores:
    """Scan-level classification metrics; macro = unweighted mean over defined classes."""

    n: int
    accuracy: float
    macro_sensitivity: float
    macro_specificity: float
    macro_f1: float
    macro_auc: float
    confusion: tuple[tuple[int, ...], ...]
    per_class: tuple[ClassScores, ...]


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def classification_scores(
    y_true: Sequence[int] | np.ndarray,
    probabilities: Sequence[Sequence[float]] | np.ndarray,
    class_names: Sequence[str] = CLASS_NAMES,
    y_pred: Sequence[int] | np.ndarray | None = None,
) -> ClassificationScores:
    """Accuracy, confusion matrix, per-class and macro sensitivity/specificity/F1/AUC.

    ``probabilities`` (n_scans, n_classes) give the one-vs-rest ROC/AUC of each class
    (score = that class's probability); ``y_pred`` defaults to their argmax. F1 =
    2 TP / (2 TP + FP + FN), which is 0 (not undefined) for a class never predicted but
    present, and NaN only when the class is neither present nor predicted.
    """
    n_classes = len(class_names)
    probs = np.asarray(probabilities, dtype=np.float64)
    true = np.asarray(y_true, dtype=np.int64).reshape(-1)
    if probs.shape != (true.size, n_classes):
        raise ValueError(f"probabilities shape {probs.shape}, expected ({true.size}, {n_classes})")
    predicted = probs.argmax(axis=1) if y_pred is None else np.asarray(y_pred, dtype=np.int64)
    matrix = confusion_matrix(true, predicted, n_classes)
    n = int(matrix.sum())
    per_class: list[ClassScores] = []
    for c, name in enumerate(class_names):
        tp = int(matrix[c, c])
        fn = int(matrix[c].sum()) - tp
        fp = int(matrix[:, c].sum()) - tp
        tn = n - tp - fn - fp
        fpr, tpr, cuts = roc_curve(true == c, probs[:, c]) if n else (np.array([]),) * 3
        per_class.append(
            ClassScores(
                name=name,
                support=tp + fn,
                sensitivity=_ratio(tp, tp + fn),
                specificity=_ratio(tn, tn + fp),
                precision=_ratio(tp, tp + fp),
                f1=_ratio(2 * tp, 2 * tp + fp + fn),
                auc=roc_auc(true == c, probs[:, c]) if n else math.nan,
                roc_fpr=tuple(float(v) for v in fpr),
                roc_tpr=tuple(float(v) for v in tpr),
                roc_thresholds=tuple(float(v) for v in cuts),
            )
        )
    return ClassificationScores(
        n=n,
        accuracy=_ratio(int(np.trace(matrix)), n),
        macro_sensitivity=_nanmean([s.sensitivity for s in per_class]),
        macro_specificity=_nanmean([s.specificity for s in per_class]),
        macro_f1=_nanmean([s.f1 for s in per_class]),
        macro_auc=_nanmean([s.auc for s in per_class]),
        confusion=tuple(tuple(int(v) for v in row) for row in matrix),
        per_class=tuple(per_class),
    )


# ------------------------------------------------------------------ LVR / PLR errors


def absolute_error_points(
    predicted: Sequence[float] | np.ndarray, truth: Sequence[float] | np.ndarray
) -> np.ndarray:
    """|predicted - truth| * 100: errors of fractions (LVR, PLR) in percentage points.

    NaN where either value is NaN (e.g. PLR of a scan without lesions).
    """
    pred = np.asarray(predicted, dtype=np.float64)
    true = np.asarray(truth, dtype=np.float64)
    if pred.shape != true.shape:
        raise ValueError(f"{pred.size} predicted values but {true.size} true values")
    return 100.0 * np.abs(pred - true)


# ---------------------------------------------------------------------- aggregation


@dataclass(frozen=True)
class Stat:
    """Mean and population std (ddof 0) over the finite values; NaN/inf are undefined."""

    mean: float
    std: float
    n: int
    n_undefined: int = 0

    @classmethod
    def of(cls, values: Sequence[float] | np.ndarray) -> Stat:
        array = np.asarray(values, dtype=np.float64).reshape(-1)
        finite = array[np.isfinite(array)]
        undefined = int(array.size - finite.size)
        if finite.size == 0:
            return cls(math.nan, math.nan, 0, undefined)
        return cls(float(finite.mean()), float(finite.std()), int(finite.size), undefined)


@dataclass(frozen=True)
class ScanResult:
    """What the evaluation knows about one scan; None = not available for that scan."""

    case_id: str = ""
    label: int | None = None
    probabilities: tuple[float, ...] | None = None
    segmentation: SegmentationScores | None = None
    lvr_pred: float | None = None
    lvr_true: float | None = None
    plr_pred: float | None = None
    plr_true: float | None = None
    predicted: int | None = None
    """The class called (at an operating point); None: the most probable one."""


@dataclass(frozen=True)
class EvaluationSummary:
    """Table II-style summary: segmentation mean/std over scans, classification, LVR/PLR."""

    n_scans: int
    segmentation: dict[str, Stat]
    segmentation_scope: str
    empty_truth: dict[str, float]
    classification: ClassificationScores | None
    lvr_abs_error_points: Stat | None
    plr_abs_error_points: Stat | None
    tolerance_mm: float = DEFAULT_TOLERANCE_MM
    class_names: tuple[str, ...] = CLASS_NAMES
    scans: tuple[ScanResult, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (NaN and inf become None, tuples lists)."""
        return _jsonable(self)


def _jsonable(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        out = {f.name: _jsonable(getattr(value, f.name)) for f in fields(value)}
        if isinstance(value, SegmentationScores):
            out["pred_volume_ml"] = _jsonable(value.pred_volume_ml)
            out["truth_volume_ml"] = _jsonable(value.truth_volume_ml)
        return out
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    return value


def _error_stat(results: Sequence[ScanResult], kind: str) -> Stat | None:
    pairs = [
        (getattr(r, f"{kind}_pred"), getattr(r, f"{kind}_true"))
        for r in results
        if getattr(r, f"{kind}_pred") is not None and getattr(r, f"{kind}_true") is not None
    ]
    if not pairs:
        return None
    predicted, truth = zip(*pairs, strict=True)
    return Stat.of(absolute_error_points(predicted, truth))


def summarise(
    results: Sequence[ScanResult],
    class_names: Sequence[str] = CLASS_NAMES,
    include_empty_truth: bool = False,
) -> EvaluationSummary:
    """Aggregate per-scan results into the Table II summary.

    Segmentation metrics are mean and std over scans whose ground truth has lesions
    (``include_empty_truth=False``, like the paper's lesion-annotated scans): a
    non-pneumonia scan with an empty truth and an empty prediction would score a perfect
    DSC and inflate the mean. Those scans are summarised apart in ``empty_truth``: how
    many, the fraction with any false-positive voxel and the mean false-positive volume.
    Classification uses every scan with a label and probabilities, each scan called as
    its ``predicted`` says (the most probable class where that is None).
    """
    seg = [r.segmentation for r in results if r.segmentation is not None]
    lesion_scans = [s for s in seg if s.truth_voxels > 0]
    empty = [s for s in seg if s.truth_voxels == 0]
    scoped = seg if include_empty_truth else lesion_scans
    segmentation = {name: Stat.of([getattr(s, name) for s in scoped]) for name in SEG_METRICS}
    empty_truth = {
        "n": len(empty),
        "fraction_with_false_positive": _ratio(sum(s.pred_voxels > 0 for s in empty), len(empty)),
        "mean_false_positive_ml": _nanmean([s.pred_volume_ml for s in empty]),
    }
    labelled = [r for r in results if r.label is not None and r.probabilities is not None]
    classification = None
    if labelled:
        called = [int(np.argmax(r.probabilities)) if r.predicted is None else r.predicted
                  for r in labelled]
        classification = classification_scores(
            [r.label for r in labelled], [r.probabilities for r in labelled], class_names,
            y_pred=called,
        )
    tolerances = {s.tolerance_mm for s in seg}
    if len(tolerances) > 1:
        raise ValueError(f"scans were scored with different NSD tolerances {sorted(tolerances)}")
    return EvaluationSummary(
        n_scans=len(results),
        segmentation=segmentation,
        segmentation_scope="all scans" if include_empty_truth else "scans with lesions in truth",
        empty_truth=empty_truth,
        classification=classification,
        lvr_abs_error_points=_error_stat(results, "lvr"),
        plr_abs_error_points=_error_stat(results, "plr"),
        tolerance_mm=tolerances.pop() if tolerances else DEFAULT_TOLERANCE_MM,
        class_names=tuple(class_names),
        scans=tuple(results),
    )


# ------------------------------------------------------------------------ the table


def _pct(value: float, std: float | None = None) -> str:
    if not math.isfinite(value):
        return "-"
    text = f"{100.0 * value:.1f}"
    return text if std is None or not math.isfinite(std) else f"{text} ({100.0 * std:.1f})"


def _mm(stat: Stat) -> str:
    if not math.isfinite(stat.mean):
        return "-"
    return f"{stat.mean:.2f} ({stat.std:.2f})"


def _row(label: str, n: str, cells: Sequence[str]) -> str:
    return f"{label:<22}{n:>5}  " + "".join(f"{c:<18}" for c in cells).rstrip()


def _paper_row(section: str, keys: Sequence[str]) -> str:
    ref = PAPER_TABLE_II[section]
    cells = [f"{ref[k][0]:.1f} ({ref[k][1]:.1f})" for k in keys]
    return _row("Paper (Table II)", "", cells)


def format_table(
    summary: EvaluationSummary, label: str = "DeepSC-COVID", include_paper: bool = False
) -> str:
    """Plain-text table in the layout of the paper's Table II: mean (std), in % and mm.

    Segmentation: DSC, sensitivity, specificity, NSD, RMSD. Classification: accuracy,
    macro sensitivity, specificity, F1, AUC, then one line per class, the confusion
    matrix, and LVR/PLR absolute errors. ``include_paper`` adds the paper's row (clinical
    3DLSC-COVID data, not comparable one to one with other data).
    """
    tau = f"{summary.tolerance_mm:g}"
    seg = summary.segmentation
    lines = [
        _row(
            "Segmentation",
            "n",
            ["DSC (%)", "Sensitivity (%)", "Specificity (%)", f"NSD@{tau}mm (%)", "RMSD (mm)"],
        ),
        _row(
            label,
            str(seg["dsc"].n),
            [_pct(seg[k].mean, seg[k].std) for k in SEG_METRICS[:4]] + [_mm(seg["rmsd_mm"])],
        ),
    ]
    if include_paper:
        lines.append(_paper_row("segmentation", SEG_METRICS))
    lines.append(f"  scope: {summary.segmentation_scope}")
    undefined = seg["rmsd_mm"].n_undefined
    if undefined:
        lines.append(f"  RMSD undefined (one mask empty) for {undefined} scan(s), left out")
    empty = summary.empty_truth
    if empty["n"]:
        lines.append(
            f"  scans without lesions in truth: {int(empty['n'])}, with false positives: "
            f"{_pct(empty['fraction_with_false_positive'])} %, mean FP volume "
            f"{empty['mean_false_positive_ml']:.2f} mL"
        )
    lines.append("")
    lines.extend(_classification_lines(summary, label, include_paper))
    for name, stat in (
        ("LVR", summary.lvr_abs_error_points),
        ("PLR", summary.plr_abs_error_points),
    ):
        if stat is not None:
            lines.append(
                f"{name} absolute error: {_mm(stat)} percentage points, n = {stat.n}"
                + (f", undefined {stat.n_undefined}" if stat.n_undefined else "")
            )
    return "\n".join(lines)


def _classification_lines(summary: EvaluationSummary, label: str, include_paper: bool) -> list[str]:
    cls = summary.classification
    header = _row(
        "Classification",
        "n",
        ["Accuracy (%)", "Sensitivity (%)", "Specificity (%)", "F1-score (%)", "AUC (%)"],
    )
    if cls is None:
        return [header, "  no scan with a label and a class prediction", ""]
    lines = [
        header,
        _row(
            label,
            str(cls.n),
            [
                _pct(cls.accuracy),
                _pct(cls.macro_sensitivity),
                _pct(cls.macro_specificity),
                _pct(cls.macro_f1),
                _pct(cls.macro_auc),
            ],
        ),
    ]
    for c in cls.per_class:
        cells = ["-", _pct(c.sensitivity), _pct(c.specificity), _pct(c.f1), _pct(c.auc)]
        lines.append(_row(f"  {c.name}", str(c.support), cells))
    if include_paper:
        lines.append(
            _paper_row("classification", ("accuracy", "sensitivity", "specificity", "f1", "auc"))
        )
    lines.append("  sensitivity, specificity, F1, AUC: macro average of one-vs-rest per class")
    lines.append("")
    width = max(len(n) for n in summary.class_names) + 2
    lines.append("Confusion matrix (rows: truth, columns: prediction)")
    lines.append(" " * width + "".join(f"{n:>{width}}" for n in summary.class_names))
    for name, row in zip(summary.class_names, cls.confusion, strict=True):
        lines.append(f"{name:<{width}}" + "".join(f"{v:>{width}}" for v in row))
    lines.append("")
    return lines


# ------------------------------------------------------------------------- the plots

Overlay = tuple[np.ndarray, np.ndarray, np.ndarray]
"""(image slice, true mask slice, predicted mask slice), all 2D of one shape."""

TRUTH_COLOUR = "orange"
PRED_COLOUR = "lime"
"""Ground truth orange, prediction green, as in the paper's Fig. 6."""


def _roc_data(
    source: EvaluationSummary | ClassificationScores | tuple[Any, Any],
    class_names: Sequence[str],
) -> ClassificationScores | None:
    if isinstance(source, EvaluationSummary):
        return source.classification
    if isinstance(source, ClassificationScores):
        return source
    y_true, probabilities = source
    return classification_scores(y_true, probabilities, class_names)


def plot_roc(ax: Any, scores: ClassificationScores | None) -> None:
    """One-vs-rest ROC curve per class on a matplotlib Axes, AUC in the legend."""
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1)
    if scores is None or scores.n == 0:
        ax.text(0.5, 0.5, "no scan with a label\nand a class prediction", ha="center",
                va="center")
    else:
        # Wide to narrow, solid to dotted: curves that coincide (a perfect classifier's)
        # all stay visible instead of the last drawn hiding the others.
        styles = [("-", 3.0), ("--", 2.0), (":", 1.5)]
        for i, c in enumerate(scores.per_class):
            if c.roc_fpr and all(map(math.isfinite, c.roc_fpr + c.roc_tpr)):
                style, width = styles[i % len(styles)]
                ax.plot(c.roc_fpr, c.roc_tpr, linestyle=style, linewidth=width,
                        label=f"{c.name} (AUC {_pct(c.auc)} %)")
        ax.legend(loc="lower right", fontsize="small")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title("ROC, one vs rest")


def plot_overlays(
    axes: Sequence[Any],
    overlays: Sequence[Overlay],
    titles: Sequence[str] | None = None,
    window: tuple[float, float] | None = None,
) -> None:
    """Draw each (image, truth, prediction) slice: grey image, truth and prediction contours.

    ``window`` (vmin, vmax) for the image, e.g. (-1400, 200) HU; default the 1st-99th
    percentile of each slice.
    """
    if len(axes) < len(overlays):
        raise ValueError(f"{len(overlays)} overlays but {len(axes)} axes")
    for index, (ax, (image, truth, pred)) in enumerate(zip(axes, overlays, strict=False)):
        img = np.asarray(image, dtype=np.float64)
        if img.ndim != 2 or np.shape(truth) != img.shape or np.shape(pred) != img.shape:
            raise ValueError(f"overlay {index}: image and masks must be 2D of one shape")
        vmin, vmax = window if window is not None else np.percentile(img, [1, 99])
        ax.imshow(img, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
        for mask, colour in ((truth, TRUTH_COLOUR), (pred, PRED_COLOUR)):
            binary = np.asarray(mask, dtype=bool)
            if binary.any() and not binary.all():
                ax.contour(binary.astype(np.float32), levels=[0.5], colors=colour, linewidths=1)
        ax.set_title(titles[index] if titles else f"example {index + 1}", fontsize="small")
        ax.set_axis_off()
    if overlays:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=TRUTH_COLOUR), Line2D([], [], color=PRED_COLOUR)]
        axes[0].legend(handles, ["truth", "prediction"], loc="upper right", fontsize="x-small")


def plot_report(
    source: EvaluationSummary | ClassificationScores | tuple[Any, Any],
    path: str | Path,
    overlays: Sequence[Overlay] | None = None,
    overlay_titles: Sequence[str] | None = None,
    window: tuple[float, float] | None = None,
    class_names: Sequence[str] = CLASS_NAMES,
) -> Path:
    """Write a PNG: ROC curves (top) and example overlays (rows of up to four below).

    ``source`` is a summary, classification scores, or raw ``(y_true, probabilities)``.
    Uses the Agg canvas directly: no display, no global pyplot state.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    overlays = list(overlays or [])
    ncols = max(1, min(4, len(overlays)))
    overlay_rows = math.ceil(len(overlays) / ncols) if overlays else 0
    fig = Figure(figsize=(3.2 * max(ncols, 2), 4.5 + 3.2 * overlay_rows), dpi=100)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(1 + overlay_rows, ncols, height_ratios=[1.4] + [1.0] * overlay_rows)
    plot_roc(fig.add_subplot(grid[0, :]), _roc_data(source, class_names))
    if overlays:
        axes = [fig.add_subplot(grid[1 + i // ncols, i % ncols]) for i in range(len(overlays))]
        plot_overlays(axes, overlays, overlay_titles, window)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    logger.info("wrote evaluation plot %s", out)
    return out
