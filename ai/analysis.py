"""Quantitative lesion analysis: LVR, PLR (paper eq. 1), lesion components and their stats.

Definitions (units in names):
- Lesions are `lesion_mask & lung_mask`; voxels outside the lungs are not lesion.
- Lesion components use 3D 26-connectivity by default (face, edge or corner neighbours), so
  a lesion that shifts diagonally between thick slices stays one lesion.
- LVR = lesion voxels / lung voxels.
- PLR = lesion voxels in the peripheral band / lesion voxels, where the band of slice s is
  U_s minus its 2D erosion by a disk of radius sigma mm (an ellipse in pixels when the pixel
  spacing is anisotropic); outside the image counts as outside the lung. U_s is the lung
  outline: each lung on slice s closed by a disk of `outline_closing_mm` (0: the lung mask
  itself, as in the paper), so that a bite which a consolidation left out of the lung mask
  cuts into the lung does not count as pleura (`DEFAULT_OUTLINE_CLOSING_MM`).
- Spread = sqrt(mean_i |c_i - mean(c)|^2) over lesion centres c_i in mm, each lesion counted
  once (not volume-weighted), so it measures scattered vs concentrated disease (Finding 4)
  rather than lesion size.
- Positions are in the volume's own frame: voxel (z, y, x) indices and mm = index * spacing
  from the centre of voxel (0, 0, 0); the caller maps them to patient coordinates.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from ai.lungs import LungSide, bounding_box

log = logging.getLogger(__name__)

DEFAULT_PERIPHERAL_MM = 10.0
DEFAULT_OUTLINE_CLOSING_MM = 10.0
"""Radius of the per-slice closing of each lung before its peripheral band is measured.
The paper's U_s is a learned lung mask that holds consolidations; the node's classical one
leaves a dense consolidation against the mediastinum out (ai/lungs.py, step 6), and the
lesion beside that cut then counts as peripheral. Closing by 10 mm, the radius the lung
mask closes with near the mediastinum, bridges bites up to 20 mm wide. On the held-out
phantoms (docs/training.md, "The PLR's lung outline") it cuts the PLR error that the
node's lung mask alone causes (true lesions: 1.89 -> 1.30 points on the set it was chosen
on, 1.30 -> 0.65 on a fresh one), while the PLR of the true lesions in the true lungs moves
by at most 1.24 points (larger radii fill real concavities such as the hilum)."""
DEFAULT_CONSOLIDATION_HU = -300.0
DEFAULT_CONNECTIVITY = 26
_CONNECTIVITY_RANK = {6: 1, 18: 2, 26: 3}


@dataclass(frozen=True)
class LesionStats:
    """One 3D lesion component. Sizes in mm / mL, positions in the volume frame."""

    index: int
    """1-based, lesions ordered by volume, largest first."""
    voxels: int
    volume_ml: float
    bbox_voxels: tuple[int, int, int, int, int, int]
    """Half-open (z0, z1, y0, y1, x0, x1)."""
    width_mm: float
    """Extent along columns (x)."""
    length_mm: float
    """Extent along rows (y)."""
    height_mm: float
    """Extent along slices (z)."""
    centre_voxel: tuple[float, float, float]
    centre_mm: tuple[float, float, float]
    mean_hu: float
    p10_hu: float
    p50_hu: float
    p90_hu: float
    ggo_fraction: float
    consolidation_fraction: float
    density: str
    """"consolidation" when at least half the voxels are >= the threshold, else "ground-glass"."""
    peripheral_fraction: float
    side: str | None
    """"right" / "left" lung holding most of the lesion, None without side labels."""

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))


@dataclass(frozen=True)
class ScanAnalysis:
    """Per-scan summary (paper Findings 1-4) and the lesion list."""

    lung_volume_ml: float
    lesion_volume_ml: float
    lvr: float
    """Lesion / lung volume, in [0, 1]."""
    plr: float | None
    """Peripheral lesion ratio, in [0, 1]; None without lesions (0/0)."""
    lesion_count: int
    spread_mm: float | None
    """Std of lesion centres (unweighted, 3D radial); None without lesions."""
    ggo_fraction: float | None
    consolidation_fraction: float | None
    lung_mean_hu: float | None
    """Mean attenuation of the lung mask (lesions included); None without lungs."""
    lesion_mean_hu: float | None
    """Mean attenuation of all lesion voxels; None without lesions."""
    peripheral_thickness_mm: float
    outline_closing_mm: float
    """Closing radius of the lung outline the peripheral band is measured from."""
    consolidation_hu: float
    connectivity: int
    lesions: tuple[LesionStats, ...]

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))


# --------------------------------------------------------------------------- components


def _structure(connectivity: int) -> np.ndarray:
    if connectivity not in _CONNECTIVITY_RANK:
        raise ValueError(f"connectivity {connectivity} must be 6, 18 or 26")
    return ndi.generate_binary_structure(3, _CONNECTIVITY_RANK[connectivity])


def label_components(
    mask: np.ndarray, connectivity: int = DEFAULT_CONNECTIVITY
) -> tuple[np.ndarray, int]:
    """3D connected components (labels 1..n, 0 background), int32."""
    labels, n = ndi.label(np.asarray(mask, dtype=bool), structure=_structure(connectivity))
    return labels.astype(np.int32, copy=False), int(n)


def remove_small_components(
    mask: np.ndarray,
    spacing_mm: Sequence[float],
    min_volume_mm3: float,
    connectivity: int = DEFAULT_CONNECTIVITY,
) -> np.ndarray:
    """The mask without 3D components smaller than `min_volume_mm3` (speckle from the model)."""
    mask = np.asarray(mask, dtype=bool)
    voxel_mm3 = math.prod(_spacing(spacing_mm))
    out = np.zeros_like(mask)
    box = bounding_box(mask)
    if box is None or min_volume_mm3 <= 0:
        return mask.copy()
    labels, n = label_components(mask[box], connectivity)
    sizes = np.bincount(labels.ravel(), minlength=n + 1) * voxel_mm3
    keep = sizes >= min_volume_mm3
    keep[0] = False
    out[box] = keep[labels]
    removed = int(n - np.count_nonzero(keep))
    if removed:
        log.debug("removed %d of %d components below %.1f mm^3", removed, n, min_volume_mm3)
    return out


# --------------------------------------------------------------------------- periphery


def peripheral_band(
    lung_mask: np.ndarray,
    spacing_mm: Sequence[float],
    thickness_mm: float = DEFAULT_PERIPHERAL_MM,
    slices: Sequence[int] | None = None,
) -> np.ndarray:
    """The band of paper eq. 1: per axial slice, U_s minus its erosion by a disk of radius
    `thickness_mm` (pixel spacing dy, dx). A lung pixel is in the band when some non-lung pixel
    (or the image outside) lies within `thickness_mm` of it in its slice. `slices` limits the
    work to those slice indices (others are left False)."""
    lung = np.asarray(lung_mask, dtype=bool)
    band = np.zeros_like(lung)
    if thickness_mm <= 0:
        return band
    _, dy, dx = _spacing(spacing_mm)
    zs = range(lung.shape[0]) if slices is None else slices
    for z in zs:
        band[z] = _band_2d(lung[z], dy, dx, thickness_mm)
    return band


def lung_outline(
    lung_labels: np.ndarray, spacing_mm: Sequence[float], closing_mm: float
) -> np.ndarray:
    """U_s of the peripheral band: per axial slice, each lung (each label > 0 of
    `lung_labels`) closed by a disk of radius `closing_mm` (an ellipse in pixels), and their
    union. Each lung on its own, so the mediastinum between them is never bridged; beyond the
    image is empty, so the closing adds nothing there. 0: the lungs as they are."""
    labels = np.asarray(lung_labels)
    outline = labels > 0
    if closing_mm <= 0:
        return outline
    _, dy, dx = _spacing(spacing_mm)
    reach = closing_mm * (1.0 + BAND_EDGE_SLACK)
    pad = (int(closing_mm // dy) + 2, int(closing_mm // dx) + 2)
    h, w = labels.shape[1:]
    for z in range(labels.shape[0]):
        for value in np.unique(labels[z]):
            if value == 0:
                continue
            box = _bbox2d(labels[z] == value)
            assert box is not None
            (y0, y1), (x0, x1) = box
            # The closing of a lung reaches at most `closing_mm` beyond its bounding box.
            ys = slice(max(y0 - pad[0], 0), min(y1 + pad[0], h))
            xs = slice(max(x0 - pad[1], 0), min(x1 + pad[1], w))
            m = np.pad(labels[z, ys, xs] == value, ((pad[0], pad[0]), (pad[1], pad[1])))
            dilated = ndi.distance_transform_edt(~m, sampling=(dy, dx)) <= reach
            closed = ndi.distance_transform_edt(dilated, sampling=(dy, dx)) > reach
            outline[z, ys, xs] |= closed[pad[0] : -pad[0], pad[1] : -pad[1]]
    return outline


def _band_2d(lung2d: np.ndarray, dy: float, dx: float, thickness_mm: float) -> np.ndarray:
    box = _bbox2d(lung2d)
    if box is None:
        return np.zeros_like(lung2d)
    # Crop to the lung, keeping a one-pixel frame of the non-lung (or of the outside of the
    # image) so the distance transform always sees what lies beyond the lung.
    (y0, y1), (x0, x1) = box
    crop = np.zeros((y1 - y0 + 2, x1 - x0 + 2), dtype=bool)
    crop[1:-1, 1:-1] = lung2d[y0:y1, x0:x1]
    dist = ndi.distance_transform_edt(crop, sampling=(dy, dx))
    out = np.zeros_like(lung2d)
    reach = thickness_mm * (1.0 + BAND_EDGE_SLACK)
    out[y0:y1, x0:x1] = (dist <= reach)[1:-1, 1:-1] & lung2d[y0:y1, x0:x1]
    return out


BAND_EDGE_SLACK = 1e-9
"""Relative slack at the band's edge: a pixel exactly sigma away is in the band (closed
disk) also where float rounding puts its distance a hair beyond (14 x 0.8 mm =
11.200000000000001 mm against sigma 11.2 mm)."""


def _spacing(spacing_mm: Sequence[float]) -> tuple[float, float, float]:
    """(dz, dy, dx) as floats, refused unless three finite numbers > 0: a zero or
    negative spacing would give volumes of 0 or below and sizes with the wrong sign."""
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing {tuple(spacing_mm)!r} must be three finite numbers > 0 mm")
    return spacing  # type: ignore[return-value]


def _bbox2d(mask2d: np.ndarray) -> tuple[tuple[int, int], tuple[int, int]] | None:
    rows = np.flatnonzero(mask2d.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask2d.any(axis=0))
    return (int(rows[0]), int(rows[-1]) + 1), (int(cols[0]), int(cols[-1]) + 1)


# --------------------------------------------------------------------------- analysis


def check_settings(
    peripheral_mm: float, consolidation_hu: float, outline_closing_mm: float = 0.0
) -> None:
    """Refuse settings `analyse_lesions` cannot use (callers check before the network
    runs, not after)."""
    # A negative band would shrink the lesions' crops and silently drop lesions.
    for name, value in (("peripheral_mm", peripheral_mm),
                        ("outline_closing_mm", outline_closing_mm)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} {value!r} must be a finite number >= 0")
    if not math.isfinite(consolidation_hu):
        raise ValueError(f"consolidation_hu {consolidation_hu!r} must be finite")


def analyse_lesions(
    volume_hu: np.ndarray,
    lesion_mask: np.ndarray,
    lung_mask: np.ndarray,
    spacing_mm: Sequence[float],
    *,
    lung_sides: np.ndarray | None = None,
    peripheral_mm: float = DEFAULT_PERIPHERAL_MM,
    outline_closing_mm: float = DEFAULT_OUTLINE_CLOSING_MM,
    consolidation_hu: float = DEFAULT_CONSOLIDATION_HU,
    connectivity: int = DEFAULT_CONNECTIVITY,
) -> ScanAnalysis:
    """LVR, PLR, lesion components with per-lesion stats, and the per-scan summary.

    lung_sides: optional labels (0 background, `LungSide.RIGHT`, `LungSide.LEFT`) as from
    `ai.lungs.label_lungs(...).sides`; gives each lesion its side, and each lung its own
    outline for the PLR (without them, each 3D component of the lung mask on either side
    of the column between the lungs is one).
    """
    shape = tuple(volume_hu.shape)
    for name, arr in (("lesion_mask", lesion_mask), ("lung_mask", lung_mask)):
        if tuple(arr.shape) != shape:
            raise ValueError(f"{name} shape {tuple(arr.shape)} != volume shape {shape}")
    if lung_sides is not None and tuple(lung_sides.shape) != shape:
        raise ValueError(f"lung_sides shape {tuple(lung_sides.shape)} != volume shape {shape}")
    check_settings(peripheral_mm, consolidation_hu, outline_closing_mm)
    spacing = _spacing(spacing_mm)
    voxel_ml = math.prod(spacing) / 1000.0
    lung = np.asarray(lung_mask, dtype=bool)
    lesion_in = np.asarray(lesion_mask, dtype=bool)
    lesion = lesion_in & lung
    outside = int(np.count_nonzero(lesion_in)) - int(np.count_nonzero(lesion))
    if outside:
        log.debug("ignored %d lesion voxels outside the lung mask", outside)

    lung_voxels = int(np.count_nonzero(lung))
    lesion_voxels = int(np.count_nonzero(lesion))
    lvr = lesion_voxels / lung_voxels if lung_voxels else 0.0
    base = dict(
        lung_mean_hu=float(np.mean(volume_hu[lung], dtype=np.float64)) if lung_voxels else None,
        lung_volume_ml=lung_voxels * voxel_ml,
        lesion_volume_ml=lesion_voxels * voxel_ml,
        lvr=lvr,
        peripheral_thickness_mm=float(peripheral_mm),
        outline_closing_mm=float(outline_closing_mm),
        consolidation_hu=float(consolidation_hu),
        connectivity=connectivity,
    )
    box = bounding_box(lesion)
    if box is None:
        return ScanAnalysis(
            plr=None, lesion_count=0, spread_mm=None, ggo_fraction=None,
            consolidation_fraction=None, lesion_mean_hu=None, lesions=(), **base,
        )  # fmt: skip

    # Work inside the lesions' bounding box, widened in-plane by the band radius so the band
    # of every lesion voxel is computed from the full neighbourhood it depends on.
    zb, yb, xb = box
    ry = int(math.ceil(peripheral_mm / spacing[1])) + 1
    rx = int(math.ceil(peripheral_mm / spacing[2])) + 1
    crop = (
        zb,
        slice(max(yb.start - ry, 0), min(yb.stop + ry, shape[1])),
        slice(max(xb.start - rx, 0), min(xb.stop + rx, shape[2])),
    )
    les = lesion[crop]
    lungs = _lung_labels(lung, lung_sides, outline_closing_mm)
    band = _lesion_band(lungs, lung, les, crop, spacing, peripheral_mm, outline_closing_mm,
                        (ry, rx))
    labels, n = label_components(les, connectivity)
    offset = np.array([s.start for s in crop], dtype=float)

    lab = labels[les]  # lesion voxels in C order, their component
    hu = np.asarray(volume_hu[crop][les], dtype=np.float64)
    counts = np.bincount(lab, minlength=n + 1)[1:]
    periph = np.bincount(lab, weights=band[les], minlength=n + 1)[1:]
    consol = np.bincount(lab, weights=hu >= consolidation_hu, minlength=n + 1)[1:]
    centres = (
        np.stack(
            [np.bincount(lab, weights=c, minlength=n + 1)[1:] for c in np.nonzero(les)], axis=1
        )
        / counts[:, None]
        + offset
    )
    sides = _side_counts(lung_sides, crop, les, lab, n)
    hu_sorted, starts = _group_sorted(hu, lab, counts)

    lesions = []
    order = np.lexsort((np.arange(n), -counts))  # by volume, ties by label (deterministic)
    objects = ndi.find_objects(labels)
    for rank, i in enumerate(order, start=1):
        values = hu_sorted[starts[i] : starts[i] + counts[i]]
        sl = objects[i]
        bb = tuple(
            int(v) for s, o in zip(sl, offset, strict=True) for v in (s.start + o, s.stop + o)
        )
        cons = float(consol[i] / counts[i])
        p10, p50, p90 = np.percentile(values, (10, 50, 90))
        lesions.append(
            LesionStats(
                index=rank,
                voxels=int(counts[i]),
                volume_ml=float(counts[i] * voxel_ml),
                bbox_voxels=bb,  # type: ignore[arg-type]
                width_mm=(bb[5] - bb[4]) * spacing[2],
                length_mm=(bb[3] - bb[2]) * spacing[1],
                height_mm=(bb[1] - bb[0]) * spacing[0],
                centre_voxel=tuple(float(c) for c in centres[i]),  # type: ignore[arg-type]
                centre_mm=tuple(float(c * s) for c, s in zip(centres[i], spacing, strict=True)),  # type: ignore[arg-type]
                mean_hu=float(values.mean()),
                p10_hu=float(p10),
                p50_hu=float(p50),
                p90_hu=float(p90),
                ggo_fraction=1.0 - cons,
                consolidation_fraction=cons,
                density="consolidation" if cons >= 0.5 else "ground-glass",
                peripheral_fraction=float(periph[i] / counts[i]),
                side=_side_name(sides, i),
            )
        )
    centres_mm = centres * np.asarray(spacing)
    spread = float(np.sqrt(((centres_mm - centres_mm.mean(axis=0)) ** 2).sum(axis=1).mean()))
    cons_total = float(consol.sum() / lesion_voxels)
    return ScanAnalysis(
        plr=float(periph.sum() / lesion_voxels),
        lesion_count=n,
        spread_mm=spread,
        ggo_fraction=1.0 - cons_total,
        consolidation_fraction=cons_total,
        lesion_mean_hu=float(hu.mean()),
        lesions=tuple(lesions),
        **base,
    )


LungLabels = Callable[[tuple[slice, slice, slice]], np.ndarray]
"""The lung labels of a region (z, y, x slices): made per crop, as only the lesions' slices
need them (a full-volume array of a 640-slice scan is 170 MB)."""


def _lung_labels(
    lung: np.ndarray, lung_sides: np.ndarray | None, outline_closing_mm: float
) -> LungLabels:
    """One label per lung, for `lung_outline`: the sides (lung voxels without one together
    as a third), else the 3D components of the mask, each split at `_mediastinum_column`
    (two lungs that touch anywhere are one component, which the closing would bridge
    across the mediastinum); the mask itself without a closing."""
    if outline_closing_mm <= 0:
        return lambda region: lung[region]
    if lung_sides is None:  # components are global: labelled once, whole
        labels, _ = label_components(lung)  # int32, in place below: a full-volume array
        labels *= 2
        labels -= 1
        labels[:, :, _mediastinum_column(lung) + 1 :] += 1
        labels[~lung] = 0
        return lambda region: labels[region]
    sides = np.asarray(lung_sides)

    def crop(region: tuple[slice, slice, slice]) -> np.ndarray:
        part = sides[region]
        return np.where(lung[region], np.where(part > 0, part, max(LungSide) + 1), 0).astype(
            np.uint8)

    return crop


MEDIASTINUM_SEARCH_SHARE = 0.2
"""`_mediastinum_column` skips this share of the lungs' width at either side, where the
lungs' lateral edges thin out."""


def _mediastinum_column(lung: np.ndarray) -> int:
    """The column between the lungs: the one with the least lung, away from the lungs'
    lateral edges. The mean or middle column would fall inside the wider lung when one is
    much wider than the other; splitting a lung there is harmless (its two parts are
    closed apart, the outline is their union), bridging the mediastinum is not."""
    profile = np.count_nonzero(lung, axis=(0, 1))
    used = np.flatnonzero(profile)
    first, last = int(used[0]), int(used[-1])
    skip = int((last - first) * MEDIASTINUM_SEARCH_SHARE)
    inner = profile[first + skip : last - skip + 1]
    return first + skip + int(np.argmin(inner))


def _lesion_band(
    lungs: LungLabels,
    lung: np.ndarray,
    les: np.ndarray,
    crop: tuple[slice, slice, slice],
    spacing: tuple[float, float, float],
    thickness_mm: float,
    closing_mm: float,
    margin: tuple[int, int],
) -> np.ndarray:
    """The peripheral band inside `crop`, right at the lesion voxels `les` (elsewhere it may
    be False): each slice's band is computed only around that slice's lesions, widened by
    `margin` pixels (more than the band is thick), which is all their band depends on
    given the outline (`_crop_band` closes the outline over a wider context)."""
    zc, yc, xc = crop
    h, w = lung.shape[1:]
    band = np.zeros(les.shape, dtype=bool)
    for k in np.flatnonzero(les.any(axis=(1, 2))):
        rows = np.flatnonzero(les[k].any(axis=1))
        cols = np.flatnonzero(les[k].any(axis=0))
        ys = slice(max(yc.start + int(rows[0]) - margin[0], 0),
                   min(yc.start + int(rows[-1]) + 1 + margin[0], h))
        xs = slice(max(xc.start + int(cols[0]) - margin[1], 0),
                   min(xc.start + int(cols[-1]) + 1 + margin[1], w))
        z = zc.start + int(k)
        part = _crop_band(lungs, lung, (slice(z, z + 1), ys, xs), spacing, thickness_mm,
                          closing_mm)
        band[k, ys.start - yc.start : ys.stop - yc.start,
             xs.start - xc.start : xs.stop - xc.start] = part[0]
    return band


def _crop_band(
    lungs: LungLabels,
    lung: np.ndarray,
    crop: tuple[slice, slice, slice],
    spacing: tuple[float, float, float],
    thickness_mm: float,
    closing_mm: float,
) -> np.ndarray:
    """The peripheral band inside `crop`, computed as on the whole slice: the crop edges that
    are image edges count as outside, the others are far enough away not to matter (the
    outline is closed over a context wider by twice the closing radius, all it depends on)."""
    zc, yc, xc = crop
    h, w = lung.shape[1:]
    # Close the outline over a context wider by twice the radius (all the closing at the
    # crop depends on), plus one pixel, marked "unknown lung" (True), so that pixels beyond
    # are not seen as outside; at image edges the outside stays outside (False).
    cy = int(math.ceil(2 * closing_mm / spacing[1])) if closing_mm > 0 else 0
    cx = int(math.ceil(2 * closing_mm / spacing[2])) if closing_mm > 0 else 0
    ys = slice(max(yc.start - 1 - cy, 0), min(yc.stop + 1 + cy, h))
    xs = slice(max(xc.start - 1 - cx, 0), min(xc.stop + 1 + cx, w))
    sub = lung_outline(lungs((zc, ys, xs)), spacing, closing_mm)
    if ys.start > 0:
        sub[:, 0, :] = True
    if ys.stop < h:
        sub[:, -1, :] = True
    if xs.start > 0:
        sub[:, :, 0] = True
    if xs.stop < w:
        sub[:, :, -1] = True
    band = peripheral_band(sub, spacing, thickness_mm) & lung[zc, ys, xs]
    y0, x0 = yc.start - ys.start, xc.start - xs.start
    return band[:, y0 : y0 + (yc.stop - yc.start), x0 : x0 + (xc.stop - xc.start)]


def _group_sorted(
    values: np.ndarray, groups: np.ndarray, counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Values sorted by (group, value), and the start of each group 1..n (index 0-based)."""
    order = np.lexsort((values, groups))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return values[order], starts


def _side_counts(
    lung_sides: np.ndarray | None,
    crop: tuple[slice, slice, slice],
    les: np.ndarray,
    lab: np.ndarray,
    n: int,
) -> np.ndarray | None:
    if lung_sides is None:
        return None
    side = np.asarray(lung_sides[crop][les])
    return np.stack(
        [np.bincount(lab, weights=side == s, minlength=n + 1)[1:] for s in LungSide], axis=1
    )


def _side_name(sides: np.ndarray | None, i: int) -> str | None:
    if sides is None or sides[i].sum() == 0:
        return None
    return list(LungSide)[int(np.argmax(sides[i]))].name.lower()


def _jsonable(value: Any) -> Any:
    """Tuples to lists, numpy scalars to Python numbers (json.dumps-safe)."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
