"""Whole-scan inference with a tiny random model (a test fixture, not a result)."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ai import infer
from ai.analysis import analyse_lesions
from ai.checkpoint import (
    Checkpoint,
    CheckpointError,
    Provenance,
    WeightsMissing,
    load_checkpoint,
    preprocess_config_for,
    save_checkpoint,
)
from ai.errors import NoLungsFound, NonFiniteVoxels, NotAVolume, TooFewSlices
from ai.labels import CLASS_NAMES, Diagnosis, diagnosis_rule
from ai.lungs import label_lungs
from ai.model import ModelConfig, build_model
from ai.preprocess import (
    InplaneBox,
    SlidingWindow,
    apply_lung_mask,
    normalise_hu,
    resize_inplane,
)
from ai.refine import NO_REFINEMENT, OutlineRefinement, refine_lesion_outline

torch.set_num_threads(1)

SPACING = (2.5, 0.8, 0.8)


def save_tiny(path: Path, task: str = "joint") -> Path:
    """A random tiny model whose lesion output starts near 0.5, so masks are not empty."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(ModelConfig.named("tiny", task), seg_prior=0.5)
    model = build_model(cfg)
    save_checkpoint(path, model, preprocess_config_for(cfg), Provenance.now("random", 0))
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    return load_checkpoint(save_tiny(tmp_path_factory.mktemp("ckpt") / "tiny.pt"), "cpu")


def chest(slices: int = 24, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic chest in HU: body, two lungs with texture, a ground-glass lesion."""
    z, y, x = np.meshgrid(
        np.linspace(-1, 1, slices), np.linspace(-1, 1, size), np.linspace(-1, 1, size),
        indexing="ij",
    )  # fmt: skip
    vol = np.full(z.shape, -1000.0, dtype=np.float32)
    vol[(y / 0.8) ** 2 + (x / 0.95) ** 2 < 1] = 40.0
    lungs = np.zeros(z.shape, dtype=bool)
    for cx in (-0.45, 0.45):
        lungs |= ((x - cx) / 0.35) ** 2 + (y / 0.6) ** 2 + (z / 0.9) ** 2 < 1
    rng = np.random.default_rng(0)
    vol[lungs] = -850.0 + rng.normal(0, 40, int(lungs.sum()))
    lesion = lungs & (((x - 0.45) / 0.15) ** 2 + ((y - 0.1) / 0.2) ** 2 + (z / 0.3) ** 2 < 1)
    vol[lesion] = -550.0
    return vol, lungs


def test_outputs_have_the_contract_shapes_and_types(ckpt: Checkpoint) -> None:
    vol, lungs = chest()
    a = infer.analyse(vol, SPACING, checkpoint=ckpt, lung_mask=lungs)
    assert a.lesion_mask.shape == vol.shape and a.lesion_mask.dtype == bool
    assert a.lung_mask.shape == vol.shape and a.lung_mask.dtype == bool
    assert np.array_equal(a.lung_mask, lungs)
    assert a.evidence_map.shape == vol.shape and a.evidence_map.dtype == np.float16
    assert a.evidence_map.min() >= 0.0 and a.evidence_map.max() == pytest.approx(1.0)
    assert list(a.probabilities) == list(CLASS_NAMES)
    assert sum(a.probabilities.values()) == pytest.approx(1.0, abs=1e-6)
    assert isinstance(a.diagnosis, Diagnosis)
    assert CLASS_NAMES[a.diagnosis] == max(a.probabilities, key=a.probabilities.__getitem__)
    assert a.evidence_class in (Diagnosis.COVID19, Diagnosis.CAP)
    assert 0.0 < a.lvr <= 1.0 and a.plr is not None and 0.0 <= a.plr <= 1.0
    assert len(a.lesions) == a.stats.lesion_count > 0
    assert a.lvr == pytest.approx(a.lesion_mask.sum() / lungs.sum())
    assert {"preprocess", "lungs", "segmentation", "classification", "analysis"} <= set(a.timings)
    assert a.model["checkpoint_sha256"] == ckpt.sha256 and a.model["device"] == "cpu"
    # how it ran, for the outputs' algorithm parameters: a CPU neither mirrors nor overlaps
    assert (a.model["mirror"], a.model["window_overlap"], a.model["threshold"]) == (
        False, 0.0, infer.DEFAULT_THRESHOLD)


def test_masks_and_evidence_stay_inside_the_lungs(ckpt: Checkpoint) -> None:
    vol, lungs = chest()
    a = infer.analyse(vol, SPACING, checkpoint=ckpt, lung_mask=lungs)
    assert a.lesion_mask.any() and not (a.lesion_mask & ~lungs).any()
    assert np.all(a.evidence_map[~lungs] == 0)


def test_small_components_are_removed(ckpt: Checkpoint) -> None:
    vol, lungs = chest()
    every = infer.analyse(vol, SPACING, checkpoint=ckpt, lung_mask=lungs, min_lesion_mm3=0)
    big = infer.analyse(vol, SPACING, checkpoint=ckpt, lung_mask=lungs, min_lesion_mm3=200)
    assert not (big.lesion_mask & ~every.lesion_mask).any()
    voxel = float(np.prod(SPACING))
    assert all(lesion.voxels * voxel >= 200 for lesion in big.lesions)
    assert big.stats.lesion_count < every.stats.lesion_count


def test_cpu_runs_are_deterministic(ckpt: Checkpoint) -> None:
    vol, lungs = chest()
    a = infer.analyse(vol, SPACING, checkpoint=ckpt, lung_mask=lungs)
    b = infer.analyse(vol, SPACING, checkpoint=ckpt, lung_mask=lungs)
    assert np.array_equal(a.lesion_mask, b.lesion_mask)
    assert np.array_equal(a.evidence_map, b.evidence_map)
    assert a.probabilities == b.probabilities


def test_window_batches_are_bounded_and_do_not_change_the_result(ckpt: Checkpoint) -> None:
    vol, lungs = chest()
    sizes: list[int] = []
    original = ckpt.model.segment_window

    def spy(x: torch.Tensor, *args: Any) -> Any:
        sizes.append(x.shape[0])
        return original(x, *args)

    ckpt.model.segment_window = spy  # type: ignore[method-assign]
    try:
        one = infer.predict(ckpt, vol, lungs, SPACING, batch_size=1)
        sizes.clear()
        three = infer.predict(ckpt, vol, lungs, SPACING, batch_size=3)
    finally:
        del ckpt.model.segment_window
    assert sizes and max(sizes) <= 3
    assert sum(sizes) <= len(SlidingWindow(vol.shape, ckpt.preprocess))
    np.testing.assert_allclose(one.lesion_probability, three.lesion_probability, atol=1e-5)
    np.testing.assert_allclose(one.probabilities, three.probabilities, atol=1e-5)


def test_windows_without_lung_are_skipped(ckpt: Checkpoint) -> None:
    vol, lungs = chest()
    lungs[:, :, 32:] = False  # the left half only: windows on the right see zeros
    sizes: list[int] = []
    original = ckpt.model.segment_window

    def spy(x: torch.Tensor, *args: Any) -> Any:
        sizes.append(x.shape[0])
        return original(x, *args)

    ckpt.model.segment_window = spy  # type: ignore[method-assign]
    try:
        pred = infer.predict(ckpt, vol, lungs, SPACING)
    finally:
        del ckpt.model.segment_window
    assert sum(sizes) <= len(SlidingWindow(vol.shape, ckpt.preprocess)) // 2
    assert np.all(pred.lesion_probability[:, :, 32:] == 0)


def test_model_inputs_equal_the_preprocess_definitions(ckpt: Checkpoint) -> None:
    """Slab-wise preprocessing is the same as preprocess.py's whole-volume functions."""
    vol, lungs = chest(slices=70)
    cfg = ckpt.preprocess
    masked = apply_lung_mask(normalise_hu(vol, cfg), lungs)
    window = SlidingWindow(vol.shape, cfg)
    whole = InplaneBox.whole(*vol.shape[1:])
    grid = resize_inplane(masked, window.grid_shape[1:])
    assert torch.equal(infer._seg_grid(vol, lungs, window, whole, cfg), grid)
    for box in window:
        assert infer._patch_box(box.fractions(), window.grid_shape) == box


def test_evidence_is_placed_at_the_true_position(ckpt: Checkpoint) -> None:
    """A CAM peak in feature cell j of a stride-s map lands on input index s * j."""
    cfg = ckpt.preprocess  # classification input 8 x 16 x 16
    shape = (16, 32, 32)  # twice the input on every axis
    maps = [torch.zeros(1, 1, 2, 4, 4), torch.zeros(1, 1, 1, 2, 2), torch.zeros(1, 1, 1, 1, 1)]
    maps[0][0, 0, 1, 2, 1] = 1.0  # stride 4: input (4, 8, 4) -> native (8.5, 16.5, 8.5)
    ev = infer._evidence_to_native(maps, shape, InplaneBox.whole(32, 32), cfg,
                                   np.ones(shape, dtype=bool))
    peak = np.argwhere(ev == ev.max())
    assert peak[:, 1].min() == 16 and peak[:, 1].max() == 17
    assert peak[:, 2].min() == 8 and peak[:, 2].max() == 9
    # The input covering a field of view, rows 8:24 (a native row per input row) and
    # columns -16:48 (four native columns per input column): input row 8 is native row 16,
    # input column 4 is native column 4 * 4 + 1.5 - 16 = 1.5.
    ev = infer._evidence_to_native(maps, shape, InplaneBox(8, 24, -16, 48), cfg,
                                   np.ones(shape, dtype=bool))
    peak = np.argwhere(ev == ev.max())
    assert set(peak[:, 1]) == {16} and set(peak[:, 2]) == {1, 2}
    assert ev.max() == pytest.approx(1.0)
    assert infer._slice_positions(16, 8) == pytest.approx(np.minimum(np.arange(16) / 2, 7))


def test_no_weights_is_an_error_that_says_how_to_get_them(tmp_path: Path, monkeypatch: Any) -> None:
    vol, lungs = chest()
    with pytest.raises(WeightsMissing, match="dicomnode train"):
        infer.analyse(vol, SPACING, checkpoint=tmp_path / "missing.pt", lung_mask=lungs)
    monkeypatch.setattr("ai.checkpoint.default_checkpoint_path", lambda: tmp_path / "d.pt")
    with pytest.raises(WeightsMissing, match="not installed"):
        infer.analyse(vol, SPACING, lung_mask=lungs)


def test_a_single_task_model_is_refused(tmp_path: Path) -> None:
    vol, lungs = chest()
    path = save_tiny(tmp_path / "seg.pt", task="seg")
    with pytest.raises(CheckpointError, match="single-task"):
        infer.analyse(vol, SPACING, checkpoint=path, lung_mask=lungs)
    pred = infer.predict(load_checkpoint(path), vol, lungs, SPACING)
    assert pred.lesion_probability.shape == vol.shape and pred.probabilities is None


@pytest.mark.parametrize(("probabilities", "thresholds", "expected"), [
    ((0.2, 0.3, 0.5), None, Diagnosis.NON_PNEUMONIA),  # the arg-max
    ((0.2, 0.3, 0.5), (0.5, 0.5), Diagnosis.NON_PNEUMONIA),  # no disease reaches 0.5
    ((0.35, 0.1, 0.55), (0.3, 0.5), Diagnosis.COVID19),  # a sensitive COVID-19 call
    ((0.35, 0.4, 0.25), (0.3, 0.3), Diagnosis.CAP),  # both reached: the more probable
    ((0.6, 0.3, 0.1), (0.7, 0.25), Diagnosis.CAP),  # COVID-19 below its own threshold
])
def test_the_diagnosis_follows_the_operating_point(
    probabilities: tuple[float, ...], thresholds: tuple[float, float] | None,
    expected: Diagnosis,
) -> None:
    assert infer.diagnose(probabilities, thresholds) == expected


def test_analyse_calls_and_shows_the_disease_its_thresholds_call(ckpt: Checkpoint) -> None:
    vol, lungs = chest()
    default = infer.analyse(vol, SPACING, checkpoint=ckpt, lung_mask=lungs)
    # CAP from any probability, COVID-19 never: CAP is called, and its evidence shown.
    cap = infer.analyse(vol, SPACING, checkpoint=ckpt, lung_mask=lungs,
                        disease_thresholds=(1.01, 0.0))
    assert cap.diagnosis == Diagnosis.CAP and cap.evidence_class == Diagnosis.CAP
    assert cap.probabilities == default.probabilities  # the operating point, not the model
    assert cap.model["disease_thresholds"] == [1.01, 0.0]  # how it was called, recorded
    assert default.model["disease_thresholds"] is None
    with pytest.raises(ValueError, match="two values"):
        infer.diagnose((0.2, 0.3, 0.5), (0.5,))
    # the call and the lesion mask are separate outputs: where they disagree, it is said
    bare = infer.analyse(vol, SPACING, checkpoint=ckpt, lung_mask=lungs, threshold=0.999,
                         disease_thresholds=(1.01, 0.0))
    assert bare.stats.lesion_count == 0
    assert [c.short for c in bare.caveats] == ["CAP called, but no lesion segmented"]


def test_the_rule_of_the_call_is_said_as_the_node_applies_it() -> None:
    assert diagnosis_rule(None) == diagnosis_rule(()) == "most probable class"
    assert diagnosis_rule((0.3, 0.455)) == (
        "COVID-19 at P >= 30 %, CAP at P >= 45.5 %, else non-pneumonia")


def test_a_call_that_disagrees_with_the_lesions_gets_a_caveat() -> None:
    """The classifier and the lesion subnet answer separately: a non-pneumonia call with
    segmented lesions (or a disease without any) must not read as a plain result."""
    lung = np.zeros((8, 20, 20), dtype=bool)
    lung[:, 2:18, 2:18] = True
    lesion = np.zeros_like(lung)
    lesion[3:5, 5:10, 5:10] = True  # 50 voxels of 20 mm3 in 2,048 of lung
    hu = np.full(lung.shape, -850.0, dtype=np.float32)
    with_lesion = analyse_lesions(hu, lesion, lung, (5.0, 2.0, 2.0))
    without = analyse_lesions(hu, np.zeros_like(lung), lung, (5.0, 2.0, 2.0))

    (candidates,) = infer.call_caveats(Diagnosis.NON_PNEUMONIA, with_lesion)
    assert candidates.short == "No pneumonia called: lesions shown are candidates"
    assert "marks 1 region(s), 1.0 mL (2.44 % of the lungs)" in candidates.detail
    (no_lesion,) = infer.call_caveats(Diagnosis.CAP, without)
    assert no_lesion.short == "CAP called, but no lesion segmented"
    assert infer.call_caveats(Diagnosis.COVID19, with_lesion) == ()
    assert infer.call_caveats(Diagnosis.NON_PNEUMONIA, without) == ()


@pytest.mark.parametrize("field_of_view_mm", [None, 101.0])
def test_mirroring_makes_the_segmentation_mirror_equivariant(
    ckpt: Checkpoint, field_of_view_mm: float | None
) -> None:
    """With test-time mirroring, the lesions of a scan mirrored left-right or flipped
    along its slices are exactly the flipped lesions (each is the average of the same four
    passes), with a field of view too; the classification is the scan's own. (The
    threshold suits the untrained model, whose probabilities lie around 0.5. The outline
    refinement is left out: its coarse grid of parenchyma levels starts at the first voxel,
    so a flipped scan's level can differ in the last digits, and a voxel exactly at the
    contrast threshold with it.)"""
    ckpt = dataclasses.replace(ckpt, preprocess=dataclasses.replace(
        ckpt.preprocess, field_of_view_mm=field_of_view_mm))
    vol, lungs = chest()
    analyse = functools.partial(infer.analyse, refinement=NO_REFINEMENT)
    plain = analyse(vol, SPACING, checkpoint=ckpt, lung_mask=lungs, threshold=0.497)
    one = analyse(vol, SPACING, checkpoint=ckpt, lung_mask=lungs, threshold=0.497,
                  mirror=True)
    assert one.lesion_mask.any()
    assert not np.array_equal(one.lesion_mask, plain.lesion_mask)
    for axes in ((2,), (0,)):
        other = analyse(np.ascontiguousarray(np.flip(vol, axes)), SPACING,
                        checkpoint=ckpt, threshold=0.497, mirror=True,
                        lung_mask=np.ascontiguousarray(np.flip(lungs, axes)))
        np.testing.assert_array_equal(one.lesion_mask, np.flip(other.lesion_mask, axes))
    assert one.probabilities == plain.probabilities
    assert one.timings["segmentation"] > plain.timings["segmentation"] * 2


def test_a_field_of_view_makes_the_answer_independent_of_the_reconstruction(
    ckpt: Checkpoint,
) -> None:
    """The same chest in a wider field, off-centre (the matrix padded with air at the same
    pixel size): with a field of view in mm the network sees the same input, so every
    output is the same, moved with the chest; over the whole matrix it sees the chest
    smaller and answers otherwise."""
    vol, lungs = chest()
    spacing = (2.5, 2.5, 2.5)  # a 160 mm matrix, lungs 128 mm across
    pad = ((0, 0), (10, 22), (30, 2))
    wide_vol, wide_lungs = np.pad(vol, pad, constant_values=-1000.0), np.pad(lungs, pad)
    fixed = dataclasses.replace(
        ckpt, preprocess=dataclasses.replace(ckpt.preprocess, field_of_view_mm=180.0))
    results = {}
    for name, checkpoint in (("fixed", fixed), ("whole", ckpt)):
        results[name] = [
            infer.analyse(v, spacing, checkpoint=checkpoint, lung_mask=m, threshold=0.497)
            for v, m in ((vol, lungs), (wide_vol, wide_lungs))
        ]
    narrow, wide = results["fixed"]
    assert narrow.lesion_mask.any()
    assert narrow.probabilities == wide.probabilities
    np.testing.assert_array_equal(np.pad(narrow.lesion_mask, pad), wide.lesion_mask)
    np.testing.assert_array_equal(np.pad(narrow.evidence_map, pad), wide.evidence_map)
    narrow, wide = results["whole"]
    assert narrow.probabilities != wide.probabilities


def test_overlapping_windows_are_blended_and_chosen_by_device(ckpt: Checkpoint) -> None:
    """`overlap` lays more, overlapping windows over the scan; `analyse` without one keeps
    the checkpoint's windows on a CPU and overlaps them by half on a GPU (`predict`, which
    validation and evaluation use, keeps them everywhere)."""
    vol, lungs = chest(slices=40, size=64)
    assert infer.with_overlap(ckpt, None) is ckpt
    assert infer.auto_overlap(ckpt) is None
    on_gpu = dataclasses.replace(ckpt, device=torch.device("cuda"))
    assert infer.auto_overlap(on_gpu) == infer.GPU_OVERLAP
    overlapping = infer.with_overlap(ckpt, 0.5)
    windows = [len(SlidingWindow(vol.shape, c.preprocess).boxes) for c in (ckpt, overlapping)]
    assert windows[1] > windows[0]
    plain = infer.analyse(vol, SPACING, checkpoint=ckpt, lung_mask=lungs)
    blended = infer.analyse(vol, SPACING, checkpoint=ckpt, lung_mask=lungs, overlap=0.5)
    assert blended.lesion_mask.any() and not (blended.lesion_mask & ~lungs).any()
    assert not np.array_equal(blended.lesion_mask, plain.lesion_mask)
    with pytest.raises(ValueError, match="overlap 0.9 must be in"):
        infer.analyse(vol, SPACING, checkpoint=ckpt, lung_mask=lungs, overlap=0.9)


def test_bad_input_is_refused(ckpt: Checkpoint) -> None:
    vol, lungs = chest()
    bad = vol.copy()
    bad[3, 4, 5] = np.nan
    with pytest.raises(NonFiniteVoxels):
        infer.analyse(bad, SPACING, checkpoint=ckpt, lung_mask=lungs)
    with pytest.raises(TooFewSlices):
        infer.analyse(vol[:6], SPACING, checkpoint=ckpt, lung_mask=lungs[:6])
    with pytest.raises(NotAVolume, match="lung mask shape"):
        infer.analyse(vol, SPACING, checkpoint=ckpt, lung_mask=lungs[:, :32])
    with pytest.raises(NoLungsFound):
        infer.analyse(vol, SPACING, checkpoint=ckpt, lung_mask=np.zeros_like(lungs))
    # A caller's mask skips label_lungs' content checks: it must lie on air-filled lung
    # of a volume in HU, and be binary.
    not_hu = np.random.default_rng(0).uniform(0, 1, vol.shape).astype(np.float32)
    with pytest.raises(NoLungsFound, match="not in HU"):
        infer.analyse(not_hu, SPACING, checkpoint=ckpt, lung_mask=lungs)
    with pytest.raises(NoLungsFound, match="not on the lungs"):
        infer.analyse(vol, SPACING, checkpoint=ckpt, lung_mask=~lungs & (vol > -200))
    with pytest.raises(NotAVolume, match="not binary"):
        infer.analyse(vol, SPACING, checkpoint=ckpt, lung_mask=lungs * 0.5)
    with pytest.raises(ValueError, match="threshold"):
        infer.analyse(vol, SPACING, checkpoint=ckpt, lung_mask=lungs, threshold=1.0)


def test_bad_analysis_settings_are_refused_before_the_network_runs(
    ckpt: Checkpoint, monkeypatch: Any
) -> None:
    vol, lungs = chest()

    def must_not_run(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the network ran")

    monkeypatch.setattr(infer, "_predict", must_not_run)
    with pytest.raises(ValueError, match="peripheral_mm"):
        infer.analyse(vol, SPACING, checkpoint=ckpt, lung_mask=lungs, peripheral_mm=-1.0)
    with pytest.raises(ValueError, match="consolidation_hu"):
        infer.analyse(vol, SPACING, checkpoint=ckpt, lung_mask=lungs,
                      consolidation_hu=float("nan"))


def test_lungs_are_segmented_when_not_given(ckpt: Checkpoint) -> None:
    vol, _ = chest(size=96)
    a = infer.analyse(vol, (8.0, 4.0, 4.0), checkpoint=ckpt)  # a chest-sized volume
    assert a.lung_mask.dtype == bool and a.lung_mask.any()
    assert not (a.lesion_mask & ~a.lung_mask).any()
    assert np.all(a.evidence_map[~a.lung_mask] == 0)


def test_analyse_hands_its_settings_to_the_analysis(ckpt: Checkpoint) -> None:
    """The statistics are those of `analyse_lesions` on the returned masks with the same
    band, consolidation threshold and the lungs' sides (each lesion gets its side)."""
    vol, _ = chest(size=96)
    spacing = (8.0, 4.0, 4.0)
    a = infer.analyse(vol, spacing, checkpoint=ckpt, peripheral_mm=4.0, consolidation_hu=-600.0,
                      min_lesion_mm3=0.0, outline_closing_mm=6.0)
    sides = label_lungs(vol, spacing).sides
    direct = analyse_lesions(vol, a.lesion_mask, a.lung_mask, spacing, lung_sides=sides,
                             peripheral_mm=4.0, consolidation_hu=-600.0, outline_closing_mm=6.0)
    assert a.stats == direct and a.lesions
    assert (direct.peripheral_thickness_mm, direct.consolidation_hu) == (4.0, -600.0)
    assert direct.outline_closing_mm == 6.0
    assert all(lesion.side in ("right", "left") for lesion in a.lesions)


def test_the_lesion_threshold_is_strict(ckpt: Checkpoint, monkeypatch: Any) -> None:
    """A voxel whose probability equals the threshold is not lesion."""
    vol, lungs = chest()
    real = infer._predict

    def at_threshold(*args: Any, **kwargs: Any) -> infer.Prediction:
        pred = real(*args, **kwargs)
        probability = np.where(lungs, 0.5, 0.0).astype(np.float32)
        probability[lungs & (np.arange(vol.shape[0]) < 12)[:, None, None]] = 0.75
        return dataclasses.replace(pred, lesion_probability=probability)

    monkeypatch.setattr(infer, "_predict", at_threshold)
    a = infer.analyse(vol, SPACING, checkpoint=ckpt, lung_mask=lungs, threshold=0.5,
                      refinement=NO_REFINEMENT)
    assert np.array_equal(a.lesion_mask, lungs & (np.arange(vol.shape[0]) < 12)[:, None, None])


def test_the_network_outline_is_refined_by_density(ckpt: Checkpoint, monkeypatch: Any) -> None:
    """`analyse` cuts the probability, re-decides the outline by density (ai/refine.py,
    tested there) and then removes small components; the settings travel with the result."""
    vol, lungs = chest()
    real = infer._predict
    found = np.zeros_like(lungs)
    found[6:10, 20:30, 12:22] = True
    found &= lungs

    def blob(*args: Any, **kwargs: Any) -> infer.Prediction:
        return dataclasses.replace(real(*args, **kwargs),
                                   lesion_probability=found.astype(np.float32))

    monkeypatch.setattr(infer, "_predict", blob)
    refinement = OutlineRefinement(band_mm=8.0, contrast_hu=20.0)
    a = infer.analyse(vol, SPACING, checkpoint=ckpt, lung_mask=lungs, refinement=refinement,
                      min_lesion_mm3=0.0)
    expected = refine_lesion_outline(vol, found, lungs, SPACING, refinement)
    assert not np.array_equal(expected, found)  # the refinement has something to do here
    assert np.array_equal(a.lesion_mask, expected)
    assert (a.model["outline_band_mm"], a.model["outline_contrast_hu"]) == (8.0, 20.0)
    off = infer.analyse(vol, SPACING, checkpoint=ckpt, lung_mask=lungs,
                        refinement=NO_REFINEMENT, min_lesion_mm3=0.0)
    assert np.array_equal(off.lesion_mask, found) and off.model["outline_band_mm"] == 0.0


def test_a_phantom_ct_end_to_end(ckpt: Checkpoint) -> None:
    """int16 HU from training/phantoms.py, lungs segmented by ai.lungs."""
    phantoms = pytest.importorskip("training.phantoms")
    p = phantoms.generate_phantom("covid", 3, slices=32, size=96)
    a = infer.analyse(p.volume_hu, p.spacing_mm, checkpoint=ckpt)
    overlap = np.count_nonzero(a.lung_mask & p.lung_mask)
    assert 2 * overlap / (a.lung_mask.sum() + p.lung_mask.sum()) > 0.9
    assert a.lesion_mask.shape == p.volume_hu.shape
    assert not (a.lesion_mask & ~a.lung_mask).any()
    assert sum(a.probabilities.values()) == pytest.approx(1.0, abs=1e-6)
    assert a.caveats == ()


def test_lungs_clipped_by_the_scan_range_come_with_a_caveat(
    ckpt: Checkpoint, caplog: pytest.LogCaptureFixture
) -> None:
    """The caveat of `ai.lungs` reaches the Analysis (and the log); a caller's lung mask
    has none, since its coverage was not measured."""
    phantoms = pytest.importorskip("training.phantoms")
    p = phantoms.generate_phantom("normal", 2, slices=48, size=64)
    short = p.volume_hu[6:]
    with caplog.at_level("WARNING", logger="ai.infer"):
        a = infer.analyse(short, p.spacing_mm, checkpoint=ckpt)
    [caveat] = a.caveats
    assert caveat == label_lungs(short, p.spacing_mm).caveats[0]
    assert "scan range may not cover the whole lungs" in caveat.detail
    assert [r.getMessage() for r in caplog.records] == [f"analysis caveat: {caveat.detail}"]
    given = infer.analyse(short, p.spacing_mm, checkpoint=ckpt, lung_mask=a.lung_mask)
    assert given.caveats == ()
