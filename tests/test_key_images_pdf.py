"""Key images (Secondary Capture) and PDF report: valid, the right slices, in the CT study."""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import EncapsulatedPDFStorage, SecondaryCaptureImageStorage
from scipy import ndimage as ndi

from ai.analysis import analyse_lesions
from ai.infer import Analysis
from ai.labels import CLASS_NAMES, Diagnosis
from ai.lungs import Caveat
from dicomnode.outputs import Provenance
from dicomnode.outputs.key_images import (
    SERIES_DESCRIPTION,
    build_key_images,
    build_notice_image,
    format_name,
    notice_lines,
    panel_lines,
    pick_key_slices,
    slice_position,
)
from dicomnode.outputs.pdf import _first_page, build_pdf_report
from dicomnode.volume import CTVolume, read_series
from tests.conftest import dciodvfy_errors
from training.phantoms import generate_phantom, write_dicom_series

PROVENANCE = Provenance(device_uid="1.2.826.0.1.3680043.10.1011.1", model_name="lite",
                        model_version="test")
SLICE_MM = 2.5
LESION_PIXELS = {4: 60, 8: 100, 10: 90, 14: 80, 18: 70}
"""Lesion area per slice (volume order). With 10 mm between picks (4 slices): 8, 14, 18, 4;
10 is too close to 8, and 4 is exactly 10 mm from 8 (allowed)."""


def _volume_and_lungs(kind: str, tmp: Path) -> tuple[CTVolume, np.ndarray]:
    phantom = generate_phantom(kind, 21, slices=24, size=64, slice_thickness_mm=SLICE_MM)
    volume = read_series(write_dicom_series(phantom, tmp))
    flipped = not np.array_equal(volume.hu, phantom.volume_hu.astype(np.float32))
    return volume, phantom.lung_mask[::-1] if flipped else phantom.lung_mask


def _analysis(volume: CTVolume, lung: np.ndarray, lesion: np.ndarray) -> Analysis:
    stats = analyse_lesions(volume.hu, lesion, lung, volume.spacing_mm)
    evidence = ndi.gaussian_filter(lesion.astype(np.float32), 2.0) * lung
    if evidence.max() > 0:
        evidence /= evidence.max()
    diagnosis = Diagnosis.COVID19 if stats.lesion_count else Diagnosis.NON_PNEUMONIA
    p = (0.8, 0.15, 0.05) if stats.lesion_count else (0.04, 0.06, 0.9)
    return Analysis(
        lesion_mask=lesion, lung_mask=lung, probabilities=dict(zip(CLASS_NAMES, p, strict=True)),
        diagnosis=diagnosis, evidence_map=evidence, evidence_class=diagnosis, lvr=stats.lvr,
        plr=stats.plr, lesions=stats.lesions, stats=stats, timings={},
        model={"name": "DeepSC-COVID lite", "trained": "2024-01-01"},
    )


@pytest.fixture(scope="module")
def covid(tmp_path_factory: pytest.TempPathFactory) -> tuple[CTVolume, Analysis]:
    volume, lung = _volume_and_lungs("covid", tmp_path_factory.mktemp("covid"))
    lesion = np.zeros_like(lung)
    for z, n in LESION_PIXELS.items():
        flat = lesion[z].reshape(-1)  # a view: the first n lung pixels of slice z
        flat[np.flatnonzero(lung[z])[:n]] = True
    return volume, _analysis(volume, lung, lesion)


@pytest.fixture(scope="module")
def normal(tmp_path_factory: pytest.TempPathFactory) -> tuple[CTVolume, Analysis]:
    volume, lung = _volume_and_lungs("normal", tmp_path_factory.mktemp("normal"))
    return volume, _analysis(volume, lung, np.zeros_like(lung))


def _sources(images: list[pydicom.Dataset], volume: CTVolume) -> list[int]:
    """Volume slice index of the CT image each key image was derived from."""
    index = {ds.SOPInstanceUID: z for z, ds in enumerate(volume.datasets)}
    return [index[ds.SourceImageSequence[0].ReferencedSOPInstanceUID] for ds in images]


def test_key_slices_have_the_most_lesion_and_are_10_mm_apart(
    covid: tuple[CTVolume, Analysis],
) -> None:
    volume, analysis = covid
    assert volume.spacing_mm[0] == pytest.approx(SLICE_MM)
    picks = pick_key_slices(analysis.lesion_mask, analysis.lung_mask, volume.spacing_mm, 10)
    assert picks == [8, 14, 18, 4]
    assert pick_key_slices(analysis.lesion_mask, analysis.lung_mask, volume.spacing_mm, 1) == [8]


def test_key_images_are_valid_rgb_secondary_captures_in_the_ct_study(
    covid: tuple[CTVolume, Analysis], tmp_path: Path
) -> None:
    volume, analysis = covid
    volume = _with_issuer(volume)
    images = build_key_images(volume, analysis, PROVENANCE, 3)
    assert _sources(images, volume) == [8, 14, 18]
    ct = volume.datasets[0]
    assert len({ds.SeriesInstanceUID for ds in images}) == 1
    # one series date and time, when its first image was made (series lists show them)
    assert {(ds.SeriesDate, ds.SeriesTime) for ds in images} == {
        (images[0].ContentDate, images[0].ContentTime)}
    for number, ds in enumerate(images, start=1):
        path = tmp_path / f"key{number}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == []
        back = pydicom.dcmread(path)
        assert back.SOPClassUID == SecondaryCaptureImageStorage
        assert back.StudyInstanceUID == ct.StudyInstanceUID
        assert back.PatientID == ct.PatientID
        assert back.SeriesInstanceUID != ct.SeriesInstanceUID
        assert back.SeriesDescription == f"{SERIES_DESCRIPTION} S{ct.SeriesNumber}"
        assert back.IssuerOfPatientID == "HOSPITAL-A"  # the whole Patient module
        assert back.ConversionType == "WSD"  # rendered by software, not digitised film
        assert back.InstanceNumber == number
        assert back.PhotometricInterpretation == "RGB" and back.BitsAllocated == 8
        assert back.BurnedInAnnotation == "YES" and back.ImageType[0] == "DERIVED"
        pixels = back.pixel_array
        assert pixels.ndim == 3 and pixels.shape[2] == 3 and pixels.dtype == np.uint8
        # the image part is upscaled to at least 512 rows, the text panel sits on its right
        assert pixels.shape[0] >= 512 and pixels.shape[1] > pixels.shape[0]
        outline = np.all(pixels == (0, 255, 255), axis=-1)
        assert outline.any(), "the lesion outline is drawn"


def _with_issuer(volume: CTVolume) -> CTVolume:
    """The volume's headers as from a PACS with several patient ID issuers."""
    datasets = tuple(copy.deepcopy(ds) for ds in volume.datasets)
    for ds in datasets:
        ds.IssuerOfPatientID = "HOSPITAL-A"
    return dataclasses.replace(volume, datasets=datasets)


@pytest.mark.parametrize(("name", "shown"), [
    ("Müller^Jürgen", "Müller, Jürgen"),
    ("Müller", "Müller"),
    ("=山田^太郎", "山田, 太郎"),
    ("", ""),
])
def test_names_are_shown_from_whichever_group_they_are_stored_in(name: str, shown: str) -> None:
    assert format_name(name) == shown


def test_the_slice_is_located_by_its_image_number_and_z(
    covid: tuple[CTVolume, Analysis],
) -> None:
    volume, _ = covid
    ds = volume.datasets[3]
    assert slice_position(volume, 3) == (
        f"Image {ds.InstanceNumber} (slice 4/{len(volume.datasets)})",
        f"z {float(ds.ImagePositionPatient[2]):.1f} mm")


def test_without_lesions_one_key_image_at_the_largest_lung_slice(
    normal: tuple[CTVolume, Analysis], tmp_path: Path
) -> None:
    volume, analysis = normal
    [image] = build_key_images(volume, analysis, PROVENANCE, 3)
    lung_area = np.count_nonzero(analysis.lung_mask, axis=(1, 2))
    assert _sources([image], volume) == [int(np.argmax(lung_area))]
    path = tmp_path / "key.dcm"
    image.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []


@pytest.mark.parametrize("case", ["covid", "normal"])
def test_pdf_report_is_valid_encapsulated_pdf(
    case: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    volume, analysis = request.getfixturevalue(case)
    volume = _with_issuer(volume)
    ds = build_pdf_report(volume, analysis, PROVENANCE)
    path = tmp_path / "report.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []

    back = pydicom.dcmread(path)
    assert back.SOPClassUID == EncapsulatedPDFStorage and back.Modality == "DOC"
    assert (back.SeriesDate, back.SeriesTime) == (back.ContentDate, back.ContentTime)
    assert back.StudyInstanceUID == volume.datasets[0].StudyInstanceUID
    assert back.IssuerOfPatientID == "HOSPITAL-A"
    assert back.ConceptNameCodeSequence[0].CodeMeaning == "Diagnostic Imaging Report"
    assert back.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert len(back.SourceInstanceSequence) == len(volume.datasets)
    document = bytes(back.EncapsulatedDocument)
    assert len(document) % 2 == 0
    pdf = document[: back.EncapsulatedDocumentLength]
    assert pdf.startswith(b"%PDF-") and pdf.rstrip().endswith(b"%%EOF")
    assert len(re.findall(rb"/Type /Page\b(?!s)", pdf)) == 2
    diagnosis = CLASS_NAMES[analysis.diagnosis].encode()
    assert b"/Subject (Diagnosis: " + diagnosis + b")" in pdf



def test_the_pdf_draws_dollar_signs_as_text(covid: tuple[CTVolume, Analysis]) -> None:
    """matplotlib reads "$...$" as a formula: a name or description holding two dollar
    signs failed the report (or showed it altered) until the PDF was drawn as plain text."""
    volume, analysis = covid
    datasets = tuple(copy.deepcopy(ds) for ds in volume.datasets)
    for ds in datasets:
        ds.SeriesDescription = "Thorax $a^^b$ 1.0 B70f"  # a double superscript
    ds = build_pdf_report(dataclasses.replace(volume, datasets=datasets), analysis, PROVENANCE)
    assert bytes(ds.EncapsulatedDocument).startswith(b"%PDF-")


CAVEATS = (Caveat("Scan range may miss lung: measures cover the imaged part",
                  "The scan range may not cover the whole lungs: an end slice holds 40 % of"
                  " the largest lung cross-section."),)


def test_a_caveat_is_shown_beside_the_numbers_it_qualifies(
    covid: tuple[CTVolume, Analysis],
) -> None:
    volume, analysis = covid
    analysis = dataclasses.replace(analysis, caveats=CAVEATS)
    lines = panel_lines(volume, analysis, PROVENANCE, 8, 1, 2)
    texts = [line.text for line in lines]
    at = texts.index(CAVEATS[0].short)
    assert texts[at - 1] == "Lesions" and lines[at].style == "notice"
    assert CAVEATS[0].short not in [line.text for line in panel_lines(
        volume, dataclasses.replace(analysis, caveats=()), PROVENANCE, 8, 1, 2)]

    page = _first_page(volume, analysis, PROVENANCE)
    [caveat] = [t for t in page.texts if t.get_text().startswith("Caveat: ")]
    assert " ".join(caveat.get_text().split()) == "Caveat: " + CAVEATS[0].detail
    headings = {t.get_text(): t.get_position()[1] for t in page.texts}
    lesions = next(y for text, y in headings.items() if text.startswith("Lesions ("))
    assert headings["Result"] > caveat.get_position()[1] > lesions


def test_a_non_pneumonia_call_shows_its_evidence_as_not_called(
    normal: tuple[CTVolume, Analysis], covid: tuple[CTVolume, Analysis],
) -> None:
    """For a non-pneumonia call the heat map is the more probable disease's evidence: the
    reader is told it was not called, and the PDF says by which rule the call was made."""
    volume, analysis = normal
    analysis = dataclasses.replace(analysis, evidence_class=Diagnosis.COVID19,
                                   model=analysis.model | {"disease_thresholds": [0.3, 0.45]})
    texts = [line.text for line in panel_lines(volume, analysis, PROVENANCE, 8, 1, 1)]
    assert "Red-yellow: evidence for COVID-19 (not called)" in texts
    cells = [cell.get_text().get_text() for ax in _first_page(volume, analysis, PROVENANCE).axes
             for table in ax.tables for cell in table.get_celld().values()]
    assert "COVID-19 at P >= 30 %, CAP at P >= 45 %, else non-pneumonia" in cells
    called = [line.text for line in panel_lines(*covid, PROVENANCE, 8, 1, 1)]
    assert "Red-yellow: evidence for COVID-19" in called


def test_the_failure_notice_as_an_image_says_why(
    covid: tuple[CTVolume, Analysis], tmp_path: Path
) -> None:
    volume, _ = covid
    header = volume.datasets[0]
    image = build_notice_image(header, "no lungs found", PROVENANCE)
    path = tmp_path / "notice.dcm"
    image.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    back = pydicom.dcmread(path)
    assert back.SOPClassUID == SecondaryCaptureImageStorage
    assert back.StudyInstanceUID == header.StudyInstanceUID
    assert back.SeriesDescription == f"AI not analysed, image (DeepSC) S{header.SeriesNumber}"
    assert back.PatientOrientation == "" and back.BurnedInAnnotation == "YES"
    assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == header.SOPInstanceUID
    lines = [line.text for line in notice_lines(header, "no lungs found")]
    assert "NOT ANALYSED" in lines and "Why: no lungs found" in lines
    text = back.pixel_array.max(axis=2) > 100  # light text on the dark panel
    assert text[: back.Rows // 2].any() and not text[-back.Rows // 4:].any()
