"""DICOM CT instances of one series -> a geometry-checked volume in HU.

The AI needs a regular 3D grid: slices parallel, equally spaced, perpendicular to their
stacking direction, all the same size. Rather than guess, every departure from that is
rejected with a reason a PACS administrator can act on (the job goes failed(reason)).
Slices are ordered along the slice normal (PS3.3 C.7.6.2.1.1), never by InstanceNumber
or file name. Axial images are turned to the display convention the AI assumes (columns
towards the patient's left, rows towards the back): a prone scan, stored upside down and
mirrored, would otherwise have its lungs' sides swapped; the SEG maps its masks back.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
)

logger = logging.getLogger(__name__)

MULTI_FRAME_CT = (EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage)
"""Multi-frame CT: one instance holds the whole series, which this module does not read."""
PERPENDICULAR_TOLERANCE = 0.01
"""Largest |cosine| between the row and column directions still counted as perpendicular
(cosines written with few decimals are off by about 1e-3)."""
ORIENTATION_TOLERANCE = 1e-3
"""Largest difference between direction cosines still counted as the same orientation."""
TILT_TOLERANCE_DEG = 1.0
"""Largest angle between the stacking direction and the slice normal (gantry tilt)."""
PADDING_HU = -3024.0
"""HU given to PixelPaddingValue voxels (outside the reconstruction circle), as most
scanners store them without a padding value: far below air, so that `ai.lungs` tells the
field of view's edge from the air around the patient (a lung that reaches the circle is
cut by the field of view, not joined to that air)."""
SPACING_TOLERANCE_MM = 0.15
"""Slice steps may always differ by this much: positions are often written rounded to
0.1 mm, which makes the steps of a 0.625 mm series 0.6 or 0.7 mm."""
AXIAL_MIN_NORMAL_Z = 0.8
"""|z| of the slice normal from which a series counts as axial (and is turned to the
display convention); below it (tilted over 37 degrees: coronal, sagittal) it is refused,
since the lung segmentation and the model read axial slices only."""


class SeriesRejected(ValueError):
    """The series cannot form a regular volume; the message says why, for the job."""


@dataclass(frozen=True)
class CTVolume:
    """A series as a volume: `hu[z, y, x]`, z ascending along the slice normal."""

    hu: np.ndarray
    spacing_mm: tuple[float, float, float]
    """(between slices, between rows, between columns)."""
    datasets: tuple[Dataset, ...]
    """Headers of the slices in volume order, without pixel data (for SEG/SR references)."""
    orientation: tuple[float, ...]
    """ImageOrientationPatient shared by all slices."""
    origin_mm: tuple[float, float, float]
    """ImagePositionPatient of the first voxel (of `hu`, after any flip)."""
    stored_flips: tuple[bool, bool] = (False, False)
    """Whether `hu`'s rows, columns run opposite to the stored images' (see
    `to_stored`): `orientation` and `origin_mm` describe `hu`, not the stored images."""
    left_out: tuple[str, ...] = ()
    """SOP Instance UIDs of the series' instances that are not slices of the volume
    (localizers, screen captures; see `_left_out_reason`)."""

    @property
    def shape(self) -> tuple[int, int, int]:
        return (int(self.hu.shape[0]), int(self.hu.shape[1]), int(self.hu.shape[2]))

    def to_stored(self, array: np.ndarray) -> np.ndarray:
        """A (z, y, x, ...) array on `hu`'s grid as a view on the stored images' pixel
        grid, for objects that reference them pixel by pixel (the SEG). Its own inverse:
        it also takes masks read from such objects (per source image, in `datasets`
        order) onto `hu`'s grid."""
        return flip_to_stored(array, self.stored_flips)


def flip_to_stored(array: np.ndarray, flips: tuple[bool, bool]) -> np.ndarray:
    """`CTVolume.to_stored` for a volume whose `stored_flips` are `flips`."""
    return array[:, ::-1 if flips[0] else 1, ::-1 if flips[1] else 1]


def _float_list(ds: Dataset, keyword: str, n: int) -> np.ndarray:
    """`keyword`'s `n` values as finite numbers, else SeriesRejected naming it."""
    value = ds.get(keyword)
    instance = f"instance {ds.get('InstanceNumber', '?')}"
    if value is None or value == "":
        raise SeriesRejected(f"{instance} lacks {keyword}")
    values = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    if len(values) != n:
        raise SeriesRejected(f"{instance} has {len(values)} value(s) of {keyword}, not {n}")
    try:
        numbers = np.array([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        raise SeriesRejected(f"{keyword} is not numeric: {value!r}") from None
    if not np.isfinite(numbers).all():
        raise SeriesRejected(f"{keyword} of {instance} is not finite: {value!r}")
    return numbers


def _check_single_frame(ds: Dataset) -> None:
    frames = ds.get("NumberOfFrames", 1) or 1
    try:
        frames = int(frames)
    except (TypeError, ValueError):
        raise SeriesRejected(f"NumberOfFrames is not a number: {frames!r}") from None
    if ds.get("SOPClassUID") in MULTI_FRAME_CT or frames > 1:
        raise SeriesRejected(
            "multi-frame (Enhanced CT) series are not supported: "
            "send the series as single-frame CT Image Storage"
        )


def _left_out_reason(ds: Dataset) -> str | None:
    """Why an instance of the series is not one of its slices, or None when it is.

    Some scanners and routers put the localizer (scout) or a dose or protocol screen
    (Secondary Capture) into the axial series; those are not slices, and failing the
    whole series over them would lose the analysis. Only these two kinds are left out:
    anything else that does not fit is still a reason to reject the series."""
    sop_class = ds.get("SOPClassUID")
    if sop_class not in (CTImageStorage, *MULTI_FRAME_CT):
        return f"SOP class {sop_class or 'missing'} is not CT Image Storage"
    if "LOCALIZER" in (v.upper() for v in string_values(ds, "ImageType")):
        return "ImageType LOCALIZER"
    return None


def _slices_of(datasets: Sequence[Dataset]) -> tuple[list[Dataset], tuple[str, ...]]:
    """The datasets that are slices, and the SOP Instance UIDs of those left out."""
    slices, left_out = [], []
    for ds in datasets:
        reason = _left_out_reason(ds)
        if reason is None:
            slices.append(ds)
            continue
        left_out.append(str(ds.get("SOPInstanceUID", "")))
        logger.warning("series %s: instance %s left out of the volume: %s",
                       ds.get("SeriesInstanceUID", "?"), ds.get("InstanceNumber", "?"), reason)
    return slices, tuple(left_out)


def _check_same(datasets: Sequence[Dataset], keyword: str) -> None:
    values = {str(ds.get(keyword, "")) or "absent" for ds in datasets}
    if len(values) > 1:
        shown = ", ".join(sorted(values)[:3])
        raise SeriesRejected(f"{keyword} differs between slices ({shown})")


def value_text(ds: Dataset, keyword: str) -> str:
    """An attribute's value as encoded text (values joined by backslashes), "" if absent.

    For the VRs of the default character repertoire only (UI, CS, DS, IS, DA, TM, ...:
    their bytes are their text in any character set). Read from the raw bytes as
    received, without pydicom's conversion and validation: on the C-STORE path that
    conversion was a third of the node's work per instance beyond storing the bytes.
    """
    element = ds.get_item(keyword)
    if element is None:
        return ""
    if isinstance(element, RawDataElement):
        return element.value.decode("ascii", "replace").strip(" \x00") if element.value else ""
    value = element.value
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def string_values(ds: Dataset, keyword: str) -> tuple[str, ...]:
    """A multi-valued attribute's values (default repertoire, `value_text`); a single
    value stays one value (ImageType "DERIVED" alone, from a non-conformant sender, is
    not its letters)."""
    text = value_text(ds, keyword)
    return tuple(v.strip() for v in text.split("\\")) if text else ()


def _check_image_kind(datasets: Sequence[Dataset]) -> None:
    """ImageType's first two values (ORIGINAL / DERIVED, PRIMARY / SECONDARY) must agree:
    the series rules judged the series by its first instance's ImageType, and a derived
    image (a screen capture, a reformat) stacked among the originals is not CT data."""
    kinds = {tuple(v.upper() for v in string_values(ds, "ImageType")[:2]) for ds in datasets}
    if len(kinds) > 1:
        shown = ", ".join("\\".join(kind) or "none" for kind in sorted(kinds)[:3])
        raise SeriesRejected(
            f"ImageType differs between slices ({shown}): the series mixes original and"
            " derived images"
        )


def _orientation(datasets: Sequence[Dataset]) -> np.ndarray:
    """The series' direction cosines, each made a unit vector: written with few decimals
    (0.996\\0.087\\0 ...) they are a little short, which would read as a gantry tilt."""
    first = _float_list(datasets[0], "ImageOrientationPatient", 6)
    for ds in datasets[1:]:
        if np.abs(_float_list(ds, "ImageOrientationPatient", 6) - first).max() > (
            ORIENTATION_TOLERANCE
        ):
            raise SeriesRejected("mixed slice orientations (ImageOrientationPatient differs)")
    row, column = first[:3], first[3:]
    if not (np.linalg.norm(row) > 0.5 and np.linalg.norm(column) > 0.5):
        raise SeriesRejected(f"ImageOrientationPatient {list(first)} is not two direction"
                             " cosines")
    row, column = row / np.linalg.norm(row), column / np.linalg.norm(column)
    if abs(float(row @ column)) > PERPENDICULAR_TOLERANCE:
        raise SeriesRejected(f"ImageOrientationPatient {list(first)}: the row and column"
                             " directions are not perpendicular (a corrupted header?)")
    return np.concatenate([row, column])


def _sort_along_normal(
    datasets: Sequence[Dataset], orientation: np.ndarray
) -> tuple[list[Dataset], np.ndarray, np.ndarray]:
    """Slices sorted by their position along the normal; also positions and distances."""
    normal = np.cross(orientation[:3], orientation[3:])
    positions = np.array([_float_list(ds, "ImagePositionPatient", 3) for ds in datasets])
    distance = positions @ normal
    order = np.argsort(distance, kind="stable")
    return [datasets[i] for i in order], positions[order], distance[order]


def _slice_spacing(
    positions: np.ndarray, distance: np.ndarray, normal: np.ndarray, tolerance: float
) -> float:
    steps = np.diff(distance)
    duplicate = np.flatnonzero(steps < 1e-3)
    if duplicate.size:
        i = int(duplicate[0])
        raise SeriesRejected(
            f"duplicate slice position {distance[i]:.2f} mm along the normal "
            f"({duplicate.size} duplicate(s)): the series mixes stacks or repeats slices"
        )
    spacing = float(distance[-1] - distance[0]) / (len(distance) - 1)
    median = float(np.median(steps))  # the step of a regular stretch, when one is missing
    worst = int(np.argmax(np.abs(steps - median)))
    if abs(steps[worst] - median) > max(tolerance * median, SPACING_TOLERANCE_MM):
        if steps[worst] > 1.5 * median:
            raise SeriesRejected(
                f"gap of {steps[worst]:.2f} mm between slices {worst} and {worst + 1} "
                f"(expected {median:.2f} mm): slices are missing"
            )
        raise SeriesRejected(
            f"slice spacing varies {steps.min():.2f}-{steps.max():.2f} mm "
            f"(more than {tolerance:.0%} around {median:.2f} mm)"
        )
    stacking = positions[-1] - positions[0]
    cosine = abs(float(stacking @ normal)) / float(np.linalg.norm(stacking))
    tilt = float(np.degrees(np.arccos(min(1.0, cosine))))
    if tilt > TILT_TOLERANCE_DEG:
        raise SeriesRejected(
            f"gantry tilt of {tilt:.1f} degrees (slices are not stacked along their normal); "
            "send a non-tilted or resampled reconstruction"
        )
    return spacing


def _rescale(ds: Dataset) -> tuple[float, float]:
    """(slope, intercept) to HU. Type 1 in CT images (PS3.3 C.8.2.1): without them the
    stored values are not HU (24 would be read as 24 HU instead of -1000), so a CT image
    that lacks them, as some anonymisers leave it, is rejected rather than guessed."""
    values = []
    for keyword, default in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0)):
        value = ds.get(keyword)
        if value is None or value == "":
            if ds.get("SOPClassUID") == CTImageStorage:
                raise SeriesRejected(
                    f"instance {ds.get('InstanceNumber', '?')} lacks {keyword} (Type 1 in"
                    " CT images): its values cannot be turned into HU"
                )
            value = default
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise SeriesRejected(f"{keyword} is not numeric: {value!r}") from None
        if not math.isfinite(number):
            raise SeriesRejected(f"{keyword} is not a finite number: {value!r}")
        if keyword == "RescaleSlope" and number == 0:
            raise SeriesRejected(f"instance {ds.get('InstanceNumber', '?')} has RescaleSlope"
                                 " 0: every voxel would read as the intercept")
        values.append(number)
    return values[0], values[1]


def _acquisitions_apart(datasets: Sequence[Dataset], distance: np.ndarray) -> None:
    """Two acquisitions in one series (inspiration and expiration, say) whose slices
    interleave would stack into one volume of alternating scans: their ranges along the
    normal must not overlap (as the rotations of an axial scan, one acquisition each)."""
    ranges: dict[str, list[float]] = {}
    for ds, d in zip(datasets, distance, strict=True):
        key = str(ds.get("AcquisitionNumber", "") or "")
        low_high = ranges.setdefault(key, [float(d), float(d)])
        low_high[0], low_high[1] = min(low_high[0], d), max(low_high[1], d)
    spans = sorted(ranges.items(), key=lambda item: item[1][0])
    for (a, (_, a_high)), (b, (b_low, _)) in pairwise(spans):
        if b_low < a_high:
            raise SeriesRejected(
                f"acquisitions {a} and {b} interleave along the slice normal: the series"
                " holds two scans of the same range; send each as its own series"
            )


def _display_flips(orientation: np.ndarray) -> tuple[bool, bool]:
    """(flip rows, flip columns) that turn an axial series to columns running towards
    the patient's left (+x) and rows towards the back (+y)."""
    row, column = orientation[:3], orientation[3:]
    normal_z = abs(float(np.cross(row, column)[2]))
    if normal_z < AXIAL_MIN_NORMAL_Z:
        tilt = np.degrees(np.arccos(min(1.0, normal_z)))
        raise SeriesRejected(
            f"slices are tilted {tilt:.0f} degrees from axial (a coronal, sagittal or"
            " strongly oblique reconstruction): only axial chest CT can be analysed"
        )
    if abs(row[0]) < abs(row[1]):
        raise SeriesRejected(
            "axial images turned by 90 degrees (rows run front to back): not supported;"
            " send a reconstruction with rows running from the patient's right to left"
        )
    return bool(column[1] < 0), bool(row[0] < 0)


def _slice_hu(ds: Dataset) -> np.ndarray:
    if "PixelData" not in ds:
        raise SeriesRejected(f"instance {ds.get('InstanceNumber', '?')} has no pixel data")
    try:
        stored = ds.pixel_array
    except Exception as exc:  # pydicom raises many kinds for undecodable pixel data
        raise SeriesRejected(
            f"pixel data of instance {ds.get('InstanceNumber', '?')} cannot be decoded "
            f"({ds.file_meta.TransferSyntaxUID.name}): {exc}"
        ) from exc
    if stored.shape != (ds.Rows, ds.Columns):
        raise SeriesRejected(
            f"pixel data of instance {ds.get('InstanceNumber', '?')} decode to "
            f"{stored.shape}, not Rows x Columns ({ds.Rows} x {ds.Columns})"
        )
    slope, intercept = _rescale(ds)
    with np.errstate(over="ignore", invalid="ignore"):  # checked on the next line
        hu = stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    if not np.isfinite(hu).all():  # float pixel data, or a rescale beyond float32
        raise SeriesRejected(
            f"pixel data of instance {ds.get('InstanceNumber', '?')} decode to non-finite"
            " values")
    padding = ds.get("PixelPaddingValue")
    if padding is not None:
        hu[stored == padding] = PADDING_HU
    return hu


def _one_per_instance(datasets: list[Dataset]) -> list[Dataset]:
    """The first file of each SOP Instance UID: a folder holding a copy of some files
    (the node's store never does) would otherwise read as duplicate slice positions."""
    unique: dict[str, Dataset] = {}
    for ds in datasets:
        unique.setdefault(str(ds.get("SOPInstanceUID", "")) or str(ds.filename), ds)
    if len(unique) < len(datasets):
        logger.warning("%d file(s) repeat an instance of the series: read once",
                       len(datasets) - len(unique))
    return list(unique.values())


DEFER_BYTES = 4096
"""Values longer than this (the pixel data) stay on disk until read."""


def _read_header(path: Path) -> Dataset:
    """The file's dataset, its pixel data left on disk; SeriesRejected naming the file
    when it is missing or not DICOM (a truncated copy, a stray file in a folder)."""
    try:
        return pydicom.dcmread(path, defer_size=DEFER_BYTES)
    except Exception as exc:  # pydicom raises many kinds for a broken file
        raise SeriesRejected(f"{Path(path).name} cannot be read as DICOM: "
                             f"{type(exc).__name__}: {exc}") from exc


def read_series(
    files: Iterable[Path], *, min_slices: int = 1, spacing_tolerance: float = 0.1
) -> CTVolume:
    """Read, check and stack a CT series; raises SeriesRejected naming the problem.

    `spacing_tolerance` is the largest relative departure of one slice step from the
    median step (0.1: 10 %).
    """
    # Headers first, each file parsed once with its pixel data left on disk (deferred):
    # the geometry is checked before any pixels are read, and then one slice at a time is
    # read, decoded into the volume and dropped again (a 1,200-slice 1024 x 1024 series
    # holds 2.5 GB of pixels, which must not all sit in memory beside its 5 GB volume).
    datasets, left_out = _slices_of(_one_per_instance([_read_header(path) for path in files]))
    for ds in datasets:  # before the count: one Enhanced CT instance holds every slice
        _check_single_frame(ds)
    if len(datasets) < max(min_slices, 2):
        aside = f" ({len(left_out)} other instance(s) are not CT slices)" if left_out else ""
        raise SeriesRejected(
            f"{len(datasets)} slice(s){aside}; at least {max(min_slices, 2)} are needed"
            " for a volume"
        )
    for keyword in ("Rows", "Columns", "SeriesInstanceUID", "FrameOfReferenceUID",
                    "ConvolutionKernel"):
        _check_same(datasets, keyword)
    for keyword in ("Rows", "Columns"):
        if not isinstance(datasets[0].get(keyword), int) or datasets[0].get(keyword) < 1:
            raise SeriesRejected(f"{keyword} is {datasets[0].get(keyword, 'absent')!r}:"
                                 " the image size is unknown")
    _check_image_kind(datasets)
    orientation = _orientation(datasets)
    flips = _display_flips(orientation)
    pixel_spacing = {tuple(_float_list(ds, "PixelSpacing", 2)) for ds in datasets}
    if len(pixel_spacing) > 1:
        raise SeriesRejected(f"PixelSpacing differs between slices ({sorted(pixel_spacing)[:3]})")
    row_spacing, column_spacing = next(iter(pixel_spacing))
    if not (row_spacing > 0 and column_spacing > 0):
        raise SeriesRejected(f"PixelSpacing {row_spacing:g}\\{column_spacing:g} mm: a pixel"
                             " spacing must be positive")
    datasets, positions, distance = _sort_along_normal(datasets, orientation)
    normal = np.cross(orientation[:3], orientation[3:])
    dz = _slice_spacing(positions, distance, normal, spacing_tolerance)
    _acquisitions_apart(datasets, distance)
    if flips[0] != flips[1]:  # one flip reverses the normal: keep z ascending along it
        datasets, positions = datasets[::-1], positions[::-1]

    hu = np.empty((len(datasets), int(datasets[0].Rows), int(datasets[0].Columns)), np.float32)
    for z, ds in enumerate(datasets):
        hu[z] = flip_to_stored(_slice_hu(ds)[None], flips)[0]
        del ds.PixelData  # and pydicom's cached array with it: the volume keeps headers
    row_direction, column_direction = orientation[:3].copy(), orientation[3:].copy()
    origin = positions[0].copy()
    if flips[0]:
        origin += (hu.shape[1] - 1) * row_spacing * column_direction
        column_direction = -column_direction
    if flips[1]:
        origin += (hu.shape[2] - 1) * column_spacing * row_direction
        row_direction = -row_direction
    if any(flips):  # `hu` was filled flipped (a flip is its own inverse)
        logger.info("series %s: images turned to the display convention (rows flipped: %s,"
                    " columns flipped: %s)", datasets[0].SeriesInstanceUID, *flips)
    logger.debug("volume %s: %s voxels, spacing %.2f x %.2f x %.2f mm",
                 datasets[0].SeriesInstanceUID, hu.shape, dz, row_spacing, column_spacing)
    return CTVolume(
        hu=hu,
        spacing_mm=(dz, float(row_spacing), float(column_spacing)),
        datasets=tuple(datasets),
        orientation=tuple(float(v) for v in (*row_direction, *column_direction)),
        origin_mm=tuple(float(v) for v in origin),  # type: ignore[arg-type]
        stored_flips=flips,
        left_out=left_out,
    )
