"""volume.py: a CT series becomes an exact HU volume, or is rejected with a named reason."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pydicom.uid import UID, JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

from ai.lungs import LungConfig
from dicomnode.volume import PADDING_HU, SeriesRejected, read_series
from tests.conftest import store_flipped, store_prone
from training.phantoms import Phantom, generate_phantom, write_dicom_series


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    return generate_phantom("cap", 5, slices=10, size=64)


@pytest.fixture
def series(tmp_path: Path, phantom: Phantom) -> list[Path]:
    return sorted(write_dicom_series(phantom, tmp_path / "ct"))


def _edit(path: Path, change: Callable[[pydicom.Dataset], None], out: Path | None = None) -> Path:
    ds = pydicom.dcmread(path)
    change(ds)
    target = out or path
    ds.save_as(target, enforce_file_format=True)
    return target


def test_volume_is_exact_and_ordered_along_the_normal(series: list[Path], phantom: Phantom) -> None:
    shuffled = list(series)
    random.Random(0).shuffle(shuffled)
    volume = read_series(shuffled)
    positions = [float(ds.ImagePositionPatient[2]) for ds in volume.datasets]
    assert positions == sorted(positions)
    # The writer may stack head-first or feet-first; either way z ascends along the normal.
    assert (np.array_equal(volume.hu, phantom.volume_hu.astype(np.float32))
            or np.array_equal(volume.hu, phantom.volume_hu[::-1].astype(np.float32)))
    assert volume.spacing_mm == pytest.approx(phantom.spacing_mm)
    assert all("PixelData" not in ds for ds in volume.datasets)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, JPEGLSLossless])
def test_compressed_series_decodes_to_the_same_volume(series: list[Path], syntax: UID) -> None:
    reference = read_series(series)
    for path in series:
        _edit(path, lambda ds: ds.compress(syntax))
    assert pydicom.dcmread(series[0]).file_meta.TransferSyntaxUID == syntax
    assert np.array_equal(read_series(series).hu, reference.hu)


def test_pixel_padding_is_marked_outside_the_field_of_view(series: list[Path]) -> None:
    """Far below air, as scanners store it without a padding value: ai.lungs tells the
    round field of view's edge from the air around the patient by it."""
    def pad_corner(ds: pydicom.Dataset) -> None:
        pixels = ds.pixel_array.copy()
        pixels[0, 0] = 0
        ds.add_new(0x00280120, "SS" if ds.PixelRepresentation else "US", 0)  # PixelPaddingValue
        ds.PixelData = pixels.tobytes()

    _edit(series[0], pad_corner)
    volume = read_series(series)
    z = [ds.SOPInstanceUID for ds in volume.datasets].index(
        pydicom.dcmread(series[0]).SOPInstanceUID)
    assert volume.hu[z, 0, 0] == PADDING_HU == -3024.0
    assert LungConfig().outside_fov_hu > PADDING_HU


def _shift(dx: float = 0.0, dz: float = 0.0) -> Callable[[pydicom.Dataset], None]:
    def change(ds: pydicom.Dataset) -> None:
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x + dx, y, z + dz]
    return change


def test_missing_slice_is_a_gap(series: list[Path]) -> None:
    by_z = sorted(series, key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    by_z[4].unlink()
    with pytest.raises(SeriesRejected, match="gap of .* slices are missing"):
        read_series(by_z[:4] + by_z[5:])


def test_duplicate_position_is_rejected(series: list[Path], tmp_path: Path) -> None:
    extra = _edit(series[3], lambda ds: setattr(ds, "SOPInstanceUID", generate_uid()),
                  out=tmp_path / "dup.dcm")
    with pytest.raises(SeriesRejected, match="duplicate slice position"):
        read_series([*series, extra])


def test_a_copy_of_a_file_is_read_once(series: list[Path], tmp_path: Path) -> None:
    """A folder export holding some files twice (a copied subfolder)."""
    copy = tmp_path / "copy.dcm"
    copy.write_bytes(series[3].read_bytes())
    assert read_series([*series, copy]).hu.shape[0] == len(series)


def test_a_coronal_reconstruction_is_rejected(series: list[Path]) -> None:
    for path in series:  # the slices' geometry as of a coronal stack
        _edit(path, lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 0, -1]))
    with pytest.raises(SeriesRejected, match="tilted 90 degrees from axial"):
        read_series(series)


def test_pixel_data_of_the_wrong_size_is_rejected(
    series: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decoder that returns another shape than the header's (a codec's bug, an odd
    compressed stream) is a named rejection, not an internal error."""
    odd = pydicom.dcmread(series[2]).SOPInstanceUID
    decode = pydicom.Dataset.pixel_array.fget

    def pixel_array(ds: pydicom.Dataset) -> np.ndarray:
        pixels = decode(ds)
        return pixels[:-1] if ds.SOPInstanceUID == odd else pixels

    monkeypatch.setattr(pydicom.Dataset, "pixel_array", property(pixel_array))
    with pytest.raises(SeriesRejected, match=r"decode to \(63, 64\), not Rows x Columns"):
        read_series(series)


def test_varying_spacing_is_rejected(series: list[Path], phantom: Phantom) -> None:
    by_z = sorted(series, key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    _edit(by_z[5], _shift(dz=0.3 * phantom.spacing_mm[0]))
    with pytest.raises(SeriesRejected, match="slice spacing varies"):
        read_series(series)


def test_gantry_tilt_is_rejected(series: list[Path], phantom: Phantom) -> None:
    by_z = sorted(series, key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    for i, path in enumerate(by_z):
        _edit(path, _shift(dx=0.2 * i * phantom.spacing_mm[0]))
    with pytest.raises(SeriesRejected, match="gantry tilt of"):
        read_series(series)


def test_direction_cosines_written_with_few_decimals_are_not_a_tilt(
    series: list[Path],
) -> None:
    """A 5 degree in-plane rotation written with 3 decimals: the vectors are 0.9998 long,
    which once read as a gantry tilt of 1.7 degrees."""
    rotated = [0.996, 0.087, 0.0, -0.087, 0.996, 0.0]
    for path in series:
        _edit(path, lambda ds: setattr(ds, "ImageOrientationPatient", rotated))
    volume = read_series(series)
    assert np.allclose(np.linalg.norm(np.reshape(volume.orientation, (2, 3)), axis=1), 1.0)
    for path in series:
        _edit(path, lambda ds: setattr(ds, "ImageOrientationPatient", [0, 0, 0, 0, 1, 0]))
    with pytest.raises(SeriesRejected, match="is not two direction cosines"):
        read_series(series)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 0.8, -0.6]),
         "mixed slice orientations"),
        (lambda ds: delattr(ds, "PixelData"), "has no pixel data"),
        (lambda ds: setattr(ds, "Columns", 32), "Columns differs"),
        (lambda ds: setattr(ds, "NumberOfFrames", 2), "multi-frame"),
        (lambda ds: setattr(ds, "PixelSpacing", [0.5, 0.5]), "PixelSpacing differs"),
        (lambda ds: delattr(ds, "ImagePositionPatient"), "lacks ImagePositionPatient"),
        (lambda ds: delattr(ds, "RescaleIntercept"), "lacks RescaleIntercept"),
        (lambda ds: setattr(ds, "ConvolutionKernel", "BONE"), "ConvolutionKernel differs"),
        (lambda ds: setattr(ds, "ImageType", ["DERIVED", "SECONDARY"]), "ImageType differs"),
        (lambda ds: ds.__setitem__(0x00281053, RawDataElement(
            Tag(0x00281053), "DS", 4, b"NaN ", 0, False, True)),
         "RescaleSlope is not a finite number"),
        (lambda ds: setattr(ds, "RescaleSlope", "1e38"), "instance .* decode to non-finite"),
        (lambda ds: setattr(ds, "RescaleSlope", 0), "RescaleSlope 0: every voxel"),
        (lambda ds: setattr(ds, "PixelSpacing", 0.7), "1 value.s. of PixelSpacing, not 2"),
        (lambda ds: ds.__setitem__(0x00200032, RawDataElement(
            Tag(0x00200032), "DS", 8, b"0\\0\\NaN ", 0, False, True)),
         "ImagePositionPatient of instance .* is not finite"),
        (lambda ds: ds.__setitem__(0x00280008, RawDataElement(
            Tag(0x00280008), "IS", 4, b"two ", 0, False, True)),
         "NumberOfFrames is not a number"),
        (lambda ds: delattr(ds, "Rows"), r"Rows differs between slices \(64, absent\)"),
    ],
    ids=["orientation", "no-pixels", "columns", "multiframe", "pixel-spacing", "no-position",
         "no-intercept", "kernel", "derived", "nan-slope", "overflow", "zero-slope",
         "one-spacing-value", "nan-position", "frames-text", "no-rows"],
)
def test_inconsistent_slice_is_rejected_by_name(
    series: list[Path], change: Callable[[pydicom.Dataset], None], reason: str
) -> None:
    _edit(series[2], change)
    with pytest.raises(SeriesRejected, match=reason):
        read_series(series)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda ds: setattr(ds, "PixelSpacing", [0, 0]), "a pixel spacing must be positive"),
        (lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 1, 0, 0]),
         "row and column directions are not perpendicular"),
        (lambda ds: delattr(ds, "Rows"), "Rows is 'absent': the image size is unknown"),
    ],
    ids=["zero-spacing", "parallel-cosines", "no-rows-anywhere"],
)
def test_a_corrupted_geometry_in_every_slice_is_rejected_by_name(
    series: list[Path], change: Callable[[pydicom.Dataset], None], reason: str
) -> None:
    for path in series:
        _edit(path, change)
    with pytest.raises(SeriesRejected, match=reason):
        read_series(series)


def test_a_file_that_is_not_dicom_is_named(series: list[Path]) -> None:
    series[3].write_bytes(b"not a DICOM file")
    with pytest.raises(SeriesRejected, match=f"{series[3].name} cannot be read as DICOM"):
        read_series(series)
    series[3].unlink()
    with pytest.raises(SeriesRejected, match=f"{series[3].name} cannot be read as DICOM"):
        read_series(series)


@pytest.mark.parametrize("sop_class", ["1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT
                                       "1.2.840.10008.5.1.4.1.1.2.2"])  # Legacy Converted
def test_one_multi_frame_ct_instance_is_named_as_such(series: list[Path], sop_class: str) -> None:
    """Not "1 slice(s)": one Enhanced CT instance holds the whole series."""
    _edit(series[0], lambda ds: setattr(ds, "SOPClassUID", sop_class))
    with pytest.raises(SeriesRejected, match="multi-frame .Enhanced CT. series are not supported"):
        read_series(series[:1])


def test_too_few_slices(series: list[Path]) -> None:
    with pytest.raises(SeriesRejected, match="at least 40 are needed"):
        read_series(series, min_slices=40)


def _localizer(ds: pydicom.Dataset) -> None:
    ds.SOPInstanceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # a coronal scout


def _dose_screen(ds: pydicom.Dataset) -> None:
    ds.SOPInstanceUID = generate_uid()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
    ds.ImageType = ["DERIVED", "SECONDARY", "SCREEN SAVE"]


def test_a_localizer_and_a_screen_capture_in_the_series_are_left_out(
    series: list[Path], tmp_path: Path
) -> None:
    reference = read_series(series)
    scout = _edit(series[0], _localizer, tmp_path / "scout.dcm")
    screen = _edit(series[1], _dose_screen, tmp_path / "screen.dcm")
    volume = read_series([scout, *series, screen], min_slices=len(series))
    assert np.array_equal(volume.hu, reference.hu)
    assert volume.datasets == reference.datasets
    assert set(volume.left_out) == {pydicom.dcmread(p).SOPInstanceUID for p in (scout, screen)}
    assert reference.left_out == ()
    # They are not counted as slices.
    with pytest.raises(SeriesRejected, match=r"2 other instance\(s\) are not CT slices"):
        read_series([scout, *series, screen], min_slices=len(series) + 1)


def test_a_prone_series_is_turned_to_the_display_convention(series: list[Path]) -> None:
    """Stored upside down and mirrored, as prone scans are: the AI gets the supine layout
    (columns to the patient's left: the lung sides stay right); SEG frames map back."""
    supine = read_series(series)
    for path in series:
        store_prone(path)
    prone = read_series(series)
    assert prone.stored_flips == (True, True)
    assert np.array_equal(prone.hu, supine.hu)
    assert prone.orientation == supine.orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    assert prone.origin_mm == pytest.approx(supine.origin_mm)
    stored = np.stack([pydicom.dcmread(path).pixel_array for path in series])
    order = np.argsort([float(pydicom.dcmread(p).ImagePositionPatient[2]) for p in series])
    assert np.array_equal(prone.to_stored(prone.hu > 0), stored[order] > 1024)


def test_positions_rounded_to_a_tenth_of_a_millimetre(series: list[Path]) -> None:
    """0.625 mm slices whose positions were written to 0.1 mm: steps of 0.6 and 0.7 mm,
    neither missing slices nor a varying spacing; the spacing is the mean step."""
    by_z = sorted(series, key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    for i, path in enumerate(by_z):
        _edit(path, lambda ds, i=i: setattr(
            ds, "ImagePositionPatient",
            [*ds.ImagePositionPatient[:2], round(-100.0 + 0.625 * i, 1)]))
        _edit(path, lambda ds: setattr(ds, "SliceThickness", 0.625))
    volume = read_series(series)
    assert volume.spacing_mm[0] == pytest.approx(0.625, abs=0.02)


def test_two_interleaved_acquisitions_are_rejected(series: list[Path]) -> None:
    """Inspiration and expiration in one series, slices half a step apart: stacked, the
    volume would alternate between two scans."""
    by_z = sorted(series, key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    for i, path in enumerate(by_z):
        _edit(path, lambda ds, i=i: setattr(ds, "AcquisitionNumber", 1 + i % 2))
    with pytest.raises(SeriesRejected, match="acquisitions 1 and 2 interleave"):
        read_series(series)


def test_a_series_mirrored_left_right_is_turned_and_keeps_z_ascending(
    series: list[Path],
) -> None:
    """Columns running to the patient's right (ImageOrientationPatient (-1,0,0,0,1,0)):
    one flip reverses the slice normal, so the slice order must be reversed too."""
    supine = read_series(series)
    for path in series:
        store_flipped(path, rows=False, columns=True)
    mirrored = read_series(series)
    assert mirrored.stored_flips == (False, True)
    assert np.array_equal(mirrored.hu, supine.hu)
    assert [ds.SOPInstanceUID for ds in mirrored.datasets] == [
        ds.SOPInstanceUID for ds in supine.datasets]
    assert mirrored.origin_mm == pytest.approx(supine.origin_mm)
