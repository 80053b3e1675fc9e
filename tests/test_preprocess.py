"""Preprocessing (ai/preprocess.py): HU window, lung masking, eq.-12 slice sampling, and the
sliding-window patch grid with its exact inverse mapping."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ai.errors import ImplausibleSpacing, NonFiniteVoxels, NotAVolume, TooFewSlices
from ai.preprocess import (
    FIELD_MARGIN_MM,
    InplaneBox,
    PatchBox,
    PreprocessConfig,
    SlidingWindow,
    apply_lung_mask,
    blend_weights,
    check_volume,
    cls_slice_indices,
    field_of_view_box,
    normalise_hu,
    resize_inplane,
    sample_cls_slices,
    window_starts,
)

torch.set_num_threads(1)


# --------------------------------------------------------------------------- intensities


def test_hu_window_maps_to_unit_range() -> None:
    hu = np.array([-3000.0, -1400.0, -600.0, 0.0, 200.0, 1500.0])
    expected = np.clip((hu + 1400.0) / 1600.0, 0.0, 1.0)
    for x in (hu, torch.from_numpy(hu), hu.astype(np.int16)):
        out = normalise_hu(x)
        assert out.dtype == torch.float32
        np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-7)
    assert normalise_hu(hu)[2].item() == pytest.approx(0.5)


def test_lung_masking() -> None:
    x = torch.rand(4, 8, 8)
    mask = np.zeros((4, 8, 8), dtype=bool)
    mask[1:3, 2:6, 2:6] = True
    out = apply_lung_mask(x, mask)
    assert torch.equal(out[torch.from_numpy(mask)], x[torch.from_numpy(mask)])
    assert not out[torch.from_numpy(~mask)].any()
    with pytest.raises(ValueError, match="lung mask shape"):
        apply_lung_mask(x, mask[:2])


# --------------------------------------------------------------------------- classification


@pytest.mark.parametrize("s", [1, 20, 48, 49, 97, 300, 601])
def test_cls_slice_indices_follow_eq_12(s: int) -> None:
    idx = cls_slice_indices(s, 48)
    assert idx.tolist() == [int(np.floor(k * s / 48)) for k in range(48)]
    assert idx.min() >= 0 and idx.max() < s
    assert np.all(np.diff(idx) >= 0)


def test_cls_slice_indices_errors() -> None:
    with pytest.raises(ValueError):
        cls_slice_indices(0, 48)
    with pytest.raises(ValueError):
        cls_slice_indices(10, 0)


def test_sample_cls_slices_picks_and_resizes() -> None:
    s = 100
    vol = np.broadcast_to(np.arange(s, dtype=np.float32)[:, None, None], (s, 64, 80)).copy()
    out = sample_cls_slices(vol, PreprocessConfig(cls_size=(32, 48)))
    assert out.shape == (48, 32, 48) and out.dtype == torch.float32
    # A constant slice stays constant under resizing: each output slice is its source index.
    np.testing.assert_allclose(out[:, 5, 7].numpy(), cls_slice_indices(s, 48), atol=1e-5)


def test_resize_inplane_modes() -> None:
    x = torch.zeros(2, 8, 8)
    x[:, :4] = 1.0
    assert resize_inplane(x, (8, 8)) is x
    down = resize_inplane(x, (4, 4))  # antialiased: a smooth edge, the mean kept
    assert down.shape == (2, 4, 4)
    assert down[:, 0].eq(1).all() and down[:, -1].eq(0).all()
    assert down.mean().item() == pytest.approx(0.5)
    labels = resize_inplane(x, (16, 16), mode="nearest")
    assert set(labels.unique().tolist()) == {0.0, 1.0}
    with pytest.raises(ValueError, match="mode"):
        resize_inplane(x, (4, 4), mode="cubic")


# --------------------------------------------------------------------------- patch grid


@pytest.mark.parametrize("length", [7, 24, 25, 47, 48, 100, 300])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_window_starts_cover_with_fewest_windows(length: int, overlap: float) -> None:
    patch = 24
    starts = window_starts(length, patch, overlap)
    covered = np.zeros(length, dtype=int)
    for s in starts:
        covered[max(s, 0) : min(s + patch, length)] += 1
    assert covered.min() >= 1
    if length < patch:
        assert starts == [-((patch - length) // 2)]
        return
    assert starts[0] == 0 and starts[-1] == length - patch
    stride = int(np.floor(patch * (1 - overlap)))
    assert np.all(np.diff(starts) <= stride)
    # one window fewer could not cover with that stride
    assert len(starts) == int(np.ceil((length - patch) / stride)) + 1


def _round_trip(shape, config: PreprocessConfig) -> tuple[SlidingWindow, torch.Tensor]:
    window = SlidingWindow(shape, config)
    grid = torch.rand(window.grid_shape, generator=torch.Generator().manual_seed(0))
    acc = window.accumulator()
    for boxes in window.batches(3):
        acc.add_batch(boxes, window.extract_batch(grid, boxes, pad_value=-5.0))
    return window, grid, acc


@pytest.mark.parametrize("blend", ["gaussian", "linear", "constant"])
@pytest.mark.parametrize("overlap", [0.0, 0.5])
@pytest.mark.parametrize("shape", [(37, 70, 90), (12, 40, 40), (24, 32, 64)])
def test_patches_blend_back_to_the_grid_exactly(shape, overlap: float, blend: str) -> None:
    """An identity model reproduces its input: every voxel is covered, the padded parts are
    dropped, and blending weights normalise."""
    cfg = PreprocessConfig(seg_patch=(16, 32, 32), seg_overlap=overlap, blend=blend, min_slices=8)
    window, grid, acc = _round_trip(shape, cfg)
    torch.testing.assert_close(acc.result(), grid, rtol=0, atol=1e-5)


def test_boxes_stay_on_the_grid_unless_it_is_smaller() -> None:
    cfg = PreprocessConfig(seg_patch=(24, 64, 64), min_slices=12)
    window = SlidingWindow((14, 100, 64), cfg)
    assert len(window) == 1 * 2 * 1
    for box in window:
        assert box.shape == (24, 64, 64)
        assert box.z0 == -5 and box.z1 == 19  # 14 slices, centred, padded 5 + 5
        assert box.y0 >= 0 and box.y1 <= 100 and (box.x0, box.x1) == (0, 64)
        grid_sl, patch_sl = box.inside()
        assert grid_sl[0] == slice(0, 14) and patch_sl[0] == slice(5, 19)


def test_padding_value_and_box_fractions() -> None:
    cfg = PreprocessConfig(seg_patch=(16, 32, 32), min_slices=8)
    window = SlidingWindow((10, 32, 32), cfg)
    (box,) = window.boxes
    patch = window.extract(torch.ones(window.grid_shape), box, pad_value=-1.0)
    assert patch.shape == (16, 32, 32)
    assert (patch[:3] == -1).all() and (patch[3:13] == 1).all() and (patch[13:] == -1).all()
    assert box.fractions() == pytest.approx((-0.3, 1.3, 0.0, 1.0, 0.0, 1.0))
    assert box.to_dict()["grid_shape"] == [10, 32, 32]


def test_default_paper_geometry_on_a_512_scan() -> None:
    window = SlidingWindow((300, 512, 512))
    assert window.grid_shape == (300, 512, 512)
    assert {b.shape for b in window} == {(24, 256, 256)}
    assert len(window) == 13 * 2 * 2  # 2 x 2 tiles in-plane (paper), 13 windows along z


def test_downscaled_segmentation_grid_blends_patches_back_exactly() -> None:
    cfg = PreprocessConfig(seg_patch=(24, 64, 64), seg_inplane_size=(64, 64), min_slices=12)
    window = SlidingWindow((30, 128, 96), cfg)
    assert window.native_shape == (30, 128, 96)
    assert window.grid_shape == (30, 64, 64)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    grid = (yy + 2 * xx).expand(30, 64, 64)
    acc = window.accumulator(channels=2)
    for box in window:
        patch = window.extract(grid, box)
        acc.add(box, torch.stack([patch, 1 - patch]))
    blended = acc.result()
    assert blended.shape == (2, 30, 64, 64)
    assert torch.allclose(blended[0], grid, atol=1e-5)
    assert torch.allclose(blended[1], 1 - grid, atol=1e-5)
    with pytest.raises(ValueError, match="segmentation grid"):
        window.extract(torch.zeros(30, 128, 96), window.boxes[0])


def test_accumulator_checks_shapes() -> None:
    window = SlidingWindow((24, 64, 64), PreprocessConfig(seg_patch=(24, 64, 64)))
    acc = window.accumulator()
    with pytest.raises(ValueError, match="patch output shape"):
        acc.add(window.boxes[0], torch.zeros(24, 32, 32))


def test_blend_weights() -> None:
    for mode in ("gaussian", "linear", "constant"):
        w = blend_weights((8, 16, 16), mode)
        assert w.shape == (8, 16, 16)
        assert w.max() == pytest.approx(1.0) and w.min() > 0
        assert torch.equal(w, w.flip(0)) and torch.equal(w, w.flip(2))
    with pytest.raises(ValueError):
        blend_weights((4, 4, 4), "cosine")


def test_patch_box_is_plain_data() -> None:
    box = PatchBox(0, 24, -8, 248, 0, 256, (30, 240, 256))
    assert box.shape == (24, 256, 256)
    grid_sl, patch_sl = box.inside()
    assert grid_sl[1] == slice(0, 240) and patch_sl[1] == slice(8, 248)


# --------------------------------------------------------------------------- config and input


def test_config_round_trip_and_validation() -> None:
    cfg = PreprocessConfig(seg_inplane_size=(256, 256), seg_patch=(24, 128, 128), blend="linear")
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["seg_patch"] == [24, 128, 128]
    with pytest.raises(ValueError, match="unknown preprocessing config keys: colour"):
        PreprocessConfig.from_dict({"colour": 1})
    for bad in (
        {"hu_window": (200.0, -1400.0)},
        {"seg_overlap": 1.0},
        {"blend": "max"},
        {"seg_patch": (24, 0, 256)},
        {"n_cls_slices": 0},
        {"min_slices": 0},
        {"field_of_view_mm": 50.0},
        {"field_of_view_mm": float("nan")},
    ):
        with pytest.raises(ValueError):
            PreprocessConfig(**bad)


def test_check_volume() -> None:
    vol = np.zeros((20, 64, 64), dtype=np.float32)
    assert check_volume(vol, (2, 0.7, 0.7)) == (2.0, 0.7, 0.7)
    assert check_volume(vol.astype(np.int16), [2, 0.7, 0.7]) == (2.0, 0.7, 0.7)
    with pytest.raises(NotAVolume, match="3D"):
        check_volume(vol[0], (2, 0.7, 0.7))
    with pytest.raises(NotAVolume, match="in-plane size"):
        check_volume(vol[:, :16], (2, 0.7, 0.7))
    with pytest.raises(NotAVolume, match="three numbers"):
        check_volume(vol, "2 mm")
    with pytest.raises(ImplausibleSpacing, match="row \\(dy\\) spacing 0 mm"):
        check_volume(vol, (2, 0, 0.7))
    with pytest.raises(TooFewSlices, match="volume has 5 slices; at least 12"):
        check_volume(vol[:5], (2, 0.7, 0.7))
    bad = torch.from_numpy(vol.copy())
    bad[1, 2, 3] = float("nan")
    with pytest.raises(NonFiniteVoxels, match="1 NaN/infinite voxels"):
        check_volume(bad, (2, 0.7, 0.7))


def _lungs(rows: slice, columns: slice, shape: tuple[int, int, int] = (4, 100, 120)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[1:3, rows, columns] = True
    return mask


def test_the_field_of_view_is_a_square_in_mm_centred_on_the_lungs() -> None:
    """Rows 30:50, columns 20:80 at 2 x 1 mm pixels: lungs 40 mm deep and 60 mm wide; a
    200 mm field is 100 rows and 200 columns around their centre (row 40, column 50),
    reaching beyond the 100 x 120 matrix."""
    lungs = _lungs(slice(30, 50), slice(20, 80))
    assert field_of_view_box(lungs, (5, 2, 1), PreprocessConfig()) == InplaneBox.whole(100, 120)
    box = field_of_view_box(lungs, (5, 2, 1), PreprocessConfig(field_of_view_mm=200))
    assert box == InplaneBox(-10, 90, -50, 150) and box.size == (100, 200)
    # Lungs wider than the field: widened to hold them with a margin on each side.
    wide = field_of_view_box(lungs, (5, 4, 4), PreprocessConfig(field_of_view_mm=200))
    assert 60 * 4 + 2 * FIELD_MARGIN_MM == 65 * 4
    assert wide.size == (66, 66)  # 65 cells, and one more to centre them exactly
    assert (wide.y0 + wide.y1, wide.x0 + wide.x1) == (80, 100)  # centred: 2 x (40, 50)
    # No lungs: the whole matrix.
    assert field_of_view_box(np.zeros((4, 100, 120), bool), (5, 2, 1),
                             PreprocessConfig(field_of_view_mm=200)) == InplaneBox.whole(100, 120)


@pytest.mark.parametrize("columns", [slice(20, 80), slice(20, 81), slice(3, 50)])
def test_a_mirrored_scan_gets_the_mirrored_field_of_view(columns: slice) -> None:
    """Whatever the parity of the lungs' width and the field's, the box is centred
    exactly, so test-time mirroring sums passes over mirrored inputs."""
    cfg = PreprocessConfig(field_of_view_mm=101.0)
    lungs = _lungs(slice(30, 50), columns)
    box = field_of_view_box(lungs, (5, 1, 1), cfg)
    mirrored = field_of_view_box(lungs[:, :, ::-1], (5, 1, 1), cfg)
    assert (mirrored.x0, mirrored.x1) == (120 - box.x1, 120 - box.x0)
    assert abs(box.size[1] - 101) <= 1


def test_a_field_of_view_crops_with_zeros_beyond_the_matrix() -> None:
    x = torch.arange(2 * 4 * 5, dtype=torch.float32).reshape(2, 4, 5) + 1
    assert InplaneBox.whole(4, 5).crop(x) is x
    out = InplaneBox(-1, 3, 2, 7).crop(x)
    assert out.shape == (2, 4, 5)
    assert torch.equal(out[:, 1:, :3], x[:, :3, 2:])
    assert not out[:, 0].any() and not out[:, :, 3:].any()
    assert InplaneBox(-1, 3, 2, 7).overlap(4, 5) == ((slice(0, 3), slice(2, 5)),
                                                      (slice(1, 4), slice(0, 3)))
    # Positions: a box of 8 columns from column 2 on a grid of 4 cells: 2 columns a cell.
    np.testing.assert_allclose(InplaneBox(0, 4, 2, 10).positions(12, 4, axis=1),
                               (np.arange(12) - 2 + 0.5) / 2 - 0.5)
