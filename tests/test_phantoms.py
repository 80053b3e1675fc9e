"""Synthetic chest CT phantoms: determinism, geometry, paper statistics and the writers."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage as ndi

from ai.labels import Diagnosis
from training.phantoms import (
    HU_MIN,
    MANUFACTURER,
    Phantom,
    add_phantom_arguments,
    generate_phantom,
    parse_kind,
    run_phantom_command,
    write_dicom_series,
    write_nifti,
)

REQUIRE_TOOLS = os.environ.get("DICOMNODE_REQUIRE_TOOLS") == "1"
SAMPLE_SEEDS = range(6)
PERIPHERAL_MM = 10.0


def plr(lung: np.ndarray, lesion: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """Paper eq. 1: share of lesion voxels in the band U_s minus its 2D erosion by a disk of
    PERIPHERAL_MM, slice by slice (outside the image counts as outside the lung)."""
    total = int(np.count_nonzero(lesion))
    if total == 0:
        return 0.0
    inside = 0
    for z in np.flatnonzero(lesion.any(axis=(1, 2))):
        dist = ndi.distance_transform_edt(np.pad(lung[z], 1), sampling=spacing[1:])[1:-1, 1:-1]
        inside += int(np.count_nonzero(lesion[z] & (dist <= PERIPHERAL_MM)))
    return inside / total


def lesion_count(lesion: np.ndarray) -> int:
    return int(ndi.label(lesion, structure=np.ones((3, 3, 3), dtype=bool))[1])


def lungs_touched(phantom: Phantom) -> int:
    """How many of the (two) lung components hold lesion voxels."""
    labels, _ = ndi.label(phantom.lung_mask, structure=np.ones((3, 3, 3), dtype=bool))
    return len(set(np.unique(labels[phantom.lesion_mask]).tolist()) - {0})


@pytest.fixture(scope="module")
def sample() -> dict[str, list[Phantom]]:
    """Six phantoms per class at 48 x 128 x 128, shared by the statistics tests."""
    return {
        kind: [generate_phantom(kind, seed, slices=48, size=128) for seed in SAMPLE_SEEDS]
        for kind in ("covid", "cap", "normal")
    }


def test_kind_accepts_enum_and_names() -> None:
    assert parse_kind(Diagnosis.CAP) is Diagnosis.CAP
    assert parse_kind("COVID") is Diagnosis.COVID19
    assert parse_kind("non-pneumonia") is Diagnosis.NON_PNEUMONIA
    assert parse_kind("non_pneumonia") is Diagnosis.NON_PNEUMONIA
    assert parse_kind("normal") is Diagnosis.NON_PNEUMONIA
    with pytest.raises(ValueError, match="unknown phantom kind"):
        parse_kind("flu")


def test_same_seed_same_phantom_other_seed_differs() -> None:
    a = generate_phantom("covid", 3, slices=8, size=64)
    b = generate_phantom(Diagnosis.COVID19, 3, slices=8, size=64)
    c = generate_phantom("covid", 4, slices=8, size=64)
    for name in ("volume_hu", "lung_mask", "lesion_mask"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert a.spacing_mm == b.spacing_mm
    assert not np.array_equal(a.volume_hu, c.volume_hu)


@pytest.mark.parametrize(("kind", "slices", "size"), [
    ("covid", 8, 64), ("cap", 32, 96), ("normal", 8, 64), ("covid", 2, 32), ("cap", 4, 32),
])
def test_tiny_phantoms_have_lungs_and_lesions(kind: str, slices: int, size: int) -> None:
    p = generate_phantom(kind, 3, slices=slices, size=size)
    assert p.volume_hu.shape == (slices, size, size)
    assert p.volume_hu.dtype == np.int16
    assert p.lung_mask.dtype == bool and p.lesion_mask.dtype == bool
    assert p.lung_mask.shape == p.lesion_mask.shape == p.volume_hu.shape
    assert all(isinstance(v, float) and v > 0 for v in p.spacing_mm)
    assert p.lung_mask.any()
    assert not (p.lesion_mask & ~p.lung_mask).any()
    assert p.lesion_mask.any() == (kind != "normal")
    assert p.volume_hu.min() >= HU_MIN
    # air outside, lungs dark, something dense (bone) in the body
    assert p.volume_hu[:, 0, 0].max() < -900
    assert np.median(p.volume_hu[p.lung_mask & ~p.lesion_mask]) < -700
    assert p.volume_hu.max() > 300


def test_drawn_scanner_settings_describe_a_chest() -> None:
    for seed in range(4):
        p = generate_phantom("normal", seed, size=32)
        nz = p.volume_hu.shape[0]
        dz, dy, dx = p.spacing_mm
        assert 60 <= nz <= 400
        assert 1.0 <= p.slice_thickness_mm <= 5.0 and dz == p.slice_thickness_mm
        assert 0.55 <= dx * 32 / 512 <= 0.9 and dy == dx
        if 60 < nz < 400:
            assert 240 <= nz * dz <= 360
        assert 10 <= p.noise_sigma_hu <= 30
    given = generate_phantom("normal", 1, slices=20, size=32, slice_thickness_mm=2.5,
                             pixel_spacing_mm=0.7)
    assert given.spacing_mm == (2.5, 0.7, 0.7)
    assert given.lung_mask.any()


def test_statistics_follow_the_paper(sample: dict[str, list[Phantom]]) -> None:
    stats = {
        kind: np.array([
            (lesion_count(p.lesion_mask), p.lvr, plr(p.lung_mask, p.lesion_mask, p.spacing_mm))
            for p in phantoms
        ])
        for kind, phantoms in sample.items()
    }
    covid, cap = stats["covid"].mean(axis=0), stats["cap"].mean(axis=0)
    # Finding 1: more lesions in COVID-19 (paper 4.4 vs 1.7 per scan)
    assert covid[0] > cap[0] >= 1 and 2.5 <= covid[0] <= 7
    # Finding 2: larger lesion volume ratio (paper 14.3 % vs 4.4 %)
    assert 0.08 <= covid[1] <= 0.22 and 0.02 <= cap[1] <= 0.08
    # Finding 4: COVID-19 peripheral, CAP central (paper PLR 62.4 % vs 24.5 % at 10 mm)
    assert 0.45 <= covid[2] <= 0.8 and cap[2] <= 0.4 and covid[2] > cap[2] + 0.2
    assert not stats["normal"].any()


def test_spatial_spread(sample: dict[str, list[Phantom]]) -> None:
    """COVID-19 bilateral and scattered, CAP in one lung."""
    assert sum(lungs_touched(p) == 2 for p in sample["covid"]) >= 4
    assert all(lungs_touched(p) == 1 for p in sample["cap"])


def test_lesion_densities(sample: dict[str, list[Phantom]]) -> None:
    """Finding 3: COVID-19 ground glass; CAP ground glass around a consolidated core."""
    covid = np.concatenate([p.volume_hu[p.lesion_mask] for p in sample["covid"]])
    assert -960 <= np.median(covid) <= -550
    assert np.mean(covid >= -100) < 0.05
    for p in sample["cap"]:
        hu = p.volume_hu[p.lesion_mask]
        assert np.any(hu >= -100) and np.any(hu <= -600)
        assert -100 <= np.percentile(hu, 95) <= 160


def test_dicom_series_round_trip(tmp_path: Path) -> None:
    p = generate_phantom("cap", 5, slices=6, size=48)
    files = write_dicom_series(p, tmp_path / "a", patient_id="P1", accession="A1")
    again = write_dicom_series(p, tmp_path / "b")
    assert len(files) == 6
    datasets = [pydicom.dcmread(f) for f in reversed(files)]
    datasets.sort(key=lambda ds: -float(ds.ImagePositionPatient[2]))
    first = datasets[0]
    assert first.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert first.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert first.Modality == "CT" and first.BodyPartExamined == "CHEST"
    assert first.Manufacturer == MANUFACTURER
    assert list(first.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert first.PatientID == "P1" and first.AccessionNumber == "A1"
    assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert tuple(float(v) for v in first.PixelSpacing) == pytest.approx(p.spacing_mm[1:])
    assert float(first.SliceThickness) == pytest.approx(p.slice_thickness_mm)
    assert float(first.SpacingBetweenSlices) == pytest.approx(p.spacing_mm[0])
    z = [float(ds.ImagePositionPatient[2]) for ds in datasets]
    assert np.allclose(-np.diff(z), p.spacing_mm[0], atol=1e-3)
    assert [ds.InstanceNumber for ds in datasets] == list(range(1, 7))
    assert len({ds.SOPInstanceUID for ds in datasets}) == 6
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert len({ds[key].value for ds in datasets}) == 1
    hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
                   for ds in datasets])
    assert np.array_equal(hu, p.volume_hu)
    # the same phantom makes the same series
    assert [pydicom.dcmread(f).SOPInstanceUID for f in again] == [
        pydicom.dcmread(f).SOPInstanceUID for f in files
    ]


def test_dicom_passes_dciodvfy(tmp_path: Path) -> None:
    tool = shutil.which("dciodvfy") or "/usr/bin/dciodvfy"
    if not os.access(tool, os.X_OK):
        message = "dciodvfy (dicom3tools) is not installed"
        if REQUIRE_TOOLS:
            pytest.fail(message)
        pytest.skip(message)
    files = write_dicom_series(generate_phantom("covid", 1, slices=3, size=32), tmp_path)
    result = subprocess.run([tool, str(files[1])], capture_output=True, text=True)
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line]
    assert not errors, "\n".join(errors)


def test_nifti_round_trip(tmp_path: Path) -> None:
    nib = pytest.importorskip("nibabel")
    p = generate_phantom("covid", 2, slices=6, size=48)
    paths = write_nifti(p, tmp_path)
    assert set(paths) == {"image", "lung", "lesion"}
    image = nib.load(paths["image"])
    assert np.array_equal(np.asarray(image.dataobj).transpose(2, 1, 0), p.volume_hu)
    assert np.array_equal(np.asarray(nib.load(paths["lung"]).dataobj).transpose(2, 1, 0),
                          p.lung_mask.astype(np.uint8))
    assert np.array_equal(np.asarray(nib.load(paths["lesion"]).dataobj).transpose(2, 1, 0),
                          p.lesion_mask.astype(np.uint8))
    assert np.allclose(image.header.get_zooms(), p.spacing_mm[::-1])
    # voxel (0, 0, 0) sits where the DICOM writer puts it (LPS -> RAS flips x and y)
    ds = pydicom.dcmread(write_dicom_series(p, tmp_path / "dicom")[0])
    lps = np.array([float(v) for v in ds.ImagePositionPatient])
    assert np.allclose(image.affine[:3, 3], lps * [-1, -1, 1], atol=1e-3)


def test_cli_writes_both_formats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_phantom_arguments(parser)
    args = parser.parse_args([str(tmp_path), "--kind", "cap", "--seed", "7", "--slices", "4",
                              "--size", "32", "--format", "both"])
    assert run_phantom_command(args) == 0
    assert len(list((tmp_path / "dicom").glob("*.dcm"))) == 4
    assert len(list((tmp_path / "nifti").glob("*.nii.gz"))) == 3
    assert "CAP phantom, seed 7" in capsys.readouterr().out


def test_phantoms_that_differ_never_share_uids(tmp_path: Path) -> None:
    """The slice thickness changes the pixels at the same slice interval, and a series
    written into another study is another object: neither may repeat a UID."""
    thin = generate_phantom("covid", 7, slices=6, size=32)
    thick = generate_phantom("covid", 7, slices=6, size=32,  # as thick as the interval
                             slice_thickness_mm=thin.spacing_mm[0])
    assert thin.spacing_mm == thick.spacing_mm
    assert not np.array_equal(thin.volume_hu, thick.volume_hu)
    uids = []
    for name, phantom, study in (("a", thin, None), ("b", thick, None), ("c", thin, "1.2.3.1"),
                                 ("d", thin, "1.2.3.2")):
        [first] = write_dicom_series(phantom, tmp_path / name, study_uid=study)[:1]
        ds = pydicom.dcmread(first)
        uids.append((ds.SeriesInstanceUID, ds.SOPInstanceUID))
    assert len({series for series, _ in uids}) == 4 and len({sop for _, sop in uids}) == 4


def test_a_name_beyond_latin_1_is_written_in_utf_8(tmp_path: Path) -> None:
    p = generate_phantom("normal", 3, slices=2, size=32)
    [first] = write_dicom_series(p, tmp_path / "jp", patient_name="山田^太郎")[:1]
    ds = pydicom.dcmread(first)
    assert ds.SpecificCharacterSet == "ISO_IR 192" and str(ds.PatientName) == "山田^太郎"
    [first] = write_dicom_series(p, tmp_path / "de", patient_name="Müller^Jörg")[:1]
    assert pydicom.dcmread(first).SpecificCharacterSet == "ISO_IR 100"


def test_a_folder_holding_another_series_is_refused(tmp_path: Path) -> None:
    """Mixed with an earlier, longer series, the files read as one broken series."""
    write_dicom_series(generate_phantom("cap", 1, slices=5, size=32), tmp_path)
    again = write_dicom_series(generate_phantom("cap", 1, slices=5, size=32), tmp_path)
    assert len(again) == 5  # the same series again: rewritten in place
    with pytest.raises(ValueError, match="already holds 5 CT file"):
        write_dicom_series(generate_phantom("cap", 2, slices=3, size=32), tmp_path)


def test_nifti_of_another_phantom_under_the_same_names_is_refused(tmp_path: Path) -> None:
    """The same kind and seed at another size has the same file names: it overwrote them."""
    nib = pytest.importorskip("nibabel")
    write_nifti(generate_phantom("cap", 1, slices=5, size=32), tmp_path)
    again = write_nifti(generate_phantom("cap", 1, slices=5, size=32), tmp_path)
    assert nib.load(again["image"]).shape == (32, 32, 5)  # the same phantom: rewritten
    with pytest.raises(ValueError, match="phantom_cap_00001_image.nii.gz is another image"):
        write_nifti(generate_phantom("cap", 1, slices=6, size=32), tmp_path)
    assert nib.load(again["image"]).shape == (32, 32, 5)
    other = write_nifti(generate_phantom("cap", 1, slices=6, size=32), tmp_path, case_id="b")
    assert other["image"].name == "b_image.nii.gz"


def test_cli_both_formats_refused_before_either_is_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A NIfTI refusal must not leave a fresh DICOM series behind it, nor the reverse."""
    pytest.importorskip("nibabel")
    parser = argparse.ArgumentParser()
    add_phantom_arguments(parser)
    args = ["--kind", "cap", "--seed", "1", "--slices", "6", "--size", "32", "--format", "both"]
    nifti_taken = tmp_path / "a"
    write_nifti(generate_phantom("cap", 1, slices=5, size=32), nifti_taken / "nifti")
    assert run_phantom_command(parser.parse_args([str(nifti_taken), *args])) == 2
    assert "is another image" in caplog.text
    assert not (nifti_taken / "dicom").exists()
    dicom_taken = tmp_path / "b"
    write_dicom_series(generate_phantom("cap", 2, slices=3, size=32), dicom_taken / "dicom")
    assert run_phantom_command(parser.parse_args([str(dicom_taken), *args])) == 2
    assert "already holds 3 CT file" in caplog.text
    assert not (dicom_taken / "nifti").exists()


def test_cli_bad_settings_are_a_message_not_a_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    parser = argparse.ArgumentParser()
    add_phantom_arguments(parser)
    for bad in (["--size", "8"], ["--seed", "-1"], ["--thickness", "-2"]):
        assert run_phantom_command(parser.parse_args([str(tmp_path), *bad])) == 2
    assert "seed must be >= 0" in caplog.text
