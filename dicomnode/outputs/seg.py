"""DICOM Segmentation (PS3.3 A.51) of the lungs and the pneumonia lesions.

Segment 1 is the lungs, segment 2 all lesions; segments 3.. are individual lesions
(largest first, capped) so the SR can measure each one against its own segment.
BINARY, uncompressed, frames parallel to the CT (OHIF overlays it on the series).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from scipy import ndimage as ndi

from ai.analysis import LesionStats, label_components
from dicomnode.outputs import (
    MANUFACTURER,
    MODEL_NAME,
    OutputSeries,
    Provenance,
    date_series,
    output_series_number,
    prepare_sources,
    series_description,
)
from dicomnode.volume import flip_to_stored

SERIES_DESCRIPTION = "AI lesions (DeepSC)"
LUNG_SEGMENT = 1
LESIONS_SEGMENT = 2
FIRST_LESION_SEGMENT = 3
LUNG_COLOUR = hd.color.CIELabColor(60.0, -40.0, 30.0)  # green
LESION_COLOUR = hd.color.CIELabColor(55.0, 75.0, 60.0)  # red
SINGLE_LESION_COLOURS = tuple(hd.color.CIELabColor.from_rgb(*rgb) for rgb in (
    (255, 220, 0),  # yellow
    (255, 140, 0),  # orange
    (230, 0, 230),  # magenta
    (40, 90, 255),  # blue
    (150, 80, 255),  # violet
    (255, 150, 190),  # pink
    (160, 110, 40),  # brown
    (180, 190, 0),  # olive
))
"""Lesion k's colour, in turn: viewers that merge overlapping segments into one label map
(OHIF) show each lesion apart. Not the lungs' green, the lesions' red or the key images'
cyan."""


@dataclass(frozen=True)
class SegmentationOutput:
    """The SEG dataset and which segment number holds which lesion (by LesionStats.index)."""

    dataset: Dataset
    lesion_segments: dict[int, int]


class NestedSegmentation(hd.seg.Segmentation):
    """A BINARY SEG whose segments nest by construction: lesions lie in the lungs and each
    lesion in all lesions, so segments overlap exactly when segment 2 has a voxel.

    highdicom infers SegmentsOverlap by summing the whole (frames, rows, columns,
    segments) array over segments in 64-bit, about 2 s for a 300-slice CT; what we know
    needs no such pass. (A private classmethod of highdicom 0.28, pinned in
    constraints.txt; tests check the attribute and the decoded masks.)
    """

    @classmethod
    def _check_and_cast_pixel_array(  # type: ignore[override]
        cls,
        pixel_array: np.ndarray,
        segment_numbers: np.ndarray,
        segmentation_type: hd.seg.SegmentationTypeValues,
        dtype: type,
    ) -> tuple[np.ndarray, hd.seg.SegmentsOverlapValues]:
        if pixel_array.ndim != 4 or pixel_array.shape[-1] != len(segment_numbers):
            raise ValueError(f"pixel array {pixel_array.shape} vs {len(segment_numbers)} segments")
        nested = bool(pixel_array[..., LESIONS_SEGMENT - 1].any())
        overlap = hd.seg.SegmentsOverlapValues.YES if nested else hd.seg.SegmentsOverlapValues.NO
        return pixel_array, overlap


def algorithm_identification(provenance: Provenance) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=provenance.algorithm_name,
        family=codes.cid7162.ArtificialIntelligence,
        version=provenance.model_version,
        parameters=provenance.algorithm_parameters or None,
    )


def lesion_voxels(
    lesion_mask: np.ndarray, lesion: LesionStats, connectivity: int
) -> tuple[tuple[slice, slice, slice], np.ndarray]:
    """The voxels of one analysed lesion: its bounding box and its mask inside that box.

    A connected component lies wholly inside its own bounding box, so labelling only the
    box finds it intact (other lesions may reach into the box, as separate components);
    it is the component with the lesion's voxel count that spans the whole box.
    """
    z0, z1, y0, y1, x0, x1 = lesion.bbox_voxels
    box = (slice(z0, z1), slice(y0, y1), slice(x0, x1))
    labels, n = label_components(lesion_mask[box], connectivity)
    counts = np.bincount(labels.ravel(), minlength=n + 1)
    full = (z1 - z0, y1 - y0, x1 - x0)
    for label, found in enumerate(ndi.find_objects(labels), start=1):
        spans = found is not None and tuple(sl.stop - sl.start for sl in found) == full
        if spans and counts[label] == lesion.voxels:
            return box, labels == label
    raise ValueError(f"lesion {lesion.index} is not a component of the lesion mask")


def _segment(
    number: int,
    label: str,
    category: object,
    kind: object,
    provenance: Provenance,
    colour: hd.color.CIELabColor,
    tracking_id: str,
) -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label,
        segmented_property_category=category,  # type: ignore[arg-type]
        segmented_property_type=kind,  # type: ignore[arg-type]
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_identification(provenance),
        tracking_uid=provenance.uid("seg", "segment", number),
        tracking_id=tracking_id,
        anatomic_regions=[codes.SCT.Lung] if number != LUNG_SEGMENT else None,
        display_color=colour,
    )


def build_segmentation(
    source_images: Sequence[Dataset],
    lung_mask: np.ndarray,
    lesion_mask: np.ndarray,
    lesions: Sequence[LesionStats],
    provenance: Provenance,
    *,
    connectivity: int = 26,
    max_lesion_segments: int = 10,
    omit_empty_frames: bool = True,
    stored_flips: tuple[bool, bool] = (False, False),
) -> SegmentationOutput:
    """The SEG for one analysed series; masks are [z, y, x] aligned with `source_images`,
    or with their rows / columns reversed as `stored_flips` says (`CTVolume.stored_flips`:
    the volume was turned to the display convention; the frames are turned back).

    `omit_empty_frames` (a frame only for each plane where a segment has voxels) keeps
    a 300-slice SEG with 12 segments at about 26 MB instead of 120 MB; turn it off for
    viewers that misplace such SEGs (OHIF v2, older dcmjs). An empty lesion segment still
    gives a valid object.
    """
    prepare_sources(source_images)
    shape = (len(source_images), int(source_images[0].Rows), int(source_images[0].Columns))
    for name, mask in (("lung_mask", lung_mask), ("lesion_mask", lesion_mask)):
        if mask.shape != shape:
            raise ValueError(f"{name} shape {mask.shape} does not match the CT {shape}")
    shown = list(lesions)[:max_lesion_segments]
    descriptions = [
        _segment(
            LUNG_SEGMENT,
            "Lungs",
            codes.SCT.AnatomicalStructure,
            codes.SCT.Lung,
            provenance,
            LUNG_COLOUR,
            "Lungs",
        ),
        _segment(
            LESIONS_SEGMENT,
            "Pneumonia lesions",
            codes.SCT.MorphologicallyAbnormalStructure,
            codes.SCT.Lesion,
            provenance,
            LESION_COLOUR,
            "Pneumonia lesions",
        ),
    ]
    lesion_segments: dict[int, int] = {}
    # (frames, rows, columns, segments) as a view of a segment-major array, so that every
    # frame highdicom encodes is one contiguous plane; individual lesions are filled only
    # inside their bounding boxes. Boolean, not uint8: highdicom tests every plane of
    # every segment for emptiness, and numpy tests booleans without a cast (about 4x
    # faster over the 3,600 planes of a 300-slice CT with 12 segments).
    planes = np.zeros((2 + len(shown), *shape), bool)
    lung = np.not_equal(lung_mask, 0, out=planes[LUNG_SEGMENT - 1])
    lesion = np.logical_and(lesion_mask, lung, out=planes[LESIONS_SEGMENT - 1])
    pixel_array = flip_to_stored(np.moveaxis(planes, 0, -1), stored_flips)
    for offset, stats in enumerate(shown):
        number = FIRST_LESION_SEGMENT + offset
        lesion_segments[stats.index] = number
        descriptions.append(
            _segment(
                number,
                f"Lesion {stats.index}",
                codes.SCT.MorphologicallyAbnormalStructure,
                codes.SCT.Lesion,
                provenance,
                SINGLE_LESION_COLOURS[offset % len(SINGLE_LESION_COLOURS)],
                f"Lesion {stats.index}",
            )
        )
        box, voxels = lesion_voxels(lesion, stats, connectivity)
        planes[(number - 1, *box)] = voxels
    seg = NestedSegmentation(
        source_images=list(source_images),
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=provenance.uid("seg", "series"),
        series_number=output_series_number(OutputSeries.SEG, source_images[0]),
        sop_instance_uid=provenance.uid("seg", "instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME,
        software_versions=provenance.software_versions,
        device_serial_number=provenance.device_serial_number,
        content_label="AI_LESIONS",
        content_description="Lungs and pneumonia lesions (DeepSC-COVID), research use",
        content_creator_name="dicomnode^AI",
        omit_empty_frames=omit_empty_frames,
        series_description=series_description(SERIES_DESCRIPTION, source_images[0]),
        content_qualification="RESEARCH",
    )
    date_series([seg])
    return SegmentationOutput(dataset=seg, lesion_segments=lesion_segments)
