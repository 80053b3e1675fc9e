"""Which complete series qualify for AI: the `[series]` selection rules.

Each rule, when it fails, names itself and the value that failed it; that text becomes
the skipped Job's reason, so an administrator sees in `dicomnode status` why a series
was not analysed.
"""

from __future__ import annotations

import math
import re

from dicomnode.config import SeriesConfig
from dicomnode.volume import MULTI_FRAME_CT
from storage.index import SeriesProgress

AXIAL_TOLERANCE_DEG = 10.0
MULTI_FRAME_NAMES = {uid: uid.name for uid in MULTI_FRAME_CT}
"""For the skip reason (`dicomnode.volume` says so too, for a series that gets past
these rules)."""


def slice_normal_angle_deg(orientation: tuple[float, ...]) -> float | None:
    """Angle between the slice normal (row x column cosines) and the patient's z axis."""
    if len(orientation) != 6:
        return None
    r, c = orientation[:3], orientation[3:]
    n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    norm = math.sqrt(sum(v * v for v in n))
    if norm == 0:
        return None
    return math.degrees(math.acos(min(1.0, abs(n[2]) / norm)))


def skip_reason(series: SeriesProgress, rules: SeriesConfig) -> str | None:
    """None when the series qualifies; otherwise why it is skipped, naming the rule."""
    if series.refused_instances:
        return (f"incomplete: {series.refused_instances} instance(s) refused for want of disk"
                " space or a failed write were not sent again within max_wait_seconds;"
                " send the series again")
    modalities = [m.upper() for m in rules.modalities]
    if series.modality.upper() not in modalities:
        return f"modalities: {series.modality or 'no modality'} is not one of {modalities}"
    multi_frame = sorted(MULTI_FRAME_NAMES[c] for c in series.sop_classes if c in MULTI_FRAME_NAMES)
    if multi_frame:
        return (f"multi-frame CT ({', '.join(multi_frame)}) is not supported: have the"
                " scanner or PACS send the series as CT Image Storage (one slice per instance)")
    image_type = {v.upper() for v in series.image_type}
    excluded = sorted(image_type & {v.upper() for v in rules.image_type_excludes})
    if excluded:
        return f"image_type_excludes: ImageType contains {', '.join(excluded)}"
    missing = sorted({v.upper() for v in rules.image_type_requires} - image_type)
    if missing:
        return f"image_type_requires: ImageType lacks {', '.join(missing)}"
    if rules.description_regex and not re.search(
        rules.description_regex, series.series_description, re.IGNORECASE
    ):
        return (
            f"description_regex: {series.series_description!r} does not match "
            f"{rules.description_regex!r}"
        )
    if (
        rules.body_part_regex
        and series.body_part_examined
        and not re.search(rules.body_part_regex, series.body_part_examined, re.IGNORECASE)
    ):
        return (
            f"body_part_regex: {series.body_part_examined!r} does not match "
            f"{rules.body_part_regex!r}"
        )
    if series.instance_count < rules.min_slices:
        return f"min_slices: {series.instance_count} instances, fewer than {rules.min_slices}"
    thickness = series.slice_thickness_mm
    if thickness is not None and thickness > rules.max_slice_thickness_mm:
        return (
            f"max_slice_thickness_mm: slices are {thickness:g} mm, thicker than "
            f"{rules.max_slice_thickness_mm:g} mm"
        )
    if rules.require_axial:
        angle = slice_normal_angle_deg(series.image_orientation)
        if angle is None:
            return "require_axial: no usable ImageOrientationPatient"
        if angle > AXIAL_TOLERANCE_DEG:
            return f"require_axial: slices are tilted {angle:.0f} degrees from axial"
    return None
