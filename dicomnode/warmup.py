"""An AI worker's start-up self-test: every output encoder runs once on a tiny made-up CT.

The first SEG and SR a process builds pay about a second for highdicom reading its
tables of the standard; doing that at start-up keeps it off the first patient's
latency, and an encoder that cannot work (a broken install) shows at start, in the log,
instead of failing the first job.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, generate_uid

from ai.analysis import analyse_lesions
from ai.infer import Analysis
from ai.labels import CLASS_NAMES, Diagnosis
from dicomnode.volume import CTVolume

SLICES, SIZE, SPACING_MM = 4, 16, 2.0
SELF_TEST_PATIENT_ID = "DICOMNODE-SELF-TEST"


def self_test_volume() -> CTVolume:
    """Four 16 x 16 axial slices of air with a water cylinder: headers only, as in service."""
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    datasets = []
    for z in range(SLICES):
        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientID, ds.PatientName = SELF_TEST_PATIENT_ID, "SELF^TEST"
        ds.PatientBirthDate, ds.PatientSex = "", "O"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20000101", "000000", "", ""
        ds.ReferringPhysicianName = ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, z + 1
        ds.Manufacturer = ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PositionReferenceIndicator = ""
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, SPACING_MM * z]
        ds.PixelSpacing = [SPACING_MM, SPACING_MM]
        ds.SliceThickness = SPACING_MM
        ds.Rows = ds.Columns = SIZE
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.KVP, ds.AcquisitionNumber = 120, 1
        datasets.append(ds)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    disc = (yy - SIZE / 2) ** 2 + (xx - SIZE / 2) ** 2 < (SIZE / 3) ** 2
    hu = np.where(disc, 0.0, -1000.0).astype(np.float32)[None].repeat(SLICES, 0)
    return CTVolume(
        hu=hu, spacing_mm=(SPACING_MM,) * 3, datasets=tuple(datasets),
        orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), origin_mm=(0.0, 0.0, 0.0),
    )  # fmt: skip


def self_test_analysis(volume: CTVolume) -> Analysis:
    """A made-up result for `volume`: the cylinder as 'lung' with one small 'lesion'."""
    lung = volume.hu > -500
    lesion = np.zeros_like(lung)
    lesion[1:3, 6:10, 6:10] = True
    stats = analyse_lesions(volume.hu, lesion, lung, volume.spacing_mm)
    return Analysis(
        lesion_mask=lesion, lung_mask=lung,
        probabilities=dict.fromkeys(CLASS_NAMES, 1 / len(CLASS_NAMES)),
        diagnosis=Diagnosis.COVID19, evidence_map=lesion.astype(np.float16),
        evidence_class=Diagnosis.COVID19, lvr=stats.lvr, plr=stats.plr,
        lesions=stats.lesions, stats=stats, timings={},
        model={"name": "self-test", "checkpoint_sha256": ""},
    )  # fmt: skip


def warm_model(checkpoint: object) -> bool:
    """On a GPU, run the network once on a made-up scan: CUDA's first passes (kernel
    selection, the allocator's pools) take seconds that the first patient would pay.
    On a CPU there is nothing to warm. Returns whether it ran."""
    device = getattr(checkpoint, "device", None)
    if getattr(device, "type", "cpu") != "cuda":
        return False
    from ai.infer import predict

    predict(checkpoint, *warm_up_scan(), mirror=True)  # type: ignore[arg-type]
    return True


def warm_up_scan() -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """A made-up scan the network accepts (lung density in a lung mask): HU, lungs, mm."""
    volume = np.full((24, 128, 128), -850.0, dtype=np.float32)
    lung = np.zeros(volume.shape, dtype=bool)
    lung[:, 16:112, 16:112] = True
    return volume, lung, (5.0, 2.5, 2.5)
