"""Every output of a CT in any character set PS3.3 C.12.1.1.2 allows: the CT's own where
highdicom takes it, else UTF-8, with the patient's name unchanged; and of a CT whose
patient and study values highdicom would refuse, without logging them."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.charset import convert_encodings
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from dicomnode.outputs import UTF8, output_character_set, prepare_sources
from dicomnode.outputs.key_images import build_key_images
from dicomnode.outputs.pdf import build_pdf_report
from dicomnode.outputs.seg import build_segmentation
from dicomnode.outputs.sr import build_failure_notice, build_report
from dicomnode.volume import read_series
from tests.conftest import dciodvfy_errors
from tests.test_key_images_pdf import PROVENANCE, _analysis
from training.phantoms import generate_phantom, write_dicom_series


@pytest.mark.parametrize(("value", "written"), [
    (None, None),
    ("", None),
    ("ISO_IR 100", "ISO_IR 100"),
    ("ISO_IR 192", "ISO_IR 192"),
    (["", "ISO 2022 IR 87"], ["ISO 2022 IR 6", "ISO 2022 IR 87"]),  # Japanese
    (["ISO 2022 IR 13", "ISO 2022 IR 87"], ["ISO 2022 IR 13", "ISO 2022 IR 87"]),
    (["", "ISO 2022 IR 149"], UTF8),  # Korean: highdicom 0.28 lacks the term
    ("ISO 2022 IR 100", "ISO_IR 100"),  # an extension term alone: its plain form
    ("ISO 2022 IR 6", None),
    ("ISO 2022 IR 87", UTF8),  # no plain form
    (["ISO 2022 IR 87", "ISO 2022 IR 159"], UTF8),  # multi-byte first: not allowed
    ("GB18030", "GB18030"),
    ("NOT A CHARSET", UTF8),
])
def test_output_character_set(value: object, written: object) -> None:
    assert output_character_set(value) == written


def test_adopting_decodes_first_and_leaves_accepted_sets_alone() -> None:
    ds = pydicom.Dataset()
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 149"]
    ds.PatientName = "Hong^Gildong=洪^吉洞=홍^길동"
    raw = pydicom.Dataset()  # the name as it comes off the wire: bytes in the CT's set
    raw.SpecificCharacterSet = ds.SpecificCharacterSet
    encoded = ds.PatientName.encode(convert_encodings(ds.SpecificCharacterSet))
    raw.add(RawDataElement(Tag("PatientName"), "PN", len(encoded), encoded, 0, True, True))
    prepare_sources([raw])
    assert raw.SpecificCharacterSet == UTF8
    assert str(raw.PatientName) == "Hong^Gildong=洪^吉洞=홍^길동"
    latin = pydicom.Dataset()
    latin.SpecificCharacterSet = "ISO_IR 100"
    latin.PatientName = "Müller^Jürgen"
    prepare_sources([latin])
    assert latin.SpecificCharacterSet == "ISO_IR 100"


@pytest.mark.parametrize(("charset", "name", "written"), [
    (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう",
     ["ISO 2022 IR 6", "ISO 2022 IR 87"]),
    (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동", UTF8),
])
def test_every_output_of_a_ct_in_iso_2022_keeps_the_name(
    charset: list[str], name: str, written: object, tmp_path: Path
) -> None:
    phantom = generate_phantom("covid", 21, slices=24, size=64, slice_thickness_mm=2.5)
    for path in write_dicom_series(phantom, tmp_path / "ct"):
        ds = pydicom.dcmread(path)
        ds.SpecificCharacterSet = charset
        ds.PatientName = name
        ds.save_as(path)
    for kind, ds in _every_output(tmp_path / "ct").items():
        path = tmp_path / f"{kind}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], kind
        back = pydicom.dcmread(path)
        assert back.SpecificCharacterSet == written, kind
        assert str(back.PatientName) == name, kind


def _every_output(ct: Path) -> dict[str, pydicom.Dataset]:
    volume = read_series(sorted(ct.iterdir()))
    lung = volume.hu < -500
    lesion = np.zeros_like(lung)
    lesion[8:12] = lung[8:12]
    analysis = _analysis(volume, lung, lesion)
    seg = build_segmentation(volume.datasets, lung, lesion, analysis.lesions, PROVENANCE)
    return {
        "seg": seg.dataset,
        "sr": build_report(volume.datasets, seg.dataset, seg.lesion_segments, analysis.stats,
                           list(analysis.probabilities.values()), analysis.diagnosis,
                           PROVENANCE),
        "key_image": build_key_images(volume, analysis, PROVENANCE, 1)[0],
        "pdf": build_pdf_report(volume, analysis, PROVENANCE),
        "notice": build_failure_notice(volume.datasets[0], "no lungs found", PROVENANCE),
    }


def test_values_highdicom_refuses_are_left_empty_and_nothing_identifying_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A birth date as "1950-03-07", a sex as "male" or a study time as "12:34" (seen from
    real modalities) made highdicom raise, and every attempt of the job failed, quoting
    the value; a name without "^" made it warn with the name in the text. The outputs
    now leave such a value empty (all are type 2), keep the names as they are, and log
    neither."""
    phantom = generate_phantom("covid", 21, slices=24, size=64, slice_thickness_mm=2.5)
    for path in write_dicom_series(phantom, tmp_path / "ct"):
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.ReferringPhysicianName = "JOHN DOE", "DR SMITH"
        ds.PatientBirthDate, ds.PatientSex, ds.StudyTime = "1950-03-07", "male", "12:34"
        ds.save_as(path)
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        outputs = _every_output(tmp_path / "ct")
    shown = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    for secret in ("JOHN DOE", "DR SMITH", "1950-03-07", "male", "12:34"):
        assert not [line for line in shown if secret in line], secret
    assert any("PatientBirthDate is not a valid DICOM date" in line for line in shown)
    for kind, ds in outputs.items():
        path = tmp_path / f"{kind}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], kind
        back = pydicom.dcmread(path)
        assert str(back.PatientName) == "JOHN DOE", kind
        assert back.PatientBirthDate == "" and back.PatientSex == "", kind
