"""Classical lung segmentation of a chest CT in HU (no learned weights, a few seconds on CPU).

The paper masks its input with the `lungmask` U-net; we need no weights for this step, so it
is classical and replaceable (`segment_lungs` is the one entry point the rest of `ai/` uses).
Steps, on a working grid of about `working_spacing_mm` voxels for speed:

1. Air is HU < `air_hu`. Per axial slice, air connected to the image border is outside the
   body; the rest is enclosed (lungs, airways, bowel gas). Voxels below `outside_fov_hu`
   lie outside the reconstruction's (round) field of view: they are not air, and air
   touching them touches the image border, so a lung that reaches the circle is a lung cut
   by the image edge (step 3), not part of the air around the patient. Known limit: a
   scanner that stores plain air (-1024) outside the circle and declares no Pixel Padding
   Value makes the circle look like that air; a lung reaching it is then lost or refused.
2. Trachea and main bronchi: small enclosed air regions near the left-right middle of the
   body at either end of the scan, tracked slice by slice inwards while they stay small; a
   bronchus stops where it opens into a lung. Orientation-agnostic (no head/feet guess),
   but a chest holds one trachea: where both ends offer one, the end whose candidate
   keeps the steadier cross-section is the head (a lung tip near the middle at the feet
   end, in front of the heart, also narrows towards the scan's end), when clearly steadier;
   when the two are close, both are tracked. Known limit: an air-filled oesophagus at the
   feet end, clearly steadier than the trachea, would be taken for it, and the trachea
   would then join the lungs.
3. Lung parts that touch the image edge (border-connected in their slice) are put back when
   they overlap enclosed lung in the neighbouring slice, so a small field of view still works.
4. Gas pockets: enclosed pure air (median below `min_lung_median_hu`) wide enough to hold a
   disc of `gas_pocket_min_radius_mm`, with lung beyond it on the feet side (away from
   the tracked trachea) under at most half of its footprint, is stomach or bowel gas: the
   gastric bubble under the left dome, which the thin diaphragm's partial volume in a
   thick slice joins to the lung base. It and the pure air joined to it above and below,
   within its footprint, are not lung, and a hole in the lung around it (the stomach
   wall) is not filled in step 6. An air cavity inside a lung has lung on both sides and
   stays. Known limits: a
   cavity at the very base of a lower lobe, above the dome, may be taken for the stomach,
   and so may emphysema below -975 HU touching a pocket's footprint.
5. 3D components: the largest, plus a second one on the other side of the body's middle. A
   largest component lying on both sides is two merged lungs and is split at its narrowest.
6. Per lung: a 3D closing and per-slice hole filling, so vessels, ground-glass and dense
   (consolidated, -70..140 HU) lesions at the pleura stay inside. Away from the mediastinum
   the closing radius is larger (`costal_closing_radius_mm`): a consolidation against the
   ribs leaves a wide bite in the aerated lung, while near the middle a large radius would
   take in the aorta, great vessels and hilum. Never between the two lungs. Known limit: a
   dense consolidation against the mediastinum looks like the mediastinum and may stay
   partly outside (a learned lung model is the upgrade path).
7. Plausibility: enough lung volume with lung-like HU (else `NoLungsFound`); not too much lung
   surface on the field-of-view edge and lungs not cut by the scan range (else
   `LungsCutOff`). Lungs clipped less than that are analysed with a `Caveat` that the
   report carries: volumes and ratios then refer to the imaged part of the lungs.
8. Full resolution: the working mask's interior is kept as is; its one-voxel boundary band is
   decided voxel by voxel by the air threshold (dense boundary voxels stay if the working
   grid had them as lung tissue).

Sides assume the usual axial orientation, columns running to the patient's left (DICOM
ImageOrientationPatient (1, 0, 0, 0, 1, 0)), as `dicomnode/volume.py` delivers: the right
lung is the one at lower column indices.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
from scipy import ndimage as ndi
from scipy import sparse
from scipy.spatial import cKDTree

from ai.errors import LungsCutOff, NoLungsFound
from ai.preprocess import check_volume

log = logging.getLogger(__name__)

_PLANE4 = np.zeros((3, 3, 3), dtype=bool)
_PLANE4[1] = ndi.generate_binary_structure(2, 1)
"""4-connectivity within an axial slice, none across slices."""
_FACE6 = ndi.generate_binary_structure(3, 1)
"""6-connectivity in 3D (face neighbours): conservative against diagonal leaks."""


class LungSide(IntEnum):
    """Label values of `LungSegmentation.sides` (0 is background)."""

    RIGHT = 1
    LEFT = 2


@dataclass(frozen=True)
class LungConfig:
    """Tuning of the classical segmentation; the defaults suit adult chest CT at 0.5-5 mm.

    air_hu: air / aerated lung threshold (paper-style classical masks use -400..-500).
    working_spacing_mm: target voxel size of the working grid (integer block averaging).
    closing_radius_mm: 3D closing radius per lung near the mediastinum.
    costal_closing_radius_mm: 3D closing radius farther than `mediastinum_half_width_mm`
        from the body's middle; keeps dense lesions against the chest wall in.
    mediastinum_half_width_mm: half width of the zone around the body's middle column
        where only the smaller closing applies.
    airway_max_area_mm2: largest cross-section still tracked as trachea / main bronchus.
    airway_min_area_mm2: smallest cross-section that can seed the trachea.
    airway_max_offset_mm: largest left-right distance of a trachea seed from the body middle.
    airway_seed_depth_mm: how far from either end of the scan trachea seeds are looked for.
    min_lung_volume_ml: less lung than this (both lungs) is `NoLungsFound`.
    min_lung_median_hu: a candidate whose median HU is below this is pure air (bowel gas,
        an air pocket, a pneumothorax), not aerated lung.
    gas_pocket_min_radius_mm: enclosed pure air (median HU below `min_lung_median_hu`)
        whose widest cross-section holds a disc of about this radius, mostly without lung
        on its feet side, is stomach or bowel gas, not lung, even where a thick slice's
        partial volume joins it to a lung base; narrower pockets are left to the lung choice.
    second_lung_min_fraction: the second lung must have at least this fraction of the first.
    merged_min_fraction: a component with at least this fraction of its voxels on each side
        of the body middle is two merged lungs.
    outside_fov_hu: voxels below this are outside the field of view (scanners store -2048
        or -3024 there; `dicomnode.volume` writes a declared Pixel Padding Value as -3024;
        air is about -1000).
    max_cut_fraction: the largest fraction of the lung surface that may lie on the edge of
        the field of view (image border, first/last slice, or outside air) before
        `LungsCutOff`: lung volumes and ratios would be wrong beyond that.
    max_end_slice_fraction: the largest lung cross-section on the first or last slice, as a
        fraction of the largest on any slice, before `LungsCutOff`: the scan range must
        cover the lungs from the apices to (nearly) the bases.
    caveat_cut_fraction, caveat_end_slice_fraction: above these (and up to the limits
        above) the lungs are analysed with a `Caveat` that part of them may be missing. A
        scan from apex to base has no lung on the image edge and little on its end slices
        (the phantoms: 0.4-0.6 % of the surface, 7-12 % of the largest cross-section, in
        the costophrenic recesses).
    caveat_side_ratio: one lung found alone, or one below this fraction of the other's
        volume, gives a `Caveat`: the lung mask leaves out what is not aerated (collapse,
        consolidation, fluid) and what is as dark as air (a giant bulla), so the measures
        may cover only part of the lungs (left/right 0.8-0.9 in adults; the phantoms
        0.83-0.97).
    caveat_pleural_air_ml, pleural_band_mm, pleural_air_hu: one connected layer of pure air
        (below `pleural_air_hu`: air, not even the darkest emphysema, on the 2 mm grid)
        this large, within `pleural_band_mm` of the lung mask's surface, gives a `Caveat`:
        a pneumothorax or a large bulla, counted as lung (the phantoms: none;
        pneumothoraces made on them, a 5 mm rim or a 25 mm anterior pocket: about 250 mL;
        their lungs darkened by 105 HU to a median of -960, as severe emphysema: none).
    caveat_dependent_mm, bone_hu: when the median distance from a lung's posterior edge
        (its last voxel down each image column: rows run front to back, the scan supine
        as `dicomnode.volume` turns it) to the nearest bone (above `bone_hu`: the ribs,
        the spine) exceeds this, dense tissue lies between that lung and its posterior
        chest wall: a dependent consolidation or an effusion, left out of the mask, gives
        a `Caveat` (the phantoms: 4.6-6.6 mm; the posterior quarter of both lungs
        consolidated: 22 mm, a sixth: 14 mm; effusions of a third: 14-30 mm). Where the
        lung's lateral edge, which lies against the ribs in any chest, seems as far from
        bone, the ribs are not seen (blurred below `bone_hu` on the 2 mm grid, as
        osteoporotic ribs may be) and nothing is judged.
    """

    air_hu: float = -400.0
    outside_fov_hu: float = -1500.0
    working_spacing_mm: float = 2.0
    closing_radius_mm: float = 10.0
    costal_closing_radius_mm: float = 20.0
    mediastinum_half_width_mm: float = 40.0
    airway_max_area_mm2: float = 700.0
    airway_min_area_mm2: float = 30.0
    airway_max_offset_mm: float = 25.0
    airway_seed_depth_mm: float = 10.0
    min_lung_volume_ml: float = 150.0
    min_lung_median_hu: float = -975.0
    gas_pocket_min_radius_mm: float = 8.0
    second_lung_min_fraction: float = 0.05
    merged_min_fraction: float = 0.2
    max_cut_fraction: float = 0.15
    max_end_slice_fraction: float = 0.5
    caveat_cut_fraction: float = 0.03
    caveat_end_slice_fraction: float = 0.25
    caveat_side_ratio: float = 0.5
    caveat_pleural_air_ml: float = 100.0
    pleural_band_mm: float = 10.0
    caveat_dependent_mm: float = 15.0
    bone_hu: float = 200.0
    pleural_air_hu: float = -990.0

    def __post_init__(self) -> None:
        positive = (
            "working_spacing_mm",
            "airway_max_area_mm2",
            "airway_max_offset_mm",
            "min_lung_volume_ml",
            "gas_pocket_min_radius_mm",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} {getattr(self, name)} must be > 0")
        non_negative = (
            "closing_radius_mm",
            "costal_closing_radius_mm",
            "mediastinum_half_width_mm",
            "airway_min_area_mm2",
            "airway_seed_depth_mm",
        )
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} {getattr(self, name)} must be >= 0")
        fractions = (
            "second_lung_min_fraction",
            "merged_min_fraction",
            "max_cut_fraction",
            "max_end_slice_fraction",
            "caveat_cut_fraction",
            "caveat_end_slice_fraction",
        )
        for name in fractions:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} {getattr(self, name)} must be in [0, 1]")
        if not self.outside_fov_hu < self.air_hu:
            raise ValueError(f"outside_fov_hu {self.outside_fov_hu} must be below air_hu"
                             f" {self.air_hu}")
        for kind in ("cut_fraction", "end_slice_fraction"):
            if getattr(self, f"caveat_{kind}") > getattr(self, f"max_{kind}"):
                raise ValueError(f"caveat_{kind} {getattr(self, f'caveat_{kind}')} must not"
                                 f" exceed max_{kind} {getattr(self, f'max_{kind}')}")


@dataclass(frozen=True)
class Caveat:
    """A limit of a result that its reader must know (the analysis still ran)."""

    short: str
    """A few words, for a key image's text panel."""
    detail: str
    """What was measured and what it means, for the report."""


@dataclass(frozen=True)
class LungSegmentation:
    """Lungs of one volume, with what the checks measured."""

    sides: np.ndarray
    """uint8 (z, y, x): 0 background, `LungSide.RIGHT` or `LungSide.LEFT`."""
    cut_fraction: float
    """Fraction of the lung surface on the field-of-view edge (0 for fully imaged lungs)."""
    end_slice_fraction: float
    """Lung cross-section on the first or last slice (the larger) over the largest."""
    merged: bool
    """The lungs touched (one air component) and were split."""
    caveats: tuple[Caveat, ...] = ()
    """What the measures may miss or include wrongly: lungs clipped by the field of view or
    the scan range (within the limits), one lung missing or far smaller, pure air along
    the lung surface, dense tissue behind a lung, sides split at the body's middle."""

    @property
    def mask(self) -> np.ndarray:
        """Both lungs as one boolean mask."""
        return self.sides > 0


def segment_lungs(
    volume_hu: np.ndarray, spacing_mm: Sequence[float], config: LungConfig | None = None
) -> np.ndarray:
    """Boolean lung mask (z, y, x) of a chest CT in HU; raises `ai.errors.InputVolumeError`s."""
    return label_lungs(volume_hu, spacing_mm, config).mask


def label_lungs(
    volume_hu: np.ndarray, spacing_mm: Sequence[float], config: LungConfig | None = None
) -> LungSegmentation:
    """Right / left lung labels of a chest CT in HU (see the module docstring for the steps).

    Raises `InvalidVolume` subclasses for malformed input, `NoLungsFound` when nothing
    lung-like is enclosed by the body, `LungsCutOff` when the field of view clips the lungs.
    """
    cfg = config or LungConfig()
    volume_hu = np.asarray(volume_hu)
    spacing = check_volume(volume_hu, spacing_mm)
    start = time.perf_counter()
    grid = _Grid.for_volume(volume_hu.shape, spacing, cfg.working_spacing_mm)
    hu = grid.downsample(volume_hu)
    outside_fov = hu < cfg.outside_fov_hu
    air = (hu < cfg.air_hu) & ~outside_fov
    comps = _AirComponents.of(air, grid, outside_fov)
    airway_ids = _track_airways(comps, grid, cfg)
    airway = comps.labels_mask(airway_ids)
    lung_ids = _rescue_cut_parts(comps, comps.enclosed & ~airway_ids)
    candidates = comps.labels_mask(lung_ids) & ~_airway_footprint(airway)
    gas = _gas_pockets(comps, airway_ids, candidates, hu, grid, cfg)
    candidates &= ~gas
    try:
        sides, merged, cut_at_middle = _select_lungs(hu, candidates, comps.body_mid_x, grid,
                                                     cfg)
    except NoLungsFound as exc:
        _raise_if_lungs_cut_everywhere(hu, comps, grid, cfg)
        dark_ml = np.count_nonzero(comps.labels_mask(lung_ids)) * grid.voxel_ml
        if dark_ml >= cfg.min_lung_volume_ml:  # enclosed air enough, none of lung density
            raise NoLungsFound(
                f"{exc} The body encloses {dark_ml:.0f} mL of air, all of it darker than"
                f" aerated lung (median below {cfg.min_lung_median_hu:.0f} HU): pure air (bowel"
                " gas, a pneumothorax, an air phantom), or lungs of very severe emphysema,"
                " which this segmentation cannot tell from air."
            ) from None
        raise
    sides = _close_and_fill(sides, airway, gas, comps.body_mid_x, grid, cfg)
    sides[outside_fov] = 0
    outside = comps.labels_mask(comps.border & ~lung_ids) | outside_fov
    cut, end, caveats = _check_field_of_view(sides > 0, outside, grid.spacing, cfg)
    caveats += _side_caveats(sides, grid.voxel_ml, cfg)
    if cut_at_middle:
        caveats += (Caveat(
            "Lung sides uncertain: split at the body's middle",
            "One air region holds lung on both sides of the body's middle, and no narrowing"
            " separates two lungs in it (one lung crossing the middle, as after a"
            " pneumonectomy?); it was split at the middle, so the side given for each lesion"
            " may be wrong. Volumes and ratios of both lungs together are not affected.",
        ),)
    caveats += _pleural_air_caveats(hu, sides > 0, grid, cfg)
    caveats += _dependent_caveats(hu, sides, grid, cfg)
    full = _to_full_resolution(volume_hu, sides, air, airway | gas, grid, cfg.air_hu,
                               cfg.outside_fov_hu)
    log.debug(
        "lungs: %.2f s, working grid %s (factors %s), merged=%s, cut %.3f, end slice %.3f",
        time.perf_counter() - start,
        grid.shape,
        grid.factors,
        merged,
        cut,
        end,
    )
    return LungSegmentation(sides=full, cut_fraction=cut, end_slice_fraction=end,
                            merged=merged, caveats=caveats)


# --------------------------------------------------------------------------- working grid


@dataclass(frozen=True)
class _Grid:
    """The working grid: the volume block-averaged by integer factors per axis."""

    full_shape: tuple[int, int, int]
    factors: tuple[int, int, int]
    full_spacing: tuple[float, float, float]

    @classmethod
    def for_volume(cls, shape: Sequence[int], spacing: Sequence[float], target_mm: float) -> _Grid:
        # At least 16 working voxels per axis, so small volumes keep their detail.
        factors = tuple(
            max(1, min(int(target_mm / s + 0.5), n // 16))
            for n, s in zip(shape, spacing, strict=True)
        )
        return cls(tuple(int(n) for n in shape), factors, tuple(spacing))  # type: ignore[arg-type]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(n // f for n, f in zip(self.full_shape, self.factors, strict=True))  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(s * f for s, f in zip(self.full_spacing, self.factors, strict=True))  # type: ignore[return-value]

    @property
    def voxel_ml(self) -> float:
        return math.prod(self.spacing) / 1000.0

    def downsample(self, volume: np.ndarray) -> np.ndarray:
        """Block means in float32 (averaging lowers noise before thresholding); the last
        partial block of each axis is dropped and restored by `upsample_index`."""
        if self.factors == (1, 1, 1):
            return volume.astype(np.float32, copy=False)
        fz, fy, fx = self.factors
        s, h, w = self.shape
        out = np.zeros(self.shape, dtype=np.float32)
        for a in range(fz):
            for b in range(fy):
                for c in range(fx):
                    out += volume[a : s * fz : fz, b : h * fy : fy, c : w * fx : fx]
        out /= fz * fy * fx
        return out

    def upsample_index(self, axis: int, start: int, stop: int) -> np.ndarray:
        """Working indices of full-resolution indices start..stop-1 along `axis`."""
        idx = np.arange(start, stop) // self.factors[axis]
        return np.minimum(idx, self.shape[axis] - 1)

    def full_slice(self, axis: int, sl: slice) -> slice:
        """The full-resolution range covered by working range `sl` (edges extended to the
        volume edge where the working grid dropped a partial block)."""
        f, n = self.factors[axis], self.shape[axis]
        stop = self.full_shape[axis] if sl.stop >= n else sl.stop * f
        return slice(sl.start * f, stop)


# --------------------------------------------------------------------------- air components


@dataclass(frozen=True)
class _AirComponents:
    """Per-slice (2D) connected components of the air mask, with a table per component.

    Arrays indexed by component label (0 = not air) hold its area, slice, mean row and
    column, and whether it touches the image border; `edges` are the overlaps between components of
    consecutive slices (a in slice z, b in slice z + 1, pixel count).
    """

    labels: np.ndarray
    area: np.ndarray
    z: np.ndarray
    mean_y: np.ndarray
    mean_x: np.ndarray
    border: np.ndarray
    edge_a: np.ndarray
    edge_b: np.ndarray
    edge_n: np.ndarray
    body_mid_x: np.ndarray
    """Per slice, the middle column of the body (tissue and enclosed air); NaN if none."""

    @property
    def enclosed(self) -> np.ndarray:
        out = ~self.border
        out[0] = False
        return out

    @classmethod
    def of(cls, air: np.ndarray, grid: _Grid, outside_fov: np.ndarray) -> _AirComponents:
        """`outside_fov`: voxels outside the field of view, which count as image border."""
        labels, n = ndi.label(air, structure=_PLANE4)
        s, h, w = labels.shape
        flat = labels.ravel()
        area = np.bincount(flat, minlength=n + 1)
        # Labels are numbered in raster order and never span slices, so each slice holds a
        # contiguous run of labels: slice of label k = first slice whose max label >= k.
        last = np.maximum.accumulate(labels.reshape(s, -1).max(axis=1))
        z = np.searchsorted(last, np.arange(n + 1))
        rows = np.tile(np.repeat(np.arange(h, dtype=np.float64), w), s)
        cols = np.tile(np.arange(w, dtype=np.float64), s * h)
        mean_y = np.bincount(flat, weights=rows, minlength=n + 1) / np.maximum(area, 1)
        mean_x = np.bincount(flat, weights=cols, minlength=n + 1) / np.maximum(area, 1)
        border = np.zeros(n + 1, dtype=bool)
        for face in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
            border[face] = True
        if outside_fov.any():
            border[labels[ndi.binary_dilation(outside_fov, structure=_PLANE4)]] = True
        border[0] = False
        # Overlaps between consecutive slices: a sparse (label, label) count matrix, whose
        # construction sums duplicates in linear time.
        both = air[:-1] & air[1:]
        overlaps = (
            sparse.coo_matrix(
                (
                    np.ones(np.count_nonzero(both), dtype=np.int64),
                    (labels[:-1][both], labels[1:][both]),
                ),
                shape=(n + 1, n + 1),
            )
            .tocsr()
            .tocoo()
        )
        return cls(
            labels=labels,
            area=area,
            z=z,
            mean_y=mean_y,
            mean_x=mean_x,
            border=border,
            edge_a=overlaps.row.astype(np.int64),
            edge_b=overlaps.col.astype(np.int64),
            edge_n=overlaps.data,
            body_mid_x=_body_middle(~(air & border[labels]) & ~outside_fov),
        )

    def labels_mask(self, selected: np.ndarray) -> np.ndarray:
        """Voxels of the selected components (a bool array indexed by label)."""
        return selected[self.labels]

    def propagate(
        self, frontier: np.ndarray, allowed: np.ndarray, forward: bool, steps: int | None = None
    ) -> list[np.ndarray]:
        """Components reachable from `frontier` slice by slice in one direction through
        `allowed` components: one bool-per-label array per slice, the frontier's first, for
        at most `steps` slices after it."""
        src, dst = (self.edge_a, self.edge_b) if forward else (self.edge_b, self.edge_a)
        layers = [frontier]
        while steps is None or len(layers) <= steps:
            nxt = np.zeros_like(frontier)
            nxt[dst[layers[-1][src] & allowed[dst]]] = True
            if not nxt.any():
                break
            layers.append(nxt)
        return layers


BODY_COLUMN_SHARE = 0.25
"""A column belongs to the body's left-right extent when it holds at least this share of
the fullest column's body pixels: the CT table (a thin plate, often wider than the
patient) does not, so a patient lying off the table's centre keeps their own middle."""


def _body_middle(body: np.ndarray) -> np.ndarray:
    """Middle column of the body's left-right extent per slice (NaN on empty slices)."""
    counts = np.count_nonzero(body, axis=1)  # (S, W): body pixels per column
    cols = counts > BODY_COLUMN_SHARE * counts.max(axis=1, keepdims=True)
    has = cols.any(axis=1)
    first = np.argmax(cols, axis=1)
    last = cols.shape[1] - 1 - np.argmax(cols[:, ::-1], axis=1)
    return np.where(has, (first + last) / 2.0, np.nan)


# --------------------------------------------------------------------------- airways


def _track_airways(comps: _AirComponents, grid: _Grid, cfg: LungConfig) -> np.ndarray:
    """Components of the trachea and main bronchi (bool per label).

    Seeds: enclosed components within `airway_seed_depth_mm` of either end of the scan, of
    trachea size, near the body middle, that continue as a tube (`_tube_spread`): this
    tells the trachea from a lung tip at the other end. Only one end holds the trachea: with
    tubes at both, the end of the clearly steadiest one (`_TRACHEA_STEADIER`; a lung tip near
    the middle, the anterior left lung at the base, widens inwards as a tube does not),
    else both ends. From there, components overlapping the airway in the next slice
    inwards join while they stay small; a bronchus that opens into a lung becomes large
    there and stops.
    """
    dz, dy, dx = grid.spacing
    s = grid.shape[0]
    area_mm2 = comps.area * (dy * dx)
    small = comps.enclosed & (area_mm2 <= cfg.airway_max_area_mm2)
    mid = comps.body_mid_x[np.minimum(comps.z, s - 1)]
    with np.errstate(invalid="ignore"):
        central = np.abs(comps.mean_x - mid) * dx <= cfg.airway_max_offset_mm
    seedable = small & central & (area_mm2 >= cfg.airway_min_area_mm2)
    depth = max(1, int(cfg.airway_seed_depth_mm / dz) + 1)
    tube_steps = max(2, math.ceil(_TUBE_LENGTH_MM / dz))
    tubes: dict[bool, list[tuple[float, np.ndarray]]] = {True: [], False: []}
    for forward, at_end in ((True, comps.z < depth), (False, comps.z >= s - depth)):
        for seed in np.flatnonzero(seedable & at_end):
            frontier = np.zeros_like(small)
            frontier[seed] = True
            spread = _tube_spread(comps, comps.propagate(frontier, small, forward, tube_steps),
                                  grid)
            if spread is not None:
                tubes[forward].append((spread, frontier))
    airway = np.zeros_like(small)
    steadiest = {forward: min(spread for spread, _ in tubes[forward])
                 for forward in (True, False) if tubes[forward]}
    ends = sorted(steadiest, key=steadiest.__getitem__)
    if len(ends) == 2 and steadiest[ends[1]] >= _TRACHEA_STEADIER * steadiest[ends[0]]:
        log.debug("tube seeds at both ends of the scan: the trachea taken at the %s one",
                  "first" if ends[0] else "last")
        ends = ends[:1]  # else too close to call: both tracked, as airway is never lung
    for forward in ends:
        for _, frontier in tubes[forward]:
            for layer in comps.propagate(frontier, small, forward):
                airway |= layer
    ml = comps.area[airway].sum() * grid.voxel_ml
    log.debug("airway: %d slice components, %.1f mL", airway.sum(), ml)
    return airway


_TRACHEA_STEADIER = 1.5
"""With tube seeds at both ends, the trachea's end is the one whose steadiest tube varies
at most 1/1.5 as much as the other end's (on the phantoms: the trachea 1.7-1.9, the lung
tips it was told from 3.3-3.9); closer than that, both ends are tracked."""
_TUBE_LENGTH_MM = 30.0
"""A trachea seed must continue this far as a tube of steady cross-section."""
_TUBE_MAX_SHIFT_MM = 15.0
"""How far the tube's centre may drift over `_TUBE_LENGTH_MM` (the trachea is oblique)."""


def _tube_spread(comps: _AirComponents, layers: list[np.ndarray], grid: _Grid) -> float | None:
    """How steady the slices reached from a seed are, as the largest over the smallest
    cross-section, when they form a tube; None when they do not. A tube is present on
    every slice over `_TUBE_LENGTH_MM`, its area within a quarter to four times the
    seed's, its centre within `_TUBE_MAX_SHIFT_MM`. A lung tip (the anterior lung at the
    last slice) grows or moves."""
    steps = max(2, math.ceil(_TUBE_LENGTH_MM / grid.spacing[0]))
    if len(layers) <= steps:
        return None
    _, dy, dx = grid.spacing
    ids0 = np.flatnonzero(layers[0])
    area0 = comps.area[ids0].sum()
    y0 = (comps.mean_y[ids0] * comps.area[ids0]).sum() / area0
    x0 = (comps.mean_x[ids0] * comps.area[ids0]).sum() / area0
    areas = [float(area0)]
    for layer in layers[1:]:
        ids = np.flatnonzero(layer)
        area = comps.area[ids].sum()
        if not 0.25 * area0 <= area <= 4.0 * area0:
            return None
        y = (comps.mean_y[ids] * comps.area[ids]).sum() / area
        x = (comps.mean_x[ids] * comps.area[ids]).sum() / area
        if math.hypot((y - y0) * dy, (x - x0) * dx) > _TUBE_MAX_SHIFT_MM:
            return None
        areas.append(float(area))
    return max(areas) / min(areas)


def _airway_footprint(airway: np.ndarray) -> np.ndarray:
    """The airway's cross-sections one slice up and down, grown by a voxel in-plane.

    Where a bronchus opens into a lung, or the carina and both bronchi lie in one thick
    slice with lung, the slice's air component is large and tracking stops; cutting the
    tracked airway's footprint out of it breaks that bridge between the lungs."""
    shifted = np.zeros_like(airway)
    shifted[1:] |= airway[:-1]
    shifted[:-1] |= airway[1:]
    return ndi.binary_dilation(shifted, structure=_PLANE4) | airway


# --------------------------------------------------------------------------- gas pockets


def _gas_pockets(
    comps: _AirComponents,
    airway_ids: np.ndarray,
    lung_air: np.ndarray,
    hu: np.ndarray,
    grid: _Grid,
    cfg: LungConfig,
) -> np.ndarray:
    """Voxels of stomach or bowel gas under a lung base (bool mask).

    A pocket is a group, joined across slices, of enclosed slice components of pure air
    (median HU below `min_lung_median_hu`: no lung tissue in them) other than the tracked
    airways, whose widest cross-section holds a disc of `gas_pocket_min_radius_mm`, and
    with lung beyond it on the feet side (the side away from the trachea; with no trachea
    in the scan, lung on both sides) under at most half of its footprint: an air cavity,
    cyst or bulla inside a lung has lung above and below. The gastric bubble under the left
    dome is the usual pocket: across a thick slice the thin diaphragm averages to air, so
    without this it joins the lung base, and its wall comes in with the lung's hole
    filling. Each pocket goes on through pure-air voxels above and below its footprint,
    where it narrows towards the dome and partial volume joins it to the lung in-plane.
    """
    below = (hu < cfg.min_lung_median_hu).ravel()
    pure_voxels = np.bincount(comps.labels.ravel()[below], minlength=comps.area.size)
    pure = comps.enclosed & ~airway_ids & (2 * pure_voxels > comps.area)  # median below
    _, dy, dx = grid.spacing
    wide = pure & (comps.area * dy * dx >= math.pi * cfg.gas_pocket_min_radius_mm**2)
    gas = np.zeros(hu.shape, dtype=bool)
    if not wide.any():
        return gas
    feet_last = _feet_at_end(comps.labels_mask(airway_ids))
    pure_voxels_mask = comps.labels_mask(pure)
    lung_air = lung_air & ~pure_voxels_mask  # other gas (the colon under the stomach) is not lung
    groups, _ = ndi.label(pure_voxels_mask, structure=_FACE6)
    objects = ndi.find_objects(groups)
    pure_air = hu < cfg.min_lung_median_hu
    for g in np.unique(groups[comps.labels_mask(wide)]):
        box = objects[g - 1]
        assert box is not None
        member = groups[box] == g
        # Padded: the box's edge is the pocket's edge, not more of it.
        widest = max(float(ndi.distance_transform_edt(np.pad(plane, 1), sampling=(dy, dx)).max())
                     for plane in member if plane.any())
        footprint = member.any(axis=0)
        columns = (slice(None), box[1], box[2])
        lung = lung_air[columns][:, footprint]
        head_side, feet_side = lung[: box[0].start].any(axis=0), lung[box[0].stop :].any(axis=0)
        if feet_last is None:
            inside = head_side & feet_side
        else:
            inside = feet_side if feet_last else head_side
        if widest < cfg.gas_pocket_min_radius_mm or 2 * inside.sum() > footprint.sum():
            continue
        seeds = np.zeros(lung_air[columns].shape, dtype=bool)
        seeds[box[0]] = member
        allowed = pure_air[columns] & footprint
        gas[columns] |= ndi.binary_propagation(seeds, structure=_FACE6, mask=allowed | seeds)
    if gas.any():
        log.debug("gas pockets: %.1f mL", np.count_nonzero(gas) * grid.voxel_ml)
    return gas


def _feet_at_end(airway: np.ndarray) -> bool | None:
    """Whether the feet end is the last slice (the trachea lies at the head end); None
    without a tracked airway."""
    zs = np.flatnonzero(airway.any(axis=(1, 2)))
    if zs.size == 0:
        return None
    return bool(zs.mean() < (airway.shape[0] - 1) / 2.0)


# --------------------------------------------------------------------------- cut lungs


def _rescue_cut_parts(comps: _AirComponents, enclosed: np.ndarray) -> np.ndarray:
    """`enclosed` plus border-touching components that are lung cut by the image edge.

    Such a component is mostly (>= half its area) covered by accepted components in the
    neighbouring slices; outside air around the body never is. Repeated so that a lung cut
    over many slices is recovered from its enclosed slices inwards.
    """
    accepted = enclosed.copy()
    candidates = comps.border.copy()
    while True:
        gain = np.bincount(
            comps.edge_b, weights=comps.edge_n * accepted[comps.edge_a], minlength=accepted.size
        ) + np.bincount(
            comps.edge_a, weights=comps.edge_n * accepted[comps.edge_b], minlength=accepted.size
        )
        new = candidates & ~accepted & (2 * gain >= comps.area)
        if not new.any():
            return accepted
        accepted |= new


# --------------------------------------------------------------------------- lung choice


def _select_lungs(
    hu: np.ndarray,
    candidates: np.ndarray,
    body_mid_x: np.ndarray,
    grid: _Grid,
    cfg: LungConfig,
) -> tuple[np.ndarray, bool, bool]:
    """Working-grid side labels (uint8) of the lungs among the candidate air, whether
    they were merged into one component, and whether that one was split at the body's
    middle for want of a narrowing between two lungs."""
    labels, n = ndi.label(candidates, structure=_FACE6)
    volume_ml = np.bincount(labels.ravel(), minlength=n + 1) * grid.voxel_ml
    volume_ml[0] = 0.0
    min_part_ml = cfg.second_lung_min_fraction * cfg.min_lung_volume_ml
    ids = [int(i) for i in np.argsort(-volume_ml, kind="stable") if volume_ml[i] >= min_part_ml]
    objects = ndi.find_objects(labels)
    lung_like = []
    for i in ids:
        median = float(ndi.median(hu, labels, index=i))
        if median >= cfg.min_lung_median_hu:
            lung_like.append(i)
        else:
            log.debug("air region of %.0f mL, median %.0f HU: not lung", volume_ml[i], median)
    if not lung_like or volume_ml[lung_like[0]] < cfg.min_lung_volume_ml:
        largest = f"{volume_ml[lung_like[0]]:.0f} mL" if lung_like else "none"
        raise NoLungsFound(
            f"no lung-like air region found (largest: {largest}; at least"
            f" {cfg.min_lung_volume_ml:.0f} mL of air below {cfg.air_hu:.0f} HU enclosed by the"
            " body is needed): is this a chest CT in HU, and of a patient older than an"
            " infant (the model is meant for adults)?"
        )
    first = lung_like[0]
    box = objects[first - 1]
    mid = _midline(body_mid_x, box[0], labels.shape[2])
    part = labels[box] == first
    cols = part.sum(axis=(0, 1))
    below_mid = cols[: max(0, min(len(cols), int(round(mid)) - box[2].start))].sum() / cols.sum()
    sides = np.zeros(labels.shape, dtype=np.uint8)
    if min(below_mid, 1.0 - below_mid) >= cfg.merged_min_fraction:
        sides[box], separated = _split_merged(part, grid.spacing, mid - box[2].start)
        return sides, True, not separated

    first_right = below_mid >= 0.5  # lower columns: the patient's right
    sides[labels == first] = LungSide.RIGHT if first_right else LungSide.LEFT
    second = _second_lung(labels, objects, lung_like, volume_ml, first, first_right, mid, cfg)
    if second is not None:  # else one lung only: `_side_caveats` says so
        sides[labels == second] = LungSide.LEFT if first_right else LungSide.RIGHT
    return sides, False, False


def _midline(body_mid_x: np.ndarray, zs: slice, width: int) -> float:
    """The body's middle column over slices `zs` (the image middle if no body)."""
    values = body_mid_x[zs]
    values = values[np.isfinite(values)]
    return float(np.median(values)) if values.size else (width - 1) / 2.0


def _second_lung(
    labels: np.ndarray,
    objects: list[tuple[slice, slice, slice] | None],
    lung_like: list[int],
    volume_ml: np.ndarray,
    first: int,
    first_right: bool,
    mid: float,
    cfg: LungConfig,
) -> int | None:
    """The largest lung-like component on the other side that overlaps the first in z."""
    box1 = objects[first - 1]
    assert box1 is not None
    for i in lung_like[1:]:
        if volume_ml[i] < cfg.second_lung_min_fraction * volume_ml[first]:
            return None
        box = objects[i - 1]
        assert box is not None
        cols = (labels[box] == i).sum(axis=(0, 1))
        centre_x = box[2].start + float((cols * np.arange(cols.size)).sum() / cols.sum())
        if (centre_x > mid) != first_right:
            continue
        overlap = min(box[0].stop, box1[0].stop) - max(box[0].start, box1[0].start)
        shorter = min(box[0].stop - box[0].start, box1[0].stop - box1[0].start)
        if overlap >= 0.3 * shorter:
            return i
    return None


def _split_merged(
    part: np.ndarray, spacing: Sequence[float], mid: float
) -> tuple[np.ndarray, bool]:
    """Side labels for one component holding both lungs (cropped to its box), and whether
    an erosion separated them.

    The component is eroded (distance threshold) until it falls apart into two cores on
    both sides of the middle; every voxel then goes to the nearer core. If no erosion
    separates them, the body's middle column splits it.
    """
    dist = ndi.distance_transform_edt(part, sampling=spacing)
    step = min(spacing)
    cores = None
    for threshold in np.arange(step, float(dist.max()), step):
        labels, n = ndi.label(dist > threshold, structure=_FACE6)
        if n < 2:
            if n == 0:
                break
            continue
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        a, b = np.argsort(-sizes, kind="stable")[:2]
        if sizes[b] < 0.2 * sizes[a]:
            continue
        xa, xb = (float(np.nonzero(labels == k)[2].mean()) for k in (a, b))
        if (xa - mid) * (xb - mid) < 0:
            right, left = (a, b) if xa < xb else (b, a)
            cores = np.where(labels == right, LungSide.RIGHT, 0).astype(np.uint8)
            cores[labels == left] = LungSide.LEFT
            break
    out = np.zeros(part.shape, dtype=np.uint8)
    if cores is None:
        log.debug("merged lungs: no erosion separates them, split at the body middle")
        cols = np.broadcast_to(np.arange(part.shape[2]), part.shape)
        out[part] = np.where(cols[part] < mid, LungSide.RIGHT, LungSide.LEFT)
        return out, False
    _, index = ndi.distance_transform_edt(cores == 0, sampling=spacing, return_indices=True)
    nearest = cores[tuple(index)]
    out[part] = nearest[part]
    return out, True


# --------------------------------------------------------------------------- closing


def _close_and_fill(
    sides: np.ndarray,
    airway: np.ndarray,
    gas: np.ndarray,
    body_mid_x: np.ndarray,
    grid: _Grid,
    cfg: LungConfig,
) -> np.ndarray:
    """Per lung: 3D closings (see the module docstring, step 6) and per-slice hole filling,
    without the airways; a voxel both lungs claim stays with the lung that had it before.
    A hole in a lung around a gas pocket (`_gas_pockets`) is the stomach or bowel under a
    dome seen through the lung base: neither the closing nor the filling takes it. (Around
    a tracked bronchus the same would keep its wall out, as the truth of the phantoms does;
    the shipped weights, trained with the wall in, then mark the lung next to it.)"""
    out = np.zeros_like(sides)
    between = _between_lungs(sides)
    mid = np.where(np.isfinite(body_mid_x), body_mid_x, (sides.shape[2] - 1) / 2.0)
    cols = np.arange(sides.shape[2])
    costal = np.abs(cols[None, :] - mid[:, None]) * grid.spacing[2] >= cfg.mediastinum_half_width_mm
    radii = (cfg.closing_radius_mm, cfg.costal_closing_radius_mm)
    for side in LungSide:
        mask = sides == side
        box = bounding_box(mask)
        if box is None:
            continue
        box, (near, far) = _closings(mask, box, grid.spacing, radii)
        added = (near | far & costal[box[0], None, box[2]]) & ~between[box]
        if gas[box].any():  # the closing keeps out of the holes around it too
            added &= ~_holes_2d(mask[box], gas[box])[1]
        holes, _ = _holes_2d(added | mask[box], gas[box])
        closed = added | mask[box] | holes
        region = out[box]
        claim = closed & ~airway[box] & ~gas[box] & ((region == 0) | (sides[box] == side))
        region[claim] = side
    return out


def _between_lungs(sides: np.ndarray) -> np.ndarray:
    """Per image row, the columns strictly between the right lung's last voxel and the left
    lung's first (the mediastinum): closing must not fill the hilum or the heart's bed."""
    cols = np.arange(sides.shape[2])
    right, left = sides == LungSide.RIGHT, sides == LungSide.LEFT
    has_both = right.any(axis=2) & left.any(axis=2)
    right_end = sides.shape[2] - 1 - np.argmax(right[:, :, ::-1], axis=2)
    left_start = np.argmax(left, axis=2)
    return has_both[..., None] & (cols > right_end[..., None]) & (cols < left_start[..., None])


def _closings(
    mask: np.ndarray, box: tuple[slice, ...], spacing: Sequence[float], radii: Sequence[float]
) -> tuple[tuple[slice, ...], list[np.ndarray]]:
    """Closings by balls of the given radii (distance transforms, so any anisotropy) on the
    box grown by the largest radius; returns the grown box and the closed masks there."""
    pad = [int(math.ceil(max(radii) / s)) + 1 for s in spacing]
    grown = tuple(
        slice(max(sl.start - p, 0), min(sl.stop + p, n))
        for sl, p, n in zip(box, pad, mask.shape, strict=True)
    )
    # Pad beyond the volume too, so that the erosion sees the same empty space as the dilation.
    m = np.pad(mask[grown], [(p, p) for p in pad])
    inner = tuple(slice(p, -p) for p in pad)
    outside = ndi.distance_transform_edt(~m, sampling=spacing)
    closed = []
    for radius in radii:
        if radius <= 0:
            closed.append(mask[grown].copy())
            continue
        dilated = outside <= radius
        eroded = ndi.distance_transform_edt(dilated, sampling=spacing) > radius
        closed.append(eroded[inner] | mask[grown])
    return grown, closed


def _holes_2d(mask: np.ndarray, gas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The holes of `mask` in every axial slice (regions not reaching the slice's border):
    those without `gas`, and those that hold some."""
    labels, n = ndi.label(~mask, structure=_PLANE4)
    hole = np.ones(n + 1, dtype=bool)
    for face in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        hole[face] = False
    hole[0] = False
    holds_gas = np.zeros(n + 1, dtype=bool)
    holds_gas[labels[gas]] = True
    return (hole & ~holds_gas)[labels], (hole & holds_gas)[labels]


def bounding_box(mask: np.ndarray) -> tuple[slice, slice, slice] | None:
    """Tight slices around the True voxels of a 3D mask, None if there are none (cheap:
    1D reductions)."""
    box = []
    for axis in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        if hit.size == 0:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)  # type: ignore[return-value]


# --------------------------------------------------------------------------- field of view


@dataclass(frozen=True)
class _Cut:
    """Lung surface (mm^2) on each kind of field-of-view edge, and in total."""

    columns: float
    rows: float
    slices: float
    outside_air: float
    total: float

    @property
    def fraction(self) -> float:
        cut = self.columns + self.rows + self.slices + self.outside_air
        return cut / self.total if self.total else 0.0

    def describe(self) -> str:
        parts = (
            ("first/last column", self.columns),
            ("first/last row", self.rows),
            ("first/last slice", self.slices),
            ("air outside the body or the field of view", self.outside_air),
        )
        return ", ".join(f"{name} {100 * v / self.total:.0f} %" for name, v in parts if v)


def _check_field_of_view(
    lung: np.ndarray, outside: np.ndarray, spacing: Sequence[float], cfg: LungConfig
) -> tuple[float, float, tuple[Caveat, ...]]:
    """Raise `LungsCutOff` when the field of view or the scan range clips the lungs beyond
    the limits; return the fraction of the lung surface on the field-of-view edge, the end
    slices' share of the largest cross-section, and the caveats of a smaller clip."""
    cut = _cut_fraction(lung, outside, spacing)
    if cut.fraction > cfg.max_cut_fraction:
        raise LungsCutOff(
            f"{100 * cut.fraction:.0f} % of the lung surface lies on the edge of the field of"
            f" view ({cut.describe()}; limit {100 * cfg.max_cut_fraction:.0f} %): lung volume,"
            " LVR and PLR would be wrong; send a series reconstructed with a wider field of"
            " view"
        )
    end = _end_slice_fraction(lung)
    if end > cfg.max_end_slice_fraction:
        raise LungsCutOff(
            f"the scan range cuts through the lungs: an end slice holds {100 * end:.0f} % of"
            f" the largest lung cross-section (limit {100 * cfg.max_end_slice_fraction:.0f} %);"
            " lung volume, LVR and PLR would be wrong: send a series covering the whole chest"
        )
    caveats = []
    if cut.fraction > cfg.caveat_cut_fraction:
        caveats.append(Caveat(
            "Lungs touch the image edge: measures cover the imaged part",
            f"The lungs touch the edge of the field of view ({100 * cut.fraction:.0f} % of"
            f" the lung surface: {cut.describe()}); part of them may lie outside it. Lung"
            " volume, lesion volume, LVR and PLR refer to the imaged part of the lungs.",
        ))
    if end > cfg.caveat_end_slice_fraction:
        caveats.append(Caveat(
            "Scan range may miss lung: measures cover the imaged part",
            f"The scan range may not cover the whole lungs: an end slice holds"
            f" {100 * end:.0f} % of the largest lung cross-section. Lung volume, lesion"
            " volume, LVR and PLR refer to the imaged part of the lungs.",
        ))
    return cut.fraction, end, tuple(caveats)


def _side_caveats(sides: np.ndarray, voxel_ml: float, cfg: LungConfig) -> tuple[Caveat, ...]:
    """A caveat when one lung is missing or far smaller than the other: what the mask
    left out (collapsed, consolidated, fluid-filled or air-dark lung) is out of every
    measure, and nothing else would tell the reader."""
    volumes = {side: np.count_nonzero(sides == side) * voxel_ml for side in LungSide}
    small, large = sorted(LungSide, key=lambda side: volumes[side])
    name = {LungSide.RIGHT: "right", LungSide.LEFT: "left"}
    if volumes[small] == 0:
        return (Caveat(
            f"Only the {name[large]} lung found: measures cover it alone",
            f"Only the {name[large]} lung was found ({volumes[large]:.0f} mL). The other may"
            " have been removed, or be collapsed, filled by consolidation or fluid, or as dark"
            " as air (a giant bulla, severe emphysema): the lung mask leaves such parts out."
            f" Lung volume, lesion volume, LVR and PLR refer to the {name[large]} lung.",
        ),)
    ratio = volumes[small] / volumes[large]
    if ratio >= cfg.caveat_side_ratio:
        return ()
    return (Caveat(
        f"{name[small].capitalize()} lung small: dense parts may be left out",
        f"The {name[small]} lung measures {volumes[small]:.0f} mL, {100 * ratio:.0f} % of the"
        f" {name[large]} ({volumes[large]:.0f} mL). Part of it may be collapsed, consolidated,"
        " behind fluid or as dark as air, which the lung mask leaves out: lesion volume, LVR"
        " and PLR may then be underestimated or off.",
    ),)


def _pleural_air_caveats(
    hu: np.ndarray, lung: np.ndarray, grid: _Grid, cfg: LungConfig
) -> tuple[Caveat, ...]:
    """A caveat when a large connected layer of pure air lies in the lung mask along its
    surface: a pneumothorax (or a large bulla), which the mask counts as lung."""
    dark = lung & (hu < cfg.pleural_air_hu)
    if np.count_nonzero(dark) * grid.voxel_ml < cfg.caveat_pleural_air_ml:
        return ()  # not even that much pure air in all the lungs (most scans)
    box = bounding_box(lung)
    assert box is not None
    depth = ndi.distance_transform_edt(np.pad(lung[box], 1), sampling=grid.spacing)
    layer = dark[box] & (depth[1:-1, 1:-1, 1:-1] <= cfg.pleural_band_mm)
    labels, n = ndi.label(layer, structure=_FACE6)
    if n == 0:
        return ()
    largest_ml = float(np.bincount(labels.ravel())[1:].max()) * grid.voxel_ml
    if largest_ml < cfg.caveat_pleural_air_ml:
        return ()
    return (Caveat(
        "Pure air along the chest wall counted as lung",
        f"{largest_ml:.0f} mL of air as dark as pure air lies in one layer along the lung's"
        " surface, inside the lung mask: a pneumothorax or a large bulla? It is counted as"
        " lung, so lung volume is overstated and LVR understated by as much.",
    ),)


MAX_RIB_PIXEL_MM = 3.0
"""Coarsest working-grid pixel at which the ribs stand out above `bone_hu` (a test-sized
64 x 64 CT's 5 mm pixels blur them into the chest wall; a diagnostic CT has 1 mm or less)."""


def _dependent_caveats(
    hu: np.ndarray, sides: np.ndarray, grid: _Grid, cfg: LungConfig
) -> tuple[Caveat, ...]:
    """A caveat per lung whose posterior edge lies far from the ribs: dense tissue fills
    the dependent part of its hemithorax (consolidation or fluid, as dense as the chest
    wall), which the mask leaves out, and with it out of the lesion volume."""
    box = bounding_box(sides > 0)
    if box is None or max(grid.spacing[1:]) > MAX_RIB_PIXEL_MM:
        return ()
    reach = [int(math.ceil(2 * cfg.caveat_dependent_mm / s)) for s in grid.spacing]
    box = tuple(slice(max(sl.start - r, 0), min(sl.stop + r, n))  # bones around the lungs
                for sl, r, n in zip(box, reach, hu.shape, strict=True))
    bone = np.argwhere(hu[box] > cfg.bone_hu) * np.asarray(grid.spacing)
    if bone.size == 0:
        return ()
    bones = cKDTree(bone)  # a few thousand queries: cheaper than a distance map
    scale = np.asarray(grid.spacing)

    def to_bone(points: np.ndarray) -> float:
        return float(np.median(bones.query(points * scale)[0]))

    caveats = []
    for side, name in ((LungSide.RIGHT, "right"), (LungSide.LEFT, "left")):
        lung = sides[box] == side
        columns, rows = lung.any(axis=1), lung.any(axis=2)
        if not columns.any():
            continue
        last = lung.shape[1] - 1 - np.argmax(lung[:, ::-1, :], axis=1)  # posterior edge
        zs, xs = np.nonzero(columns)
        distance = to_bone(np.stack([zs, last[zs, xs], xs], axis=1))
        # The lateral edge (low columns: the patient's right) lies against the ribs in any
        # chest; where it does not seem to, the ribs are not seen (bone too faint for
        # `bone_hu`), and the posterior distance says nothing.
        outer = (np.argmax(lung, axis=2) if side == LungSide.RIGHT
                 else lung.shape[2] - 1 - np.argmax(lung[:, :, ::-1], axis=2))
        zs, ys = np.nonzero(rows)
        ribs_seen = to_bone(np.stack([zs, ys, outer[zs, ys]], axis=1)) <= cfg.caveat_dependent_mm
        if ribs_seen and distance > cfg.caveat_dependent_mm:
            caveats.append(Caveat(
                f"Dense tissue behind the {name} lung: may be consolidation left out",
                f"Dense tissue lies between the {name} lung and its posterior chest wall (a"
                f" median {distance:.0f} mm from the lung's posterior edge to the ribs, against"
                " about 5 mm in a chest without): a dependent consolidation or a pleural"
                " effusion, which the lung mask leaves out. If it is consolidation, the lesion"
                " volume, LVR and PLR are underestimated.",
            ))
    return tuple(caveats)


def _raise_if_lungs_cut_everywhere(
    hu: np.ndarray, comps: _AirComponents, grid: _Grid, cfg: LungConfig
) -> None:
    """When nothing enclosed is lung, tell a field of view that cuts through the lungs on
    every slice (air of lung density touching the image edge) from a scan without lungs."""
    mean_hu = np.bincount(comps.labels.ravel(), weights=hu.ravel(), minlength=comps.area.size)
    mean_hu /= np.maximum(comps.area, 1)
    lung_like = comps.border & (mean_hu >= cfg.min_lung_median_hu)
    volume_ml = float(comps.area[lung_like].sum() * grid.voxel_ml)
    if volume_ml >= cfg.min_lung_volume_ml:
        raise LungsCutOff(
            f"no lungs enclosed by the body, but {volume_ml:.0f} mL of air of lung density"
            " touches the edge of the field of view: the field of view cuts through the lungs;"
            " send a series reconstructed with a wider field of view"
        )


def _end_slice_fraction(lung: np.ndarray) -> float:
    """Lung area on the first or last slice (the larger) over the largest slice area."""
    area = np.count_nonzero(lung, axis=(1, 2))
    return float(max(area[0], area[-1]) / area.max()) if area.max() else 0.0


def _cut_fraction(lung: np.ndarray, outside: np.ndarray, spacing: Sequence[float]) -> _Cut:
    """How much of the lung surface is not a real lung boundary: faces on the volume's edge,
    or against air outside the body (lung merged with it where the image clips the body)."""
    dz, dy, dx = spacing
    face_area = (dy * dx, dz * dx, dz * dy)  # faces normal to z, y, x
    on_edge = [0.0, 0.0, 0.0]
    against_outside = 0.0
    total = 0.0
    for axis in range(3):
        lo = np.take(lung, range(lung.shape[axis] - 1), axis=axis)
        hi = np.take(lung, range(1, lung.shape[axis]), axis=axis)
        out_lo = np.take(outside, range(lung.shape[axis] - 1), axis=axis)
        out_hi = np.take(outside, range(1, lung.shape[axis]), axis=axis)
        ends = np.count_nonzero(np.take(lung, 0, axis=axis)) + np.count_nonzero(
            np.take(lung, -1, axis=axis)
        )
        on_edge[axis] = ends * face_area[axis]
        against_outside += (
            np.count_nonzero(lo & out_hi) + np.count_nonzero(out_lo & hi)
        ) * face_area[axis]
        total += (np.count_nonzero(lo != hi) + ends) * face_area[axis]
    return _Cut(
        columns=on_edge[2],
        rows=on_edge[1],
        slices=on_edge[0],
        outside_air=against_outside,
        total=total,
    )


# --------------------------------------------------------------------------- full resolution

_SURE, _IF_AIR = 1, 2
"""Upsampling codes: 2 * (side - 1) + _SURE or + _IF_AIR, 0 for background."""
_DECODE = np.array([[0, 0], [1, 1], [0, 1], [2, 2], [0, 2]], dtype=np.uint8)
"""Side label of a full-resolution voxel, indexed by [code, voxel is air]."""


def _to_full_resolution(
    volume_hu: np.ndarray,
    sides: np.ndarray,
    air: np.ndarray,
    not_lung_air: np.ndarray,
    grid: _Grid,
    air_hu: float,
    outside_fov_hu: float,
) -> np.ndarray:
    """Side labels at full resolution: the working mask's interior as is, its boundary band
    (one working voxel inside and outside) by the full-resolution air threshold (air, not
    outside the field of view), except boundary voxels that were dense lung tissue on the
    working grid (lesions, vessels) and outer ones in `not_lung_air` (airways, gas
    pockets)."""
    full = np.zeros(grid.full_shape, dtype=np.uint8)
    box = bounding_box(sides > 0)
    if box is None:
        return full
    if grid.factors == (1, 1, 1):
        full[:] = sides
        return full
    # Grow by one working voxel for the outer band.
    box = tuple(
        slice(max(sl.start - 1, 0), min(sl.stop + 1, n))
        for sl, n in zip(box, sides.shape, strict=True)
    )
    structure = _FACE6 if grid.factors[0] > 1 else _PLANE4
    code = np.zeros(sides[box].shape, dtype=np.uint8)
    for side in LungSide:
        mask = sides[box] == side
        core = ndi.binary_erosion(mask, structure=structure, border_value=1)
        band_in = mask & ~core
        band_out = ndi.binary_dilation(mask, structure=structure) & ~mask & (sides[box] == 0)
        band_out &= ~not_lung_air[box]
        code[core | (band_in & ~air[box])] = 2 * (side - 1) + _SURE
        code[(band_in & air[box]) | band_out] = 2 * (side - 1) + _IF_AIR
    full_box = tuple(grid.full_slice(axis, sl) for axis, sl in enumerate(box))
    up = code
    for axis, sl in enumerate(full_box):
        idx = grid.upsample_index(axis, sl.start, sl.stop) - box[axis].start
        up = up.take(idx, axis=axis)
    up <<= 1
    hu = volume_hu[full_box]
    up |= (hu < air_hu) & (hu >= outside_fov_hu)
    full[full_box] = _DECODE.ravel().take(up)
    return full
