"""DICOM CT instances of one series -> a geometry-checked volume in HU.

The AI needs a regular 3D grid: slices parallel, equally spaced, perpendicular to their
stacking direction, all the same size. Rather than guess, every departure from that is
rejected with a reason a PACS administrator can act on (the job goes failed(reason)).
Slices are ordered along the slice normal (PS3.3 C.7.6.2.1.1), never by InstanceNumber
or file name.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID

logger = logging.getLogger(__name__)

ENHANCED_CT_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2.1")
ORIENTATION_TOLERANCE = 1e-3
"""Largest difference between direction cosines still counted as the same orientation."""
TILT_TOLERANCE_DEG = 1.0
"""Largest angle between the stacking direction and the slice normal (gantry tilt)."""
PADDING_HU = -1024.0
"""HU given to PixelPaddingValue voxels (outside the reconstruction circle): air."""


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
    """ImagePositionPatient of the first slice."""

    @property
    def shape(self) -> tuple[int, int, int]:
        return (int(self.hu.shape[0]), int(self.hu.shape[1]), int(self.hu.shape[2]))


def _float_list(ds: Dataset, keyword: str, n: int) -> np.ndarray:
    value = ds.get(keyword)
    if value is None or len(value) != n:
        raise SeriesRejected(f"instance {ds.get('InstanceNumber', '?')} lacks {keyword}")
    try:
        return np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        raise SeriesRejected(f"{keyword} is not numeric: {value!r}") from None


def _check_single_frame(ds: Dataset) -> None:
    if ds.get("SOPClassUID") == ENHANCED_CT_STORAGE or int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise SeriesRejected(
            "multi-frame (Enhanced CT) series are not supported: "
            "send the series as single-frame CT Image Storage"
        )


def _check_same(datasets: Sequence[Dataset], keyword: str) -> None:
    values = {str(ds.get(keyword, "")) for ds in datasets}
    if len(values) > 1:
        shown = ", ".join(sorted(values)[:3])
        raise SeriesRejected(f"{keyword} differs between slices ({shown})")


def _orientation(datasets: Sequence[Dataset]) -> np.ndarray:
    first = _float_list(datasets[0], "ImageOrientationPatient", 6)
    for ds in datasets[1:]:
        if np.abs(_float_list(ds, "ImageOrientationPatient", 6) - first).max() > (
            ORIENTATION_TOLERANCE
        ):
            raise SeriesRejected("mixed slice orientations (ImageOrientationPatient differs)")
    return first


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
    spacing = float(np.median(steps))
    worst = int(np.argmax(np.abs(steps - spacing)))
    if abs(steps[worst] - spacing) > tolerance * spacing:
        if steps[worst] > 1.5 * spacing:
            raise SeriesRejected(
                f"gap of {steps[worst]:.2f} mm between slices {worst} and {worst + 1} "
                f"(expected {spacing:.2f} mm): slices are missing"
            )
        raise SeriesRejected(
            f"slice spacing varies {steps.min():.2f}-{steps.max():.2f} mm "
            f"(more than {tolerance:.0%} around {spacing:.2f} mm)"
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
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    hu = stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    padding = ds.get("PixelPaddingValue")
    if padding is not None:
        hu[stored == padding] = PADDING_HU
    return hu


def read_series(
    files: Iterable[Path], *, min_slices: int = 1, spacing_tolerance: float = 0.1
) -> CTVolume:
    """Read, check and stack a CT series; raises SeriesRejected naming the problem.

    `spacing_tolerance` is the largest relative departure of one slice step from the
    median step (0.1: 10 %).
    """
    datasets = [pydicom.dcmread(path) for path in files]
    if len(datasets) < max(min_slices, 2):
        raise SeriesRejected(
            f"{len(datasets)} slice(s); at least {max(min_slices, 2)} are needed for a volume"
        )
    for ds in datasets:
        _check_single_frame(ds)
    for keyword in ("Rows", "Columns", "SeriesInstanceUID", "FrameOfReferenceUID"):
        _check_same(datasets, keyword)
    orientation = _orientation(datasets)
    pixel_spacing = {tuple(_float_list(ds, "PixelSpacing", 2)) for ds in datasets}
    if len(pixel_spacing) > 1:
        raise SeriesRejected(f"PixelSpacing differs between slices ({sorted(pixel_spacing)[:3]})")
    row_spacing, column_spacing = next(iter(pixel_spacing))
    datasets, positions, distance = _sort_along_normal(datasets, orientation)
    normal = np.cross(orientation[:3], orientation[3:])
    dz = _slice_spacing(positions, distance, normal, spacing_tolerance)

    hu = np.empty((len(datasets), int(datasets[0].Rows), int(datasets[0].Columns)), np.float32)
    for z, ds in enumerate(datasets):
        hu[z] = _slice_hu(ds)
        del ds.PixelData  # the headers are kept for references; the pixels live in `hu`
    if not np.isfinite(hu).all():
        raise SeriesRejected("pixel data decode to non-finite values")
    logger.debug("volume %s: %s voxels, spacing %.2f x %.2f x %.2f mm",
                 datasets[0].SeriesInstanceUID, hu.shape, dz, row_spacing, column_spacing)
    return CTVolume(
        hu=hu,
        spacing_mm=(dz, float(row_spacing), float(column_spacing)),
        datasets=tuple(datasets),
        orientation=tuple(float(v) for v in orientation),
        origin_mm=tuple(float(v) for v in positions[0]),  # type: ignore[arg-type]
    )
