"""The node's results as DICOM objects: SEG, TID 1500 SR, key images, PDF.

Each builder takes the source CT headers (sorted as in the volume) and the analysis,
and returns a pydicom Dataset ready to store and send. What every object shares (who
made it, with which model) lives in `Provenance`.
"""

from __future__ import annotations

import functools
import json
import logging
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pydicom.valuerep import DA, TM

from dicomnode import __version__

logger = logging.getLogger(__name__)

MANUFACTURER = "dicomnode"
MODEL_NAME = "DeepSC-COVID node"
RESEARCH_NOTICE = (
    "Research use: AI result not reviewed by a radiologist; not for diagnosis without review."
)
UTF8 = "ISO_IR 192"
MULTI_BYTE_EXTENSIONS = {"ISO 2022 IR 87", "ISO 2022 IR 159", "ISO 2022 IR 149", "ISO 2022 IR 58"}
"""PS3.3 C.12.1.1.2 Table C.12-4: these may not be the first of several values."""


@dataclass(frozen=True)
class Provenance:
    """Who made an output: the node (device) and the model that produced the numbers."""

    device_uid: str
    """A UID for this node installation (SR observer device)."""
    model_name: str
    """E.g. "DeepSC-COVID lite"."""
    model_version: str
    """Identifies the weights: the first 12 hex digits of the checkpoint's sha256."""
    device_serial_number: str = "1"
    station_name: str = "DICOMNODE"
    job_key: str = ""
    """Names the job the outputs belong to; empty for an offline run (see `uid`)."""
    algorithm_parameters: dict[str, str] = field(default_factory=dict)
    """How the model ran and the analysis measured (device, test-time mirroring, lesion
    threshold, ...): the same weights give other numbers with other settings. The SEG's
    Algorithm Parameters (0066,0032), a comment in the SR and the PDF footer carry them."""

    def uid(self, *names: object) -> str:
        """The UID of one part of one output, e.g. `uid("seg", "instance")`.

        With a job key it is derived from the node, the job, the model version and the
        names, so a job run again after a crash remakes its outputs under the same UIDs:
        the node stores, and the PACS receives, each result once (other weights make other
        objects, under new UIDs). Without a job key it is new on every call.
        """
        if not self.job_key:
            return generate_uid()
        parts = [self.device_uid, self.job_key, self.model_version, *map(str, names)]
        return generate_uid(entropy_srcs=[json.dumps(parts)])

    @property
    def software_versions(self) -> list[str]:
        # A list, not a tuple: pydicom warns on tuples for multi-valued LO.
        return [f"dicomnode {__version__}", f"{self.model_name} {self.model_version}"]

    @property
    def algorithm_name(self) -> str:
        return self.model_name


@functools.cache
def _highdicom_character_sets() -> frozenset[str]:
    # Imported here, not with the package: the SCP imports it, and highdicom's tables
    # would cost the receiving process 20 MB.
    from highdicom.enum import SpecificCharacterSetValues

    return frozenset(s.value for s in SpecificCharacterSetValues)


def _terms(value: object) -> list[str]:
    if value is None:
        return []
    return [value.strip()] if isinstance(value, str) else [str(v).strip() for v in value]  # type: ignore[attr-defined]


def output_character_set(value: object) -> str | list[str] | None:
    """The Specific Character Set (0008,0005) an output of a CT with `value` is written in.

    The CT's own, where highdicom (which copies it from the CT) accepts it; an equivalent
    form where one exists (an empty first value is ISO 2022 IR 6, PS3.3 C.12.1.1.2; a lone
    "ISO 2022 IR 100" is "ISO_IR 100"); else UTF-8, which holds any name. Without this,
    a Japanese CT ("\\ISO 2022 IR 87") or a Korean one ("\\ISO 2022 IR 149") got no
    outputs at all, not even the failure notice.
    """
    terms = _terms(value)
    if terms and terms[0] == "":
        terms[0] = "ISO 2022 IR 6"
    if len(terms) == 1 and terms[0].startswith("ISO 2022 "):  # an extension term alone
        terms = [] if terms[0] == "ISO 2022 IR 6" else [terms[0].replace("ISO 2022 IR ", "ISO_IR ")]
    known = _highdicom_character_sets()
    if not terms:
        return None
    if all(t in known for t in terms):
        if len(terms) == 1 and not terms[0].startswith("ISO 2022 "):
            return terms[0]
        if (len(terms) > 1 and all(t.startswith("ISO 2022 ") for t in terms)
                and terms[0] not in MULTI_BYTE_EXTENSIONS):
            return terms
    return UTF8


_COPIED_VALUES = (("PatientBirthDate", DA), ("StudyDate", DA), ("StudyTime", TM))
"""Attributes every output copies from the CT that highdicom parses (a value it cannot
parse, e.g. a birth date "1950-03-07", raised and failed the job on every attempt)."""
PATIENT_SEX = ("M", "F", "O")
"""PS3.3 C.7.1.1 Patient's Sex; highdicom refuses any other value."""


def _conform_copied_values(ds: Dataset) -> None:
    """Empty (all are type 2) what the outputs could not carry as the CT has it; says so
    without the value, which may identify the patient."""
    for keyword, parse in _COPIED_VALUES:
        value = ds.get(keyword)
        if value in (None, ""):
            continue
        try:
            parse(value)
        except ValueError:
            logger.warning("the CT's %s is not a valid DICOM %s: left empty in the outputs",
                           keyword, "date" if parse is DA else "time")
            setattr(ds, keyword, "")
    if "PatientSex" not in ds:
        return
    sex = str(ds.PatientSex or "").strip().upper()
    if sex and sex not in PATIENT_SEX:
        logger.warning("the CT's PatientSex is not M, F or O: left empty in the outputs")
        sex = ""
    ds.PatientSex = sex


def prepare_sources(datasets: Iterable[Dataset]) -> None:
    """Make the source CT datasets (in memory; the stored files are untouched) what
    highdicom, which copies the patient and study attributes from them, accepts: the
    character set their outputs are written in (`output_character_set`, their text
    decoded in their own first), and dates, times and sex it can copy
    (`_conform_copied_values`). Every builder calls it first.

    It also keeps highdicom from warning with a name in the text whenever a patient's or
    referring physician's name has no "^" ("JOHN DOE", as many modalities write it): the
    warning would print the name to the node's log (the name is copied as it is). Set
    here, on every call, because a `warnings.catch_warnings` block around an import would
    undo a filter set once (adding the same filter again only moves it to the front)."""
    warnings.filterwarnings(
        "ignore", message=r'The string ".*" is unlikely to represent the intended person name',
        category=UserWarning)
    for ds in datasets:
        _conform_copied_values(ds)
        current = ds.get("SpecificCharacterSet")
        target = output_character_set(current)
        if _terms(target) == _terms(current):
            continue
        ds.decode()  # every text value to str, in the CT's character set
        if target is None:
            del ds.SpecificCharacterSet
        else:
            ds.SpecificCharacterSet = target


def date_series(datasets: Sequence[Dataset]) -> None:
    """Series Date and Time (General Series module, type 3) of a new output series: when
    its first instance was made (Content Date and Time, else Instance Creation). Horos and
    PACS series lists show and sort by them; without them the results' dates are blank."""
    if not datasets:
        return
    first = datasets[0]
    date = first.get("ContentDate") or first.InstanceCreationDate
    time = first.get("ContentTime") or first.InstanceCreationTime
    for ds in datasets:
        ds.SeriesDate, ds.SeriesTime = date, time


def series_description(base: str, source: Dataset) -> str:
    """An output series' description naming the CT series it is about ("AI lesions
    (DeepSC) S3"): a chest CT study often holds a lung and a soft-tissue reconstruction,
    both analysed, and their results must not look alike in the series list."""
    number = source.get("SeriesNumber")
    return f"{base} S{number}" if number not in (None, "") else base


class OutputSeries(IntEnum):
    """The last digit of each output series' number (`output_series_number`)."""

    SEG = 1
    SR = 2
    KEY_IMAGES = 3
    PDF = 4
    NOTICE_IMAGE = 8
    NOTICE_SR = 9


MAX_SERIES_NUMBER = 2**31 - 1
"""Series Number is IS: a signed 32-bit integer (PS3.5 6.2)."""


def output_series_number(kind: OutputSeries, source: Dataset) -> int:
    """9000 + 10 x the source's Series Number + the kind's digit (CT series 3: SEG 9031,
    SR 9032, key images 9033, PDF 9034; a not-analysed notice 9038, 9039): a study with
    two series analysed (a lung and a soft-tissue reconstruction) then lists two sets of
    results with numbers of their own, each telling its source, where fixed numbers
    would give two SEGs 9001 side by side. 9000 + the digit when the source has no
    usable Series Number."""
    try:
        number = int(source.get("SeriesNumber"))
    except (TypeError, ValueError):
        return 9000 + kind
    derived = 9000 + 10 * number + kind
    return derived if number >= 0 and derived <= MAX_SERIES_NUMBER else 9000 + kind
