"""Encapsulated PDF report (PS3.3 A.45.1): the whole result as a document to read.

OHIF (dicom-pdf), Horos and practically every PACS display Encapsulated PDF, so this is
the one output a radiologist can open anywhere and print: identifiers, the diagnosis and
measurements, a per-lesion table, key slices with the same overlays as the key images,
the model version and the disclaimer. Drawn with matplotlib's object API (no pyplot, so
no global figure state shared between worker threads).
"""

from __future__ import annotations

import datetime
import io
import logging
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING

import highdicom as hd
from matplotlib import rc_context
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure
from pydicom.dataset import Dataset
from pydicom.uid import EncapsulatedPDFStorage, ExplicitVRLittleEndian
from pydicom.valuerep import DA, DT, TM

from ai.labels import CLASS_NAMES, diagnosis_rule
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
from dicomnode.outputs.fonts import drawable
from dicomnode.outputs.key_images import (
    format_date,
    format_name,
    lesion_area_mm2,
    mark_orientation,
    orientation_letters,
    percent,
    pick_key_slices,
    render_slice,
    slice_position,
)

if TYPE_CHECKING:  # ai.infer pulls in torch; only its types are needed here
    from ai.infer import Analysis
    from dicomnode.volume import CTVolume

logger = logging.getLogger(__name__)

SERIES_DESCRIPTION = "AI report PDF (DeepSC)"
DOCUMENT_TITLE = "AI chest CT report (DeepSC-COVID)"
DOCUMENT_CONCEPT = hd.sr.CodedConcept("18748-4", "LN", "Diagnostic Imaging Report")
"""CID 7020's meaning of LOINC 18748-4 (pydicom's codes.LN.DiagnosticImagingReport)."""
A4_INCHES = (8.27, 11.69)
MAX_LESION_ROWS = 10
KEY_SLICES = 4
DISCLAIMER = (
    "Research use only. This report was produced automatically by an AI model and has not "
    "been reviewed by a radiologist; it must not be used for diagnosis without review. "
    "Model weights trained on synthetic data (such as the shipped default) must be "
    "validated on local data before any clinical evaluation."
)

LEFT, WIDTH = 0.08, 0.84
ROW = 0.0185
"""Table row height as a fraction of the page height (about 15 pt)."""
FONT = 8.5
CAVEAT_LINE = 0.0135
"""Height of a line of FONT-sized text as a fraction of the page height, with leading."""


def _text(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "")


def _heading(fig: Figure, top: float, text: str) -> float:
    fig.text(LEFT, top, text, fontsize=11, fontweight="bold", va="top")
    return top - 0.026


def _table(
    fig: Figure, top: float, rows: Sequence[Sequence[str]],
    header: Sequence[str] | None = None, widths: Sequence[float] | None = None,
) -> float:
    """A ruled table whose top edge is at `top`; returns the y just below it."""
    height = ROW * (len(rows) + (header is not None))
    ax = fig.add_axes((LEFT, top - height, WIDTH, height))
    ax.set_axis_off()
    table = ax.table(cellText=[list(r) for r in rows], colLabels=header, colWidths=widths,
                     cellLoc="left", colLoc="left", bbox=(0.0, 0.0, 1.0, 1.0))
    table.auto_set_font_size(False)
    table.set_fontsize(FONT)
    for (row, _), cell in table.get_celld().items():
        cell.set_edgecolor("#b0b0b0")
        cell.set_linewidth(0.5)
        text, families = drawable(cell.get_text().get_text())  # names may be in any script
        cell.get_text().set_text(text)
        cell.get_text().set_fontfamily(families)
        if header is not None and row == 0:
            cell.set_facecolor("#e6e6e6")
            cell.get_text().set_fontweight("bold")
    return top - height - 0.02


def _identifiers(volume: CTVolume) -> list[list[str]]:
    ds = volume.datasets[0]
    series = f"{_text(ds, 'SeriesNumber')} {_text(ds, 'SeriesDescription')}".strip()
    return [
        ["Patient", format_name(ds.get("PatientName")), "Study date",
         format_date(_text(ds, "StudyDate"))],
        ["Patient ID", _text(ds, "PatientID"), "Accession", _text(ds, "AccessionNumber")],
        ["Birth date", format_date(_text(ds, "PatientBirthDate")), "Study",
         _text(ds, "StudyDescription")[:40]],
        ["Sex", _text(ds, "PatientSex"), "CT series", series[:40]],
        ["Slices", f"{len(volume.datasets)} x {volume.shape[1]} x {volume.shape[2]}",
         "Spacing", " x ".join(f"{s:.2f}" for s in volume.spacing_mm) + " mm"],
    ]


def _summary(analysis: Analysis) -> list[list[str]]:
    stats = analysis.stats

    def opt(value: float | None, unit: str) -> str:
        return "n/a" if value is None else f"{value:.1f} {unit}"

    rule = diagnosis_rule(analysis.model.get("disease_thresholds"))
    rows = [["Diagnosis", CLASS_NAMES[analysis.diagnosis], rule]]
    rows += [[f"Probability {name}", percent(p), ""] for name, p in
             ((n, analysis.probabilities[n]) for n in CLASS_NAMES)]
    rows += [
        ["LVR", percent(analysis.lvr), "lesion volume / lung volume"],
        ["PLR", percent(analysis.plr),
         f"share of lesion volume within {stats.peripheral_thickness_mm:g} mm of the pleura"],
        ["Lesions", str(stats.lesion_count), "3D connected components"],
        ["Lesion volume", f"{stats.lesion_volume_ml:.1f} mL", ""],
        ["Lung volume", f"{stats.lung_volume_ml:.1f} mL", ""],
        ["Ground-glass fraction", percent(stats.ggo_fraction),
         f"lesion voxels below {stats.consolidation_hu:g} HU"],
        ["Consolidation fraction", percent(stats.consolidation_fraction),
         f"lesion voxels at or above {stats.consolidation_hu:g} HU"],
        ["Lesion spread", opt(stats.spread_mm, "mm"), "RMS distance of lesion centres"],
    ]
    return rows


def _lesion_rows(analysis: Analysis) -> list[list[str]]:
    return [
        [str(s.index), f"{s.volume_ml:.2f}",
         f"{s.width_mm:.0f} x {s.length_mm:.0f} x {s.height_mm:.0f}", f"{s.mean_hu:.0f}",
         s.density, s.side or "-", f"{100 * s.peripheral_fraction:.0f} %"]
        for s in analysis.lesions[:MAX_LESION_ROWS]
    ]


def _footer(fig: Figure, provenance: Provenance, analysis: Analysis, page: str) -> None:
    trained = analysis.model.get("trained")
    checksum = str(analysis.model.get("checkpoint_sha256", ""))[:12]
    model = f"Model: {provenance.algorithm_name} {provenance.model_version}".strip()
    model += f", trained {trained}" if trained else ""
    model += f", weights sha256 {checksum}" if checksum else ""
    settings = ", ".join(f"{k.replace('_', ' ')} {v}"
                         for k, v in provenance.algorithm_parameters.items())
    fig.text(LEFT, 0.09, textwrap.fill(DISCLAIMER, 120), fontsize=7.5, color="#8a1c00",
             va="top")
    fig.text(LEFT, 0.045, f"{model}. {provenance.software_versions[0]}.", fontsize=7,
             color="#555555")
    if settings:  # the numbers depend on them (the SEG's algorithm parameters)
        fig.text(LEFT, 0.037, textwrap.fill(f"Settings: {settings}.", 150), fontsize=6.5,
                 color="#555555", va="top")
    fig.text(LEFT + WIDTH, 0.045, page, fontsize=7, color="#555555", ha="right")


def _first_page(volume: CTVolume, analysis: Analysis, provenance: Provenance) -> Figure:
    fig = Figure(figsize=A4_INCHES)
    fig.text(LEFT, 0.955, DOCUMENT_TITLE, fontsize=16, fontweight="bold", va="top")
    fig.text(LEFT, 0.928, RESEARCH_NOTICE, fontsize=8.5, color="#8a1c00", va="top")
    top = _heading(fig, 0.9, "Patient and study")
    top = _table(fig, top, _identifiers(volume), widths=(0.15, 0.35, 0.15, 0.35))
    top = _heading(fig, top, "Result")
    top = _table(fig, top, _summary(analysis), header=("Measure", "Value", "Definition"),
                 widths=(0.26, 0.16, 0.58))
    for caveat in analysis.caveats:  # right under the numbers they qualify
        text = textwrap.fill(f"Caveat: {caveat.detail}", 115)
        fig.text(LEFT, top + 0.008, text, fontsize=FONT, color="#8a1c00", va="top")
        top -= CAVEAT_LINE * (text.count("\n") + 1) + 0.006
    count = analysis.stats.lesion_count
    shown = min(count, MAX_LESION_ROWS)
    title = f"Lesions (largest {shown} of {count})" if count > shown else f"Lesions ({count})"
    top = _heading(fig, top, title)
    if count:
        _table(fig, top, _lesion_rows(analysis),
               header=("#", "Volume mL", "W x L x H mm", "Mean HU", "Density", "Side",
                       "Peripheral"), widths=(0.06, 0.14, 0.2, 0.13, 0.19, 0.12, 0.16))
    else:
        fig.text(LEFT, top, "No lesions were segmented.", fontsize=FONT, va="top")
    _footer(fig, provenance, analysis, "page 1 of 2")
    return fig


def _slices_page(volume: CTVolume, analysis: Analysis, provenance: Provenance) -> Figure:
    fig = Figure(figsize=A4_INCHES)
    top = _heading(fig, 0.955, "Key slices")
    legend = (f"Lung window W 1500 / L -600. Cyan outline: AI lesion boundary. Red-yellow: "
              f"model {analysis.evidence_legend}.")
    fig.text(LEFT, top, legend, fontsize=FONT, va="top", wrap=True)
    slices = pick_key_slices(analysis.lesion_mask, analysis.lung_mask, volume.spacing_mm,
                             KEY_SLICES)
    letters = orientation_letters(volume.orientation)
    cell_w, cell_h = WIDTH / 2, 0.37
    for i, z in enumerate(slices):
        left = LEFT + (i % 2) * cell_w
        bottom = top - 0.04 - (i // 2 + 1) * cell_h
        ax = fig.add_axes((left + 0.01, bottom + 0.04, cell_w - 0.02, cell_h - 0.05))
        ax.imshow(mark_orientation(render_slice(volume, analysis, z), letters),
                  interpolation="none")
        ax.set_axis_off()
        where, position = slice_position(volume, z)
        caption = f"{i + 1}. {where}, {position}"
        if analysis.stats.lesion_count:
            caption += f"\nlesion area {lesion_area_mm2(volume, analysis, z) / 100:.1f} cm2"
        fig.text(left + cell_w / 2, bottom + 0.035, caption, fontsize=FONT, ha="center",
                 va="top")
    _footer(fig, provenance, analysis, "page 2 of 2")
    return fig


def render_pdf(volume: CTVolume, analysis: Analysis, provenance: Provenance) -> bytes:
    """The report as PDF bytes (A4, two pages)."""
    buffer = io.BytesIO()
    metadata = {
        "Title": DOCUMENT_TITLE,
        "Subject": f"Diagnosis: {CLASS_NAMES[analysis.diagnosis]}",
        "Creator": f"{MANUFACTURER} {provenance.software_versions[0]}",
        "Keywords": "research use; AI; not reviewed",
    }
    # plain text: a "$" in a name or description would start a formula, which fails
    # to parse or shows the text altered
    with PdfPages(buffer, metadata=metadata) as pdf, rc_context({"text.parse_math": False}):
        for page in (_first_page, _slices_page):
            pdf.savefig(page(volume, analysis, provenance))
    return buffer.getvalue()


def _source_instances(volume: CTVolume) -> list[Dataset]:
    items = []
    for ds in volume.datasets:
        item = Dataset()
        item.ReferencedSOPClassUID = ds.SOPClassUID
        item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        items.append(item)
    return items


def build_pdf_report(
    volume: CTVolume, analysis: Analysis, provenance: Provenance
) -> Dataset:
    """Encapsulated PDF Storage in the CT's study, one new series (Modality DOC)."""
    prepare_sources(volume.datasets)
    source = volume.datasets[0]
    document = render_pdf(volume, analysis, provenance)
    now = datetime.datetime.now()
    ds = hd.base.SOPClass(
        study_instance_uid=source.StudyInstanceUID,
        series_instance_uid=provenance.uid("pdf", "series"),
        series_number=output_series_number(OutputSeries.PDF, source),
        sop_instance_uid=provenance.uid("pdf", "instance"),
        sop_class_uid=EncapsulatedPDFStorage,
        instance_number=1,
        modality="DOC",
        manufacturer=MANUFACTURER,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        patient_id=_text(source, "PatientID"),
        patient_name=source.get("PatientName", ""),
        patient_birth_date=_text(source, "PatientBirthDate"),
        patient_sex=_text(source, "PatientSex"),
        accession_number=_text(source, "AccessionNumber"),
        study_id=_text(source, "StudyID"),
        study_date=_text(source, "StudyDate"),
        study_time=_text(source, "StudyTime"),
        referring_physician_name=source.get("ReferringPhysicianName", ""),
        series_description=series_description(SERIES_DESCRIPTION, source),
        manufacturer_model_name=MODEL_NAME,
        software_versions=provenance.software_versions,
        device_serial_number=provenance.device_serial_number,
        content_date=now.date(),
        content_time=now.time(),
        specific_character_set=source.get("SpecificCharacterSet"),
    )
    ds.copy_patient_and_study_information(source)  # issuer, other IDs, age, size ...
    ds.StationName = provenance.station_name
    # SC Equipment: made by software on a workstation
    ds.ConversionType = "WSD"
    ds.SecondaryCaptureDeviceManufacturer = MANUFACTURER
    ds.SecondaryCaptureDeviceManufacturerModelName = MODEL_NAME
    ds.SecondaryCaptureDeviceSoftwareVersions = list(provenance.software_versions)
    # Encapsulated Document
    ds.ContentDate = DA(now.date())
    ds.ContentTime = TM(now.time())
    ds.AcquisitionDateTime = DT(now)
    ds.BurnedInAnnotation = "YES"  # the document names the patient
    ds.SourceInstanceSequence = _source_instances(volume)
    ds.DocumentTitle = DOCUMENT_TITLE
    ds.ConceptNameCodeSequence = [DOCUMENT_CONCEPT]
    ds.VerificationFlag = "UNVERIFIED"
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocumentLength = len(document)
    ds.EncapsulatedDocument = document + b"\0" * (len(document) % 2)
    date_series([ds])
    logger.debug("PDF report for series %s: %d bytes", source.SeriesInstanceUID, len(document))
    return ds
