"""Data sources for training: spec parsing, NIfTI, DICOM + SEG, the node's index, samples."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from ai.labels import Diagnosis
from ai.lungs import segment_lungs
from ai.preprocess import SlidingWindow, sample_cls_slices
from storage.index import InstanceRecord, StudyIndex
from tests.conftest import store_prone
from training import datasets
from training.datasets import (
    Augmentation,
    Case,
    Concat,
    DatasetError,
    LungMaskCache,
    NiftiSource,
    PhantomSource,
    TrainingSamples,
    kfold_indices,
    open_data,
    parse_data_spec,
    scan_dicom_folder,
    split_indices,
)

torch.set_num_threads(1)

SPACING = (2.5, 0.8, 0.7)


def _volume(slices: int = 6, rows: int = 40, cols: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """An asymmetric HU volume (orientation errors show) and a lesion mask on it."""
    rng = np.random.default_rng(5)
    volume = rng.integers(-1000, 200, size=(slices, rows, cols)).astype(np.int16)
    lesion = np.zeros(volume.shape, dtype=bool)
    lesion[1:3, 5:12, 30:40] = True
    lesion[4, 20:22, 3:6] = True
    return volume, lesion


# ----------------------------------------------------------------------------- specs


def test_phantom_spec_assigns_seeds_and_labels() -> None:
    source = parse_data_spec("phantoms:normal=1,covid=2,cap=1,seed=100,size=64,slices=16")
    assert isinstance(source, PhantomSource)
    assert source.items == [("covid", 100), ("covid", 101), ("cap", 102), ("normal", 103)]
    assert (source.size, source.slices) == (64, 16)
    assert source.labels() == [Diagnosis.COVID19, Diagnosis.COVID19, Diagnosis.CAP,
                               Diagnosis.NON_PNEUMONIA]  # fmt: skip
    assert source.case_ids()[2] == "phantom-cap-102"


def test_a_case_id_two_sources_hold_is_told_apart_by_its_source() -> None:
    """Two sites' ``pat1/ct`` (here the same phantom given twice) appeared twice under one
    name in evaluation.json; ids only one source holds stay as they are."""
    spec = "phantoms:covid=1,seed=100,size=16,slices=8"
    source = Concat([parse_data_spec(spec), parse_data_spec(spec),
                     parse_data_spec("phantoms:cap=1,seed=300,size=16,slices=8")])
    ids = ["1:phantom-covid-100", "2:phantom-covid-100", "phantom-cap-300"]
    assert source.case_ids() == ids
    assert [source[i].case_id for i in range(3)] == ids
    assert source[-2].case_id == ids[1]
    with pytest.raises(IndexError):
        source[3]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("phantoms:covid=2,flu=3", "unknown option"),
        ("phantoms:seed=3", "give a count"),
        ("phantoms:covid=1,lungs=mine", "lungs="),
        ("phantoms:covid=x", "phantoms"),
        ("phantoms:covid=1,thickness=-1", "slice thickness must be > 0 mm, got -1.0"),
        ("phantoms:covid=1,size=8,seed=-2", "seed must be >= 0, got -2; size must be >= 16"),
        ("phantoms:covid=1,cache=nope", "cache=nope must be yes or no"),
        ("nowhere:/x", "unknown scheme"),
        ("no-scheme", "expected SCHEME"),
        ("dicom:/does/not/exist", "not a folder"),
        ("nifti:/does/not/exist.csv", "cannot read"),
        ("index:/does/not/exist", "is not a folder"),
        ("index:/does/not/exist,url=sqlite://", "is not a folder"),
        ("index:/tmp", "no index.sqlite"),
        ("index:", "give the node's data directory"),
        ("index:/tmp,url=nonsense://x", "cannot open the study index"),
    ],
)
def test_bad_specs_say_why(spec: str, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        parse_data_spec(spec)


def test_splits_are_stratified_disjoint_and_seeded() -> None:
    labels = [Diagnosis(i % 3) for i in range(30)] + [None] * 3
    train, val = split_indices(labels, 0.2, seed=1)
    assert sorted(train + val) == list(range(33)) and not set(train) & set(val)
    assert [sum(labels[i] == c for i in val) for c in Diagnosis] == [2, 2, 2]
    assert split_indices(labels, 0.2, seed=1) == (train, val)
    folds = [kfold_indices(labels, 3, f, seed=2)[1] for f in range(3)]
    assert sorted(i for fold in folds for i in fold) == list(range(33))
    for fold in folds:  # 10 per class in 3 folds: 3 or 4 of each class per fold
        assert all(3 <= sum(labels[i] == c for i in fold) <= 4 for c in Diagnosis)
        assert len(fold) == 11
    with pytest.raises(DatasetError):
        kfold_indices(labels, 3, 3, seed=0)
    # one case per patient, named: the same splits as unnamed (runs resumed across keep theirs)
    own = [f"p{i}" for i in range(33)]
    assert split_indices(labels, 0.2, seed=1, patients=own) == (train, val)
    assert kfold_indices(labels, 3, 1, seed=2, patients=own)[1] == folds[1]


def test_splits_keep_each_patient_on_one_side() -> None:
    """Several scans of one patient (follow-ups, a second reconstruction) are trained or
    validated on together, never both; the class mix is kept as far as patients allow."""
    labels = [Diagnosis(i % 3) for i in range(30)]
    patients = [f"p{i // 3 * 3 + (i % 3 == 0)}" for i in range(30)]  # 1 or 2 scans each
    patients[6:9] = ["twice"] * 3  # and one patient with three
    for seed in range(5):
        train, val = split_indices(labels, 0.3, seed=seed, patients=patients)
        assert sorted(train + val) == list(range(30))
        assert not {patients[i] for i in train} & {patients[i] for i in val}
        assert 7 <= len(val) <= 11
        sizes = []
        for fold in range(3):
            train, val = kfold_indices(labels, 3, fold, seed=seed, patients=patients)
            assert not {patients[i] for i in train} & {patients[i] for i in val}
            sizes.append(len(val))
        assert sum(sizes) == 30 and max(sizes) - min(sizes) <= 3
    with pytest.raises(DatasetError, match="3 cases of 2 patients do not fill 3 folds"):
        kfold_indices([Diagnosis.CAP] * 3, 3, 0, seed=0, patients=["a", "a", "b"])


# ----------------------------------------------------------------------------- NIfTI


def test_nifti_cases_name_their_patient(tmp_path: Path) -> None:
    """An optional patient_id column groups scans for the splits; empty: the case's own."""
    (tmp_path / "labels.csv").write_text(
        "case_id,label,image,lesion_mask,patient_id\n"
        "a1,covid,a1.nii,a1_m.nii,A\na2,covid,a2.nii,a2_m.nii,A\nb,cap,b.nii,b_m.nii,\n"
    )
    for name in ("a1", "a1_m", "a2", "a2_m", "b", "b_m"):
        (tmp_path / f"{name}.nii").touch()  # opening checks that the files exist
    assert NiftiSource.from_csv(tmp_path / "labels.csv").patients() == ["A", "A", "b"]


def _write_nifti(path: Path, zyx: np.ndarray, spacing: tuple[float, float, float]) -> None:
    """(z, y, x) in the DICOM patient frame -> NIfTI with an LPS-like (flipped RAS) affine."""
    dz, dy, dx = spacing
    affine = np.diag([-dx, -dy, dz, 1.0])
    nib.save(nib.Nifti1Image(np.transpose(zyx, (2, 1, 0)), affine), str(path))


def test_nifti_source_reads_pairs_in_the_dicom_frame(tmp_path: Path) -> None:
    volume, lesion = _volume()
    _write_nifti(tmp_path / "a.nii.gz", volume, SPACING)
    _write_nifti(tmp_path / "a_mask.nii.gz", lesion.astype(np.uint8), SPACING)
    # The same scan stored RAS+: the reader must undo the flips.
    dz, dy, dx = SPACING
    ras = np.transpose(volume, (2, 1, 0))[::-1, ::-1, :]
    nib.save(nib.Nifti1Image(ras, np.diag([dx, dy, dz, 1.0])), str(tmp_path / "b.nii"))
    mask_ras = np.transpose(lesion.astype(np.uint8), (2, 1, 0))[::-1, ::-1, :]
    nib.save(nib.Nifti1Image(mask_ras, np.diag([dx, dy, dz, 1.0])), str(tmp_path / "b_m.nii"))
    (tmp_path / "labels.csv").write_text(
        "case_id,label,image,lesion_mask\n"
        "a,COVID-19,a.nii.gz,a_mask.nii.gz\n"
        f"b,,{tmp_path / 'b.nii'},b_m.nii\n"
    )
    source = parse_data_spec(f"nifti:{tmp_path / 'labels.csv'}")
    assert isinstance(source, NiftiSource)
    assert source.labels() == [Diagnosis.COVID19, None]
    assert source.patients() == ["a", "b"]  # no patient_id column: each case its own
    for i in range(2):
        case = source[i]
        np.testing.assert_array_equal(case.volume_hu, volume)
        np.testing.assert_array_equal(case.lesion_mask, lesion)
        assert case.spacing_mm == pytest.approx(SPACING)
        assert case.lung_mask is None and case.volume_hu.dtype == np.int16


def test_phantoms_and_their_nifti_share_the_node_frame(tmp_path: Path) -> None:
    """A phantom read back from write_nifti equals the phantom source's case."""
    from training.phantoms import generate_phantom, write_nifti

    source = parse_data_spec("phantoms:cap=1,seed=42,size=64,slices=24")
    case = source[0]
    paths = write_nifti(generate_phantom("cap", 42, slices=24, size=64), tmp_path)
    (tmp_path / "l.csv").write_text(
        f"case_id,label,image,lesion_mask,lung_mask\nc,cap,{paths['image']},"
        f"{paths['lesion']},{paths['lung']}\n"
    )
    read = NiftiSource.from_csv(tmp_path / "l.csv")[0]
    np.testing.assert_array_equal(read.volume_hu, case.volume_hu)
    np.testing.assert_array_equal(read.lesion_mask, case.lesion_mask)
    assert read.lung_mask is not None and case.lung_mask is not None
    np.testing.assert_array_equal(read.lung_mask, case.lung_mask)
    assert read.spacing_mm == pytest.approx(case.spacing_mm, abs=1e-4)
    assert read.label == case.label == Diagnosis.CAP


def test_phantom_cache_round_trip(tmp_path: Path) -> None:
    fresh = parse_data_spec("phantoms:normal=1,seed=7,size=64,slices=24")[0]
    cached_source = parse_data_spec("phantoms:normal=1,seed=7,size=64,slices=24", tmp_path)
    first, again = cached_source[0], cached_source[0]
    assert len(list((tmp_path / "phantoms").glob("*.npz"))) == 1
    for case in (first, again):
        np.testing.assert_array_equal(case.volume_hu, fresh.volume_hu)
        np.testing.assert_array_equal(case.lesion_mask, fresh.lesion_mask)
        assert case.lung_mask is not None and fresh.lung_mask is not None
        np.testing.assert_array_equal(case.lung_mask, fresh.lung_mask)
        assert case.spacing_mm == fresh.spacing_mm and case.label == fresh.label


def test_the_phantom_cache_key_covers_the_code_that_made_the_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cached cases are stored after `_generate`'s reordering, so a change to it, like
    one to the generator, must miss the old entries."""
    import training.phantoms

    source = parse_data_spec("phantoms:normal=1,seed=7,size=64,slices=24", tmp_path)
    monkeypatch.setattr(datasets, "_source_hash", lambda code: "same")
    key = source._cache_path("normal", 7)
    for changed in (datasets.PhantomSource._generate, training.phantoms):
        monkeypatch.setattr(datasets, "_source_hash",
                            lambda code, c=changed: "changed" if code is c else "same")
        assert source._cache_path("normal", 7) != key


def test_phantoms_can_carry_the_lungs_the_node_segments(tmp_path: Path) -> None:
    spec = "phantoms:covid=1,seed=7,size=64,slices=24"
    truth = open_data(spec, tmp_path)[0]
    node = open_data(spec + ",lungs=node", tmp_path)[0]
    assert truth.lung_mask is not None and node.lung_mask is not None
    np.testing.assert_array_equal(node.volume_hu, truth.volume_hu)
    np.testing.assert_array_equal(node.lesion_mask, truth.lesion_mask)
    expected = segment_lungs(truth.volume_hu, truth.spacing_mm)
    np.testing.assert_array_equal(node.lung_mask, np.asarray(expected, dtype=bool))
    assert not np.array_equal(node.lung_mask, truth.lung_mask)  # the two masks differ
    with pytest.raises(DatasetError, match="lungs='mine'"):  # built directly, not parsed
        PhantomSource([("covid", 7)], lungs="mine")


def test_nifti_masks_must_share_the_image_grid_and_images_be_hu(tmp_path: Path) -> None:
    """A mask saved with another affine would be reoriented differently (mirrored): it is
    refused. NaN outside a resampled field of view is air; a normalised image is not HU."""
    volume, lesion = _volume()
    image = volume.astype(np.float32)
    image[0, 0, 0] = np.nan
    _write_nifti(tmp_path / "a.nii.gz", image, SPACING)
    _write_nifti(tmp_path / "a_mask.nii.gz", lesion.astype(np.uint8), SPACING)
    nib.save(nib.Nifti1Image(lesion.astype(np.uint8).T, np.eye(4)), str(tmp_path / "eye.nii"))
    _write_nifti(tmp_path / "unit.nii.gz", (volume + 1000) / 1200.0, SPACING)
    (tmp_path / "labels.csv").write_text(
        "case_id,label,image,lesion_mask\n"
        "a,covid,a.nii.gz,a_mask.nii.gz\nb,covid,a.nii.gz,eye.nii\n"
        "c,covid,unit.nii.gz,a_mask.nii.gz\n"
    )
    source = NiftiSource.from_csv(tmp_path / "labels.csv")
    case = source[0]
    assert case.volume_hu[0, 0, 0] == -1024
    np.testing.assert_array_equal(case.volume_hu.ravel()[1:], volume.ravel()[1:])
    with pytest.raises(DatasetError, match="voxel grid"):
        source[1]
    with pytest.raises(DatasetError, match="no air"):
        source[2]


def test_nifti_inputs_that_would_train_wrongly_are_refused(tmp_path: Path) -> None:
    """Numeric labels (data sets disagree on what 0 means), a label map or a soft mask as
    the lesion mask, a file without an orientation, a file that is not there (found at
    open, not hours into a run), a case listed twice; an Excel CSV's BOM is fine."""
    volume, lesion = _volume()
    _write_nifti(tmp_path / "a.nii.gz", volume, SPACING)
    _write_nifti(tmp_path / "a_mask.nii.gz", lesion.astype(np.uint8), SPACING)
    _write_nifti(tmp_path / "labels_map.nii.gz", lesion.astype(np.uint8) * 3, SPACING)
    _write_nifti(tmp_path / "soft.nii.gz", lesion.astype(np.float32) * 0.5, SPACING)
    bare = nib.Nifti1Image(np.transpose(volume, (2, 1, 0)), None)
    bare.header.set_qform(None, code=0)
    bare.header.set_sform(None, code=0)
    nib.save(bare, str(tmp_path / "bare.nii.gz"))
    header = "case_id,label,image,lesion_mask\n"
    csv_path = tmp_path / "labels.csv"

    def source(rows: str, prefix: str = "") -> NiftiSource:
        csv_path.write_text(prefix + header + rows, encoding="utf-8")
        return NiftiSource.from_csv(csv_path)

    with pytest.raises(DatasetError, match="numbers are refused"):
        source("a,0,a.nii.gz,a_mask.nii.gz\n")
    with pytest.raises(DatasetError, match=r"no such file \['gone.nii.gz'\]"):
        source("a,covid,gone.nii.gz,a_mask.nii.gz\n")
    with pytest.raises(DatasetError, match="case_id 'a' again"):
        source("a,covid,a.nii.gz,a_mask.nii.gz\na,cap,a.nii.gz,a_mask.nii.gz\n")
    cases = source("a,covid,a.nii.gz,a_mask.nii.gz\nm,covid,a.nii.gz,labels_map.nii.gz\n"
                   "s,covid,a.nii.gz,soft.nii.gz\nb,covid,bare.nii.gz,a_mask.nii.gz\n",
                   prefix="\ufeff")  # Excel's byte order mark
    assert cases[0].lesion_mask.sum() == lesion.sum()
    with pytest.raises(DatasetError, match="must hold 0 and 1 only, found 0, 3"):
        cases[1]
    with pytest.raises(DatasetError, match="must hold 0 and 1 only, found 0, 0.5"):
        cases[2]
    with pytest.raises(DatasetError, match="neither qform nor sform is set"):
        cases[3]
    # as training and evaluation open them: the broken cases are refused (skipped, and
    # named), so that one of five hundred does not end a run hours in
    wrapped = open_data(f"nifti:{csv_path}", tmp_path / "cache")
    assert not wrapped[0].refused.startswith("cannot be loaded")  # (too few slices here)
    assert wrapped[1].refused.startswith("cannot be loaded: ")
    assert "must hold 0 and 1 only" in wrapped[1].refused
    assert wrapped[1].label == Diagnosis.COVID19


def test_labels_csv_rows_are_checked(tmp_path: Path) -> None:
    from training.datasets import read_labels_csv

    path = tmp_path / "labels.csv"
    path.write_text("case_id,label\nx,covid\ny\n")
    with pytest.raises(DatasetError, match=r"labels.csv:3: expected 'case_id,label'"):
        read_labels_csv(path)
    path.write_text("case_id,label\nx,covid\nx,cap\n")
    with pytest.raises(DatasetError, match="'x' labelled twice, differently"):
        read_labels_csv(path)
    path.write_text("\ufeffcase_id,label\nx,covid\nx,covid\n", encoding="utf-8")
    assert read_labels_csv(path) == {"x": Diagnosis.COVID19}
    path.write_text("case_id,label\na,COVID_19\nb,Non Pneumonia\nc,CAP\n")
    assert read_labels_csv(path) == {"a": Diagnosis.COVID19, "b": Diagnosis.NON_PNEUMONIA,
                                     "c": Diagnosis.CAP}
    for ambiguous in ("pneumonia", "none"):  # COVID-19 pneumonia? no disease, or no label?
        path.write_text(f"case_id,label\nx,{ambiguous}\n")
        with pytest.raises(DatasetError, match=f"unknown label '{ambiguous}'"):
            read_labels_csv(path)


def test_nifti_csv_errors(tmp_path: Path) -> None:
    (tmp_path / "l.csv").write_text("case_id,label,image\nx,covid,x.nii\n")
    with pytest.raises(DatasetError, match="missing"):
        NiftiSource.from_csv(tmp_path / "l.csv")
    (tmp_path / "l.csv").write_text("case_id,label,image,lesion_mask\nx,flu,x.nii,m.nii\n")
    with pytest.raises(DatasetError, match="unknown label"):
        NiftiSource.from_csv(tmp_path / "l.csv")


# ------------------------------------------------------------------------ DICOM + SEG


def _write_ct(folder: Path, volume: np.ndarray, study: str, reverse: bool = False) -> list[Path]:
    """A CT series (one file per slice, written in reverse order when asked)."""
    folder.mkdir(parents=True, exist_ok=True)
    series, frame = generate_uid(), generate_uid()
    dz, dy, dx = SPACING
    paths = []
    order = range(volume.shape[0])
    for z in reversed(order) if reverse else order:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"{z}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientID, ds.PatientName = "CT", "P1", "Test^Patient"
        ds.PatientBirthDate, ds.PatientSex, ds.StudyDate, ds.StudyTime = "19700101", "O", "", ""
        ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "", "", "1"
        ds.SeriesNumber, ds.InstanceNumber = 1, z + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-100.0, -80.0, 30.0 + z * dz]
        ds.PixelSpacing, ds.SliceThickness = [dy, dx], dz
        ds.Rows, ds.Columns = volume.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (volume[z].astype(np.int32) + 1024).astype(np.uint16).tobytes()
        ds.save_as(folder / f"{z}.dcm", enforce_file_format=True)
        paths.append(folder / f"{z}.dcm")
    return paths


def _write_seg(
    path: Path, ct_paths: list[Path], lesion: np.ndarray | None, lung: np.ndarray | None,
    algorithm: str,
    automatic_extra: np.ndarray | None = None, fractional: bool = False,
    lung_codes: tuple[Code, Code] = (codes.SCT.AnatomicalStructure, codes.SCT.Lung),
) -> hd.seg.Segmentation:
    sources = hd.spatial.sort_datasets([pydicom.dcmread(p) for p in ct_paths])
    # Frames parallel to the sorted sources: frame i is our slice z of sources[i].
    frames = [round((float(d.ImagePositionPatient[2]) - 30.0) / SPACING[0]) for d in sources]
    masks, descriptions = [], []
    segments = [("Lesions", codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Lesion,
                  lesion)] if lesion is not None else []  # fmt: skip
    if lung is not None:
        segments.append(("Lungs", *lung_codes, lung))
    kinds = [algorithm] * len(segments)
    if automatic_extra is not None:  # e.g. a per-lesion segment of the node's, unedited
        segments.append(("Lesion 1", codes.SCT.MorphologicallyAbnormalStructure,
                         codes.SCT.Lesion, automatic_extra))
        kinds.append("AUTOMATIC")
    for number, ((label, category, kind, mask), how) in enumerate(zip(segments, kinds,
                                                                       strict=True), start=1):
        net = hd.AlgorithmIdentificationSequence(
            "net", codes.cid7162.ArtificialIntelligence, "1") if how != "MANUAL" else None
        descriptions.append(
            hd.seg.SegmentDescription(
                number, label, category, kind, how, algorithm_identification=net
            )
        )
        masks.append(mask[frames])
    seg = hd.seg.Segmentation(
        source_images=sources,
        # Fractional: probability 0.8 inside, 0.3 (below the threshold) outside.
        pixel_array=(np.where(np.stack(masks, axis=-1), 0.8, 0.3).astype(np.float32)
                     if fractional else np.stack(masks, axis=-1).astype(np.uint8)),
        segmentation_type="FRACTIONAL" if fractional else "BINARY",
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=2,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="test",
        manufacturer_model_name="test",
        software_versions="1",
        device_serial_number="1",
    )
    seg.save_as(path)
    return seg


def test_dicom_folder_with_seg_and_labels(tmp_path: Path) -> None:
    volume, lesion = _volume()
    lung = np.zeros_like(lesion)
    lung[:, 2:30, 2:45] = True
    study = generate_uid()
    ct = _write_ct(tmp_path / "pat1" / "ct", volume, study, reverse=True)
    _write_seg(tmp_path / "pat1" / "seg.dcm", ct, lesion, lung, "MANUAL")
    ct2 = _write_ct(tmp_path / "pat2" / "ct", volume, generate_uid())
    _write_seg(tmp_path / "pat2" / "seg.dcm", ct2, lesion, None, "SEMIAUTOMATIC")
    (tmp_path / "notes.txt").write_text("not DICOM")
    (tmp_path / "labels.csv").write_text(f"key,label\npat1/ct,cap\n{study},cap\n")
    source = scan_dicom_folder(tmp_path)
    assert sorted(source.case_ids()) == ["pat1/ct", "pat2/ct"]
    by_id = {source.case_ids()[i]: i for i in range(len(source))}
    assert source.labels()[by_id["pat1/ct"]] == Diagnosis.CAP
    assert source.labels()[by_id["pat2/ct"]] is None
    assert source.patients() == ["P1", "P1"]  # the CT's PatientID: one patient, two scans
    case = source[by_id["pat1/ct"]]
    np.testing.assert_array_equal(case.volume_hu, volume)
    np.testing.assert_array_equal(case.lesion_mask, lesion)
    assert case.lung_mask is not None
    np.testing.assert_array_equal(case.lung_mask, lung)
    assert case.spacing_mm == pytest.approx(SPACING)
    assert source[by_id["pat2/ct"]].lung_mask is None


def test_scans_labelled_normal_need_no_lesion_segment(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A team's normal scans have no SEG, or one with the lungs only: labelled normal,
    they are cases with an empty lesion mask (without them the classifier could not
    learn 'no pneumonia' from DICOM data); unlabelled or labelled diseased, they are not,
    and the series left out are counted in the log."""
    volume, lesion = _volume()
    lung = np.zeros_like(lesion)
    lung[:, 2:30, 2:45] = True
    _write_ct(tmp_path / "normal" / "ct", volume, generate_uid())
    ct_lungs = _write_ct(tmp_path / "lungs_only" / "ct", volume, generate_uid())
    _write_seg(tmp_path / "lungs_only" / "seg.dcm", ct_lungs, None, lung, "MANUAL")
    _write_ct(tmp_path / "unlabelled" / "ct", volume, generate_uid())
    (tmp_path / "labels.csv").write_text(
        "key,label\nnormal/ct,normal\nlungs_only/ct,normal\n")
    with caplog.at_level(logging.INFO, logger="training.datasets"):
        source = scan_dicom_folder(tmp_path)
    assert sorted(source.case_ids()) == ["lungs_only/ct", "normal/ct"]
    assert "1 CT series under" in caplog.text and "no label normal: left out" in caplog.text
    for i in range(len(source)):
        case = source[i]
        assert case.label == Diagnosis.NON_PNEUMONIA and not case.lesion_mask.any()
        assert (case.lung_mask is not None) == (case.case_id == "lungs_only/ct")
    (tmp_path / "labels.csv").write_text("key,label\nnormal/ct,normal\nlungs_only/ct,cap\n")
    source = scan_dicom_folder(tmp_path)
    with pytest.raises(DatasetError, match="SEG has no lesion segment"):
        source[source.case_ids().index("lungs_only/ct")]


def test_series_sharing_a_folder_are_cases_by_their_uid(tmp_path: Path) -> None:
    """A flat export (every file of a study in one folder): case ids by folder would all
    be '.', and labels, results and the resume check could not tell the cases apart."""
    volume, lesion = _volume()
    flat = tmp_path / "export"
    flat.mkdir()
    uids = []
    for n in range(2):
        ct = _write_ct(tmp_path / f"tmp{n}", volume, generate_uid())
        for path in ct:
            path.rename(flat / f"s{n}_{path.name}")
        ct = sorted(flat.glob(f"s{n}_*.dcm"))
        _write_seg(flat / f"seg{n}.dcm", ct, lesion, None, "MANUAL")
        uids.append(str(pydicom.dcmread(ct[0]).SeriesInstanceUID))
    assert sorted(scan_dicom_folder(flat).case_ids()) == sorted(uids)


def test_a_lung_segment_in_legacy_snomed_rt_codes_is_lung(tmp_path: Path) -> None:
    volume, lesion = _volume()
    lung = np.zeros_like(lesion)
    lung[:, 2:30, 2:45] = True
    ct = _write_ct(tmp_path / "pat" / "ct", volume, generate_uid())
    legacy = (Code("T-D000A", "SRT", "Anatomical Structure"), Code("T-28000", "SRT", "Lung"))
    _write_seg(tmp_path / "pat" / "seg.dcm", ct, lesion, lung, "MANUAL", lung_codes=legacy)
    case = scan_dicom_folder(tmp_path)[0]
    np.testing.assert_array_equal(case.lesion_mask, lesion)
    assert case.lung_mask is not None
    np.testing.assert_array_equal(case.lung_mask, lung)


def test_a_fractional_seg_is_thresholded_at_one_half(tmp_path: Path) -> None:
    volume, lesion = _volume()
    ct = _write_ct(tmp_path / "pat" / "ct", volume, generate_uid())
    _write_seg(tmp_path / "pat" / "seg.dcm", ct, lesion, None, "MANUAL", fractional=True)
    np.testing.assert_array_equal(scan_dicom_folder(tmp_path)[0].lesion_mask, lesion)


def test_a_seg_on_other_instances_of_the_series_is_refused(tmp_path: Path) -> None:
    """Same series UID, but the SEG was drawn on instances the CT folder does not hold
    (another reconstruction re-sent under the series): its masks would read as empty."""
    volume, lesion = _volume()
    study = generate_uid()
    ct = _write_ct(tmp_path / "pat" / "ct", volume, study)
    _write_seg(tmp_path / "pat" / "seg.dcm", ct, lesion, None, "MANUAL")
    for path in ct:
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DatasetError, match="references none of the CT series' instances"):
        scan_dicom_folder(tmp_path)[0]


def test_label_rows_that_match_no_case_are_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    volume, lesion = _volume()
    ct = _write_ct(tmp_path / "pat1" / "ct", volume, generate_uid())
    _write_seg(tmp_path / "pat1" / "seg.dcm", ct, lesion, None, "MANUAL")
    (tmp_path / "labels.csv").write_text("key,label\npat1/ct,cap\npat1/c,covid\n")
    with caplog.at_level(logging.WARNING, logger="training.datasets"):
        source = scan_dicom_folder(tmp_path)
    assert source.labels() == [Diagnosis.CAP]
    assert "1 row(s) match no case (by case id" in caplog.text and "pat1/c" in caplog.text


def test_a_seg_drawn_on_a_prone_series_lands_on_the_volume(tmp_path: Path) -> None:
    """The node turns a prone series to the display convention; a radiologist's SEG lies
    on the stored (turned) images and must be turned with it."""
    volume, lesion = _volume()
    ct = _write_ct(tmp_path / "pat" / "ct", volume, generate_uid())
    for path in ct:
        store_prone(path)
    _write_seg(tmp_path / "pat" / "seg.dcm", ct, lesion[:, ::-1, ::-1], None, "MANUAL")
    case = scan_dicom_folder(tmp_path)[0]
    np.testing.assert_array_equal(case.volume_hu, volume)
    np.testing.assert_array_equal(case.lesion_mask, lesion)


def test_node_index_takes_reviewed_segs_only(tmp_path: Path) -> None:
    volume, lesion = _volume()
    study = generate_uid()
    data = tmp_path / "data"
    ct = _write_ct(data / "ct", volume, study)
    _write_seg(data / "auto.dcm", ct, lesion, None, "AUTOMATIC")
    corrected = lesion.copy()
    corrected[5, 30:35, 30:35] = True
    index = StudyIndex(f"sqlite:///{data / 'index.sqlite'}")
    for path in [*ct, data / "auto.dcm"]:
        _add_to_index(index, data, path)
    index.close()
    with pytest.raises(DatasetError, match="no CT series with a reviewed"):
        parse_data_spec(f"index:{data}")  # the node's own (automatic) output only
    _write_seg(data / "fixed.dcm", ct, corrected, None, "MANUAL")
    index = StudyIndex(f"sqlite:///{data / 'index.sqlite'}")
    _add_to_index(index, data, data / "fixed.dcm")
    index.close()
    (tmp_path / "labels.csv").write_text(f"study,label\n{study},covid\n")
    source = parse_data_spec(f"index:{data},labels={tmp_path / 'labels.csv'}")
    assert len(source) == 1 and source.labels() == [Diagnosis.COVID19]
    assert source.patients() == ["P1"]
    case = source[0]
    np.testing.assert_array_equal(case.lesion_mask, corrected)
    np.testing.assert_array_equal(case.volume_hu, volume)


def test_node_index_takes_the_newest_drawn_seg_not_the_last_received(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A draft drawn earlier but received (or re-analysed) later replaced the newest
    correction; a damaged SEG in the store was passed over without a word."""
    volume, lesion = _volume()
    data = tmp_path / "data"
    ct = _write_ct(data / "ct", volume, generate_uid())
    draft = lesion.copy()
    draft[5, 30:35, 30:35] = True
    index = StudyIndex(f"sqlite:///{data / 'index.sqlite'}")
    for path in ct:
        _add_to_index(index, data, path)
    for name, mask, time in (("final.dcm", lesion, "140000"), ("draft.dcm", draft, "120000")):
        seg = _write_seg(data / name, ct, mask, None, "MANUAL")
        seg.ContentDate, seg.ContentTime = "20261201", time
        seg.save_as(data / name)
        _add_to_index(index, data, data / name)  # the draft arrives last
    broken = _write_seg(data / "broken.dcm", ct, draft, None, "MANUAL")
    _add_to_index(index, data, data / "broken.dcm")
    index.close()
    del broken.SegmentSequence
    broken.save_as(data / "broken.dcm")
    with caplog.at_level(logging.WARNING, logger="training.datasets"):
        source = parse_data_spec(f"index:{data}")
    assert len(source) == 1
    np.testing.assert_array_equal(source[0].lesion_mask, lesion)
    assert "draft.dcm ignored" in caplog.text
    assert "broken.dcm: left out, a SEG without segments" in caplog.text


def _add_to_index(index: StudyIndex, data: Path, path: Path) -> None:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    record = InstanceRecord(
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        patient_id="P1",
        modality=str(ds.Modality),
        instance_number=int(ds.get("InstanceNumber", 1)),
    )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    index.add_instance(record, str(path.relative_to(data)), path.stat().st_size, digest)


# ------------------------------------------------------------------ lung masks, samples


def test_lung_mask_cache_computes_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    volume, lesion = _volume()
    calls = []

    def fake_segment(v: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
        calls.append(1)
        return v < -500

    monkeypatch.setattr(LungMaskCache, "_segment", staticmethod(fake_segment))
    cache = LungMaskCache(tmp_path)
    first = cache(volume, SPACING)
    again = cache(volume, SPACING)
    np.testing.assert_array_equal(first, volume < -500)
    np.testing.assert_array_equal(again, first)
    assert len(calls) == 1 and len(list((tmp_path / "lungs").glob("*.npz"))) == 1
    cache(volume, (2.0, 0.8, 0.7))  # other spacing, other key
    assert len(calls) == 2


def _toy_case(label: Diagnosis | None = Diagnosis.COVID19) -> Case:
    """32 x 32 in-plane: the tiny model's segmentation grid, so nothing is resampled."""
    volume = np.full((20, 32, 32), -1000, dtype=np.int16)
    lung = np.zeros(volume.shape, dtype=bool)
    lung[:, 6:26, 5:27] = True
    volume[lung] = -850
    lesion = np.zeros(volume.shape, dtype=bool)
    lesion[6:10, 8:12, 7:11] = True
    volume[lesion] = -400
    return Case("toy", volume, (2.0, 1.0, 1.0), lesion, lung, label)


class _OneCase:
    def __init__(self, case: Case) -> None:
        self.case = case

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> Case:
        return self.case

    def labels(self) -> list[Diagnosis | None]:
        return [self.case.label]

    def case_ids(self) -> list[str]:
        return ["toy"]

    def scan_keys(self) -> list[str]:
        return ["toy"]

    def patients(self) -> list[str]:
        return ["toy"]


def test_training_samples_are_keyed_and_consistent() -> None:
    from ai.checkpoint import preprocess_config_for
    from ai.model import ModelConfig

    cfg = ModelConfig.named("tiny")
    pre = preprocess_config_for(cfg)
    samples = TrainingSamples(
        _OneCase(_toy_case()), pre, cfg.cls_input, seed=3, lesion_bias=1.0, with_grid=True
    )
    a, b, c = samples[(0, 0)], samples[(0, 0)], samples[(1, 0)]
    for key in ("x_cls", "x_seg", "seg_target", "box", "grid"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert not torch.equal(a["grid"], c["grid"])  # another epoch, other augmentation
    assert a["x_cls"].shape == (1, *cfg.cls_input)
    assert a["x_seg"].shape == a["seg_target"].shape == (1, *cfg.seg_patch)
    assert a["lesion_map"].shape == (1, 4, 8, 8)
    assert a["label"].item() == 0
    assert a["seg_target"].sum() > 0  # lesion-biased: the patch holds lesion
    assert float(a["x_seg"].max()) <= 1.0 and float(a["x_seg"].min()) >= 0.0
    plain = TrainingSamples(
        _OneCase(_toy_case(None)), pre, cfg.cls_input, seed=3,
        augmentation=Augmentation.off(),
    )[(0, 0)]  # fmt: skip
    assert plain["label"].item() == -1 and "grid" not in plain
    # Without augmentation the lesion map on the C grid is the lesion's volume fraction.
    frac = _toy_case().lesion_mask.mean()
    assert float(plain["lesion_map"].mean()) == pytest.approx(frac, rel=1e-5)


@pytest.mark.parametrize("field_of_view_mm", [None, 100.0])
def test_samples_match_inference_preprocessing(field_of_view_mm: float | None) -> None:
    """Training sees what `ai.infer` feeds the network (no augmentation), with or without
    a field of view (here a 100 mm square around 22 mm lungs: mostly beyond the matrix)."""
    from ai import infer
    from ai.checkpoint import preprocess_config_for
    from ai.model import ModelConfig
    from ai.preprocess import field_of_view_box

    cfg = ModelConfig.named("tiny")
    pre = replace(preprocess_config_for(cfg), field_of_view_mm=field_of_view_mm)
    case = _toy_case()
    assert case.lung_mask is not None
    sample = TrainingSamples(
        _OneCase(case), pre, cfg.cls_input, seed=0, augmentation=Augmentation.off(),
        with_grid=True,
    )[(0, 0)]  # fmt: skip
    window = SlidingWindow(case.volume_hu.shape, pre)
    fov = field_of_view_box(case.lung_mask, case.spacing_mm, pre)
    assert fov.size == ((100, 100) if field_of_view_mm else (32, 32))
    grid = infer._seg_grid(case.volume_hu, case.lung_mask, window, fov, pre)
    torch.testing.assert_close(sample["grid"], grid, rtol=0, atol=0)
    torch.testing.assert_close(sample["x_cls"][0], sample_cls_slices(grid, pre), rtol=0, atol=0)


def test_augmentation_thickens_slices_by_averaging_and_flips_exactly() -> None:
    """Slices doubled in thickness are the mean of the two they cover; a flip alone moves
    every column to its mirror image, the masks with the image."""
    slices = torch.arange(8, dtype=torch.float32)[:, None, None].expand(8, 6, 5)
    stack = torch.stack([slices, slices * 2])
    thick = Augmentation(flip=0.0, rotate_deg=0.0, scale=0.0, z_scale=0.5, noise_hu=0.0)
    rng = next(
        np.random.default_rng(s) for s in range(100)
        if round(8 * (1 + np.random.default_rng(s).uniform(-0.5, 0.5))) == 4
    )  # fmt: skip
    out = datasets._augment(stack, thick, rng)
    assert out.shape == (2, 4, 6, 5)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([0.5, 2.5, 4.5, 6.5]))
    torch.testing.assert_close(out[1], out[0] * 2)

    image = torch.rand(1, 3, 6, 5, generator=torch.Generator().manual_seed(0))
    flip = Augmentation(flip=1.0, rotate_deg=0.0, scale=0.0, z_scale=0.0, noise_hu=0.0)
    torch.testing.assert_close(
        datasets._augment(image, flip, np.random.default_rng(0)), image.flip(-1),
        rtol=0, atol=1e-5,
    )  # fmt: skip


def test_unknown_lungs_fail_loudly() -> None:
    case = _toy_case()
    case.lung_mask = None
    from ai.checkpoint import preprocess_config_for
    from ai.model import ModelConfig

    cfg = ModelConfig.named("tiny")
    samples = TrainingSamples(_OneCase(case), preprocess_config_for(cfg), cfg.cls_input, seed=0)
    with pytest.raises(DatasetError, match="no lung mask"):
        samples[(0, 0)]


def test_open_data_fills_lung_masks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    volume, lesion = _volume()
    _write_nifti(tmp_path / "a.nii.gz", volume, SPACING)
    _write_nifti(tmp_path / "m.nii.gz", lesion.astype(np.uint8), SPACING)
    (tmp_path / "l.csv").write_text("case_id,label,image,lesion_mask\na,normal,a.nii.gz,m.nii.gz\n")
    monkeypatch.setattr(
        LungMaskCache, "_segment", staticmethod(lambda v, s: np.ones(v.shape, dtype=bool))
    )
    source = datasets.open_data([f"nifti:{tmp_path / 'l.csv'}"] * 2, tmp_path / "cache")
    assert len(source) == 2 and source.labels() == [Diagnosis.NON_PNEUMONIA] * 2
    assert source[1].lung_mask is not None and source[1].lung_mask.all()


def test_a_scan_whose_lungs_are_refused_is_marked_and_training_draws_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One scan the segmenter refuses (lungs cut off) must not stop a training run over
    thousands: it is marked once (and remembered), and its training samples come from
    the next usable case."""
    from ai.checkpoint import preprocess_config_for
    from ai.errors import LungsCutOff
    from ai.model import ModelConfig

    volume, lesion = _volume()
    _write_nifti(tmp_path / "a.nii.gz", volume, SPACING)
    _write_nifti(tmp_path / "b.nii.gz", volume[::-1].copy(), SPACING)
    _write_nifti(tmp_path / "m.nii.gz", lesion.astype(np.uint8), SPACING)
    (tmp_path / "l.csv").write_text("case_id,label,image,lesion_mask\n"
                                    "a,covid,a.nii.gz,m.nii.gz\nb,cap,b.nii.gz,m.nii.gz\n")
    refused = _volume()[0][::-1]
    calls = []

    def segment(v: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
        calls.append(1)
        if np.array_equal(v, refused):
            raise LungsCutOff("the lungs reach the last slice")
        return np.ones(v.shape, dtype=bool)

    monkeypatch.setattr(LungMaskCache, "_segment", staticmethod(segment))
    source = datasets.open_data(f"nifti:{tmp_path / 'l.csv'}", tmp_path / "cache")
    assert source[0].refused == ""
    assert source[1].refused == "the lungs reach the last slice"
    assert source[1].refused == "the lungs reach the last slice" and len(calls) == 2  # cached
    cfg = ModelConfig.named("tiny")
    samples = TrainingSamples(source, preprocess_config_for(cfg), cfg.cls_input, seed=0)
    assert samples[(0, 1)]["case_id"] == "a"


def test_only_what_a_person_drew_is_truth_and_the_newest_seg_wins(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A corrected copy of the node's SEG keeps its AUTOMATIC segments (false positives
    the radiologist removed from the MANUAL one among them); the node's own unreviewed
    SEG beside it in the export is not truth, and is counted at INFO without its path
    (a folder may be named after the patient); one case per CT series."""
    volume, lesion = _volume()
    false_positive = np.zeros_like(lesion)
    false_positive[0, 30:35, 10:15] = True
    ct = _write_ct(tmp_path / "pat" / "ct", volume, generate_uid())
    own = _write_seg(tmp_path / "pat" / "own.dcm", ct, lesion | false_positive, None,
                     "AUTOMATIC")
    own.Manufacturer = "dicomnode"
    own.save_as(tmp_path / "pat" / "own.dcm")
    corrected = _write_seg(tmp_path / "pat" / "corrected.dcm", ct, lesion, None, "MANUAL",
                           automatic_extra=false_positive)
    corrected.ContentDate, corrected.ContentTime = "20261201", "120000"
    corrected.save_as(tmp_path / "pat" / "corrected.dcm")
    with caplog.at_level(logging.INFO, logger="training.datasets"):
        source = scan_dicom_folder(tmp_path)
    assert len(source) == 1
    np.testing.assert_array_equal(source[0].lesion_mask, lesion)
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("1 of this node's own SEG(s)" in m for m in info)
    assert not any("own.dcm" in m for m in info)
    # another vendor's automatic SEG, newer than the radiologist's: the radiologist's wins
    vendor = _write_seg(tmp_path / "pat" / "vendor.dcm", ct, lesion | false_positive, None,
                        "AUTOMATIC")
    vendor.ContentDate, vendor.ContentTime = "20261202", "120000"
    vendor.save_as(tmp_path / "pat" / "vendor.dcm")
    np.testing.assert_array_equal(scan_dicom_folder(tmp_path)[0].lesion_mask, lesion)


def test_nifti_spacing_comes_from_the_affine_in_any_storage_order(tmp_path: Path) -> None:
    """A tool that resamples and updates the sform alone leaves pixdim (and the qform)
    stale; a file already stored RAS+ kept that stale pixdim as its spacing, while the same
    file stored in another order got the affine's."""
    volume, lesion = _volume()
    dz, dy, dx = SPACING
    stale = np.diag([dx / 2, dy / 2, dz / 2, 1.0])
    for name, flip in (("ras", 1.0), ("las", -1.0)):
        data = np.transpose(volume, (2, 1, 0))[::-1, ::-1, :]
        mask = np.transpose(lesion.astype(np.uint8), (2, 1, 0))[::-1, ::-1, :]
        if flip < 0:
            data, mask = data[::-1], mask[::-1]
        affine = np.diag([flip * dx, dy, dz, 1.0])
        for array, suffix in ((data, ""), (mask, "_m")):
            image = nib.Nifti1Image(np.ascontiguousarray(array), affine)
            image.header.set_qform(stale, code=1)
            image.header.set_zooms((dx / 2, dy / 2, dz / 2))
            image.set_sform(affine, code=2)
            nib.save(image, str(tmp_path / f"{name}{suffix}.nii.gz"))
    (tmp_path / "labels.csv").write_text("case_id,label,image,lesion_mask\n"
                                         "ras,covid,ras.nii.gz,ras_m.nii.gz\n"
                                         "las,covid,las.nii.gz,las_m.nii.gz\n")
    source = NiftiSource.from_csv(tmp_path / "labels.csv")
    for i in range(2):
        case = source[i]
        assert case.spacing_mm == pytest.approx(SPACING)
        np.testing.assert_array_equal(case.volume_hu, volume)
        np.testing.assert_array_equal(case.lesion_mask, lesion)


def test_unreadable_nifti_and_seg_files_are_refused_cases_not_crashes(tmp_path: Path) -> None:
    """A truncated .nii.gz, an Analyze file where NIfTI is expected, a truncated SEG: each
    is a refused case (skipped and named by train and evaluate), not the end of a run."""
    volume, lesion = _volume()
    _write_nifti(tmp_path / "a.nii.gz", volume, SPACING)
    _write_nifti(tmp_path / "a_mask.nii.gz", lesion.astype(np.uint8), SPACING)
    whole = (tmp_path / "a.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(whole[: len(whole) // 2])
    dz, dy, dx = SPACING
    nib.save(nib.AnalyzeImage(np.transpose(volume, (2, 1, 0)), np.diag([-dx, -dy, dz, 1.0])),
             str(tmp_path / "old.img"))
    (tmp_path / "labels.csv").write_text("case_id,label,image,lesion_mask\n"
                                         "cut,covid,cut.nii.gz,a_mask.nii.gz\n"
                                         "old,covid,old.img,a_mask.nii.gz\n")
    source = NiftiSource.from_csv(tmp_path / "labels.csv")
    with pytest.raises(DatasetError, match="cannot read the NIfTI voxels"):
        source[0]
    with pytest.raises(DatasetError, match="AnalyzeImage, not a NIfTI image"):
        source[1]
    ct = _write_ct(tmp_path / "dcm" / "pat" / "ct", volume, generate_uid())
    _write_seg(tmp_path / "dcm" / "pat" / "seg.dcm", ct, lesion, None, "MANUAL")
    seg_bytes = (tmp_path / "dcm" / "pat" / "seg.dcm").read_bytes()
    pixel_data = seg_bytes.rindex(b"\xe0\x7f\x10\x00")  # (7FE0,0010): cut inside the frames
    (tmp_path / "dcm" / "pat" / "seg.dcm").write_bytes(seg_bytes[: pixel_data + 20])
    dicom = scan_dicom_folder(tmp_path / "dcm")
    with pytest.raises(DatasetError, match=r"seg\.dcm: (cannot be read as a SEG|its segments"
                       r" cannot be laid on the CT series)"):
        dicom[0]


def test_a_truncated_file_in_a_dicom_folder_is_left_out_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A cut-off copy of a CT slice beside a good series made the whole folder fail with
    a struct.error that named no file."""
    volume, lesion = _volume()
    ct = _write_ct(tmp_path / "pat" / "ct", volume, generate_uid())
    _write_seg(tmp_path / "pat" / "seg.dcm", ct, lesion, None, "MANUAL")
    whole = ct[0].read_bytes()
    (tmp_path / "stray").mkdir()
    left_out = 0
    for cut in range(130, len(whole), 23):  # wherever the copy stopped
        (tmp_path / "stray" / "partial.dcm").write_bytes(whole[:cut])
        with caplog.at_level(logging.WARNING, logger="training.datasets"):
            caplog.clear()
            source = scan_dicom_folder(tmp_path)
        # Cut in its pixels, the copy reads as the series' instance (spread over two
        # folders, the case is then named by its UID) and the whole file is read first.
        [case] = [source[i] for i in range(len(source))]
        np.testing.assert_array_equal(case.lesion_mask, lesion)
        warned = [r.getMessage() for r in caplog.records if r.name == "training.datasets"]
        if warned:
            assert all("partial.dcm: left out" in message for message in warned)
            left_out += 1
    assert left_out > 5


def test_a_series_in_the_root_folder_is_named_by_its_uid(tmp_path: Path) -> None:
    """Its folder relative to the root is ".": two sites' single-series folders then shared
    that case id, and `--val-data` was refused as holding a training case."""
    volume, lesion = _volume()
    ct = _write_ct(tmp_path, volume, generate_uid())
    _write_seg(tmp_path / "seg.dcm", ct, lesion, None, "MANUAL")
    source = scan_dicom_folder(tmp_path)
    [case_id] = source.case_ids()
    assert case_id == str(pydicom.dcmread(ct[0]).SeriesInstanceUID)


def test_of_two_segs_saved_at_the_same_time_the_one_left_out_is_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    volume, lesion = _volume()
    ct = _write_ct(tmp_path / "pat" / "ct", volume, generate_uid())
    other = np.zeros_like(lesion)
    other[0, 30:35, 10:15] = True
    for name, mask in (("a.dcm", other), ("b.dcm", lesion)):
        seg = _write_seg(tmp_path / "pat" / name, ct, mask, None, "MANUAL")
        seg.ContentDate, seg.ContentTime = "20261201", "120000"
        seg.save_as(tmp_path / "pat" / name)
    with caplog.at_level(logging.WARNING, logger="training.datasets"):
        source = scan_dicom_folder(tmp_path)
    np.testing.assert_array_equal(source[0].lesion_mask, lesion)  # the later file by path
    assert "a.dcm ignored" in caplog.text and "b.dcm ignored" not in caplog.text


def test_validation_overlap_is_judged_by_scan_not_case_id(tmp_path: Path) -> None:
    """Two sites' exports with the same layout ("pat/ct") hold other scans: refused as
    shared by case id before; one series exported twice under other folder names is the
    same scan and is refused."""
    from training.trainer import TrainConfig, prepare_data

    volume, lesion = _volume()
    sites = {}
    for site in ("a", "b"):
        ct = _write_ct(tmp_path / site / "pat" / "ct", volume, generate_uid())
        _write_seg(tmp_path / site / "pat" / "seg.dcm", ct, lesion, None, "MANUAL")
        sites[site] = ct
    copy = tmp_path / "c" / "other" / "ct"
    copy.mkdir(parents=True)
    for path in sites["a"]:
        (copy / path.name).write_bytes(path.read_bytes())
    (tmp_path / "c" / "other" / "seg.dcm").write_bytes(
        (tmp_path / "a" / "pat" / "seg.dcm").read_bytes())

    def config(val: str) -> TrainConfig:
        return TrainConfig(data=[f"dicom:{tmp_path / 'a'}"], val_data=[f"dicom:{val}"],
                           out=tmp_path / "run", size="tiny", task="seg",
                           cache_dir=tmp_path / "cache")

    train, val = prepare_data(config(str(tmp_path / "b")))
    assert train.case_ids() == val.case_ids() == ["pat/ct"]  # same name, other scans
    with pytest.raises(DatasetError, match="shares 1 case.* validated on scans it trained on"):
        prepare_data(config(str(tmp_path / "c")))
