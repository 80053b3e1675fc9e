"""Lesion analysis (ai/analysis.py): exact values on hand-made masks."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import ndimage as ndi

from ai.analysis import (
    analyse_lesions,
    label_components,
    lung_outline,
    peripheral_band,
    remove_small_components,
)
from ai.lungs import LungSide

SPACING = (2.5, 0.8, 0.7)


def _disk(spacing, radius_mm: float) -> np.ndarray:
    """A disk of `radius_mm` in pixels (an ellipse), in exact decimal arithmetic:
    (12 x 0.8)^2 + (4 x 0.7)^2 is 10^2 exactly, not in floats."""
    _, dy, dx = (Fraction(str(s)) for s in spacing)
    radius = Fraction(str(radius_mm))
    ry, rx = int(radius // dy), int(radius // dx)
    return np.array([[(y * dy) ** 2 + (x * dx) ** 2 <= radius**2 for x in range(-rx, rx + 1)]
                     for y in range(-ry, ry + 1)])


def _disk_band(lung: np.ndarray, spacing, sigma_mm: float) -> np.ndarray:
    """Paper eq. 1 by the book: per slice, U_s minus its erosion by a disk of radius sigma
    (an ellipse in pixels), outside the image counting as outside the lung."""
    disk = _disk(spacing, sigma_mm)
    band = np.zeros_like(lung)
    for z in range(lung.shape[0]):
        eroded = ndi.binary_erosion(lung[z], structure=disk, border_value=0)
        band[z] = lung[z] & ~eroded
    return band


def _closed_outline(lung: np.ndarray, spacing, radius_mm: float) -> np.ndarray:
    """The outline by the book: per slice, each 3D component of the lung, on each side of
    the column with the least lung in the middle 60 % of the lungs' width, closed (dilated,
    then eroded) by a disk of `radius_mm`, beyond the image empty."""
    disk = _disk(spacing, radius_mm)
    pad = max(disk.shape)
    labels, n = ndi.label(lung, structure=np.ones((3, 3, 3)))
    profile = lung.sum(axis=(0, 1))
    first, last = np.flatnonzero(profile)[[0, -1]]
    skip = int((last - first) * 0.2)
    split = first + skip + np.argmin(profile[first + skip : last - skip + 1])
    right = np.arange(lung.shape[2]) <= split
    outline = lung.copy()
    for z in range(lung.shape[0]):
        for value, side in ((v, s) for v in range(1, n + 1) for s in (right, ~right)):
            part = np.pad((labels[z] == value) & side[None, :], pad)
            closed = ndi.binary_erosion(ndi.binary_dilation(part, structure=disk),
                                        structure=disk, border_value=0)
            outline[z] |= closed[pad:-pad, pad:-pad]
    return outline


def _blobby_lung(shape=(6, 90, 100), seed=0) -> np.ndarray:
    """An irregular lung-like mask that also touches the image edge."""
    rng = np.random.default_rng(seed)
    field = ndi.gaussian_filter(rng.normal(size=shape), sigma=(1, 6, 6))
    lung = field > np.quantile(field, 0.45)
    lung[:, 30:60, 0:20] = True  # against the left image edge
    return lung


def _box_lung(shape=(10, 80, 80)) -> np.ndarray:
    lung = np.zeros(shape, dtype=bool)
    lung[:, 10:70, 10:70] = True
    return lung


# --------------------------------------------------------------------------- peripheral band


@pytest.mark.parametrize("sigma", [0.0, 3.0, 10.0, 17.5, 25.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_band_is_lung_minus_its_disk_erosion(sigma: float, seed: int) -> None:
    lung = _blobby_lung(shape=(3, 90, 100), seed=seed)
    band = peripheral_band(lung, SPACING, sigma)
    np.testing.assert_array_equal(band, _disk_band(lung, SPACING, sigma) if sigma else False)


def test_band_on_selected_slices_only() -> None:
    lung = _blobby_lung()
    band = peripheral_band(lung, SPACING, 10.0, slices=[1, 4])
    full = peripheral_band(lung, SPACING, 10.0)
    np.testing.assert_array_equal(band[[1, 4]], full[[1, 4]])
    assert not band[[0, 2, 3, 5]].any()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("closing_mm", [0.0, 4.0, 10.0])
def test_plr_matches_the_full_slice_band(seed: int, closing_mm: float) -> None:
    """analyse_lesions computes the band only around the lesions, from an outline closed
    only there; it must equal the band of whole slices of the outline closed by the book,
    also where lesions touch the image edge."""
    lung = _blobby_lung(seed=seed)
    rng = np.random.default_rng(seed + 10)
    field = ndi.gaussian_filter(rng.normal(size=lung.shape), (1, 4, 4))
    lesion = lung & (field > np.quantile(field, 0.8))
    vol = np.full(lung.shape, -800.0)
    result = analyse_lesions(vol, lesion, lung, SPACING, peripheral_mm=10.0,
                             outline_closing_mm=closing_mm)
    outline = _closed_outline(lung, SPACING, closing_mm) if closing_mm else lung
    assert outline.sum() > lung.sum() or not closing_mm  # the closing does something here
    band = _disk_band(outline, SPACING, 10.0) & lung
    expected = np.count_nonzero(lesion & band) / np.count_nonzero(lesion)
    assert result.plr == pytest.approx(expected, abs=1e-12)
    total = sum(les.peripheral_fraction * les.voxels for les in result.lesions)
    assert total == pytest.approx(np.count_nonzero(lesion & band))


def test_plr_one_for_a_lesion_in_the_periphery_and_zero_in_the_core() -> None:
    lung = _box_lung()
    vol = np.full(lung.shape, -700.0)
    spacing = (5.0, 1.0, 1.0)
    peripheral = np.zeros_like(lung)
    peripheral[2:5, 12:18, 30:40] = True  # 2..8 mm from the lung's edge at row 10
    central = np.zeros_like(lung)
    central[2:5, 35:45, 35:45] = True  # >= 25 mm from every edge
    assert analyse_lesions(vol, peripheral, lung, spacing, peripheral_mm=10.0).plr == 1.0
    assert analyse_lesions(vol, central, lung, spacing, peripheral_mm=10.0).plr == 0.0
    both = analyse_lesions(vol, peripheral | central, lung, spacing, peripheral_mm=10.0)
    assert both.plr == pytest.approx(180 / (180 + 300))
    assert [les.peripheral_fraction for les in both.lesions] == [0.0, 1.0]


def test_plr_band_edge_is_inclusive_at_sigma() -> None:
    """A pixel exactly sigma from the nearest non-lung pixel is in the band (closed disk)."""
    lung = _box_lung()
    vol = np.full(lung.shape, -700.0)
    spacing = (5.0, 1.0, 1.0)
    at_sigma = np.zeros_like(lung)
    at_sigma[3, 19, 40] = True  # nearest non-lung: row 9, 10 mm away
    beyond = np.zeros_like(lung)
    beyond[3, 20, 40] = True
    assert analyse_lesions(vol, at_sigma, lung, spacing, peripheral_mm=10.0).plr == 1.0
    assert analyse_lesions(vol, beyond, lung, spacing, peripheral_mm=10.0).plr == 0.0


def test_plr_band_edge_survives_the_rounding_of_decimal_spacings() -> None:
    """14 x 0.8 mm is 11.200000000000001 mm in floats: still sigma = 11.2 mm away."""
    lung = _box_lung()
    vol = np.full(lung.shape, -700.0)
    at_sigma = np.zeros_like(lung)
    at_sigma[3, 23, 40] = True  # nearest non-lung: row 9, 14 pixels of 0.8 mm
    assert analyse_lesions(vol, at_sigma, lung, (5.0, 0.8, 0.8), peripheral_mm=11.2).plr == 1.0


def _lungs_with_a_bite() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two box lungs 8 mm apart (1 mm pixels); the right one with a 12 mm wide bite cut
    into it from the mediastinum (a consolidation the lung mask left out), 20 mm deep."""
    lung = np.zeros((4, 80, 110), dtype=bool)
    lung[:, 10:70, 5:50] = True
    lung[:, 10:70, 58:103] = True
    lung[:, 34:46, 30:50] = False
    sides = np.where(np.arange(110) < 54, LungSide.RIGHT, LungSide.LEFT)
    return lung, np.where(lung, sides, 0).astype(np.uint8), np.full(lung.shape, -800.0)


def test_a_bite_left_out_of_the_lung_mask_is_not_pleura() -> None:
    """Lesion beside the bite, 15 mm from every true edge of the lung: peripheral only for
    the bare mask (the paper's eq. 1 on a mask that missed the consolidation)."""
    lung, sides, vol = _lungs_with_a_bite()
    lesion = np.zeros_like(lung)
    lesion[1:3, 28:34, 25:35] = True  # rows 28-33, up to 6 mm above the bite
    spacing = (5.0, 1.0, 1.0)
    for lung_sides in (sides, None):  # the sides, or the mask's components
        closed = analyse_lesions(vol, lesion, lung, spacing, lung_sides=lung_sides,
                                 peripheral_mm=10.0, outline_closing_mm=10.0)
        bare = analyse_lesions(vol, lesion, lung, spacing, lung_sides=lung_sides,
                               peripheral_mm=10.0, outline_closing_mm=0.0)
        assert (closed.plr, bare.plr) == (0.0, 1.0)
        assert closed.outline_closing_mm == 10.0


def test_the_closing_never_bridges_the_two_lungs() -> None:
    """Lesion along the 8 mm gap between the lungs stays peripheral: each lung is closed on
    its own, by sides or, without them, by 3D component split at the lungs' middle (lungs
    that touch on some slice are one component)."""
    lung, sides, vol = _lungs_with_a_bite()
    lesion = np.zeros_like(lung)
    lesion[1:3, 50:60, 60:66] = True  # the left lung's medial edge, 2-7 mm from the gap
    joined = lung.copy()
    joined[3, 20, 50:58] = True  # a strand across the gap on another slice: one component
    lopsided = joined.copy()  # ... and the right lung twice as wide as the left
    lopsided[:, 10:70, 72:103] = False
    for lung_mask, lung_sides in ((lung, sides), (lung, None), (joined, None),
                                  (lopsided, None)):
        result = analyse_lesions(vol, lesion, lung_mask, (5.0, 1.0, 1.0),
                                 lung_sides=lung_sides, peripheral_mm=10.0,
                                 outline_closing_mm=10.0)
        assert result.plr == 1.0


def test_lung_outline_closes_each_lung_alone() -> None:
    lung, sides, _ = _lungs_with_a_bite()
    outline = lung_outline(sides, (5.0, 1.0, 1.0), 10.0)
    # The bite bridged but for a shallow arc at its mouth, where a 10 mm disk still fits.
    np.testing.assert_array_equal(outline[:, 34:46, 30:47], True)
    assert not outline[:, 40, 49].any()
    np.testing.assert_array_equal(outline[:, :, 50:58], False)  # the gap kept
    np.testing.assert_array_equal(lung_outline(sides, (5.0, 1.0, 1.0), 0.0), lung)


@pytest.mark.parametrize("spacing", [(0.0, 1.0, 1.0), (-2.5, 1.0, 1.0), (2.5, float("nan"), 1.0),
                                     (2.5, 1.0)])
def test_impossible_spacing_is_refused(spacing: tuple[float, ...]) -> None:
    """Not a volume of 0 (or below) and sizes with the wrong sign."""
    lung = _box_lung()
    lesion = np.zeros_like(lung)
    lesion[2:4, 20:30, 20:30] = True
    vol = np.full(lung.shape, -700.0)
    with pytest.raises(ValueError, match="spacing"):
        analyse_lesions(vol, lesion, lung, spacing)
    with pytest.raises(ValueError, match="spacing"):
        remove_small_components(lesion, spacing, 10.0)


# --------------------------------------------------------------------------- lesion statistics


def test_two_lesions_each_with_its_own_density() -> None:
    """Percentiles and density fractions per lesion; the scan's lesion mean HU over all
    lesion voxels (volume-weighted); -300 HU exactly is consolidation; LVR counts only
    lesion inside the lungs."""
    lung = _box_lung()
    vol = np.full(lung.shape, -850.0)
    lesion = np.zeros_like(lung)
    lesion[2:4, 15:20, 15:20] = True  # 50 voxels of ground glass, -700..-651
    vol[2:4, 15:20, 15:20] = np.arange(-700.0, -650.0).reshape(2, 5, 5)
    lesion[6:8, 40:45, 40:50] = True  # 100 voxels: 20 at -300 exactly, 80 at 20 HU
    vol[6:8, 40:45, 40:50] = 20.0
    vol[6, 40:42, 40:50] = -300.0
    lesion[5, 0:5, 0:5] = True  # outside the lungs: ignored everywhere
    result = analyse_lesions(vol, lesion, lung, SPACING, consolidation_hu=-300.0)
    assert result.lesion_count == 2
    assert result.lvr == pytest.approx(150 / np.count_nonzero(lung))
    big, small = result.lesions  # largest first
    assert big.voxels == 100 and small.voxels == 50
    assert (small.p10_hu, small.p50_hu, small.p90_hu) == pytest.approx(
        tuple(np.percentile(np.arange(-700.0, -650.0), [10, 50, 90])))
    assert (big.p10_hu, big.p50_hu, big.p90_hu) == pytest.approx((-300.0, 20.0, 20.0))
    assert big.consolidation_fraction == 1.0 and small.ggo_fraction == 1.0
    assert result.lesion_mean_hu == pytest.approx((50 * -675.5 + 20 * -300.0 + 80 * 20.0) / 150)
    assert result.consolidation_fraction == pytest.approx(100 / 150)


def test_cube_volume_bbox_centre_and_hu() -> None:
    lung = _box_lung()
    vol = np.full(lung.shape, -850.0)
    lesion = np.zeros_like(lung)
    lesion[2:6, 20:30, 40:52] = True  # 4 x 10 x 12 voxels
    vol[2:6, 20:30, 40:52] = np.linspace(-700.0, 100.0, 480).reshape(4, 10, 12)
    result = analyse_lesions(vol, lesion, lung, SPACING, consolidation_hu=-300.0)
    assert result.lesion_count == 1
    (les,) = result.lesions
    voxel_ml = math.prod(SPACING) / 1000.0
    assert les.index == 1
    assert les.voxels == 480
    assert les.volume_ml == pytest.approx(480 * voxel_ml)
    assert les.bbox_voxels == (2, 6, 20, 30, 40, 52)
    assert (les.width_mm, les.length_mm, les.height_mm) == pytest.approx((12 * 0.7, 10 * 0.8, 10))
    assert les.centre_voxel == pytest.approx((3.5, 24.5, 45.5))
    assert les.centre_mm == pytest.approx((3.5 * 2.5, 24.5 * 0.8, 45.5 * 0.7))
    values = vol[lesion]
    assert les.mean_hu == pytest.approx(values.mean())
    assert (les.p10_hu, les.p50_hu, les.p90_hu) == pytest.approx(
        tuple(np.percentile(values, (10, 50, 90)))
    )
    consolidated = np.count_nonzero(values >= -300.0) / values.size
    assert les.consolidation_fraction == pytest.approx(consolidated)
    assert les.ggo_fraction == pytest.approx(1 - consolidated)
    assert les.density == ("consolidation" if consolidated >= 0.5 else "ground-glass")
    assert result.lvr == pytest.approx(480 / np.count_nonzero(lung))
    assert result.lung_volume_ml == pytest.approx(np.count_nonzero(lung) * voxel_ml)
    assert result.lesion_volume_ml == pytest.approx(les.volume_ml)
    assert result.spread_mm == 0.0
    assert result.lesion_mean_hu == pytest.approx(values.mean())
    assert result.lung_mean_hu == pytest.approx(vol[lung].mean())


def test_density_classes_and_threshold() -> None:
    lung = _box_lung()
    vol = np.full(lung.shape, -850.0)
    ggo = np.zeros_like(lung)
    ggo[1:3, 20:25, 20:25] = True
    dense = np.zeros_like(lung)
    dense[6:8, 40:45, 40:46] = True
    vol[ggo] = -600.0
    vol[dense] = 20.0
    result = analyse_lesions(vol, ggo | dense, lung, SPACING)
    by_density = {les.density: les for les in result.lesions}
    assert by_density["ground-glass"].ggo_fraction == 1.0
    assert by_density["consolidation"].consolidation_fraction == 1.0
    assert result.consolidation_fraction == pytest.approx(60 / 110)
    moved = analyse_lesions(vol, ggo | dense, lung, SPACING, consolidation_hu=-700.0)
    assert moved.consolidation_fraction == 1.0
    assert moved.consolidation_hu == -700.0


def test_count_order_and_spread() -> None:
    lung = _box_lung(shape=(12, 80, 80))
    vol = np.full(lung.shape, -800.0)
    lesion = np.zeros_like(lung)
    lesion[4:6, 20:24, 20:24] = True  # 32 voxels, centre (4.5, 21.5, 21.5)
    lesion[4:6, 20:26, 50:56] = True  # 72 voxels, centre (4.5, 22.5, 52.5)
    result = analyse_lesions(vol, lesion, lung, SPACING)
    assert result.lesion_count == 2
    assert [les.voxels for les in result.lesions] == [72, 32]
    assert [les.index for les in result.lesions] == [1, 2]
    a, b = (np.array(les.centre_mm) for les in result.lesions)
    assert result.spread_mm == pytest.approx(np.linalg.norm(a - b) / 2)


def test_connectivity_counts_diagonal_lesions() -> None:
    lung = _box_lung()
    vol = np.full(lung.shape, -800.0)
    lesion = np.zeros_like(lung)
    lesion[3, 30, 30] = lesion[4, 31, 31] = True  # corner neighbours across a slice
    assert analyse_lesions(vol, lesion, lung, SPACING).lesion_count == 1
    assert analyse_lesions(vol, lesion, lung, SPACING, connectivity=6).lesion_count == 2
    with pytest.raises(ValueError, match="connectivity"):
        analyse_lesions(vol, lesion, lung, SPACING, connectivity=8)


def test_lesion_outside_the_lungs_is_ignored() -> None:
    lung = _box_lung()
    vol = np.full(lung.shape, -800.0)
    lesion = np.zeros_like(lung)
    lesion[2:4, 0:8, 0:8] = True  # outside the lung box
    lesion[2:4, 30:32, 30:32] = True
    result = analyse_lesions(vol, lesion, lung, SPACING)
    assert result.lesion_count == 1
    assert result.lesions[0].voxels == 8


def test_no_lesions() -> None:
    lung = _box_lung()
    result = analyse_lesions(np.full(lung.shape, -800.0), np.zeros_like(lung), lung, SPACING)
    assert (result.lesion_count, result.lvr, result.lesion_volume_ml) == (0, 0.0, 0.0)
    assert result.plr is None and result.spread_mm is None
    assert result.ggo_fraction is None and result.consolidation_fraction is None
    assert result.lesion_mean_hu is None and result.lung_mean_hu == pytest.approx(-800.0)
    assert result.lesions == ()


def test_sides() -> None:
    lung = _box_lung()
    sides = np.where(np.arange(80)[None, None, :] < 40, LungSide.RIGHT, LungSide.LEFT)
    sides = np.where(lung, sides, 0).astype(np.uint8)
    vol = np.full(lung.shape, -800.0)
    lesion = np.zeros_like(lung)
    lesion[2:4, 20:30, 20:30] = True
    lesion[6:8, 20:30, 36:60] = True  # mostly left
    result = analyse_lesions(vol, lesion, lung, SPACING, lung_sides=sides)
    assert {les.voxels: les.side for les in result.lesions} == {200: "right", 480: "left"}
    assert all(les.side is None for les in analyse_lesions(vol, lesion, lung, SPACING).lesions)


def test_results_are_json_ready() -> None:
    lung = _box_lung()
    lesion = np.zeros_like(lung)
    lesion[2:4, 20:30, 20:30] = True
    result = analyse_lesions(np.full(lung.shape, -800, dtype=np.int16), lesion, lung, SPACING)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["lesion_count"] == 1
    assert data["lesions"][0]["bbox_voxels"] == [2, 4, 20, 30, 20, 30]
    assert json.loads(json.dumps(result.lesions[0].to_dict())) == data["lesions"][0]


def test_shape_mismatch_is_an_error() -> None:
    lung = _box_lung()
    with pytest.raises(ValueError, match="lesion_mask shape"):
        analyse_lesions(np.zeros(lung.shape), np.zeros((1, 2, 3), bool), lung, SPACING)
    with pytest.raises(ValueError, match="lung_sides shape"):
        analyse_lesions(np.zeros(lung.shape), lung, lung, SPACING, lung_sides=np.zeros((2, 2, 2)))


# --------------------------------------------------------------------------- components


def test_remove_small_components_by_physical_volume() -> None:
    mask = np.zeros((10, 40, 40), dtype=bool)
    mask[1:3, 5:10, 5:10] = True  # 50 voxels
    mask[5:7, 20:25, 20:24] = True  # 40 voxels
    mask[8, 30, 30] = True  # 1 voxel
    voxel = math.prod(SPACING)
    kept = remove_small_components(mask, SPACING, min_volume_mm3=40 * voxel)
    assert label_components(kept)[1] == 2
    assert np.count_nonzero(kept) == 90
    assert not kept[8, 30, 30]
    assert np.count_nonzero(remove_small_components(mask, SPACING, 41 * voxel)) == 50
    np.testing.assert_array_equal(remove_small_components(mask, SPACING, 0), mask)
    assert not remove_small_components(np.zeros_like(mask), SPACING, 10).any()


def test_label_components() -> None:
    mask = np.zeros((3, 5, 5), dtype=bool)
    mask[0, 0, 0] = mask[1, 1, 1] = mask[2, 4, 4] = True
    labels, n = label_components(mask)
    assert n == 2 and labels.dtype == np.int32
    assert label_components(mask, connectivity=6)[1] == 3


@pytest.mark.parametrize(("option", "value"), [
    ("peripheral_mm", -5.0), ("peripheral_mm", float("nan")), ("consolidation_hu", float("inf")),
    ("outline_closing_mm", -1.0), ("outline_closing_mm", float("inf")),
])
def test_a_nonsense_band_or_threshold_is_refused(option: str, value: float) -> None:
    """A negative band silently dropped lesions (their crops shrank to nothing)."""
    volume = np.full((4, 16, 16), -800.0)
    lung = np.ones(volume.shape, bool)
    with pytest.raises(ValueError, match=option):
        analyse_lesions(volume, lung, lung, (1.0, 1.0, 1.0), **{option: value})
