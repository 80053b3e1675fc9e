"""Secondary Capture key images: the few slices that matter, readable in any viewer.

Every PACS and OsiriX/Horos displays Secondary Capture, whereas SEG overlays need a
capable viewer (Horos rejects SEG outright). So the slices with the most lesion are
rendered here in a lung window, with the lesion outline, the model's evidence heat map
and the numbers burned into a side panel. Rendering is numpy + Pillow (no matplotlib
figure): well under a second per 512 x 512 slice, and safe in worker threads.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import PersonName
from scipy import ndimage as ndi

from ai.labels import CLASS_NAMES, Diagnosis
from dicomnode.outputs import (
    MANUFACTURER,
    MODEL_NAME,
    RESEARCH_NOTICE,
    OutputSeries,
    Provenance,
    date_series,
    output_series_number,
    prepare_sources,
    series_description,
)
from dicomnode.outputs.fonts import PLACEHOLDER, base_font, font_runs

if TYPE_CHECKING:  # ai.infer pulls in torch; only its types are needed here
    from ai.infer import Analysis
    from dicomnode.volume import CTVolume

logger = logging.getLogger(__name__)

SERIES_DESCRIPTION = "AI key images (DeepSC)"
WINDOW_CENTRE_HU = -600.0
WINDOW_WIDTH_HU = 1500.0
MIN_SEPARATION_MM = 10.0
"""Key slices closer than this show the same lesion twice; pick another one instead."""
MIN_IMAGE_PIXELS = 512
"""Small matrices are upscaled (integer factor) to at least this, so the text stays legible."""
PANEL_FRACTION = 0.66
"""Width of the text panel relative to the image height."""
OUTLINE_RGB = (0, 255, 255)
"""Cyan: stands out from grey lung and from the red-yellow heat map."""
HEAT_OPACITY = 0.4
"""Opacity of the heat map where the evidence is 1 (it fades out with the evidence)."""
HEAT_FLOOR = 0.1
"""Evidence below this is not drawn, so that unremarkable lung stays plain grey."""
PANEL_RGB = (16, 16, 16)
TEXT_RGB = (235, 235, 235)
DIM_RGB = (160, 160, 160)
NOTICE_RGB = (255, 210, 0)
DIAGNOSIS_RGB = {
    Diagnosis.COVID19: (255, 120, 90),
    Diagnosis.CAP: (255, 190, 80),
    Diagnosis.NON_PNEUMONIA: (140, 230, 140),
}
SOURCE_PURPOSE = hd.sr.CodedConcept("121322", "DCM", "Source image for image processing operation")


@dataclass(frozen=True)
class Line:
    """One row of the side panel: text on the left, optionally a value on the right."""

    text: str
    value: str = ""
    style: str = "normal"
    """normal | bold | small | dim | notice | diagnosis"""


def percent(fraction: float | None) -> str:
    """Fractions as percent for reports; None (undefined, e.g. PLR without lesions) as n/a."""
    return "n/a" if fraction is None else f"{100.0 * fraction:.1f} %"


def pick_key_slices(
    lesion_mask: np.ndarray,
    lung_mask: np.ndarray,
    spacing_mm: Sequence[float],
    count: int,
    min_separation_mm: float = MIN_SEPARATION_MM,
) -> list[int]:
    """Slice indices to show, most lesion area first, at least `min_separation_mm` apart.

    Without lesions: the one slice with the most lung (where a reader would look first).
    Fewer than `count` come back when the lesions span too few separated slices.
    """
    if count < 1:
        raise ValueError(f"count {count} must be >= 1")
    areas = np.count_nonzero(lesion_mask, axis=(1, 2))
    if not areas.any():
        return [int(np.argmax(np.count_nonzero(lung_mask, axis=(1, 2))))]
    dz = float(spacing_mm[0])
    picked: list[int] = []
    for z in np.argsort(-areas, kind="stable"):
        if areas[z] == 0 or len(picked) == count:
            break
        if all(abs(int(z) - p) * dz >= min_separation_mm - 1e-6 for p in picked):
            picked.append(int(z))
    return picked


def _scale(shape: tuple[int, ...]) -> int:
    return max(1, math.ceil(MIN_IMAGE_PIXELS / max(shape)))


def _upscale_nearest(mask: np.ndarray, k: int) -> np.ndarray:
    return mask if k == 1 else np.repeat(np.repeat(mask, k, axis=0), k, axis=1)


def _upscale_linear(values: np.ndarray, k: int) -> np.ndarray:
    if k == 1:
        return values
    image = Image.fromarray(np.ascontiguousarray(values, dtype=np.float32), mode="F")
    size = (values.shape[1] * k, values.shape[0] * k)
    return np.asarray(image.resize(size, Image.Resampling.BILINEAR))


def render_slice(volume: CTVolume, analysis: Analysis, z: int) -> np.ndarray:
    """Slice z in the lung window with heat map and lesion outline: RGB uint8, upscaled."""
    k = _scale(volume.hu.shape[1:])
    low = WINDOW_CENTRE_HU - WINDOW_WIDTH_HU / 2
    grey = np.clip((volume.hu[z] - low) * (255.0 / WINDOW_WIDTH_HU), 0.0, 255.0)
    grey = _upscale_linear(grey, k)
    lung = _upscale_nearest(analysis.lung_mask[z].astype(bool), k)
    evidence = np.clip(_upscale_linear(analysis.evidence_map[z], k), 0.0, 1.0) * lung
    alpha = (HEAT_OPACITY * np.clip((evidence - HEAT_FLOOR) / (1.0 - HEAT_FLOOR), 0, 1))[..., None]
    heat = np.stack([np.full_like(evidence, 255.0), 255.0 * evidence,
                     np.zeros_like(evidence)], axis=-1)  # red (weak) -> yellow (strong)
    rgb = grey[..., None] * (1.0 - alpha) + heat * alpha
    lesion = _upscale_nearest(analysis.lesion_mask[z].astype(bool) & lung[::k, ::k], k)
    thickness = max(1, rgb.shape[0] // 256)
    edge = lesion & ~ndi.binary_erosion(lesion, iterations=thickness)
    out = np.rint(rgb).astype(np.uint8)
    out[edge] = OUTLINE_RGB
    return out


_TEXT_LOCK = threading.Lock()
"""FreeType faces are not safe to share between threads; text drawing is brief, so serialise it."""


@lru_cache(maxsize=32)
def _font(size: int, path: str) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def _draw_text(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, size: int,
               bold: bool, colour: tuple[int, int, int]) -> None:
    """`text` at xy (left, top), run by run in the fonts that have its characters
    (`fonts.font_runs`: a name in Chinese, Japanese or Korean is not DejaVu Sans's), on
    DejaVu Sans's baseline; the placeholder where no installed font has them."""
    base = _font(size, base_font(bold))
    runs = font_runs(text, bold)
    if runs is None:
        runs = [(PLACEHOLDER, base_font(bold))]
    x, baseline = float(xy[0]), xy[1] + base.getmetrics()[0]
    for segment, path in runs:
        font = _font(size, path)
        draw.text((x, baseline), segment, font=font, fill=colour, anchor="ls")
        x += font.getlength(segment)


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: float) -> list[str]:
    indent = text[: len(text) - len(text.lstrip())]
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(indent + word)
    return lines


def annotate(image: np.ndarray, lines: Sequence[Line], diagnosis: Diagnosis) -> np.ndarray:
    """The image with a text panel on its right; long lines wrap, the rest is cut off. An
    image of width 0 gives the panel alone."""
    h, w = image.shape[:2]
    panel_w = int(PANEL_FRACTION * h)
    canvas = Image.new("RGB", (w + panel_w, h), PANEL_RGB)
    if w:
        canvas.paste(Image.fromarray(image), (0, 0))
    draw = ImageDraw.Draw(canvas)
    size = max(10, h // 32)
    x0, x1, y = w + size, w + panel_w - size, size // 2
    colours = {"dim": DIM_RGB, "small": DIM_RGB, "notice": NOTICE_RGB,
               "diagnosis": DIAGNOSIS_RGB[diagnosis]}
    with _TEXT_LOCK:
        for line in lines:
            line_size = int(size * 0.85) if line.style in ("small", "notice") else size
            bold = line.style in ("bold", "diagnosis")
            font = _font(line_size, base_font(bold))
            colour = colours.get(line.style, TEXT_RGB)
            for part in _wrap(line.text, font, x1 - x0) or [""]:
                _draw_text(draw, (x0, y), part, line_size, bold, colour)
                if line.value:
                    draw.text((x1, y), line.value, font=font, fill=colour, anchor="ra")
                y += int(font.size * 1.3)
    return np.asarray(canvas)


def mark_orientation(image: np.ndarray, letters: tuple[str, str]) -> np.ndarray:
    """Patient direction letters at the four edges (radiologists read R/L first)."""
    opposite = {"L": "R", "R": "L", "A": "P", "P": "A", "H": "F", "F": "H"}
    row, column = letters
    h, w = image.shape[:2]
    marks = ((opposite[row], (4, h // 2), "lm"), (row, (w - 4, h // 2), "rm"),
             (opposite[column], (w // 2, 4), "mt"), (column, (w // 2, h - 4), "mb"))
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    font = _font(max(10, h // 32), base_font(bold=True))
    with _TEXT_LOCK:
        for text, xy, anchor in marks:
            draw.text(xy, text, font=font, fill=TEXT_RGB, anchor=anchor, stroke_width=2,
                      stroke_fill=(0, 0, 0))
    return np.asarray(canvas)


def orientation_letters(orientation: Sequence[float]) -> tuple[str, str]:
    """Main patient direction of the rows and columns (PatientOrientation, LPS axes)."""
    letters = []
    for vector in (orientation[:3], orientation[3:]):
        axis = int(np.argmax(np.abs(vector)))
        positive = vector[axis] > 0
        letters.append(("L", "P", "H")[axis] if positive else ("R", "A", "F")[axis])
    return letters[0], letters[1]


def format_name(value: object) -> str:
    """A DICOM person name as "Family, Given" (readable, unlike the raw "Family^Given"),
    from its alphabetic group, else its ideographic or phonetic one (a name stored only
    as "=山田^太郎" must not print as a bare comma)."""
    if not value:
        return ""
    name = PersonName(value)
    for group in (name.alphabetic, name.ideographic, name.phonetic):
        parts = [part.strip() for part in group.split("^")[:2]]
        if any(parts):
            return ", ".join(part for part in parts if part)
    return ""


def format_date(value: object) -> str:
    """DICOM DA (YYYYMMDD) as YYYY-MM-DD; anything else as it is."""
    text = str(value or "")
    return f"{text[:4]}-{text[4:6]}-{text[6:8]}" if len(text) == 8 else text


def slice_position(volume: CTVolume, z: int) -> tuple[str, str]:
    """Where slice z is, as the viewer shows it: image number and table position (z; the
    node analyses axial series only, `volume.read_series`)."""
    ds = volume.datasets[z]
    return (f"Image {ds.get('InstanceNumber', '?')} (slice {z + 1}/{len(volume.datasets)})",
            f"z {float(ds.ImagePositionPatient[2]):.1f} mm")


def lesion_area_mm2(volume: CTVolume, analysis: Analysis, z: int) -> float:
    return float(np.count_nonzero(analysis.lesion_mask[z])) * math.prod(volume.spacing_mm[1:])


def _identity_lines(ds: Dataset) -> list[Line]:
    return [
        Line("DeepSC-COVID AI result", style="bold"),
        Line(format_name(ds.get("PatientName")), style="small"),
        Line(f"ID {ds.get('PatientID', '')}", format_date(ds.get("StudyDate")), style="small"),
        Line(""),
    ]


def panel_lines(
    volume: CTVolume, analysis: Analysis, provenance: Provenance, z: int, rank: int, total: int
) -> list[Line]:
    """The burned-in text: identity, the diagnosis and numbers, where this slice is, notice."""
    stats = analysis.stats
    lines = [
        *_identity_lines(volume.datasets[z]),
        Line(f"Diagnosis: {CLASS_NAMES[analysis.diagnosis]}", style="diagnosis"),
    ]
    lines += [Line(f"  {name}", percent(analysis.probabilities[name])) for name in CLASS_NAMES]
    lines += [
        Line("LVR (lesion / lung volume)", percent(analysis.lvr)),
        Line("PLR (peripheral lesions)", percent(analysis.plr)),
        Line("Lesions", f"{stats.lesion_count} ({stats.lesion_volume_ml:.1f} mL)"),
        *(Line(caveat.short, style="notice") for caveat in analysis.caveats),
        Line(""),
        Line(f"Key image {rank} of {total}", style="bold"),
        Line(*slice_position(volume, z), style="dim"),
    ]
    if stats.lesion_count:
        area_cm2 = lesion_area_mm2(volume, analysis, z) / 100.0
        lines += [
            Line("Lesion area on this slice", f"{area_cm2:.1f} cm2", style="dim"),
            Line("Cyan outline: AI lesion boundary", style="small"),
        ]
    else:
        lines.append(Line("No lesions found; slice with the most lung", style="small"))
    lines += [
        Line(f"Red-yellow: {analysis.evidence_legend}", style="small"),
        Line(""),
        Line(RESEARCH_NOTICE, style="notice"),
        Line(f"{provenance.algorithm_name} {provenance.model_version}".strip(), style="small"),
    ]
    return lines


def _source_reference(ds: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    item.PurposeOfReferenceCodeSequence = [SOURCE_PURPOSE]
    return item


def _sc_image(
    source: Dataset, pixels: np.ndarray, number: int, series_uid: str,
    provenance: Provenance, series_number: int, *, orientation: Sequence[float] | None,
    kind: str = "key_images", description: str = SERIES_DESCRIPTION,
    derivation: str = "Lung window W1500 L-600 with AI lesion outline and evidence heat map",
) -> hd.sc.SCImage:
    """A Secondary Capture image of `pixels` (RGB) made from the CT image `source`, in
    patient coordinates; with `orientation` None (a text image), Patient Orientation
    (0020,0020, type 2C) is present and empty: the picture has none."""
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=provenance.uid(kind, "instance", number),
        instance_number=number,
        manufacturer=MANUFACTURER,
        patient_orientation=orientation_letters(orientation or (1, 0, 0, 0, 1, 0)),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=series_description(description, source),
        manufacturer_model_name=MODEL_NAME,
        software_versions=provenance.software_versions,
        device_serial_number=provenance.device_serial_number,
    )
    # Every Patient and Study attribute, not only the few from_ref_dataset copies: a PACS
    # with several patient ID issuers files an image without IssuerOfPatientID wrongly.
    sc.copy_patient_and_study_information(source)
    if "BodyPartExamined" in source:
        sc.BodyPartExamined = source.BodyPartExamined
    sc.ConversionType = "WSD"  # rendered by software (highdicom's default: digitised film)
    sc.StationName = provenance.station_name
    sc.BurnedInAnnotation = "YES"  # patient name, ID and study date are in the panel
    sc.RecognizableVisualFeatures = "NO"
    sc.LossyImageCompression = "00"
    if orientation is None:
        sc.PatientOrientation = ""
    sc.DerivationDescription = derivation
    sc.SourceImageSequence = [_source_reference(source)]
    sc.ImageComments = RESEARCH_NOTICE
    return sc


def build_key_images(
    volume: CTVolume,
    analysis: Analysis,
    provenance: Provenance,
    count: int,
) -> list[Dataset]:
    """Up to `count` Secondary Capture images (one new series in the CT's study).

    Instance 1 is the slice with the most lesion; without lesions a single image at the
    slice with the most lung still carries the diagnosis and the numbers.
    """
    prepare_sources(volume.datasets)
    slices = pick_key_slices(analysis.lesion_mask, analysis.lung_mask, volume.spacing_mm, count)
    series_uid = provenance.uid("key_images", "series")
    series_number = output_series_number(OutputSeries.KEY_IMAGES, volume.datasets[0])
    letters = orientation_letters(volume.orientation)
    images: list[Dataset] = []
    for rank, z in enumerate(slices, start=1):
        picture = mark_orientation(render_slice(volume, analysis, z), letters)
        lines = panel_lines(volume, analysis, provenance, z, rank, len(slices))
        pixels = annotate(picture, lines, analysis.diagnosis)
        images.append(_sc_image(volume.datasets[z], pixels, rank, series_uid, provenance,
                                series_number, orientation=volume.orientation))
    logger.debug("key images of series %s: slices %s", volume.datasets[0].SeriesInstanceUID,
                 slices)
    date_series(images)
    return images


NOTICE_DESCRIPTION = "AI not analysed, image (DeepSC)"
NOTICE_ROWS = 512


def notice_lines(source_header: Dataset, reason: str) -> list[Line]:
    what = (f"Series {source_header.get('SeriesNumber', '')}"
            f" ({source_header.get('SeriesDescription', '')})")
    return [
        *_identity_lines(source_header),
        Line("NOT ANALYSED", style="notice"),
        Line(what),
        Line(""),
        Line(f"Why: {reason}", style="small"),
        Line(""),
        Line("There is no AI result for this series.", style="small"),
    ]


def build_notice_image(
    source_header: Dataset, reason: str, provenance: Provenance
) -> Dataset:
    """The failure notice as a Secondary Capture image: the text of the SR notice
    (`sr.build_failure_notice`) burned in, for viewers that show images but not a
    free-form SR (OHIF lists such an SR as unsupported)."""
    prepare_sources([source_header])
    pixels = annotate(np.zeros((NOTICE_ROWS, 0, 3), np.uint8),
                      notice_lines(source_header, reason), Diagnosis.NON_PNEUMONIA)
    image = _sc_image(source_header, pixels, 1, provenance.uid("notice_image", "series"),
                      provenance, output_series_number(OutputSeries.NOTICE_IMAGE, source_header),
                      orientation=None, kind="notice_image",
                      description=NOTICE_DESCRIPTION,
                      derivation="Text: the series was not analysed, and why")
    date_series([image])
    return image
