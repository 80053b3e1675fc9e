"""SEG and TID 1500 SR: valid per dciodvfy, and they say exactly what the analysis found."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from ai.analysis import ScanAnalysis, analyse_lesions
from ai.labels import Diagnosis
from dicomnode.outputs import RESEARCH_NOTICE, OutputSeries, Provenance, output_series_number
from dicomnode.outputs.seg import (
    FIRST_LESION_SEGMENT,
    LESIONS_SEGMENT,
    LUNG_SEGMENT,
    SegmentationOutput,
    build_segmentation,
)
from dicomnode.outputs.sr import (
    CAVEAT,
    COVID19,
    DIAGNOSIS,
    LVR,
    OUTLINE_CLOSING,
    PERIPHERAL_THICKNESS,
    PLR,
    PNEUMONIA,
    build_failure_notice,
    build_report,
)
from dicomnode.volume import CTVolume, read_series
from tests.conftest import dciodvfy_errors, store_prone
from training.phantoms import Phantom, generate_phantom, write_dicom_series

PROVENANCE = Provenance(
    device_uid="1.2.826.0.1.3680043.10.1011.1", model_name="DeepSC-COVID lite", model_version="test"
)


@pytest.fixture(scope="module", params=["covid", "normal"])
def case(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Phantom, CTVolume, ScanAnalysis]:
    phantom = generate_phantom(request.param, 21, slices=24, size=96)
    files = write_dicom_series(phantom, tmp_path_factory.mktemp("ct"))
    volume = read_series(files)
    if not np.array_equal(volume.hu, phantom.volume_hu.astype(np.float32)):
        phantom = _flipped(phantom)  # the writer stacked the other way round
    stats = analyse_lesions(volume.hu, phantom.lesion_mask, phantom.lung_mask, volume.spacing_mm)
    return phantom, volume, stats


def _flipped(phantom: Phantom) -> Phantom:
    return dataclasses.replace(
        phantom,
        volume_hu=phantom.volume_hu[::-1],
        lung_mask=phantom.lung_mask[::-1],
        lesion_mask=phantom.lesion_mask[::-1],
    )


@pytest.mark.parametrize("omit_empty_frames", [True, False])
def test_seg_is_valid_and_reproduces_the_masks(
    case: tuple[Phantom, CTVolume, ScanAnalysis], tmp_path: Path, omit_empty_frames: bool
) -> None:
    phantom, volume, stats = case
    out = build_segmentation(
        volume.datasets,
        phantom.lung_mask,
        phantom.lesion_mask,
        stats.lesions,
        PROVENANCE,
        max_lesion_segments=3,
        omit_empty_frames=omit_empty_frames,
    )
    path = tmp_path / "seg.dcm"
    out.dataset.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    assert out.dataset.SeriesDate == out.dataset.ContentDate
    assert out.dataset.SeriesTime == out.dataset.ContentTime
    # every segment its own colour: a viewer that merges them still tells lesions apart
    colours = [tuple(s.RecommendedDisplayCIELabValue) for s in out.dataset.SegmentSequence]
    assert len(set(colours)) == len(colours)
    segments = 2 + len(out.lesion_segments)
    dense = len(volume.datasets) * segments
    if omit_empty_frames:  # one frame per slice where a segment has voxels
        planes = [phantom.lung_mask, phantom.lesion_mask & phantom.lung_mask]
        for stats_index in out.lesion_segments:
            lesion = next(s for s in stats.lesions if s.index == stats_index)
            z0, z1 = lesion.bbox_voxels[:2]
            planes.append(np.zeros(phantom.lung_mask.shape[0], bool))
            planes[-1][z0:z1] = True
        expected = sum(int(p.reshape(p.shape[0], -1).any(1).sum()) for p in planes)
        assert int(out.dataset.NumberOfFrames) == expected < dense
    else:
        assert int(out.dataset.NumberOfFrames) == dense

    seg = hd.seg.segread(path)
    # Named after its CT series: a study's lung and soft-tissue series both get one.
    assert seg.SeriesDescription == f"AI lesions (DeepSC) S{volume.datasets[0].SeriesNumber}"
    has_lesion = bool((phantom.lesion_mask & phantom.lung_mask).any())
    assert seg.SegmentsOverlap == ("YES" if has_lesion else "NO")  # lesions lie in the lungs
    assert seg.StudyInstanceUID == volume.datasets[0].StudyInstanceUID
    ct_uids = [ds.SOPInstanceUID for ds in volume.datasets]
    masks = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=ct_uids,
        combine_segments=False,
        segment_numbers=[LUNG_SEGMENT, LESIONS_SEGMENT],
        skip_overlap_checks=True,
    )
    assert np.array_equal(masks[..., 0] > 0, phantom.lung_mask)
    assert np.array_equal(masks[..., 1] > 0, phantom.lesion_mask & phantom.lung_mask)
    assert seg.get_segment_description(LUNG_SEGMENT).segmented_property_type == codes.SCT.Lung
    assert seg.get_segment_description(LESIONS_SEGMENT).segmented_property_type == codes.SCT.Lesion
    assert len(out.lesion_segments) == min(3, len(stats.lesions))
    for stats_index, number in out.lesion_segments.items():
        single = (
            seg.get_pixels_by_source_instance(
                source_sop_instance_uids=ct_uids,
                segment_numbers=[number],
                combine_segments=False,
                skip_overlap_checks=True,
            )[..., 0]
            > 0
        )
        lesion = next(s for s in stats.lesions if s.index == stats_index)
        assert int(single.sum()) == lesion.voxels
        assert number == FIRST_LESION_SEGMENT + stats_index - 1


def test_seg_of_a_prone_series_maps_the_masks_back_to_the_stored_pixels(
    tmp_path: Path,
) -> None:
    """The volume was turned to the display convention; each SEG frame must still lie on
    its source image's stored pixel grid."""
    phantom = generate_phantom("cap", 22, slices=16, size=64)
    files = write_dicom_series(phantom, tmp_path / "ct")
    for path in files:
        store_prone(path)
    volume = read_series(files)
    assert volume.stored_flips == (True, True)
    if not np.array_equal(volume.hu, phantom.volume_hu.astype(np.float32)):
        phantom = _flipped(phantom)
    stats = analyse_lesions(volume.hu, phantom.lesion_mask, phantom.lung_mask, volume.spacing_mm)
    out = build_segmentation(volume.datasets, phantom.lung_mask, phantom.lesion_mask,
                             stats.lesions, PROVENANCE, max_lesion_segments=1,
                             stored_flips=volume.stored_flips)
    path = tmp_path / "seg.dcm"
    out.dataset.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    masks = hd.seg.segread(path).get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in volume.datasets],
        combine_segments=False, segment_numbers=[LUNG_SEGMENT, LESIONS_SEGMENT],
        skip_overlap_checks=True,
    )
    assert np.array_equal(masks[..., 0] > 0, volume.to_stored(phantom.lung_mask))
    assert np.array_equal(masks[..., 1] > 0,
                          volume.to_stored(phantom.lesion_mask & phantom.lung_mask))
    assert not np.array_equal(masks[..., 0] > 0, phantom.lung_mask)


def _segmentation(case: tuple[Phantom, CTVolume, ScanAnalysis]) -> SegmentationOutput:
    phantom, volume, stats = case
    return build_segmentation(
        volume.datasets, phantom.lung_mask, phantom.lesion_mask, stats.lesions, PROVENANCE
    )


def test_each_analysed_series_numbers_its_outputs_after_itself(
    case: tuple[Phantom, CTVolume, ScanAnalysis],
) -> None:
    """A study with its lung and soft-tissue series both analysed lists two sets of
    results: each set takes numbers from its CT series (9000 + 10 n + the kind), not
    two SEGs 9001 side by side."""
    _, volume, stats = case
    header = volume.datasets[0]
    assert int(header.SeriesNumber) == 1
    seg = _segmentation(case)
    sr = build_report(volume.datasets, seg.dataset, seg.lesion_segments, stats,
                      (0.2, 0.3, 0.5), Diagnosis.NON_PNEUMONIA, PROVENANCE)
    notice = build_failure_notice(header, "no lungs found", PROVENANCE)
    assert (seg.dataset.SeriesNumber, sr.SeriesNumber, notice.SeriesNumber) == (9011, 9012, 9019)
    for number, expected in ((3, 9031), (0, 9001), (4711, 56111), (-2, 9001), ("", 9001),
                             (None, 9001), (2**31 // 10, 9001)):
        other = Dataset()
        other.SeriesNumber = number
        assert output_series_number(OutputSeries.SEG, other) == expected, number
    assert output_series_number(OutputSeries.NOTICE_IMAGE, Dataset()) == 9008


def test_sr_is_valid_and_carries_the_result(
    case: tuple[Phantom, CTVolume, ScanAnalysis], tmp_path: Path
) -> None:
    _, volume, stats = case
    seg = _segmentation(case)
    diagnosis = Diagnosis.COVID19 if stats.lesion_count else Diagnosis.NON_PNEUMONIA
    probabilities = (0.8, 0.15, 0.05) if stats.lesion_count else (0.05, 0.05, 0.9)
    sr = build_report(
        volume.datasets,
        seg.dataset,
        seg.lesion_segments,
        stats,
        probabilities,
        diagnosis,
        PROVENANCE,
    )
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []

    sr = hd.sr.srread(path)
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    assert (sr.SeriesDate, sr.SeriesTime) == (sr.ContentDate, sr.ContentTime)
    assert sr.PreliminaryFlag == "PRELIMINARY"
    [study_group] = sr.content.get_image_measurement_groups()
    assert study_group.tracking_identifier == "AI diagnosis"
    evaluations = {e.name: e.value for e in study_group.get_qualitative_evaluations()}
    if diagnosis == Diagnosis.COVID19:
        assert evaluations[DIAGNOSIS] == COVID19
        assert evaluations[PNEUMONIA] == codes.SCT.Present
    else:
        assert DIAGNOSIS not in evaluations
        assert evaluations[PNEUMONIA] == codes.SCT.Absent
    numbers = {m.name: float(m.value) for m in study_group.get_measurements()}
    assert numbers[LVR] == pytest.approx(100 * stats.lvr, abs=1e-3)
    # How the PLR was measured travels with it.
    assert (numbers[PERIPHERAL_THICKNESS], numbers[OUTLINE_CLOSING]) == (
        stats.peripheral_thickness_mm, stats.outline_closing_mm)
    assert (PLR in numbers) == (stats.plr is not None)
    if stats.plr is not None:
        assert numbers[PLR] == pytest.approx(100 * stats.plr, abs=1e-3)
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert evidence == {ds.SOPInstanceUID for ds in volume.datasets} | {seg.dataset.SOPInstanceUID}
    # One volumetric group per SEG segment, each pointing at its segment of this SEG.
    volumetric = sr.content.get_volumetric_roi_measurement_groups()
    referenced = [g.referenced_segment for g in volumetric]
    assert {n for r in referenced for n in r.referenced_segment_numbers} == {
        LUNG_SEGMENT,
        LESIONS_SEGMENT,
        *seg.lesion_segments.values(),
    }
    assert {r.referenced_sop_instance_uid for r in referenced} == {seg.dataset.SOPInstanceUID}
    lesion_volumes = {g.tracking_identifier: g for g in volumetric}
    for label, mean_hu in (("Lungs", stats.lung_mean_hu),
                           ("Pneumonia lesions", stats.lesion_mean_hu)):
        measured = [float(m.value) for m in lesion_volumes[label].get_measurements()
                    if m.name == codes.DCM.AttenuationCoefficient]
        assert measured == ([] if mean_hu is None else [pytest.approx(mean_hu, abs=1e-3)])
    for lesion in stats.lesions[: len(seg.lesion_segments)]:
        [volume_ml] = [
            float(m.value)
            for m in lesion_volumes[f"Lesion {lesion.index}"].get_measurements()
            if m.name == codes.SCT.Volume
        ]
        assert volume_ml == pytest.approx(lesion.volume_ml, rel=1e-3)
    # Each group tracks its finding under its SEG segment's Tracking UID (PS3.3 C.8.20.4).
    seg_tracking = {int(item.SegmentNumber): item.TrackingUID
                    for item in seg.dataset.SegmentSequence}
    for group, reference in zip(volumetric, referenced, strict=True):
        [number] = reference.referenced_segment_numbers
        assert group.tracking_uid == seg_tracking[number]
    # The research-use statement, as in every output.
    root = sr.ContentSequence
    [container] = [item for item in root if item.ConceptNameCodeSequence[0].CodeValue
                   == "C0034375"]
    assert container.ContentSequence[0].TextValue == RESEARCH_NOTICE
    assert not [item for item in container.ContentSequence
                if item.TextValue.startswith(CAVEAT)]


def test_sr_states_each_caveat_beside_the_research_notice(
    case: tuple[Phantom, CTVolume, ScanAnalysis], tmp_path: Path
) -> None:
    _, volume, stats = case
    seg = _segmentation(case)
    caveats = ["The lungs touch the edge of the field of view.", "The scan range is short."]
    sr = build_report(volume.datasets, seg.dataset, seg.lesion_segments, stats,
                      (0.8, 0.15, 0.05), Diagnosis.COVID19, PROVENANCE, caveats=caveats)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    [container] = [item for item in hd.sr.srread(path).ContentSequence
                   if item.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    texts = [item.TextValue for item in container.ContentSequence]
    assert texts[:3] == [RESEARCH_NOTICE, *(CAVEAT + c for c in caveats)]


def test_sr_with_the_tid_1600_image_library_lists_every_ct_image(
    case: tuple[Phantom, CTVolume, ScanAnalysis], tmp_path: Path
) -> None:
    _, volume, stats = case
    seg = _segmentation(case)
    sr = build_report(volume.datasets, seg.dataset, seg.lesion_segments, stats,
                      (0.8, 0.15, 0.05), Diagnosis.COVID19, PROVENANCE, image_library=True)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    [library] = [item for item in sr.ContentSequence
                 if item.ConceptNameCodeSequence[0].CodeValue == "111028"]  # Image Library
    images = {image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
              for group in library.ContentSequence for image in group.ContentSequence
              if image.ValueType == "IMAGE"}
    assert images == {ds.SOPInstanceUID for ds in volume.datasets}


def test_failure_notice_is_a_valid_sr_that_says_why(
    case: tuple[Phantom, CTVolume, ScanAnalysis], tmp_path: Path
) -> None:
    from dicomnode.outputs.sr import NOT_ANALYSED

    _, volume, _ = case
    notice = build_failure_notice(volume.datasets[0], "no lungs found", PROVENANCE)
    path = tmp_path / "notice.dcm"
    notice.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    read = hd.sr.srread(path)
    assert read.StudyInstanceUID == volume.datasets[0].StudyInstanceUID
    assert read.ConceptNameCodeSequence[0].CodeValue == NOT_ANALYSED.value
    assert "not analysed: no lungs found" in read.ContentSequence[0].TextValue


def test_a_job_key_makes_the_output_uids_the_same_on_every_attempt(
    case: tuple[Phantom, CTVolume, ScanAnalysis],
) -> None:
    phantom, volume, stats = case

    def uids(provenance: Provenance) -> list[str]:
        seg = build_segmentation(volume.datasets, phantom.lung_mask, phantom.lesion_mask,
                                 stats.lesions, provenance, max_lesion_segments=3)
        sr = build_report(volume.datasets, seg.dataset, seg.lesion_segments, stats,
                          (0.2, 0.3, 0.5), Diagnosis.NON_PNEUMONIA, provenance)
        tracking = [str(s.TrackingUID) for s in seg.dataset.SegmentSequence]
        return [seg.dataset.SeriesInstanceUID, seg.dataset.SOPInstanceUID, *tracking,
                sr.SeriesInstanceUID, sr.SOPInstanceUID]

    job = dataclasses.replace(PROVENANCE, job_key="job 7 of series 1.2.3")
    first = uids(job)
    assert uids(job) == first
    assert len(set(first)) == len(first)  # every part its own UID
    assert set(uids(dataclasses.replace(job, job_key="job 8 of series 1.2.3"))).isdisjoint(first)
    assert set(uids(dataclasses.replace(job, model_version="other"))).isdisjoint(first)
    assert set(uids(PROVENANCE)).isdisjoint(uids(PROVENANCE))  # no job: new every time
