"""Classical lung segmentation (ai/lungs.py): accuracy on phantoms and hand-built chests,
robustness (thick slices, small fields of view, merged lungs, either slice order) and the
clear refusals of bad input."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from scipy import ndimage as ndi

from ai.errors import (
    ImplausibleSpacing,
    InputVolumeError,
    InvalidVolume,
    LungsCutOff,
    NoLungsFound,
    NonFiniteVoxels,
    NotAVolume,
    TooFewSlices,
)
from ai.lungs import LungConfig, LungSide, _close_and_fill, _Grid, label_lungs, segment_lungs
from training.phantoms import Phantom, generate_phantom

AIR, LUNG, TISSUE, DENSE = -1000.0, -850.0, 40.0, 30.0


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


# --------------------------------------------------------------------------- hand-built chest


@dataclass(frozen=True)
class Chest:
    volume_hu: np.ndarray
    spacing_mm: tuple[float, float, float]
    sides: np.ndarray
    """Ground truth: 1 right (low columns), 2 left; the airways' intrapulmonary parts in."""
    trachea: np.ndarray
    lesion: np.ndarray


def _ellipsoid(z, y, x, centre, axes) -> np.ndarray:
    return sum(((c - m) / a) ** 2 for c, m, a in zip((z, y, x), centre, axes, strict=True)) <= 1


def _tube(z, y, x, p0, p1, radius) -> np.ndarray:
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    d = p1 - p0
    rel = (z - p0[0], y - p0[1], x - p0[2])
    t = np.clip(sum(r * c for r, c in zip(rel, d, strict=True)) / float(d @ d), 0.0, 1.0)
    return sum((r - t * c) ** 2 for r, c in zip(rel, d, strict=True)) <= radius**2


def build_chest(
    slices: int = 60, size: int = 128, *, lung_gap_mm: float = 40.0, consolidation_mm: float = 0
) -> Chest:
    """A 300 mm chest in a 380 mm field of view: body, two ellipsoid lungs `lung_gap_mm`
    apart (< 0: merged), heart, trachea from the top slice to a carina and two main bronchi
    into the lungs, a table, noise; optionally a dense lesion of that radius against the
    right lung's lateral pleura. Slice 0 is the feet end (as dicomnode/volume.py orders)."""
    dz, d = 300.0 / slices, 380.0 / size
    rng = np.random.default_rng(0)
    vol = np.empty((slices, size, size), dtype=np.float32)
    sides = np.zeros((slices, size, size), dtype=np.uint8)
    trachea = np.zeros((slices, size, size), dtype=bool)
    lesion = np.zeros((slices, size, size), dtype=bool)
    y = (np.arange(size) * d - 190.0)[:, None]
    x = (np.arange(size) * d - 190.0)[None, :]
    half = lung_gap_mm / 2
    lungs = {
        LungSide.RIGHT: ((150.0, 0.0, -(half + 55.0)), (110.0, 80.0, 55.0)),
        LungSide.LEFT: ((150.0, 0.0, half + 55.0), (105.0, 78.0, 55.0)),
    }
    carina = (200.0, -20.0, -3.0)
    for k in range(slices):
        z = (k + 0.5) * dz
        sl = np.full((size, size), AIR, dtype=np.float32)
        sl[(x / 165.0) ** 2 + ((y - 5.0) / 120.0) ** 2 <= 1] = TISSUE
        sl[(y > 128.0) & (y < 136.0) & (np.abs(x) < 170.0)] = 150.0  # table
        for side, (centre, axes) in lungs.items():
            inside = _ellipsoid(z, y, x, centre, axes) & (sides[k] == 0)
            sides[k][inside] = side
            sl[inside] = LUNG
        sl[_ellipsoid(z, y, x, (100.0, 10.0, 0.0), (45.0, 60.0, 45.0)) & (sides[k] == 0)] = TISSUE
        if consolidation_mm:
            edge = -(half + 110.0) + 0.4 * consolidation_mm
            m = _ellipsoid(z, y, x, (130.0, 0.0, edge), (consolidation_mm,) * 3) & (sides[k] > 0)
            sl[m] = DENSE
            lesion[k] = m
        airway = _tube(z, y, x, carina, (310.0, -20.0, -3.0), 9.0)
        for sign in (-1, 1):
            airway |= _tube(z, y, x, carina, (165.0, 0.0, sign * 75.0), 6.0)
        sl[airway] = AIR
        trachea[k] = airway & (sides[k] == 0)
        vol[k] = sl + rng.normal(0.0, 25.0, sl.shape).astype(np.float32)
    return Chest(vol, (dz, d, d), sides, trachea, lesion)


@pytest.fixture(scope="module")
def chest() -> Chest:
    return build_chest()


# --------------------------------------------------------------------------- phantoms


@pytest.fixture(scope="module")
def phantoms() -> dict[str, Phantom]:
    return {
        "covid": generate_phantom("covid", 0, slices=48, size=128),
        "cap": generate_phantom("cap", 1, slices=48, size=128),
        "normal": generate_phantom("normal", 2, slices=48, size=128),
    }


@pytest.mark.parametrize("kind", ["covid", "cap", "normal"])
def test_phantom_lungs_match_ground_truth(phantoms: dict[str, Phantom], kind: str) -> None:
    p = phantoms[kind]
    result = label_lungs(p.volume_hu, p.spacing_mm)
    assert result.sides.shape == p.volume_hu.shape
    assert result.sides.dtype == np.uint8
    assert dice(result.mask, p.lung_mask) >= 0.95
    assert result.caveats == (), "lungs imaged from apex to base need no caveat"
    # Phantom columns run from the patient's right to left, as DICOM axial images do.
    cols = np.arange(p.volume_hu.shape[2])
    right_x = cols[np.nonzero(result.sides == LungSide.RIGHT)[2]].mean()
    left_x = cols[np.nonzero(result.sides == LungSide.LEFT)[2]].mean()
    assert right_x < left_x
    if kind != "normal":
        covered = np.count_nonzero(result.mask & p.lesion_mask) / np.count_nonzero(p.lesion_mask)
        assert covered >= 0.9, "lesions (ground glass and consolidation) stay in the lungs"


def test_segment_lungs_is_the_boolean_mask(phantoms: dict[str, Phantom]) -> None:
    p = phantoms["normal"]
    mask = segment_lungs(p.volume_hu, p.spacing_mm)
    assert mask.dtype == bool
    np.testing.assert_array_equal(mask, label_lungs(p.volume_hu, p.spacing_mm).mask)


def test_phantom_with_5mm_slices() -> None:
    p = generate_phantom("cap", 4, size=128, slice_thickness_mm=5.0)
    assert p.spacing_mm[0] == 5.0
    assert dice(segment_lungs(p.volume_hu, p.spacing_mm), p.lung_mask) >= 0.95


def test_phantom_with_thin_slices_and_fine_pixels() -> None:
    """1 mm slices of 0.9 mm pixels: the working grid is 2x coarser on every axis and the
    mask is refined back at full resolution."""
    p = generate_phantom(
        "covid", 5, slices=150, size=256, slice_thickness_mm=1.0, pixel_spacing_mm=0.9
    )
    assert dice(segment_lungs(p.volume_hu, p.spacing_mm), p.lung_mask) >= 0.95


def _lung_columns(p: Phantom) -> tuple[int, int]:
    cols = np.flatnonzero(p.lung_mask.any(axis=(0, 1)))
    return int(cols[0]), int(cols[-1]) + 1


def test_small_field_of_view_touching_the_lungs(phantoms: dict[str, Phantom]) -> None:
    """The body is cut and the lungs touch the image edge: still segmented."""
    p = phantoms["covid"]
    x0, x1 = _lung_columns(p)
    rows = np.flatnonzero(p.lung_mask.any(axis=(0, 2)))
    crop = np.s_[:, rows[0] - 2 : rows[-1] + 3, x0:x1]
    result = label_lungs(p.volume_hu[crop], p.spacing_mm)
    assert dice(result.mask, p.lung_mask[crop]) >= 0.95
    assert 0.0 < result.cut_fraction < LungConfig().max_cut_fraction


def _round_field_of_view(p: Phantom, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """The phantom as reconstructed in a circle of `radius` pixels (outside it -3024 HU,
    as scanners and `dicomnode.volume` store it), and the circle."""
    n = p.volume_hu.shape[1]
    lo = n // 2 - radius
    crop = np.s_[:, lo : lo + 2 * radius, lo : lo + 2 * radius]
    y, x = np.mgrid[: 2 * radius, : 2 * radius] - (radius - 0.5)
    inside = y**2 + x**2 <= radius**2
    volume = p.volume_hu[crop].astype(np.float32)
    volume[:, ~inside] = -3024.0
    return volume, inside


def test_a_round_field_of_view_that_reaches_the_lungs(phantoms: dict[str, Phantom]) -> None:
    """Outside the circle is not air around the patient: a lung that reaches it is a lung
    cut by the field of view (was: joined to that air and dropped, silently)."""
    p = phantoms["covid"]
    n = p.volume_hu.shape[1]
    y, x = np.mgrid[:n, :n] - (n - 1) / 2
    lung_radius = float(np.hypot(y, x)[p.lung_mask.any(axis=0)].max())
    for radius, caveat in ((int(lung_radius) + 3, False), (int(lung_radius) - 1, True),
                           (int(lung_radius) - 5, True)):
        volume, inside = _round_field_of_view(p, radius)
        lo = n // 2 - radius
        truth = p.lung_mask[:, lo : lo + 2 * radius, lo : lo + 2 * radius] & inside
        result = label_lungs(volume, p.spacing_mm)
        assert dice(result.mask, truth) >= 0.95, radius
        assert not result.mask[:, ~inside].any()
        assert bool(result.caveats) == caveat, (radius, result.cut_fraction)
        if caveat:
            assert "the field of view" in result.caveats[0].detail


def test_field_of_view_cutting_through_the_lungs(phantoms: dict[str, Phantom]) -> None:
    p = phantoms["covid"]
    x0, x1 = _lung_columns(p)
    cut = (x1 - x0) // 6
    with pytest.raises(LungsCutOff, match="edge of the field of view"):
        segment_lungs(p.volume_hu[:, :, x0 + cut : x1 - cut], p.spacing_mm)


def test_scan_range_cutting_through_the_lungs(phantoms: dict[str, Phantom]) -> None:
    p = phantoms["normal"]
    with pytest.raises(LungsCutOff, match="scan range cuts through the lungs"):
        segment_lungs(p.volume_hu[20:], p.spacing_mm)


def test_lungs_clipped_within_the_limits_are_analysed_with_a_caveat(
    phantoms: dict[str, Phantom],
) -> None:
    """A scan range missing about 4 cm of one lung end (6 slices of 6.3 mm), or a field of
    view 1 cm short of the lungs on each side: segmented, and the result says that its
    volumes cover the imaged part only."""
    p = phantoms["normal"]
    short = label_lungs(p.volume_hu[6:], p.spacing_mm)
    assert LungConfig().caveat_end_slice_fraction < short.end_slice_fraction
    assert short.end_slice_fraction < LungConfig().max_end_slice_fraction
    [caveat] = short.caveats
    assert "scan range may not cover the whole lungs" in caveat.detail
    assert f"{100 * short.end_slice_fraction:.0f} % of the largest" in caveat.detail
    assert "LVR and PLR refer to the imaged part" in caveat.detail
    x0, x1 = _lung_columns(p)
    narrow = label_lungs(p.volume_hu[:, :, x0 + 4 : x1 - 4], p.spacing_mm)
    assert LungConfig().caveat_cut_fraction < narrow.cut_fraction
    [caveat] = narrow.caveats
    assert "edge of the field of view" in caveat.detail and "first/last column" in caveat.detail
    assert len(caveat.short) <= 60, "it fits a key image's panel on two lines"
    strict = LungConfig(caveat_cut_fraction=0.0, caveat_end_slice_fraction=0.0)
    assert len(label_lungs(p.volume_hu, p.spacing_mm, strict).caveats) == 2


def test_slice_order_and_mirroring(phantoms: dict[str, Phantom]) -> None:
    """Head-first or feet-first gives the same lungs; mirrored columns swap the sides."""
    p = phantoms["cap"]
    sides = label_lungs(p.volume_hu, p.spacing_mm).sides
    flipped = label_lungs(p.volume_hu[::-1], p.spacing_mm).sides[::-1]
    assert dice(sides > 0, flipped > 0) >= 0.99
    mirrored = label_lungs(p.volume_hu[:, :, ::-1], p.spacing_mm).sides[:, :, ::-1]
    assert dice(sides == LungSide.RIGHT, mirrored == LungSide.LEFT) >= 0.99


def test_patient_off_centre_on_a_table_wider_than_the_body(
    phantoms: dict[str, Phantom],
) -> None:
    """Patients often lie a few cm off the table's centre, and the table spans the field
    of view: the body's middle (trachea seeding, the split of merged lungs, the sides)
    must be the patient's, not the table's."""
    p = phantoms["cap"]
    shift = 16  # columns, about 2.5 cm
    volume = np.full_like(p.volume_hu, -1000)
    volume[:, :, shift:] = p.volume_hu[:, :, :-shift]
    lungs = np.zeros_like(p.lung_mask)
    lungs[:, :, shift:] = p.lung_mask[:, :, :-shift]
    below_body = np.flatnonzero((volume > -500).any(axis=(0, 2)))[-1] + 2
    volume[:, below_body : below_body + 4, :] = -150  # a table plate, edge to edge
    result = label_lungs(volume, p.spacing_mm)
    assert dice(result.mask, lungs) >= 0.95
    right = np.nonzero(result.sides == LungSide.RIGHT)[2].mean()
    left = np.nonzero(result.sides == LungSide.LEFT)[2].mean()
    assert right < left


# --------------------------------------------------------------------------- hand-built cases


def test_hand_built_chest(chest: Chest) -> None:
    result = label_lungs(chest.volume_hu, chest.spacing_mm)
    for side in LungSide:
        assert dice(result.sides == side, chest.sides == side) >= 0.97
    assert not result.merged
    assert result.cut_fraction == 0.0
    # Trachea and the main bronchi outside the lungs are not lung.
    assert np.count_nonzero(result.mask & chest.trachea) <= 0.05 * np.count_nonzero(chest.trachea)


def test_merged_lungs_are_split() -> None:
    c = build_chest(lung_gap_mm=-10.0)
    result = label_lungs(c.volume_hu, c.spacing_mm)
    assert result.merged and result.caveats == ()  # a narrowing separates them
    for side in LungSide:
        assert dice(result.sides == side, c.sides == side) >= 0.95


def test_one_air_region_without_a_narrowing_is_split_with_a_caveat() -> None:
    """Lungs fused so broadly that no erosion separates them (or one lung crossing the
    body's middle, as after a pneumonectomy): split at the middle, and the lesion sides
    said to be uncertain."""
    c = build_chest(lung_gap_mm=-70.0)
    result = label_lungs(c.volume_hu, c.spacing_mm)
    assert result.merged
    assert [caveat.short for caveat in result.caveats] == [
        "Lung sides uncertain: split at the body's middle"]
    assert "Volumes and ratios of both lungs together are not affected" in (
        result.caveats[0].detail)


def test_dense_consolidation_against_the_ribs_stays_in() -> None:
    """A 16 mm consolidation (30 HU) at the lateral pleura: no air there, but the closing
    keeps it inside the lung."""
    c = build_chest(consolidation_mm=8.0)
    mask = segment_lungs(c.volume_hu, c.spacing_mm)
    assert np.count_nonzero(c.lesion) > 20
    assert np.count_nonzero(mask & c.lesion) >= 0.9 * np.count_nonzero(c.lesion)
    without = segment_lungs(
        c.volume_hu, c.spacing_mm, LungConfig(closing_radius_mm=0, costal_closing_radius_mm=0)
    )
    assert np.count_nonzero(without & c.lesion) < 0.5 * np.count_nonzero(c.lesion)


def test_air_cavity_inside_a_lung_stays_in() -> None:
    """A 28 mm air cavity with a 6 mm wall in the middle of the right lung (an abscess, a
    cyst, a bulla) is pure air as wide as a gas pocket, but it has lung above and below:
    it and its wall stay lung."""
    c = build_chest()
    dz, d, _ = c.spacing_mm
    z = ((np.arange(c.volume_hu.shape[0]) + 0.5) * dz)[:, None, None]
    y = (np.arange(c.volume_hu.shape[1]) * d - 190.0)[None, :, None]
    x = (np.arange(c.volume_hu.shape[2]) * d - 190.0)[None, None, :]
    centre = (150.0, 0.0, -75.0)
    cavity = _ellipsoid(z, y, x, centre, (20.0, 20.0, 20.0))
    volume = c.volume_hu.copy()
    volume[cavity] = TISSUE
    volume[_ellipsoid(z, y, x, centre, (14.0, 14.0, 14.0))] = AIR
    assert (c.sides[cavity] == LungSide.RIGHT).all()
    mask = segment_lungs(volume, c.spacing_mm)
    assert np.count_nonzero(mask & cavity) >= 0.95 * np.count_nonzero(cavity)


def test_holes_around_gas_pockets_stay_open() -> None:
    """In a slice, a hole in a lung is filled (a vessel, a dense lesion) unless it holds a
    gas pocket: the stomach seen through the lung base, whose wall is not lung."""
    sides = np.zeros((3, 40, 40), dtype=np.uint8)
    sides[:, 5:35, 5:35] = LungSide.RIGHT
    sides[:, 10:16, 10:16] = 0  # a vessel
    sides[:, 22:30, 22:30] = 0  # the stomach: its wall around gas
    gas = np.zeros(sides.shape, dtype=bool)
    gas[:, 25:27, 25:27] = True
    grid = _Grid((3, 40, 40), (1, 1, 1), (2.0, 2.0, 2.0))
    no_closing = LungConfig(closing_radius_mm=0, costal_closing_radius_mm=0)
    no_airway = np.zeros(sides.shape, dtype=bool)
    out = _close_and_fill(sides, no_airway, gas, np.full(3, 20.0), grid, no_closing)
    assert (out[:, 10:16, 10:16] == LungSide.RIGHT).all()
    assert not out[:, 22:30, 22:30].any()
    assert (out[sides > 0] == LungSide.RIGHT).all()


@pytest.mark.parametrize(("kind", "seed"), [("cap", 900013), ("covid", 900007)])
def test_gastric_bubble_under_the_dome_stays_out(kind: str, seed: int) -> None:
    """In these phantoms (5 mm slices) the stomach's gas bubble under the left dome joins
    the lung base through the thin diaphragm's partial volume; it used to come into the left
    lung with its wall (2,400-2,900 voxels of air outside the true lungs)."""
    p = generate_phantom(kind, seed, size=256, slices=64)
    mask = segment_lungs(p.volume_hu, p.spacing_mm)
    air_outside_lungs = mask & ~p.lung_mask & (p.volume_hu < -700)
    assert np.count_nonzero(air_outside_lungs) < 100
    assert dice(mask, p.lung_mask) >= 0.99
    without = LungConfig(gas_pocket_min_radius_mm=1000.0)  # no pocket is that wide
    before = segment_lungs(p.volume_hu, p.spacing_mm, without) & ~p.lung_mask
    assert np.count_nonzero(before & (p.volume_hu < -700)) > 2000


@pytest.mark.parametrize(("kind", "seed"), [("normal", 950028), ("covid", 900003)])
def test_a_lung_tip_at_the_feet_end_is_not_taken_for_the_trachea(kind: str, seed: int) -> None:
    """In these phantoms the anterior left lung narrows to a tip near the middle on the last
    slices (the feet end), steady enough over 30 mm to pass for a trachea: it was tracked
    as one and cut out of the lung (14-21 mL of aerated lung). The trachea is at the other
    end, with a steadier cross-section. Either slice order (the generator's is head first,
    DICOM's feet first)."""
    p = generate_phantom(kind, seed, size=256, slices=64)
    feet_end = slice(p.lung_mask.shape[0] - 8, None)
    for order in (slice(None), slice(None, None, -1)):
        mask = segment_lungs(p.volume_hu[order], p.spacing_mm)[order]  # in generator order
        aerated_missed = p.lung_mask & ~mask & (p.volume_hu < -500)
        ml = np.count_nonzero(aerated_missed) * float(np.prod(p.spacing_mm)) / 1000
        assert ml < 2.0
        assert dice(mask[feet_end], p.lung_mask[feet_end]) >= 0.97
        assert dice(mask, p.lung_mask) >= 0.99


def test_float64_and_int16_inputs_agree(chest: Chest) -> None:
    as_int = np.rint(chest.volume_hu).astype(np.int16)
    a = segment_lungs(as_int, chest.spacing_mm)
    b = segment_lungs(as_int.astype(np.float64), chest.spacing_mm)
    np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- refusals


def _abdomen(slices: int = 40, size: int = 128) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Body, soft tissue, three bowel gas pockets (pure air): no lungs."""
    d = 380.0 / size
    vol = np.full((slices, size, size), AIR, dtype=np.float32)
    y = (np.arange(size) * d - 190.0)[:, None]
    x = (np.arange(size) * d - 190.0)[None, :]
    for k in range(slices):
        z = (k + 0.5) * 5.0
        vol[k][(x / 160.0) ** 2 + (y / 115.0) ** 2 <= 1] = TISSUE
        for centre in ((60.0, 20.0, -50.0), (110.0, -30.0, 40.0), (150.0, 10.0, 60.0)):
            vol[k][_ellipsoid(z, y, x, centre, (25.0, 20.0, 30.0))] = AIR
    vol += np.random.default_rng(1).normal(0.0, 25.0, vol.shape).astype(np.float32)
    return vol, (5.0, d, d)


def test_abdomen_without_lungs_is_refused() -> None:
    vol, spacing = _abdomen()
    with pytest.raises(NoLungsFound, match="is this a chest CT"):
        segment_lungs(vol, spacing)


def test_chest_with_airless_lungs_is_refused(phantoms: dict[str, Phantom]) -> None:
    p = phantoms["normal"]
    vol = p.volume_hu.copy()
    vol[p.lung_mask] = 40
    with pytest.raises(NoLungsFound):
        segment_lungs(vol, p.spacing_mm)


def test_lungs_of_pure_air_density_are_named_as_a_possible_cause() -> None:
    """Lungs darker than aerated lung (very severe emphysema) cannot be told from air:
    the refusal says so instead of only asking whether this is a chest CT."""
    p = generate_phantom("normal", 2, slices=48, size=128)
    vol = p.volume_hu.astype(np.float32)
    vol[p.lung_mask] = np.random.default_rng(0).uniform(-1000, -975, int(p.lung_mask.sum()))
    with pytest.raises(NoLungsFound, match="darker than aerated lung .* very severe emphysema"):
        segment_lungs(vol, p.spacing_mm)


def test_one_lung_missing_or_much_smaller_comes_with_a_caveat(
    phantoms: dict[str, Phantom]
) -> None:
    """The mask leaves out lung that is not aerated: a lung removed or filled, or mostly
    consolidated, must be said, since every measure then covers less than the lungs."""
    p = phantoms["normal"]
    sides = label_lungs(p.volume_hu, p.spacing_mm).sides
    left = p.lung_mask & (sides == LungSide.LEFT)
    filled = p.volume_hu.copy()
    filled[left] = 40  # removed (pneumonectomy) or white-out
    [caveat] = label_lungs(filled, p.spacing_mm).caveats
    assert caveat.short == "Only the right lung found: measures cover it alone"
    assert "refer to the right lung" in caveat.detail
    posterior = left & (np.arange(left.shape[1])[None, :, None]
                        > np.quantile(np.nonzero(left)[1], 0.3))
    consolidated = p.volume_hu.copy()
    consolidated[posterior] = 35  # the posterior 70 % of the left lung
    result = label_lungs(consolidated, p.spacing_mm)
    assert [caveat.short for caveat in result.caveats] == [
        "Left lung small: dense parts may be left out",
        "Dense tissue behind the left lung: may be consolidation left out"]
    right, small = (np.count_nonzero(result.sides == side) for side in LungSide)
    assert small / right < LungConfig().caveat_side_ratio


def test_a_pneumothorax_counted_as_lung_comes_with_a_caveat() -> None:
    """Air between a collapsing lung and the chest wall is enclosed like lung: the mask
    takes it in, and the report must say so (lung volume up, LVR down)."""
    p = generate_phantom("normal", 1, slices=64, size=256)  # 1.2 mm pixels, 5 mm slices
    sides = label_lungs(p.volume_hu, p.spacing_mm).sides
    left = p.lung_mask & (sides == LungSide.LEFT)
    depth = ndi.distance_transform_edt(left, sampling=(1e3, *p.spacing_mm[1:]))  # in-plane
    pleural_air = left & (depth <= 5.0)  # the lung 5 mm away from the wall all round
    with_air = p.volume_hu.copy()
    with_air[pleural_air] = -1000
    result = label_lungs(with_air, p.spacing_mm)
    assert [c.short for c in result.caveats] == ["Pure air along the chest wall counted as lung"]
    assert "a pneumothorax or a large bulla?" in result.caveats[0].detail


def test_dense_tissue_behind_the_lungs_comes_with_a_caveat() -> None:
    """A dependent consolidation (or effusion) as dense as the chest wall is left out of
    the mask; the posterior lung edge then lies far from the ribs, and the report says
    that the lesion volume may be underestimated."""
    p = generate_phantom("normal", 1, slices=64, size=256)
    assert label_lungs(p.volume_hu, p.spacing_mm).caveats == ()
    rows = np.arange(p.lung_mask.shape[1])[None, :, None]
    last = np.where(p.lung_mask.any(axis=1), p.lung_mask.shape[1] - 1
                    - np.argmax(p.lung_mask[:, ::-1, :], axis=1), -1)[:, None, :]
    dependent = p.lung_mask & (rows > last - 25)  # the posterior 25 rows (30 mm) of each lung
    consolidated = p.volume_hu.copy()
    consolidated[dependent] = 30
    caveats = label_lungs(consolidated, p.spacing_mm).caveats
    assert [c.short for c in caveats] == [
        "Dense tissue behind the right lung: may be consolidation left out",
        "Dense tissue behind the left lung: may be consolidation left out"]
    assert "the lesion volume, LVR and PLR are underestimated" in caveats[0].detail
    # bone too faint to find (ribs below 200 HU): the lateral edge seems far from the ribs
    # too, so nothing is judged, rather than a caveat on every lung
    faint = consolidated.copy()
    faint[faint > 150] = 150
    z, y, x = (n // 2 for n in faint.shape)
    faint[z - 8:z + 8, y - 4:y + 4, x - 4:x + 4] = 400  # bright, but only in the middle
    assert label_lungs(faint, p.spacing_mm).caveats == ()


def test_volume_not_in_hu_is_refused(chest: Chest) -> None:
    """Stored values without the rescale (0..4095, air ~ 24): no air below -400."""
    with pytest.raises(NoLungsFound, match="in HU"):
        segment_lungs(chest.volume_hu + 1024.0, chest.spacing_mm)


def test_non_finite_voxels_are_refused(chest: Chest) -> None:
    vol = chest.volume_hu.copy()
    vol[3, 10, 10] = np.nan
    vol[4, 10, 10] = np.inf
    with pytest.raises(NonFiniteVoxels, match="2 NaN/infinite voxels"):
        segment_lungs(vol, chest.spacing_mm)


@pytest.mark.parametrize(
    "spacing", [(5.0, 0.01, 0.01), (50.0, 1.0, 1.0), (2.0, 0.0, 1.0), (2.0, float("nan"), 1.0)]
)
def test_absurd_spacing_is_refused(chest: Chest, spacing: tuple[float, float, float]) -> None:
    with pytest.raises(ImplausibleSpacing, match="geometry missing or corrupted"):
        segment_lungs(chest.volume_hu, spacing)


def test_malformed_input_is_refused(chest: Chest) -> None:
    with pytest.raises(NotAVolume):
        segment_lungs(chest.volume_hu[0], chest.spacing_mm)
    with pytest.raises(NotAVolume):
        segment_lungs(chest.volume_hu, (1.0, 1.0))
    with pytest.raises(TooFewSlices, match="3 slices"):
        segment_lungs(chest.volume_hu[:3], chest.spacing_mm)


def test_error_hierarchy() -> None:
    for error in (NotAVolume, NonFiniteVoxels, TooFewSlices, ImplausibleSpacing):
        assert issubclass(error, InvalidVolume)
    for error in (InvalidVolume, NoLungsFound, LungsCutOff):
        assert issubclass(error, InputVolumeError)
        assert issubclass(error, ValueError)
    codes = {
        e.code
        for e in (
            InvalidVolume,
            NotAVolume,
            NonFiniteVoxels,
            TooFewSlices,
            ImplausibleSpacing,
            NoLungsFound,
            LungsCutOff,
        )
    }
    assert len(codes) == 7


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="max_cut_fraction"):
        LungConfig(max_cut_fraction=1.5)
    with pytest.raises(ValueError, match="caveat_end_slice_fraction 0.6 must not exceed"):
        LungConfig(caveat_end_slice_fraction=0.6)
    with pytest.raises(ValueError, match="outside_fov_hu -300.0 must be below air_hu"):
        LungConfig(outside_fov_hu=-300.0)
    with pytest.raises(ValueError, match="working_spacing_mm"):
        LungConfig(working_spacing_mm=0)
    with pytest.raises(ValueError, match="closing_radius_mm"):
        LungConfig(closing_radius_mm=-1)
