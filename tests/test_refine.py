"""The lesion outline re-decided by density near the network's outline (ai/refine.py)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from ai.refine import NO_REFINEMENT, OutlineRefinement, refine_lesion_outline

SPACING = (2.0, 1.0, 1.0)
SHAPE = (24, 64, 64)


def _ball(centre: tuple[float, float, float], radius_mm: float) -> np.ndarray:
    z, y, x = np.indices(SHAPE, dtype=np.float64)
    d2 = sum(((g - c) * s) ** 2 for g, c, s in zip((z, y, x), centre, SPACING, strict=True))
    return d2 <= radius_mm**2


def _chest(lesion: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A block of lung (-860 HU, a little noise) inside soft tissue, `lesion` at -650 HU."""
    rng = np.random.default_rng(seed)
    lung = np.zeros(SHAPE, dtype=bool)
    lung[2:-2, 4:-4, 4:-4] = True
    hu = np.full(SHAPE, 40.0)
    hu[lung] = -860.0
    hu[lesion & lung] = -650.0
    hu += rng.normal(0.0, 5.0, SHAPE)
    return hu.astype(np.int16), lung


CENTRE = (12.0, 32.0, 32.0)


def _assert_outline(refined: np.ndarray, expected: np.ndarray) -> None:
    """`refined` is `expected` but for one-voxel tips of a digital sphere's outline that the
    band would add and the in-plane majority vote does not (at most 1 %, on its surface)."""
    assert not (refined & ~expected).any()
    missing = expected & ~refined
    assert np.count_nonzero(missing) <= 0.01 * np.count_nonzero(expected)
    assert not (missing & ndi.binary_erosion(expected)).any()


@pytest.mark.parametrize("network_radius_mm", [5.0, 11.0])  # under- and oversegmented
def test_a_lesion_outline_moves_to_its_density_outline(network_radius_mm: float) -> None:
    truth = _ball(CENTRE, 8.0)
    hu, lung = _chest(truth)
    network = _ball(CENTRE, network_radius_mm)
    refined = refine_lesion_outline(hu, network, lung, SPACING)
    if network_radius_mm > 8.0:  # all inside what the network found: nothing voted away
        assert np.array_equal(refined, truth & lung)
    else:
        _assert_outline(refined, truth & lung)


def test_the_in_plane_vote_drops_a_thin_vessel_and_fills_a_one_voxel_gap() -> None:
    lesion = _ball(CENTRE, 6.0)
    hu, lung = _chest(lesion)
    vessel = np.zeros(SHAPE, dtype=bool)
    vessel[12, 32, 32:50] = True  # one voxel wide, leaving the lesion through the band
    hu[vessel & ~lesion] = -100
    hu[12, 30, 30] = -860  # a voxel of plain lung inside the lesion
    refined = refine_lesion_outline(hu, lesion, lung, SPACING)
    assert refined[12, 30, 30]
    assert not (refined & vessel & ~lesion).any()
    assert np.array_equal(refined, lesion & lung)


def test_no_lesion_is_made_where_the_network_found_none() -> None:
    found = _ball(CENTRE, 6.0)
    near = _ball((12.0, 32.0, 41.0), 1.5)  # dense, within the band, not touching the lesion
    far = _ball((12.0, 10.0, 10.0), 4.0)  # dense, beyond the band
    hu, lung = _chest(found | near | far)
    refined = refine_lesion_outline(hu, found, lung, SPACING)
    assert np.array_equal(refined, found)
    assert not (refined & (near | far)).any()


def test_a_faint_false_lesion_is_dropped() -> None:
    hu, lung = _chest(np.zeros(SHAPE, dtype=bool))
    network = _ball(CENTRE, 4.0)  # plain lung, marked by mistake
    assert not refine_lesion_outline(hu, network, lung, SPACING).any()


def test_never_outside_the_lungs_and_a_lesion_filling_its_neighbourhood_stays() -> None:
    hu, lung = _chest(np.ones(SHAPE, dtype=bool))  # every lung voxel dense: no parenchyma
    network = np.zeros(SHAPE, dtype=bool)
    network[10:14, 20:40, 0:40] = True  # reaches into the chest wall
    refined = refine_lesion_outline(hu, network, lung, SPACING)
    assert np.array_equal(refined, network & lung)


def test_off_and_empty_give_the_mask_back_inside_the_lungs() -> None:
    truth = _ball(CENTRE, 8.0)
    hu, lung = _chest(truth)
    network = _ball(CENTRE, 5.0)
    network[0] = True  # outside the lungs
    off = refine_lesion_outline(hu, network, lung, SPACING, NO_REFINEMENT)
    assert np.array_equal(off, network & lung)
    empty = np.zeros(SHAPE, dtype=bool)
    assert not refine_lesion_outline(hu, empty, lung, SPACING).any()
    assert network[0].all()  # the input is not changed


def test_the_contrast_threshold_decides_a_faint_rim() -> None:
    core, rim = _ball(CENTRE, 5.0), _ball(CENTRE, 8.0)
    hu, lung = _chest(core)
    hu[rim & ~core] = -820  # 40 HU above the lung
    low = refine_lesion_outline(hu, core, lung, SPACING, OutlineRefinement(contrast_hu=25.0))
    high = refine_lesion_outline(hu, core, lung, SPACING, OutlineRefinement(contrast_hu=60.0))
    _assert_outline(low, rim & lung)
    assert np.array_equal(high, core & lung)


@pytest.mark.parametrize(
    "kwargs",
    [{"band_mm": -1.0}, {"band_mm": float("nan")}, {"background_mm": 0.0},
     {"contrast_hu": 5000.0}, {"background_max_hu": float("inf")}],
)
def test_bad_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        OutlineRefinement(**kwargs)
