"""Whole-scan inference: CT volume in HU -> lesion mask, class probabilities, evidence map.

`analyse` is the AI contract of docs/architecture.md. Stages (each timed):

1. lungs: `ai.lungs.label_lungs` (or a caller-supplied mask);
2. preprocess: HU window, lung masking, the 48-slice classification sample (eq. 12) and
   the segmentation grid, built slab by slab so a 600-slice scan needs no full-volume
   float temporaries;
3. segmentation: sliding windows in batches through `DeepSC.scan_context` (the same code
   that builds the classifier's inputs in training), blended on the segmentation grid,
   resized to the native grid slab by slab, thresholded inside the lungs, small
   components removed;
4. classification: once per scan on the sampled slices plus the whole-volume lesion map;
   the multi-layer CAM evidence map (eq. 5) placed exactly on the native grid;
5. analysis: LVR, PLR and lesion statistics (`ai.analysis`).

No weights means `WeightsMissing`, never a made-up result. Deterministic on CPU (same
input, same thread count: same output), in float32 with channels-last 3D weights; on
CUDA under autocast (bf16, else fp16).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ai.analysis import (
    DEFAULT_CONSOLIDATION_HU,
    DEFAULT_OUTLINE_CLOSING_MM,
    DEFAULT_PERIPHERAL_MM,
    LesionStats,
    ScanAnalysis,
    analyse_lesions,
    check_settings,
    remove_small_components,
)
from ai.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from ai.errors import NoLungsFound, NotAVolume
from ai.labels import CLASS_NAMES, Diagnosis
from ai.limits import MAX_WINDOW_OVERLAP
from ai.lungs import Caveat, bounding_box, label_lungs
from ai.model import UNIT_STRIDES, SegOutput, evidence_class
from ai.preprocess import (
    InplaneBox,
    PatchBox,
    PreprocessConfig,
    SlidingWindow,
    check_volume,
    cls_slice_indices,
    field_of_view_box,
    normalise_hu,
    resize_inplane,
    sample_cls_slices,
)
from ai.refine import DEFAULT_REFINEMENT, OutlineRefinement, refine_lesion_outline

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5
DEFAULT_MIN_LESION_MM3 = 10.0
"""Components below this are speckle (a 2.7 mm sphere); configurable per call."""
SLAB = 32
"""Slices per slab when preprocessing and resizing maps (bounds the temporaries)."""

CheckpointLike = Checkpoint | str | os.PathLike[str] | None


@dataclass(frozen=True)
class Prediction:
    """Raw network output for one scan on the native grid (before analysis).

    `lesion_probability` is None for a classification-only model; `probabilities`,
    `evidence_map` and `evidence_class` are None for a segmentation-only model.
    """

    lesion_probability: np.ndarray | None
    probabilities: np.ndarray | None
    evidence_map: np.ndarray | None
    evidence_class: Diagnosis | None
    timings: dict[str, float] = field(default_factory=dict)
    diagnosis: Diagnosis | None = None
    """`diagnose` of `probabilities` (with the thresholds `predict` was given)."""


def diagnose(
    probabilities: Sequence[float], disease_thresholds: Sequence[float] | None = None
) -> Diagnosis:
    """The diagnosis from the class probabilities (CLASS_NAMES order): the most probable
    class; or, with `disease_thresholds` (COVID-19, CAP), a disease once its probability
    reaches its threshold (the more probable one when both do), else non-pneumonia. The
    thresholds set the operating point: below 0.5 a disease is called on less evidence
    (more sensitive, less specific) than the arg-max would ask."""
    if not disease_thresholds:
        return Diagnosis(int(np.argmax(probabilities)))
    diseases = (Diagnosis.COVID19, Diagnosis.CAP)
    if len(disease_thresholds) != len(diseases):
        raise ValueError(f"disease_thresholds {list(disease_thresholds)}: expected two values"
                         " (COVID-19, CAP)")
    called = [d for d, t in zip(diseases, disease_thresholds, strict=True)
              if probabilities[d] >= t]
    return max(called, key=lambda d: probabilities[d]) if called else Diagnosis.NON_PNEUMONIA


def call_caveats(diagnosis: Diagnosis, stats: ScanAnalysis) -> tuple[Caveat, ...]:
    """Where the diagnosis and the lesion segmentation disagree, every report must say so:
    they are separate outputs of the network, and the lesion mask does not depend on the
    call (a non-pneumonia scan keeps what the segmentation marked, so nothing is hidden
    from the reader)."""
    if diagnosis == Diagnosis.NON_PNEUMONIA and stats.lesion_count:
        return (Caveat(
            "No pneumonia called: lesions shown are candidates",
            f"The classification calls no pneumonia, yet the lesion segmentation marks "
            f"{stats.lesion_count} region(s), {stats.lesion_volume_ml:.1f} mL "
            f"({100 * stats.lvr:.2f} % of the lungs). The two are separate outputs of the "
            "model: read these regions as candidates to review (small ones are often false "
            "positives, others may be opacities of another cause), not as pneumonia."),)
    if diagnosis != Diagnosis.NON_PNEUMONIA and not stats.lesion_count:
        name = CLASS_NAMES[diagnosis]
        return (Caveat(
            f"{name} called, but no lesion segmented",
            f"The classification calls {name}, yet the lesion segmentation marks no "
            "lesion: the call rests on the classification alone, and the lesion measures "
            "(LVR, PLR) cannot show its extent."),)
    return ()


@dataclass(frozen=True)
class Analysis:
    """Everything the node reports for one scan. Masks and maps are (z, y, x) like the input.

    lvr, plr: fractions in [0, 1]; plr is None without lesions (0 / 0). `stats` holds the
    full per-scan summary (volumes, spread, density fractions) of `ai.analysis`. `model`:
    the checkpoint's `info` and how it ran (device, mirror, window_overlap, threshold,
    disease_thresholds), since results differ with these. `caveats`: limits of the result
    that every report of it must state (`ai.lungs.LungSegmentation.caveats`, then
    `call_caveats`).
    """

    lesion_mask: np.ndarray
    lung_mask: np.ndarray
    probabilities: dict[str, float]
    diagnosis: Diagnosis
    evidence_map: np.ndarray
    evidence_class: Diagnosis
    lvr: float
    plr: float | None
    lesions: tuple[LesionStats, ...]
    stats: ScanAnalysis
    timings: dict[str, float]
    model: dict[str, Any]
    caveats: tuple[Caveat, ...] = ()

    @property
    def evidence_legend(self) -> str:
        """What the evidence map shows: for a non-pneumonia call it is the evidence for the
        more probable disease, which the reader must not take for a call."""
        legend = f"evidence for {CLASS_NAMES[self.evidence_class]}"
        return legend if self.evidence_class == self.diagnosis else f"{legend} (not called)"


# --------------------------------------------------------------------------- entry points


def load_model(
    checkpoint: CheckpointLike = None, device: str | torch.device = "auto"
) -> Checkpoint:
    """A loaded checkpoint passes through (on its own device); a path or None is loaded.

    Keep the result to analyse many scans without reloading.
    """
    if isinstance(checkpoint, Checkpoint):
        return checkpoint
    return load_checkpoint(checkpoint, device)


def analyse(
    volume_hu: np.ndarray,
    spacing_mm: Sequence[float],
    *,
    checkpoint: CheckpointLike = None,
    device: str | torch.device = "auto",
    lung_mask: np.ndarray | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    min_lesion_mm3: float = DEFAULT_MIN_LESION_MM3,
    peripheral_mm: float = DEFAULT_PERIPHERAL_MM,
    outline_closing_mm: float = DEFAULT_OUTLINE_CLOSING_MM,
    consolidation_hu: float = DEFAULT_CONSOLIDATION_HU,
    batch_size: int | None = None,
    disease_thresholds: Sequence[float] | None = None,
    mirror: bool | None = None,
    overlap: float | None = None,
    refinement: OutlineRefinement = DEFAULT_REFINEMENT,
) -> Analysis:
    """Analyse one CT volume (z, y, x) in HU with spacing (dz, dy, dx) mm.

    `checkpoint`: a `Checkpoint` from `load_model`, a path, or None for the shipped
    default (raises `WeightsMissing` when absent). `lung_mask` skips lung segmentation.
    `disease_thresholds`: the operating point (`diagnose`); None: the arg-max.
    `mirror`: test-time mirroring of the segmentation (`_mirrored_segmentation`); None:
    on a GPU only (on a CPU it doubles the longest stage). `overlap`: the share of a
    segmentation window that its neighbours cover too (`with_overlap`); None:
    `GPU_OVERLAP` on a GPU, the checkpoint's own (none for the shipped weights) on a CPU.
    `refinement`: how the lesion outline is re-decided by density (`ai.refine`).
    Bad input raises an `ai.errors.InputVolumeError` subclass that says why.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold {threshold} must be in (0, 1)")
    if not min_lesion_mm3 >= 0.0:
        raise ValueError(f"min_lesion_mm3 {min_lesion_mm3} must be >= 0")
    check_settings(peripheral_mm, consolidation_hu, outline_closing_mm)
    _check_batch(batch_size)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    ckpt = load_model(checkpoint, device)
    if not isinstance(checkpoint, Checkpoint):
        timings["load"] = time.perf_counter() - t0
    ckpt = with_overlap(ckpt, auto_overlap(ckpt) if overlap is None else overlap)
    if ckpt.model_config.task != "joint":
        raise CheckpointError(
            f"{ckpt.path}: a single-task ({ckpt.model_config.task!r}) ablation model cannot "
            "analyse a scan; use a joint checkpoint"
        )
    volume_hu = np.asarray(volume_hu)
    spacing = check_volume(volume_hu, spacing_mm, ckpt.preprocess)

    t = time.perf_counter()
    sides = None
    caveats: tuple[Caveat, ...] = ()
    if lung_mask is None:
        lungs = label_lungs(volume_hu, spacing)
        sides, caveats = lungs.sides, lungs.caveats
        lung = sides > 0
    else:
        lung = _check_lung_mask(lung_mask, volume_hu)
    timings["lungs"] = time.perf_counter() - t

    pred = _predict(ckpt, volume_hu, lung, spacing, batch_size, disease_thresholds)
    mirrored = bool(mirror or (mirror is None and ckpt.device.type == "cuda"))
    if mirrored:
        pred = _mirrored_segmentation(ckpt, volume_hu, lung, spacing, batch_size, pred)
    assert pred.lesion_probability is not None and pred.probabilities is not None
    assert pred.evidence_map is not None and pred.evidence_class is not None
    assert pred.diagnosis is not None
    timings |= pred.timings

    t = time.perf_counter()
    probability = pred.lesion_probability
    pred = dataclasses.replace(pred, lesion_probability=None)  # freed: the largest array
    lesion = lesion_mask(probability, lung, volume_hu, spacing, threshold=threshold,
                         min_lesion_mm3=min_lesion_mm3, refinement=refinement)
    del probability
    timings["segmentation"] += time.perf_counter() - t
    t = time.perf_counter()
    stats = analyse_lesions(
        volume_hu,
        lesion,
        lung,
        spacing,
        lung_sides=sides,
        peripheral_mm=peripheral_mm,
        outline_closing_mm=outline_closing_mm,
        consolidation_hu=consolidation_hu,
    )
    timings["analysis"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    probs = {name: float(p) for name, p in zip(CLASS_NAMES, pred.probabilities, strict=True)}
    diagnosis = pred.diagnosis
    log.info(
        "analysed %s volume: %s (p=%.3f), %d lesions, LVR %.4f, %.1f s",
        "x".join(map(str, volume_hu.shape)), CLASS_NAMES[diagnosis], probs[CLASS_NAMES[diagnosis]],
        stats.lesion_count, stats.lvr, timings["total"],
    )  # fmt: skip
    for caveat in caveats:
        log.warning("analysis caveat: %s", caveat.detail)
    disagreement = call_caveats(diagnosis, stats)
    for caveat in disagreement:  # common (small false positives), hence not a warning
        log.info("analysis caveat: %s", caveat.detail)
    return Analysis(
        lesion_mask=lesion,
        lung_mask=lung,
        probabilities=probs,
        diagnosis=diagnosis,
        evidence_map=pred.evidence_map,
        evidence_class=pred.evidence_class,
        lvr=stats.lvr,
        plr=stats.plr,
        lesions=stats.lesions,
        stats=stats,
        timings=timings,
        model=ckpt.info | {
            "device": str(ckpt.device), "mirror": mirrored,
            "window_overlap": ckpt.preprocess.seg_overlap, "threshold": threshold,
            "outline_band_mm": refinement.band_mm,
            "outline_contrast_hu": refinement.contrast_hu,
            "field_of_view_mm": ckpt.preprocess.field_of_view_mm,
            "disease_thresholds": list(disease_thresholds) if disease_thresholds else None,
        },
        caveats=caveats + disagreement,
    )


def lesion_mask(
    probability: np.ndarray,
    lung: np.ndarray,
    volume_hu: np.ndarray,
    spacing_mm: Sequence[float],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    min_lesion_mm3: float = DEFAULT_MIN_LESION_MM3,
    refinement: OutlineRefinement = DEFAULT_REFINEMENT,
) -> np.ndarray:
    """The network's lesion probability to the lesion mask: cut at `threshold` inside the
    lungs, the outline re-decided by density (`ai.refine`), then components under
    `min_lesion_mm3` removed (the refinement can leave specks at the band's edge)."""
    candidate = probability > threshold
    candidate &= lung
    candidate = refine_lesion_outline(volume_hu, candidate, lung, spacing_mm, refinement)
    return remove_small_components(candidate, spacing_mm, min_lesion_mm3)


def predict(
    ckpt: Checkpoint,
    volume_hu: np.ndarray,
    lung_mask: np.ndarray,
    spacing_mm: Sequence[float],
    *,
    batch_size: int | None = None,
    mirror: bool = False,
    overlap: float | None = None,
) -> Prediction:
    """Run the network of any task (joint, seg, cls) on one scan; also for evaluation.

    Returns the lesion probability on the native grid (zero outside the lungs) and the
    class probabilities with the evidence map, whichever the model has. `mirror` and
    `overlap`: as in `analyse`, but off and as trained unless asked for (validation and
    evaluation run as the weights were trained, on any device).
    """
    _check_batch(batch_size)
    ckpt = with_overlap(ckpt, overlap)
    volume_hu = np.asarray(volume_hu)
    spacing = check_volume(volume_hu, spacing_mm, ckpt.preprocess)
    lung = _check_lung_mask(lung_mask, volume_hu)
    pred = _predict(ckpt, volume_hu, lung, spacing, batch_size)
    if mirror and pred.lesion_probability is not None:
        pred = _mirrored_segmentation(ckpt, volume_hu, lung, spacing, batch_size, pred)
    return pred


GPU_OVERLAP = 0.5
"""Window overlap on a GPU when none is asked for: nnU-Net's default, at about 4 x the
windows; on 2 CPU cores that would break the node's time target."""


def auto_overlap(ckpt: Checkpoint) -> float | None:
    """`analyse`'s window overlap when none is asked for: `GPU_OVERLAP` on a GPU, else
    None (as trained)."""
    return GPU_OVERLAP if ckpt.device.type == "cuda" else None


def with_overlap(ckpt: Checkpoint, overlap: float | None) -> Checkpoint:
    """`ckpt` segmenting with windows that overlap by `overlap` of their size on every
    axis (None: as trained), blended as the checkpoint says (Gaussian for the shipped
    weights: the voxels near a window's border, where it sees the least context, count
    least). The classifier reads the lesion map these windows make, so the class
    probabilities can change too."""
    if overlap is None:
        return ckpt
    if not 0.0 <= overlap <= MAX_WINDOW_OVERLAP:
        raise ValueError(f"overlap {overlap} must be in [0, {MAX_WINDOW_OVERLAP}]")
    if overlap == ckpt.preprocess.seg_overlap:
        return ckpt
    preprocess = dataclasses.replace(ckpt.preprocess, seg_overlap=overlap)
    return dataclasses.replace(ckpt, preprocess=preprocess)


def _mirrored_segmentation(
    ckpt: Checkpoint, volume_hu: np.ndarray, lung: np.ndarray, spacing: Sequence[float],
    batch_size: int | None, pred: Prediction,
) -> Prediction:
    """Test-time mirroring, as nnU-Net does by default: the lesion probability averaged
    over the scan as it is, mirrored left-right, flipped along the slices, and both, at
    four times the segmentation time; the classification stays that of the scan as it is.
    Front-back is left out: scans reach the network supine.

    Training mirrors left-right only, yet the flip along the slices helps more (on the
    selection phantoms, DSC 76.6 % plain, 76.9 left-right, 77.6 slices, 77.9 all four).
    The sum runs pairwise, (as is + left-right) + (slices + both), so that a scan flipped
    either way gets exactly the flipped lesions."""
    assert pred.lesion_probability is not None
    timings = dict(pred.timings)

    def flipped(axes: tuple[int, ...]) -> np.ndarray:
        mirrored = _predict(ckpt, np.ascontiguousarray(np.flip(volume_hu, axes)),
                            np.ascontiguousarray(np.flip(lung, axes)), spacing,
                            batch_size, classify=False)
        assert mirrored.lesion_probability is not None
        for stage in ("preprocess", "segmentation"):
            timings[stage] += mirrored.timings[stage]
        return np.flip(mirrored.lesion_probability, axes)

    probability = pred.lesion_probability + flipped((2,))
    along_slices = flipped((0,))
    along_slices += flipped((0, 2))
    probability += along_slices
    probability *= 0.25
    return dataclasses.replace(pred, lesion_probability=probability, timings=timings)


def _predict(
    ckpt: Checkpoint, volume_hu: np.ndarray, lung: np.ndarray, spacing: Sequence[float],
    batch_size: int | None, disease_thresholds: Sequence[float] | None = None,
    classify: bool = True,
) -> Prediction:
    """One pass of the network over the scan; `classify=False` stops after the
    segmentation (a mirrored pass, whose classification nobody reads)."""
    model, cfg, dev = ckpt.model, ckpt.preprocess, ckpt.device
    timings: dict[str, float] = {}
    cuda = dev.type == "cuda"

    t = time.perf_counter()
    fov = field_of_view_box(lung, spacing, cfg)
    window = SlidingWindow(volume_hu.shape, cfg)
    grid = _seg_grid(volume_hu, lung, window, fov, cfg).to(dev)
    weight = next(p for p in model.parameters() if p.dim() == 5)
    x_cls = None
    if model.stem_c is not None:
        # From the segmentation grid, as training samples it (from the grid it augments).
        x_cls = _like(sample_cls_slices(grid, cfg)[None, None], weight)
    timings["preprocess"] = _elapsed(t, dev)

    t = time.perf_counter()
    acc = window.accumulator(device=dev) if model.stem_l is not None else None
    batch = batch_size or (8 if cuda else 2)
    with torch.inference_mode(), _autocast(dev):

        def sink(seg: SegOutput, box: Tensor) -> None:
            assert acc is not None
            for row, prob in zip(box.tolist(), seg.prob.float(), strict=True):
                acc.add(_patch_box(row, window.grid_shape), prob[0])

        context = model.scan_context(x_cls, _windows(window, grid, batch, weight), sink)
        del grid
        lesion_prob = None
        if acc is not None:
            lesion_prob = _to_native(acc.result(), window, fov, lung)
            del acc  # the blended grid's sums: not held while the classifier runs
        timings["segmentation"] = _elapsed(t, dev)

        t = time.perf_counter()
        probs = evidence = cls_idx = diagnosis = None
        if model.classifier is not None and classify:
            out = model.classify_scan(context)
            logits = out.logits.float()
            probs = torch.softmax(logits, 1)[0].cpu().numpy().astype(np.float64)
            diagnosis = diagnose(probs, disease_thresholds)
            # The evidence of the diagnosed disease; for non-pneumonia, of the likelier one.
            j = (evidence_class(logits) if diagnosis == Diagnosis.NON_PNEUMONIA
                 else torch.tensor([int(diagnosis)], device=logits.device))
            maps = model.evidence([u.float() for u in out.units], j)
            evidence = _evidence_to_native(maps, volume_hu.shape, fov, cfg, lung)
            cls_idx = Diagnosis(int(j[0]))
        timings["classification"] = _elapsed(t, dev)
    return Prediction(lesion_prob, probs, evidence, cls_idx, timings, diagnosis)


# --------------------------------------------------------------------------- preprocessing


def _check_batch(batch_size: int | None) -> None:
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size {batch_size} must be >= 1")


MIN_AERATED_FRACTION = 0.2
"""Least share of a caller's lung mask below AERATED_HU: even a lung half consolidated is
mostly air-filled, while a mask on soft tissue, or a volume not in HU, has none."""
AERATED_HU = -500.0


def _check_lung_mask(mask: np.ndarray, volume_hu: np.ndarray) -> np.ndarray:
    """A caller's lung mask (instead of `label_lungs`, whose content checks it skips):
    binary, the volume's shape, and on air-filled lung of a volume in HU."""
    mask = np.asarray(mask)
    if mask.shape != volume_hu.shape:
        raise NotAVolume(f"lung mask shape {mask.shape} != volume shape {volume_hu.shape}")
    if mask.dtype != bool and np.any((mask != 0) & (mask != 1)):
        raise NotAVolume("the lung mask is not binary (0/1): threshold a probability map first")
    mask = mask.astype(bool, copy=False)
    lung_voxels = np.count_nonzero(mask)
    if not lung_voxels:
        raise NoLungsFound("the lung mask is empty")
    aerated = np.count_nonzero(volume_hu[mask] < AERATED_HU) / lung_voxels
    if aerated < MIN_AERATED_FRACTION:
        raise NoLungsFound(
            f"only {aerated:.0%} of the lung mask is below {AERATED_HU:g} HU: the mask is"
            " not on the lungs, or the volume is not in HU"
        )
    return mask


def _masked_slices(volume_hu: np.ndarray, lung: np.ndarray, idx: Any, cfg: PreprocessConfig):
    """HU window and lung masking of some slices (float32 CPU tensor)."""
    x = normalise_hu(volume_hu[idx], cfg)
    return x.mul_(torch.from_numpy(np.ascontiguousarray(lung[idx])))


def _seg_grid(
    volume_hu: np.ndarray, lung: np.ndarray, window: SlidingWindow, fov: InplaneBox,
    cfg: PreprocessConfig,
) -> Tensor:
    """The lung-masked, windowed field of view on the segmentation grid, by slabs."""
    grid = torch.empty(window.grid_shape, dtype=torch.float32)
    for z0 in range(0, volume_hu.shape[0], SLAB):
        sl = slice(z0, z0 + SLAB)
        masked = fov.crop(_masked_slices(volume_hu, lung, sl, cfg))
        grid[sl] = resize_inplane(masked, window.grid_shape[1:])
    return grid


def _windows(
    window: SlidingWindow, grid: Tensor, batch: int, like: Tensor
) -> Iterator[tuple[Tensor, Tensor]]:
    """Window batches (n, 1, d, h, w) laid out like the model's conv weights, and their
    boxes (n, 6) as volume fractions."""
    for boxes in window.batches(batch):
        x = window.extract_batch(grid, boxes)
        yield _like(x, like), torch.tensor([b.fractions() for b in boxes], dtype=torch.float64)


def _like(x: Tensor, weight: Tensor) -> Tensor:
    """x on the weight's device, in its dtype and memory format (channels-last or not)."""
    x = x.to(weight.device, weight.dtype, non_blocking=True)
    if weight.is_contiguous(memory_format=torch.channels_last_3d) and not weight.is_contiguous():
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x.contiguous()


def _patch_box(row: Sequence[float], grid_shape: tuple[int, int, int]) -> PatchBox:
    """Inverse of `PatchBox.fractions` (exact: the fractions are integer / size)."""
    s, h, w = grid_shape
    z0, z1, y0, y1, x0, x1 = (round(f * n) for f, n in zip(row, (s, s, h, h, w, w), strict=True))
    return PatchBox(z0, z1, y0, y1, x0, x1, grid_shape)


# --------------------------------------------------------------------------- outputs


def _to_native(
    prob_grid: Tensor, window: SlidingWindow, fov: InplaneBox, lung: np.ndarray
) -> np.ndarray:
    """Blended probability on the native grid (float32), zero outside the lungs; by slabs,
    only over the slices with lung (a chest-abdomen scan's lower half is not resized)."""
    out = np.zeros(window.native_shape, dtype=np.float32)
    box = bounding_box(lung)
    if box is None:
        return out
    (ny, nx), (by, bx) = fov.overlap(*window.native_shape[1:])
    for z0 in range(box[0].start, box[0].stop, SLAB):
        sl = slice(z0, min(z0 + SLAB, box[0].stop))
        part = resize_inplane(prob_grid[sl], fov.size).clamp_(0.0, 1.0)
        out[sl, ny, nx] = part[:, by, bx].cpu().numpy()
        out[sl] *= lung[sl]
    return out


def _evidence_to_native(
    maps: Sequence[Tensor], shape: tuple[int, ...], fov: InplaneBox, cfg: PreprocessConfig,
    lung: np.ndarray,
) -> np.ndarray:
    """Mean of the per-unit evidence masks on the native grid, in the lungs, scaled to [0, 1];
    float16 (a heat map to show, in half the memory of float32: 335 MB less for a
    640 x 512 x 512 scan), made by slabs of slices so that no float32 copy of it exists.

    Each unit map is interpolated linearly at the true position of every native voxel: the
    classification input's slices are the eq.-12 sample and its rows / columns a resize of
    the field of view, and feature cell j of a map 2^L times coarser than that input is
    centred on input index stride * j (every stride-2 layer is centred), not at a
    cell-centre convention.
    """
    s, h, w = (int(n) for n in shape)
    ev = np.zeros((s, h, w), dtype=np.float16)
    box = bounding_box(lung)  # outside it the map is zero: not computed
    if box is None:
        return ev
    zs, ys, xs = box
    n_cls, h_in, w_in = cfg.n_cls_slices, *cfg.cls_size
    u_z = _slice_positions(s, n_cls)[zs]
    u_y = fov.positions(h, h_in, axis=0)[ys]
    u_x = fov.positions(w, w_in, axis=1)[xs]
    dev = maps[0].device
    with torch.autocast(dev.type, enabled=False):  # float32 maps, whatever the caller runs
        inplane, along_z = [], []  # per unit: the map resized in-plane, its slice weights
        for m, stride in zip(maps, UNIT_STRIDES, strict=True):
            v = m[0, 0].float()  # (d, hh, ww)
            wz, wy, wx = (
                _interp_matrix(u / stride, n, dev)
                for u, n in zip((u_z, u_y, u_x), v.shape, strict=True)
            )
            inplane.append((wy @ (v @ wx.T)).reshape(v.shape[0], -1))  # (d, box h * box w)
            along_z.append(wz)
        peak = 0.0
        for z0 in range(0, u_z.size, SLAB):
            rows = slice(z0, min(z0 + SLAB, u_z.size))
            total = sum(wz[rows] @ v for wz, v in zip(along_z, inplane, strict=True))
            block = total.reshape(-1, u_y.size, u_x.size).cpu().numpy()
            block *= lung[zs.start + rows.start : zs.start + rows.stop, ys, xs]
            peak = max(peak, float(np.float16(block.max())))  # as stored: max 1.0 exactly
            ev[zs.start + rows.start : zs.start + rows.stop, ys, xs] = block
    if peak > 0:  # by torch: numpy's float16 arithmetic is 40 times slower
        torch.from_numpy(ev).div_(peak)
    return ev


def _slice_positions(n_slices: int, n_sampled: int) -> np.ndarray:
    """Continuous classification-input slice index of every native slice (eq. 12 inverted)."""
    idx = cls_slice_indices(n_slices, n_sampled)
    uniq, inverse = np.unique(idx, return_inverse=True)
    k_mean = np.bincount(inverse, weights=np.arange(n_sampled)) / np.bincount(inverse)
    return np.interp(np.arange(n_slices), uniq, k_mean)


def _interp_matrix(t: np.ndarray, n: int, dev: torch.device) -> Tensor:
    """(len(t), n) linear interpolation at positions t, clamped to the edge cells."""
    t = np.clip(t, 0.0, n - 1)
    j0 = np.floor(t).astype(np.int64)
    j1 = np.minimum(j0 + 1, n - 1)
    frac = t - j0
    m = np.zeros((t.size, n), dtype=np.float64)
    rows = np.arange(t.size)
    np.add.at(m, (rows, j0), 1.0 - frac)
    np.add.at(m, (rows, j1), frac)
    return torch.from_numpy(m.astype(np.float32)).to(dev)


# --------------------------------------------------------------------------- device


def _autocast(dev: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 (else fp16) autocast on CUDA; full precision on CPU (deterministic, no gain)."""
    if dev.type != "cuda":
        return contextlib.nullcontext()
    # bf16 from compute capability 8.0 (Ampere) on, asked of the chosen GPU, not GPU 0.
    bf16 = torch.cuda.get_device_capability(dev) >= (8, 0)
    return torch.autocast("cuda", dtype=torch.bfloat16 if bf16 else torch.float16)


def _elapsed(t0: float, dev: torch.device) -> float:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t0
