"""Lesion outline refinement by local density contrast (ours; not in the paper).

The network finds the lesions, but its outline is coarse: most of the lesion subnet works
on a grid of twice the voxel size (the inception stem halves every dimension, and thick
slices become 8-10 mm), and the outline it draws misses lesion voxels that are clearly
denser than the lung around them while taking in lung that is not (docs/training.md,
"Refining the outline"). Ground glass and consolidation are lung whose density is raised
above the surrounding parenchyma, which is what a radiologist outlines; so near the
network's outline each lung voxel is decided again by that contrast:

    contrast = HU - the local parenchyma level (the mean, with a Gaussian weight of
                    `background_mm`, of the lung voxels below `background_max_hu` that
                    the network left out: lung, not lesion, vessel or airway wall)

and a voxel within `band_mm` of the network's outline (outside it) or inside it is lesion
when its contrast exceeds `contrast_hu`. A single voxel's contrast is noisy, so the calls
also go to a vote of each voxel's 3 x 3 neighbourhood within the slice (`_MAJORITY` of 9):
the band adds a voxel only where the majority agrees (no lone voxel of noise above the
threshold, and a vessel one voxel wide no longer carries the outline out along itself),
and inside the network's lesions a voxel below the threshold stays lesion where the
majority is (a gap of noise); the vote never takes away what the network found and the
contrast confirms, so small lesions keep their shape. Voxels farther out keep the
network's call, and what the band adds must join a lesion that keeps some of the
network's voxels, so the refinement moves outlines and may drop a faint false lesion, but
never creates a lesion the network did not find. Vessels inside a lesion stay in it (they
are denser than the lung); a vessel wider than the vote leaving it, or denser lung beside
it, is taken in up to `band_mm`, which is what the refinement costs (docs/training.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from ai.analysis import label_components
from ai.limits import DEFAULT_OUTLINE_BAND_MM, DEFAULT_OUTLINE_CONTRAST_HU
from ai.lungs import bounding_box

_TRUNCATE = 4.0
"""Gaussian kernels reach this many sigmas (scipy's default)."""
_SLAB = 32
"""Slices decided at a time (bounds the float temporaries, as `ai.infer.SLAB`)."""
_MAJORITY = 5
"""Lesion calls among a voxel's 3 x 3 in-plane neighbourhood (itself included) that make a
majority; in the slice only, as slices are often several times thicker than the pixels
(chosen on held-out phantoms: docs/training.md, "Refining the outline")."""
_MIN_WEIGHT = 1e-3
"""Below this share of parenchyma in the background kernel the level is unknown there and
the network's call stands (a lesion filling the whole neighbourhood)."""


@dataclass(frozen=True)
class OutlineRefinement:
    """Settings of `refine_lesion_outline`, chosen on held-out phantoms (docs/training.md,
    "Refining the outline"); `band_mm` 0 turns the refinement off."""

    band_mm: float = DEFAULT_OUTLINE_BAND_MM
    contrast_hu: float = DEFAULT_OUTLINE_CONTRAST_HU
    background_mm: float = 20.0
    background_max_hu: float = -700.0

    def __post_init__(self) -> None:
        for name in ("band_mm", "background_mm"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0.0 <= value <= 100.0):
                raise ValueError(f"{name} {value} must be in [0, 100] mm")
        if self.background_mm <= 0:
            raise ValueError(f"background_mm {self.background_mm} must be > 0")
        for name in ("contrast_hu", "background_max_hu"):
            value = getattr(self, name)
            if not (math.isfinite(value) and -1000.0 <= value <= 1000.0):
                raise ValueError(f"{name} {value} must be in [-1000, 1000] HU")

    @property
    def enabled(self) -> bool:
        return self.band_mm > 0


DEFAULT_REFINEMENT = OutlineRefinement()
NO_REFINEMENT = OutlineRefinement(band_mm=0.0)


def refine_lesion_outline(
    volume_hu: np.ndarray,
    lesion: np.ndarray,
    lung: np.ndarray,
    spacing_mm: Sequence[float],
    settings: OutlineRefinement = DEFAULT_REFINEMENT,
) -> np.ndarray:
    """The lesion mask with its outline re-decided by local density contrast (module doc).

    All arrays (z, y, x) on one grid; `spacing_mm` (dz, dy, dx). Returns a new bool mask,
    inside `lung`; the input is not changed. The parenchyma level, smooth over tens of mm,
    is estimated on a coarse grid; the voxel work is confined to the lesions' bounding box
    grown by the band, so scans with small lesions cost little.
    """
    lung = np.asarray(lung, dtype=bool)
    lesion = np.asarray(lesion, dtype=bool) & lung
    box = bounding_box(lesion) if settings.enabled else None
    if box is None:
        return lesion
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    volume_hu = np.asarray(volume_hu)
    reach = [math.ceil(settings.band_mm / d) for d in spacing]
    box = tuple(slice(max(0, sl.start - r), min(n, sl.stop + r))
                for sl, r, n in zip(box, reach, lesion.shape, strict=True))
    # blocks of about a quarter of the level's sigma (`_parenchyma_level`)
    factors = [max(1, round(settings.background_mm / 4.0 / d)) for d in spacing]
    level, share = _parenchyma_level(
        volume_hu, lung & ~lesion & (volume_hu < settings.background_max_hu), spacing,
        settings.background_mm, factors)  # fmt: skip
    weights = [_interpolation(sl, f, n)
               for sl, f, n in zip(box, factors, level.shape, strict=True)]
    found = lesion[box]
    refined = np.empty_like(found)
    halo = reach[0]  # slices beyond a slab that can hold a lesion within the band
    for z0 in range(0, found.shape[0], _SLAB):
        part = slice(z0, min(found.shape[0], z0 + _SLAB))
        wide = slice(max(0, z0 - halo), min(found.shape[0], part.stop + halo))
        lo = part.start - wide.start
        near = _within(found[wide], spacing, settings.band_mm)[lo:lo + part.stop - part.start]
        z = slice(box[0].start + part.start, box[0].start + part.stop)
        hu = volume_hu[z, box[1], box[2]].astype(np.float32)
        lung_s = lung[z, box[1], box[2]]
        wz = weights[0][part]
        decided = near & lung_s & (_resample(share, wz, *weights[1:]) >= _MIN_WEIGHT)
        contrast = hu - _resample(level, wz, *weights[1:])
        called = np.where(decided, contrast > settings.contrast_hu, found[part])
        vote = _in_plane_majority(called)
        # the band adds a voxel its neighbours agree on; inside, a gap they agree on closes
        voted = np.where(found[part], called | vote, called & vote)
        refined[part] = np.where(decided, voted, called) & lung_s
    # only what joins a lesion the network found: noise above the threshold in the band
    # would otherwise make specks of single voxels, each a lesion of its own
    labels, n = label_components(refined)
    joined = np.zeros(n + 1, dtype=bool)
    joined[np.unique(labels[refined & found])] = True
    joined[0] = False
    out = lesion.copy()
    out[box] = joined[labels]
    return out


def _in_plane_majority(called: np.ndarray) -> np.ndarray:
    """Where at least `_MAJORITY` of the 3 x 3 in-plane neighbourhood is called lesion
    (outside the array counts as not lesion); sums of shifted slices, as a 3 x 3 filter
    over 300 x 512 x 512 takes seconds."""
    c = np.pad(called, ((0, 0), (1, 1), (1, 1))).view(np.uint8)
    rows = c[:, :-2] + c[:, 1:-1] + c[:, 2:]
    return rows[:, :, :-2] + rows[:, :, 1:-1] + rows[:, :, 2:] >= _MAJORITY


def _parenchyma_level(
    volume_hu: np.ndarray, parenchyma: np.ndarray, spacing: np.ndarray, sigma_mm: float,
    factors: Sequence[int],
) -> tuple[np.ndarray, np.ndarray]:
    """On blocks of `factors` voxels, the Gaussian-weighted mean HU of the parenchyma
    voxels (normalised convolution; outside the volume counts as no parenchyma) and the
    share of the kernel's weight they hold.

    Both vary over `sigma_mm`, hence blocks of about a quarter of it, brought back to the
    voxels by linear interpolation (`_resample`): a full-resolution Gaussian of 20 mm over
    a 300 x 512 x 512 scan takes a minute on 2 cores.
    """
    w = _block_sums(parenchyma, factors)
    v = _block_sums(np.where(parenchyma, volume_hu, 0), factors)
    sigma = [sigma_mm / (d * f) for d, f in zip(spacing, factors, strict=True)]
    w = ndi.gaussian_filter(w, sigma, mode="constant", truncate=_TRUNCATE)
    v = ndi.gaussian_filter(v, sigma, mode="constant", truncate=_TRUNCATE)
    return v / np.maximum(w, _MIN_WEIGHT), w / math.prod(factors)


def _resample(grid: np.ndarray, wz: np.ndarray, wy: np.ndarray, wx: np.ndarray) -> np.ndarray:
    """A block grid at the voxels the interpolation weights stand for."""
    return np.einsum("ia,jb,kc,abc->ijk", wz, wy, wx, grid, optimize=True).astype(np.float32)


def _within(found: np.ndarray, spacing: np.ndarray, band_mm: float) -> np.ndarray:
    """Voxels within `band_mm` of a found voxel (Euclidean, in mm)."""
    if not found.any():
        return found.copy()
    return ndi.distance_transform_edt(~found, sampling=spacing) <= band_mm


def _block_sums(values: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """float32 sums over blocks of `factors` voxels (the last blocks padded with zeros)."""
    pad = [(0, -n % f) for n, f in zip(values.shape, factors, strict=True)]
    values = np.pad(values, pad)
    (nz, ny, nx), (fz, fy, fx) = values.shape, factors
    blocks = values.reshape(nz // fz, fz, ny // fy, fy, nx // fx, fx)
    return blocks.sum(axis=(1, 3, 5), dtype=np.float32)


def _interpolation(voxels: slice, factor: int, blocks: int) -> np.ndarray:
    """Linear interpolation weights (voxels x blocks) from block centres to the voxels of
    `voxels` along one axis; beyond the first and last centres the nearest one holds."""
    centre = (np.arange(voxels.start, voxels.stop) + 0.5) / factor - 0.5
    centre = np.clip(centre, 0, blocks - 1)
    below = np.minimum(np.floor(centre).astype(int), max(blocks - 2, 0))
    frac = (centre - below).astype(np.float32)
    out = np.zeros((len(centre), blocks), dtype=np.float32)
    rows = np.arange(len(centre))
    out[rows, below] = 1 - frac
    if blocks > 1:
        out[rows, below + 1] += frac
    return out
