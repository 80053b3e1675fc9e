"""Training and evaluation cases from the places a radiology team keeps them.

Four sources, all yielding :class:`Case` (HU volume, spacing, lesion mask, lung mask or
None, label or None):

- ``phantoms:covid=40,cap=40,normal=40,seed=1000,size=128,slices=64``: synthetic chest CT
  (training/phantoms.py) generated on demand, case i with seed ``seed + i``;
- ``nifti:/path/labels.csv``: NIfTI image and lesion mask pairs listed in a CSV (the
  layout of public COVID CT sets once converted);
- ``dicom:/path``: CT series with a DICOM SEG ground truth that references them;
- ``index:/data_dir``: the node's own store, where a SEG sent back by a radiologist
  (a manual or semi-automatic segmentation referencing a CT series) makes a case.

Sources load lazily (``source[i]``) and are picklable, so DataLoader workers do the
loading. Missing lung masks are computed with ``ai.lungs`` and cached by content hash
(:class:`LungMaskCache`), because the classical segmenter costs seconds per scan and
every epoch needs the mask again; generated phantoms are cached the same way.

:class:`TrainingSamples` turns a case into one training step's inputs: augmented, then
preprocessed as ``ai.infer`` does (bit for bit when the scan's in-plane size is the
model's segmentation grid and augmentation is off), with a lesion-biased patch.
"""

from __future__ import annotations

import csv
import hashlib
import inspect
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from ai.errors import InputVolumeError
from ai.labels import Diagnosis
from ai.model import area_weights, linear_weights, paste_from_box
from ai.preprocess import (
    PatchBox,
    PreprocessConfig,
    SlidingWindow,
    apply_lung_mask,
    field_of_view_box,
    normalise_hu,
    resize_inplane,
    sample_cls_slices,
)
from training.losses import UNKNOWN_LABEL

if TYPE_CHECKING:
    from dicomnode.volume import CTVolume

logger = logging.getLogger(__name__)

T = TypeVar("T")

Spacing = tuple[float, float, float]

LABEL_NAMES: dict[str, Diagnosis] = {
    "covid": Diagnosis.COVID19,
    "covid19": Diagnosis.COVID19,
    "covid-19": Diagnosis.COVID19,
    "cap": Diagnosis.CAP,
    "normal": Diagnosis.NON_PNEUMONIA,
    "non-pneumonia": Diagnosis.NON_PNEUMONIA,
    "nonpneumonia": Diagnosis.NON_PNEUMONIA,
}
"""Spellings accepted in label CSVs (case-insensitive, "_" and " " read as "-"); an empty
cell is 'unknown'. No numbers: public sets mean 0 = normal (MosMedData's CT-0) or 0 =
negative, 1 = COVID-19, and a silent mapping to the model's class order would train every
normal scan as COVID-19. Nor "pneumonia" (COVID-19 is a pneumonia too: a set that means
COVID-19 pneumonia would train as CAP) or "none" (no disease, or no label?)."""

PHANTOM_KINDS: dict[str, Diagnosis] = {
    "covid": Diagnosis.COVID19,
    "cap": Diagnosis.CAP,
    "normal": Diagnosis.NON_PNEUMONIA,
}
"""Phantom kinds of training/phantoms.py and the label each one carries."""
PHANTOM_LUNGS = ("truth", "node")
"""Whose lung masks phantoms carry: the generator's, or none (segmented like the node)."""
CACHE_WORDS = {"yes": True, "1": True, "true": True, "on": True,
               "no": False, "0": False, "false": False, "off": False}
"""The values of a phantom spec's ``cache=`` option."""

LUNG_CODES = frozenset({"39607008", "3341006", "44029006"})
"""SNOMED CT Lung, Right lung, Left lung: SEG segments that are lung, not lesion."""
ANATOMY_CATEGORIES = frozenset({"91723000", "123037004"})
"""SNOMED CT 'Anatomical Structure' (current and retired code)."""


class DatasetError(ValueError):
    """A data specification or a case on disk that cannot be used, with the reason."""


@dataclass
class Case:
    """One scan with its ground truth; arrays are (z, y, x), spacing (dz, dy, dx) in mm."""

    case_id: str
    volume_hu: np.ndarray
    spacing_mm: Spacing
    lesion_mask: np.ndarray
    lung_mask: np.ndarray | None = None
    label: Diagnosis | None = None
    # Why the node would refuse this scan (its lungs could not be segmented), or why it
    # cannot be loaded, or "": evaluation and validation skip it and training draws
    # another case instead.
    refused: str = ""
    # The lung mask was segmented by the node (`ai.lungs`, cached), not given by the data.
    lungs_segmented: bool = False

    def __post_init__(self) -> None:
        shape = self.volume_hu.shape
        if self.volume_hu.ndim != 3:
            raise DatasetError(f"{self.case_id}: volume must be 3D (z, y, x), got {shape}")
        for name in ("lesion_mask", "lung_mask"):
            mask = getattr(self, name)
            if mask is not None and mask.shape != shape:
                raise DatasetError(f"{self.case_id}: {name} {mask.shape} != volume {shape}")
        self.spacing_mm = tuple(float(s) for s in self.spacing_mm)  # type: ignore[assignment]
        self.lesion_mask = np.asarray(self.lesion_mask, dtype=bool)
        if self.lung_mask is not None:
            self.lung_mask = np.asarray(self.lung_mask, dtype=bool)


class CaseSource(Protocol):
    """A lazily loaded, picklable sequence of cases whose labels are known up front."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Case: ...

    def labels(self) -> list[Diagnosis | None]:
        """Labels without loading volumes (class weights, stratified splits)."""
        ...

    def case_ids(self) -> list[str]: ...

    def scan_keys(self) -> list[str]:
        """What each case's scan is, across sources: the CT's SeriesInstanceUID, a NIfTI
        image's resolved path, a phantom's case id. Two sources' case ids may coincide
        (two sites' "case001/ct") for other scans; the same key is the same scan."""
        ...

    def patients(self) -> list[str]:
        """Whose scan each case is (the PatientID; the case id when unknown), without
        loading volumes: a split keeps a patient's scans together, so that no patient is
        both trained and validated on (a follow-up, or a second reconstruction of the
        same scan, would flatter the validation)."""
        ...


def parse_label(text: str, where: str) -> Diagnosis | None:
    """A label cell: a name of :data:`LABEL_NAMES` or empty (unknown)."""
    key = text.strip().lower().replace("_", "-").replace(" ", "-")
    if not key:
        return None
    if key not in LABEL_NAMES:
        hint = (" (numbers are refused: data sets disagree on what 0, 1 and 2 mean; write"
                " the class names)" if key.isdigit() else "")
        raise DatasetError(f"{where}: unknown label {text!r}{hint}; use one of"
                           f" {sorted(LABEL_NAMES)}")
    return LABEL_NAMES[key]


# --------------------------------------------------------------------- lung masks


def _source_hash(code: Any) -> str:
    """Hash of a module's or function's source: a cache entry made by other code is a
    miss."""
    return hashlib.sha256(inspect.getsource(code).encode()).hexdigest()[:12]


def _pack(mask: np.ndarray) -> np.ndarray:
    return np.packbits(mask.reshape(-1))


def _unpack(packed: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    return np.unpackbits(packed, count=math.prod(shape)).astype(bool).reshape(tuple(shape))


class LungMaskCache:
    """``ai.lungs.segment_lungs`` memoised on disk, keyed by the volume's content hash."""

    def __init__(self, cache_dir: str | Path | None) -> None:
        self.cache_dir = None if cache_dir is None else Path(cache_dir) / "lungs"

    def __call__(self, volume_hu: np.ndarray, spacing_mm: Spacing) -> np.ndarray:
        """The lung mask; raises `InputVolumeError` (remembered too) when the segmenter
        refuses the scan, as the node would."""
        import ai.lungs
        import ai.preprocess

        if self.cache_dir is None:
            return self._segment(volume_hu, spacing_mm)
        digest = hashlib.sha256()
        digest.update(np.ascontiguousarray(volume_hu).tobytes())
        digest.update(repr((volume_hu.shape, str(volume_hu.dtype), tuple(spacing_mm))).encode())
        digest.update(_source_hash(ai.lungs).encode())
        digest.update(_source_hash(ai.preprocess).encode())  # its checks refuse scans too
        path = self.cache_dir / f"{digest.hexdigest()[:32]}.npz"
        refusal = path.with_suffix(".refused.txt")
        if path.exists():
            with np.load(path) as data:
                return _unpack(data["lung"], volume_hu.shape)
        if refusal.exists():
            raise InputVolumeError(refusal.read_text())
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        try:
            mask = self._segment(volume_hu, spacing_mm)
        except InputVolumeError as exc:
            tmp = refusal.with_name(f"{refusal.name}.{os.getpid()}.tmp")
            tmp.write_text(str(exc))
            os.replace(tmp, refusal)
            raise
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        np.savez_compressed(tmp, lung=_pack(mask))
        os.replace(tmp, path)  # atomic: concurrent workers never read half a file
        return mask

    @staticmethod
    def _segment(volume_hu: np.ndarray, spacing_mm: Spacing) -> np.ndarray:
        from ai.lungs import segment_lungs

        return np.asarray(segment_lungs(volume_hu, spacing_mm), dtype=bool)


@dataclass
class WithLungMasks:
    """A source whose cases always carry a lung mask (computed and cached when missing)."""

    source: CaseSource
    cache: LungMaskCache

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Case:
        try:
            case = self.source[index]
        except (DatasetError, OSError) as exc:  # one broken case must not end a long run
            case_id = self.source.case_ids()[index]
            logger.warning("%s: refused, it cannot be loaded: %s", case_id, exc)
            empty = np.zeros((1, 1, 1), dtype=bool)
            return Case(case_id, np.zeros((1, 1, 1), np.float32), (1.0, 1.0, 1.0), empty,
                        empty, self.source.labels()[index], f"cannot be loaded: {exc}")
        if case.lung_mask is None:
            case.lungs_segmented = True
            try:
                case.lung_mask = self.cache(case.volume_hu, case.spacing_mm)
            except InputVolumeError as exc:
                logger.warning("%s: refused, its lungs could not be segmented: %s",
                               case.case_id, exc)
                case.lung_mask = np.zeros(case.volume_hu.shape, dtype=bool)
                case.refused = str(exc)
        return case

    def labels(self) -> list[Diagnosis | None]:
        return self.source.labels()

    def case_ids(self) -> list[str]:
        return self.source.case_ids()

    def scan_keys(self) -> list[str]:
        return self.source.scan_keys()

    def patients(self) -> list[str]:
        return self.source.patients()


# ----------------------------------------------------------------- combinators


@dataclass
class Subset:
    """The cases of ``source`` at ``indices`` (train/validation splits, folds)."""

    source: CaseSource
    indices: list[int]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Case:
        return self.source[self.indices[index]]

    def labels(self) -> list[Diagnosis | None]:
        labels = self.source.labels()
        return [labels[i] for i in self.indices]

    def case_ids(self) -> list[str]:
        ids = self.source.case_ids()
        return [ids[i] for i in self.indices]

    def scan_keys(self) -> list[str]:
        keys = self.source.scan_keys()
        return [keys[i] for i in self.indices]

    def patients(self) -> list[str]:
        patients = self.source.patients()
        return [patients[i] for i in self.indices]


@dataclass
class Concat:
    """Several sources as one (``--data`` given more than once). A case id that more than
    one source holds (two sites' ``pat1/ct``) is prefixed with its source's place in
    ``--data`` (``2:pat1/ct``), so that results and logs tell the scans apart."""

    sources: list[CaseSource]

    def __len__(self) -> int:
        return sum(len(s) for s in self.sources)

    def __getitem__(self, index: int) -> Case:
        if index < 0:
            index += len(self)
        for k, source in enumerate(self.sources):
            if 0 <= index < len(source):
                case, case_id = source[index], self._case_ids[k][index]
                return case if case.case_id == case_id else replace(case, case_id=case_id)
            index -= len(source)
        raise IndexError(index)

    def labels(self) -> list[Diagnosis | None]:
        return [label for s in self.sources for label in s.labels()]

    @cached_property
    def _case_ids(self) -> list[list[str]]:
        per_source = [s.case_ids() for s in self.sources]
        sources_of = Counter(i for ids in per_source for i in set(ids))
        return [[f"{k}:{i}" if sources_of[i] > 1 else i for i in ids]
                for k, ids in enumerate(per_source, start=1)]

    def case_ids(self) -> list[str]:
        return [i for ids in self._case_ids for i in ids]

    def scan_keys(self) -> list[str]:
        return [k for s in self.sources for k in s.scan_keys()]

    def patients(self) -> list[str]:
        return [p for s in self.sources for p in s.patients()]


def _patient_strata(
    labels: Sequence[Diagnosis | None], patients: Sequence[str] | None
) -> dict[int, list[list[int]]]:
    """Case indices grouped by patient (each case alone when ``patients`` is None), and
    the groups by stratum: the label of the patient's first case (-1: unlabelled)."""
    if patients is not None and len(patients) != len(labels):
        raise DatasetError(f"{len(patients)} patients for {len(labels)} cases")
    groups: dict[str, list[int]] = {}
    for i in range(len(labels)):
        groups.setdefault(str(i) if patients is None else patients[i], []).append(i)
    strata: dict[int, list[list[int]]] = {}
    for members in groups.values():
        label = labels[members[0]]
        strata.setdefault(-1 if label is None else int(label), []).append(members)
    return strata


def _shuffled(groups: list[list[int]], rng: np.random.Generator) -> list[list[int]]:
    """The groups in a seeded random order (one `permutation` call per stratum, as the
    splits of one case per patient have always drawn, so their seeds keep their splits)."""
    return [groups[int(k)] for k in rng.permutation(len(groups))]


def kfold_indices(
    labels: Sequence[Diagnosis | None], folds: int, fold: int, seed: int,
    patients: Sequence[str] | None = None,
) -> tuple[list[int], list[int]]:
    """(train, validation) indices of fold ``fold`` of ``folds``, stratified by label,
    each patient's cases in one fold (``patients``: `CaseSource.patients`).

    Each class's patients are shuffled with ``seed`` and dealt, largest first, to the
    fold with the fewest cases so far (ties: round-robin), so every fold keeps the class
    mix and the split is the same on every run and rank; with one case per patient this
    is a plain round-robin deal.
    """
    if folds < 2 or not 0 <= fold < folds:
        raise DatasetError(f"fold {fold} of {folds}: need folds >= 2 and 0 <= fold < folds")
    rng = np.random.default_rng(seed)
    assignment = np.empty(len(labels), dtype=np.int64)
    sizes = [0] * folds
    turn = 0
    for _, groups in sorted(_patient_strata(labels, patients).items()):
        for members in sorted(_shuffled(groups, rng), key=len, reverse=True):
            target = min(range(folds), key=lambda f: (sizes[f], (f - turn) % folds))
            assignment[members] = target
            sizes[target] += len(members)
            turn = (target + 1) % folds
    if min(sizes) == 0:
        raise DatasetError(f"{len(labels)} cases of {_count_patients(labels, patients)} "
                           f"patients do not fill {folds} folds")
    val = [i for i in range(len(labels)) if assignment[i] == fold]
    train = [i for i in range(len(labels)) if assignment[i] != fold]
    return train, val


def split_indices(
    labels: Sequence[Diagnosis | None], val_fraction: float, seed: int,
    patients: Sequence[str] | None = None,
) -> tuple[list[int], list[int]]:
    """(train, validation) indices with about ``val_fraction`` of each class held out,
    whole patients at a time (``patients``: `CaseSource.patients`): a shuffled patient
    joins the validation while that brings its class nearer its share."""
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"validation fraction {val_fraction} must be in (0, 1)")
    rng = np.random.default_rng(seed)
    val: list[int] = []
    for _, groups in sorted(_patient_strata(labels, patients).items()):
        n_val = round(sum(map(len, groups)) * val_fraction)
        taken = 0
        for members in _shuffled(groups, rng):
            if taken + len(members) / 2 < n_val:
                val.extend(members)
                taken += len(members)
    held = set(val)
    return [i for i in range(len(labels)) if i not in held], sorted(val)


def _count_patients(labels: Sequence[Diagnosis | None], patients: Sequence[str] | None) -> int:
    return len(labels) if patients is None else len(set(patients))


# -------------------------------------------------------------------- phantoms


@dataclass
class PhantomSource:
    """Phantoms generated on demand: ``items`` are (kind, seed) pairs.

    Generation is deterministic per seed. With a ``cache_dir`` each case is stored
    after its first generation (uncompressed volume, bit-packed masks; keyed by the
    settings and the generator's source), so later epochs read it back in milliseconds
    instead of generating it again.
    """

    items: list[tuple[str, int]]
    size: int = 512
    slices: int | None = None
    slice_thickness_mm: float | None = None
    pixel_spacing_mm: float | None = None
    cache_dir: Path | None = None
    # "truth": the generator's lung mask; "node": none, so that `open_data` segments the
    # lungs as the node does (`ai.lungs`), border tissue included (docs/training.md).
    lungs: str = "truth"

    def __post_init__(self) -> None:
        if self.lungs not in PHANTOM_LUNGS:
            raise DatasetError(f"phantoms: lungs={self.lungs!r}; use one of {PHANTOM_LUNGS}")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Case:
        case = self._case(index)
        return case if self.lungs == "truth" else replace(case, lung_mask=None)

    def _case(self, index: int) -> Case:
        kind, seed = self.items[index]
        path = self._cache_path(kind, seed)
        if path is not None and path.exists():
            with np.load(path) as data:
                shape = tuple(int(n) for n in data["volume_hu"].shape)
                return Case(
                    case_id=self.case_ids()[index],
                    volume_hu=data["volume_hu"],
                    spacing_mm=tuple(float(v) for v in data["spacing_mm"]),  # type: ignore[arg-type]
                    lesion_mask=_unpack(data["lesion"], shape),
                    lung_mask=_unpack(data["lung"], shape),
                    label=PHANTOM_KINDS[kind],
                )
        case = self._generate(index)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
            assert case.lung_mask is not None
            np.savez(
                tmp,
                volume_hu=case.volume_hu,
                spacing_mm=np.asarray(case.spacing_mm),
                lesion=_pack(case.lesion_mask),
                lung=_pack(case.lung_mask),
            )
            os.replace(tmp, path)
        return case

    def _cache_path(self, kind: str, seed: int) -> Path | None:
        if self.cache_dir is None:
            return None
        import training.phantoms

        settings = (kind, seed, self.size, self.slices, self.slice_thickness_mm,
                    self.pixel_spacing_mm, _source_hash(training.phantoms),
                    _source_hash(PhantomSource._generate))  # fmt: skip
        key = hashlib.sha256(repr(settings).encode()).hexdigest()[:24]
        return Path(self.cache_dir) / "phantoms" / f"{kind}-{seed}-{key}.npz"

    def _generate(self, index: int) -> Case:
        from training.phantoms import affine_ras, generate_phantom

        kind, seed = self.items[index]
        phantom = generate_phantom(
            kind,
            seed,
            slices=self.slices,
            size=self.size,
            slice_thickness_mm=self.slice_thickness_mm,
            pixel_spacing_mm=self.pixel_spacing_mm,
        )
        # The node sees volumes with z ascending along the slice normal (inferior to
        # superior for axial scans, as dicomnode/volume.py and the NIfTI reader deliver):
        # train on phantoms in that order, whatever order the generator draws them in.
        z = slice(None, None, -1) if affine_ras(phantom)[2, 2] < 0 else slice(None)
        return Case(
            case_id=self.case_ids()[index],
            volume_hu=np.ascontiguousarray(phantom.volume_hu[z]),
            spacing_mm=tuple(phantom.spacing_mm),  # type: ignore[arg-type]
            lesion_mask=np.ascontiguousarray(phantom.lesion_mask[z]),
            lung_mask=np.ascontiguousarray(phantom.lung_mask[z]),
            label=Diagnosis(phantom.label),
        )

    def labels(self) -> list[Diagnosis | None]:
        return [PHANTOM_KINDS[kind] for kind, _ in self.items]

    def case_ids(self) -> list[str]:
        return [f"phantom-{kind}-{seed}" for kind, seed in self.items]

    def scan_keys(self) -> list[str]:
        return self.case_ids()  # one seed, one chest, whatever its size or slices

    def patients(self) -> list[str]:
        return self.case_ids()  # every phantom is a patient of its own


def _phantom_source(options: Mapping[str, str], cache_dir: Path | None) -> PhantomSource:
    known = set(PHANTOM_KINDS) | {
        "seed", "size", "slices", "thickness", "spacing", "cache", "lungs"
    }
    unknown = sorted(set(options) - known)
    if unknown:
        raise DatasetError(f"phantoms: unknown option(s) {unknown}; known: {sorted(known)}")
    try:
        counts = {k: int(options[k]) for k in PHANTOM_KINDS if k in options}
        seed = int(options.get("seed", "0"))
        size = int(options.get("size", "512"))
        slices = int(options["slices"]) if "slices" in options else None
        thickness = float(options["thickness"]) if "thickness" in options else None
        spacing = float(options["spacing"]) if "spacing" in options else None
    except ValueError as exc:
        raise DatasetError(f"phantoms: {exc}") from exc
    if not counts or sum(counts.values()) < 1 or min(counts.values()) < 0:
        raise DatasetError(f"phantoms: give a count for at least one of {sorted(PHANTOM_KINDS)}")
    from training.phantoms import settings_problems

    # Checked here, not when the first phantom is made (after the run folder is set up).
    problems = settings_problems(seed, slices, size, thickness, spacing)
    if options.get("cache", "yes").lower() not in CACHE_WORDS:
        problems.append(f"cache={options['cache']} must be yes or no")
    if problems:
        raise DatasetError(f"phantoms: {'; '.join(problems)}")
    lungs = options.get("lungs", "truth")
    items: list[tuple[str, int]] = []
    for kind in PHANTOM_KINDS:  # fixed kind order: seeds do not depend on option order
        for _ in range(counts.get(kind, 0)):
            items.append((kind, seed + len(items)))
    if not CACHE_WORDS[options.get("cache", "yes").lower()]:
        cache_dir = None
    return PhantomSource(items, size, slices, thickness, spacing, cache_dir, lungs)


# ----------------------------------------------------------------------- NIfTI


AFFINE_TOLERANCE_MM = 0.01
"""How far a mask's voxel grid may lie from its image's (header rounding) and still be
the same grid."""


def _nifti_zyx(path: Path) -> tuple[np.ndarray, Spacing, np.ndarray]:
    """A NIfTI image as a (z, y, x) array in the DICOM patient frame, its spacing, and
    its RAS+ affine (to check that a mask lies on its image's grid).

    Reoriented to RAS+ first, then axes reversed and x, y flipped: columns run to the
    patient's left, rows to posterior, slices to superior, as the DICOM loader sorts them.
    """
    import nibabel as nib

    try:
        loaded = nib.load(str(path))
    except (OSError, nib.filebasedimages.ImageFileError) as exc:
        raise DatasetError(f"{path}: cannot read the NIfTI file: {exc}") from exc
    if not isinstance(loaded, nib.Nifti1Pair):  # .nii, .hdr/.img, NIfTI-1/2; not Analyze
        raise DatasetError(f"{path}: a {type(loaded).__name__}, not a NIfTI image; convert"
                           " it to NIfTI (.nii or .nii.gz) with its orientation")
    header = loaded.header
    if int(header["qform_code"]) == 0 and int(header["sform_code"]) == 0:
        raise DatasetError(
            f"{path}: neither qform nor sform is set (codes 0), so its orientation is"
            " unknown and the image could load mirrored; write it with an affine (e.g."
            " nibabel's set_qform/set_sform, code 1)")
    try:  # reorienting reads the voxels too
        image = nib.as_closest_canonical(loaded)
        data = np.asarray(image.dataobj)
    except Exception as exc:  # a truncated .nii.gz: EOFError, zlib.error, ValueError ...
        raise DatasetError(f"{path}: cannot read the NIfTI voxels: {type(exc).__name__}:"
                           f" {exc}") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DatasetError(f"{path}: expected a 3D image, got shape {data.shape}")
    # From the affine, which places the voxels: a tool that resamples and updates the
    # sform alone leaves pixdim stale, and a file already in RAS+ keeps its header as is.
    zooms = nib.affines.voxel_sizes(image.affine)
    volume = np.transpose(data, (2, 1, 0))[:, ::-1, ::-1]
    spacing = (float(zooms[2]), float(zooms[1]), float(zooms[0]))
    return np.ascontiguousarray(volume), spacing, np.asarray(image.affine)


def _binary_mask(mask: np.ndarray, path: Path) -> np.ndarray:
    """A 0/1 mask as booleans. Other values are refused, not taken as > 0: a label map
    (COVID-19-CT-Seg's lung_and_infection: 1, 2 lungs, 3 infection) would make the lungs
    the lesion, and a resampled or probability mask would grow by its soft border."""
    values = np.unique(mask)
    if not np.all(np.isin(values, (0, 1))):
        shown = ", ".join(f"{v:g}" for v in values[:6]) + (" ..." if values.size > 6 else "")
        raise DatasetError(
            f"{path}: a mask must hold 0 and 1 only, found {shown}; for a label map, write"
            " the lesion label as a 0/1 mask; for a soft mask, threshold it")
    return mask.astype(bool)


def _same_grid(image: Path, image_affine: np.ndarray, mask: Path, mask_affine: np.ndarray
               ) -> None:
    """A mask saved with another affine than its image (same shape or not) would be
    reoriented differently and land mirrored or shifted: refused, not guessed."""
    if not np.allclose(image_affine, mask_affine, rtol=0.0, atol=AFFINE_TOLERANCE_MM):
        raise DatasetError(
            f"{mask}: its voxel grid (NIfTI affine) is not that of {image.name}; resample"
            " the mask onto the image first"
        )


def _hu_volume(path: Path, volume: np.ndarray) -> np.ndarray:
    """int16 HU; NaN (outside a resampled field of view) becomes air. A volume without
    air is not in HU (normalised, or an MR): refused."""
    if np.issubdtype(volume.dtype, np.floating):
        volume = np.nan_to_num(volume, nan=-1024.0)
    if float(np.percentile(volume[::4, ::4, ::4], 1)) > -500.0:  # a sample is plenty
        raise DatasetError(
            f"{path}: no air in the image (1st percentile above -500): is it a CT in HU?"
        )
    return _to_int16(volume)


def _to_int16(volume: np.ndarray) -> np.ndarray:
    if volume.dtype == np.int16:
        return volume
    return np.clip(np.rint(volume), -32768, 32767).astype(np.int16)


@dataclass
class NiftiSource:
    """Cases listed in a CSV: ``case_id,label,image,lesion_mask[,lung_mask][,patient_id]``.

    Paths are relative to the CSV's folder unless absolute; ``label`` may be empty
    (segmentation-only case), ``lung_mask`` empty or absent (computed), ``patient_id``
    empty or absent (the case is a patient of its own).
    """

    rows: list[dict[str, str]]
    root: Path

    @classmethod
    def from_csv(cls, path: str | Path) -> NiftiSource:
        path = Path(path)
        try:
            with path.open(newline="", encoding="utf-8-sig") as handle:  # Excel's BOM too
                rows = [
                    {k.strip(): (v or "").strip() for k, v in row.items() if k}
                    for row in csv.DictReader(handle)
                ]
        except (OSError, UnicodeDecodeError) as exc:
            raise DatasetError(f"nifti: cannot read {path}: {exc}") from exc
        source = cls(rows, path.parent)
        required = ("case_id", "label", "image", "lesion_mask")
        seen: set[str] = set()
        for number, row in enumerate(rows, start=2):
            missing = [k for k in required if k not in row or (k != "label" and not row[k])]
            if missing:
                raise DatasetError(f"{path}:{number}: missing {missing}")
            parse_label(row["label"], f"{path}:{number}")
            if row["case_id"] in seen:
                raise DatasetError(f"{path}:{number}: case_id {row['case_id']!r} again")
            seen.add(row["case_id"])
            # checked now: a missing file found at load time ends a run hours in
            absent = [row[k] for k in ("image", "lesion_mask", "lung_mask")
                      if row.get(k) and not source._path(row[k]).is_file()]
            if absent:
                raise DatasetError(f"{path}:{number}: no such file {absent}")
        if not rows:
            raise DatasetError(f"{path}: no cases")
        return source

    def __len__(self) -> int:
        return len(self.rows)

    def _path(self, text: str) -> Path:
        path = Path(text)
        return path if path.is_absolute() else self.root / path

    def __getitem__(self, index: int) -> Case:
        row = self.rows[index]
        image_path = self._path(row["image"])
        volume, spacing, affine = _nifti_zyx(image_path)
        masks: list[np.ndarray | None] = []
        for key in ("lesion_mask", "lung_mask"):
            if not row.get(key):
                masks.append(None)
                continue
            mask, _, mask_affine = _nifti_zyx(self._path(row[key]))
            _same_grid(image_path, affine, self._path(row[key]), mask_affine)
            masks.append(_binary_mask(mask, self._path(row[key])))
        lesion, lung = masks
        assert lesion is not None
        label = parse_label(row["label"], row["case_id"])
        return Case(row["case_id"], _hu_volume(image_path, volume), spacing, lesion, lung, label)

    def labels(self) -> list[Diagnosis | None]:
        return [parse_label(r["label"], r["case_id"]) for r in self.rows]

    def case_ids(self) -> list[str]:
        return [r["case_id"] for r in self.rows]

    def scan_keys(self) -> list[str]:
        return [str(self._path(r["image"]).resolve()) for r in self.rows]

    def patients(self) -> list[str]:
        return [r.get("patient_id") or r["case_id"] for r in self.rows]


# ----------------------------------------------------------------------- DICOM


def load_ct_series(paths: Iterable[str | Path]) -> CTVolume:
    """CT files -> the node's own volume (`dicomnode.volume`), so training sees exactly
    the geometry checks, slice order and display convention that inference sees."""
    from dicomnode.volume import SeriesRejected, read_series

    try:
        return read_series([Path(p) for p in paths])
    except SeriesRejected as exc:
        raise DatasetError(f"CT series rejected: {exc}") from exc


def _segment_kinds(seg: Any) -> tuple[list[int], list[int]]:
    """(lesion segment numbers, lung segment numbers) of a SEG.

    Lung: property type Lung / Right lung / Left lung. Lesion: every segment that is not
    an anatomical structure (lesions, infiltrates, ground glass, consolidation ...).
    When a person drew or edited some segments (MANUAL / SEMIAUTOMATIC), only those are
    truth: the node's own SEG corrected in segment 2 still carries its AUTOMATIC
    per-lesion segments, false positives the radiologist removed among them.
    """
    reviewed = _is_reviewed(seg)
    lesion, lung = [], []
    for number in seg.segment_numbers:
        description = seg.get_segment_description(number)
        if reviewed and str(description.get("SegmentAlgorithmType", "")) == "AUTOMATIC":
            continue
        if _snomed_ct(description.segmented_property_type) in LUNG_CODES:
            lung.append(number)
        elif _snomed_ct(description.segmented_property_category) not in ANATOMY_CATEGORIES:
            lesion.append(number)
    return lesion, lung


def _snomed_ct(code: Any) -> str:
    """A code's SNOMED CT value; a legacy SNOMED RT code ("SRT", as older SEG editors
    write: Anatomical Structure T-D000A, Lung T-28000) translated by pydicom's table, so
    an old SEG's lung segment is not taken for a lesion."""
    from pydicom.sr._snomed_dict import mapping

    value = str(code.value)
    return mapping["SRT"].get(value, value) if code.scheme_designator == "SRT" else value


FRACTIONAL_THRESHOLD = 0.5
"""A FRACTIONAL SEG's voxel is lesion from this probability or occupancy on (PS3.3
C.8.20.2.3: values scaled by MaximumFractionalValue)."""


def _union(seg: Any, volume: CTVolume, numbers: Sequence[int]) -> np.ndarray:
    """OR of the given segments on the CT volume's grid, one segment at a time (bounded
    memory). The SEG's frames lie on the stored images; the volume may be turned to the
    display convention (a prone series), so they are turned with it. A FRACTIONAL SEG
    (probabilities, as AI tools export) is thresholded at FRACTIONAL_THRESHOLD."""
    uids = [str(ds.SOPInstanceUID) for ds in volume.datasets]
    fractional = str(seg.get("SegmentationType", "")) == "FRACTIONAL"
    out: np.ndarray | None = None
    for number in numbers:
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=uids,
            segment_numbers=[number],
            assert_missing_frames_are_empty=True,
            dtype=np.float32 if fractional else np.uint8,
        )[..., 0]
        mask = pixels >= FRACTIONAL_THRESHOLD if fractional else pixels > 0
        out = mask if out is None else out | mask
    assert out is not None
    return np.ascontiguousarray(volume.to_stored(out))


def case_from_dicom(
    case_id: str, ct_paths: Sequence[str | Path], seg_path: str | Path, label: Diagnosis | None
) -> Case:
    """A case from a CT series and a SEG that references it (lesion and optional lung).
    A scan labelled normal needs no SEG (`seg_path` empty) or lesion segment: its truth is
    an empty lesion mask."""
    import highdicom as hd

    volume = load_ct_series(ct_paths)
    normal = label == Diagnosis.NON_PNEUMONIA
    if not str(seg_path):
        if not normal:
            raise DatasetError(f"{case_id}: no SEG, and not labelled normal")
        empty = np.zeros(volume.hu.shape, dtype=bool)
        return Case(case_id, _to_int16(volume.hu), volume.spacing_mm, empty, None, label)
    try:
        seg = hd.seg.segread(str(seg_path))
        referenced = {uid for _, _, uid in seg.get_source_image_uids()}
    except Exception as exc:  # a truncated or malformed SEG: highdicom raises many kinds
        raise DatasetError(f"{seg_path}: cannot be read as a SEG: {type(exc).__name__}:"
                           f" {exc}") from exc
    if not referenced & {str(ds.SOPInstanceUID) for ds in volume.datasets}:
        raise DatasetError(
            f"{seg_path}: SEG references none of the CT series' instances (drawn on another"
            " reconstruction of the series?): its masks would be empty"
        )
    lesion_numbers, lung_numbers = _segment_kinds(seg)
    if not lesion_numbers and not normal:
        raise DatasetError(f"{seg_path}: SEG has no lesion segment (and the scan is not"
                           " labelled normal)")
    try:
        lesion = (_union(seg, volume, lesion_numbers) if lesion_numbers
                  else np.zeros(volume.hu.shape, dtype=bool))
        lung = _union(seg, volume, lung_numbers) if lung_numbers else None
    except Exception as exc:  # frames without per-frame references to the CT's images ...
        raise DatasetError(f"{seg_path}: its segments cannot be laid on the CT series:"
                           f" {type(exc).__name__}: {exc}") from exc
    return Case(case_id, _to_int16(volume.hu), volume.spacing_mm, lesion, lung, label)


def _referenced_series(seg: Any) -> str | None:
    refs = seg.get("ReferencedSeriesSequence") or []
    return str(refs[0].SeriesInstanceUID) if refs else None


def _keep_newest(newest: dict[str, tuple[tuple[Any, ...], T]], series: str,
                 rank: tuple[Any, ...], item: T) -> None:
    """Keep for `series` the higher-ranked of `item` and the one kept so far; `rank` ends
    with the SEG's path, so that on equal times the later file wins, whatever order the
    files were met in. A warning names the one left out."""
    kept = newest.get(series)
    if kept is not None:
        loser = min(kept[0], rank)
        logger.warning("CT series %s has several SEGs; the newest (reviewed ones first, on"
                       " equal times the later file by path) is truth, %s ignored", series,
                       loser[-1])
        if kept[0] > rank:
            return
    newest[series] = (rank, item)


def _content_stamp(seg: Any) -> str:
    """ContentDate and ContentTime as one string: the later SEG sorts higher."""
    return str(seg.get("ContentDate", "")) + str(seg.get("ContentTime", ""))


def _is_reviewed(seg: Any) -> bool:
    """True when some segment was drawn or edited by a person (MANUAL / SEMIAUTOMATIC)."""
    return any(
        str(item.get("SegmentAlgorithmType", "")) != "AUTOMATIC"
        for item in seg.get("SegmentSequence", [])
    )


def read_labels_csv(path: str | Path) -> dict[str, Diagnosis | None]:
    """``key,label`` rows (header required; the key column may be named anything)."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            rows = [(reader.line_num, r) for r in reader if r]
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read labels {path}: {exc}") from exc
    if header is None or len(header) < 2:
        raise DatasetError(f"{path}: expected a header 'case_id,label'")
    labels: dict[str, Diagnosis | None] = {}
    for line, row in rows:
        if len(row) < 2:
            raise DatasetError(f"{path}:{line}: expected 'case_id,label', got {row!r}")
        key, label = row[0].strip(), parse_label(row[1], f"{path}:{line}")
        if key in labels and labels[key] != label:
            raise DatasetError(f"{path}:{line}: {key!r} labelled twice, differently")
        labels[key] = label
    return labels


@dataclass
class DicomCaseRef:
    """Where one DICOM case lives on disk (resolved up front; loaded in workers)."""

    case_id: str
    ct_paths: list[str]
    seg_path: str
    label: Diagnosis | None
    keys: tuple[str, ...] = field(default_factory=tuple)
    patient_id: str = ""  # the CT's PatientID; "": unknown


@dataclass
class DicomSource:
    """CT series + SEG pairs; see :func:`scan_dicom_folder` and :func:`index_source`."""

    refs: list[DicomCaseRef]

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> Case:
        ref = self.refs[index]
        return case_from_dicom(ref.case_id, ref.ct_paths, ref.seg_path, ref.label)

    def labels(self) -> list[Diagnosis | None]:
        return [r.label for r in self.refs]

    def case_ids(self) -> list[str]:
        return [r.case_id for r in self.refs]

    def scan_keys(self) -> list[str]:
        return [r.keys[0] if r.keys else r.case_id for r in self.refs]  # SeriesInstanceUID

    def patients(self) -> list[str]:
        return [r.patient_id or r.case_id for r in self.refs]


def _apply_labels(refs: list[DicomCaseRef], labels: Mapping[str, Diagnosis | None]) -> None:
    """Label each case by its case id, SeriesInstanceUID or StudyInstanceUID; rows that
    label no case (a typo, a case without SEG) are reported, not silently dropped: the
    case they meant would otherwise train without its diagnosis."""
    used: set[str] = set()
    for ref in refs:
        key = next((k for k in (ref.case_id, *ref.keys) if k in labels), None)
        ref.label = labels[key] if key is not None else None
        used.update(k for k in (ref.case_id, *ref.keys) if k in labels)
    unused = sorted(set(labels) - used)
    if unused:
        logger.warning("labels: %d row(s) match no case (by case id, series or"
                       " study UID): %s%s", len(unused), ", ".join(unused[:5]),
                       " ..." if len(unused) > 5 else "")
    unlabelled = sum(ref.label is None for ref in refs)
    if unlabelled:
        logger.info("labels: %d of %d case(s) have no label (segmentation only)",
                    unlabelled, len(refs))


def scan_dicom_folder(root: str | Path, labels_csv: str | Path | None = None) -> DicomSource:
    """Every SEG under ``root`` paired with the CT series it references, and every CT
    series labelled normal (no SEG needed: its truth is an empty lesion mask).

    Case id = the CT series' folder relative to ``root``; its SeriesInstanceUID when the
    series is spread over several folders, shares its folder with another CT series
    (a flat PACS export) or lies in ``root`` itself, so that no two cases share an id.
    Labels come from ``labels_csv`` (default ``root/labels.csv`` when present), keyed by
    case id, SeriesInstanceUID or StudyInstanceUID; cases without a label train the
    segmentation only.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.uid import SegmentationStorage

    from dicomnode.outputs import MANUFACTURER

    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dicom: {root} is not a folder")
    series: dict[str, list[Path]] = {}
    studies: dict[str, str] = {}
    patients: dict[str, str] = {}
    # One case per CT series: its newest SEG a person drew or edited, if any.
    newest: dict[str, tuple[tuple[Any, ...], Path]] = {}
    own_segs = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        except InvalidDicomError:
            continue  # not DICOM: a labels.csv, a README, a DICOMDIR's neighbours
        except Exception as exc:  # a truncated copy: pydicom raises many kinds
            logger.warning("%s: left out, cannot be read as DICOM: %s: %s", path,
                           type(exc).__name__, exc)
            continue
        if ds.get("SOPClassUID") == SegmentationStorage:
            referenced = _referenced_series(ds)
            if referenced is None:
                logger.warning("%s: SEG references no series; ignored", path)
            elif str(ds.get("Manufacturer", "")) == MANUFACTURER and not _is_reviewed(ds):
                own_segs += 1  # a path may name the patient: counted at INFO, named at DEBUG
                logger.debug("%s: this node's own SEG, not reviewed: not truth", path)
            else:
                _keep_newest(newest, referenced, (_is_reviewed(ds), _content_stamp(ds),
                                                  str(path)), path)
        elif str(ds.get("Modality", "")) == "CT":
            if "SeriesInstanceUID" not in ds:
                logger.warning("%s: left out, a CT image without SeriesInstanceUID", path)
                continue
            uid = str(ds.SeriesInstanceUID)
            series.setdefault(uid, []).append(path)
            studies[uid] = str(ds.get("StudyInstanceUID", ""))
            patients[uid] = str(ds.get("PatientID", "")).strip()
    series_in_folder: dict[Path, int] = {}
    for paths in series.values():
        for folder in {p.parent for p in paths}:
            series_in_folder[folder] = series_in_folder.get(folder, 0) + 1

    def case_id_of(uid: str) -> str:
        folders = {p.parent for p in series[uid]}
        folder = next(iter(folders))
        own_folder = len(folders) == 1 and series_in_folder[folder] == 1 and folder != root
        return str(folder.relative_to(root)) if own_folder else uid  # "." names nothing

    refs = []
    for uid, (_, seg_path) in newest.items():
        if uid not in series:
            logger.warning("%s: referenced CT series %s not found under %s", seg_path, uid, root)
            continue
        files = [str(p) for p in series[uid]]
        refs.append(DicomCaseRef(case_id_of(uid), files, str(seg_path), None,
                                 (uid, studies[uid]), patients[uid]))
    default_csv = root / "labels.csv"
    csv_path = labels_csv or (default_csv if default_csv.exists() else None)
    labels = read_labels_csv(csv_path) if csv_path is not None else {}
    # A scan without disease needs no SEG: one labelled normal is a case as it is.
    for uid in sorted(set(series) - set(newest)):
        case_id = case_id_of(uid)
        if any(labels.get(k) == Diagnosis.NON_PNEUMONIA for k in (case_id, uid, studies[uid])):
            refs.append(DicomCaseRef(case_id, [str(p) for p in series[uid]], "", None,
                                     (uid, studies[uid]), patients[uid]))
    if own_segs:
        logger.info("dicom: %d of this node's own SEG(s) under %s, not reviewed: not truth",
                    own_segs, root)
    unused = len(set(series) - {ref.keys[0] for ref in refs})
    if unused:  # a scout, a reformat, a series nobody drew on: said, not silently dropped
        logger.info("dicom: %d CT series under %s have no SEG and no label normal: left out",
                    unused, root)
    if not refs:
        raise DatasetError(f"dicom: no CT series with a SEG (or labelled normal) under {root}")
    if csv_path is not None:
        _apply_labels(refs, labels)
    return DicomSource(refs)


# ------------------------------------------------------------------- node index


class SeriesIndex(Protocol):
    """What :func:`index_source` needs of ``storage.index.StudyIndex``."""

    def counts(self) -> dict[str, int]: ...

    def series_status(self, limit: int = 100) -> list[dict[str, Any]]: ...

    def series_instance_paths(self, series_instance_uid: str) -> list[str]: ...


def index_source(
    index: SeriesIndex,
    data_dir: str | Path,
    labels: Mapping[str, Diagnosis | None] | None = None,
) -> DicomSource:
    """Cases from the node's store: CT series with a reviewed SEG sent back to the node.

    A SEG counts when one of its segments is MANUAL or SEMIAUTOMATIC (a person drew or
    corrected it); the node's own AUTOMATIC output is never training truth. The newest
    reviewed SEG of a series wins. ``labels`` maps StudyInstanceUID or
    SeriesInstanceUID (of the CT) to a diagnosis; without one a case trains the
    segmentation only.
    """
    import pydicom

    data_dir = Path(data_dir)
    rows = index.series_status(limit=max(1, index.counts().get("series", 0)))
    # Per CT series, its newest reviewed SEG by content date and time (when it was drawn,
    # not when the node last received or re-analysed anything of the study), as for a
    # DICOM folder.
    newest: dict[str, tuple[tuple[Any, ...], tuple[Path, Any, str]]] = {}
    for row in rows:
        if row["modality"] != "SEG":
            continue
        for relative in index.series_instance_paths(row["series_instance_uid"]):
            seg_path = data_dir / relative
            try:
                ds = pydicom.dcmread(str(seg_path), stop_before_pixels=True)
            except Exception as exc:  # gone from the store, or damaged
                logger.warning("%s: left out, cannot be read as DICOM: %s: %s", seg_path,
                               type(exc).__name__, exc)
                continue
            if "SegmentSequence" not in ds:
                logger.warning("%s: left out, a SEG without segments (damaged?)", seg_path)
                continue
            source = _referenced_series(ds)
            if source is None or not _is_reviewed(ds):
                continue
            _keep_newest(newest, source, (_content_stamp(ds), str(seg_path)),
                         (seg_path, ds, row["study_instance_uid"]))
    refs: list[DicomCaseRef] = []
    for source, (_, (seg_path, ds, study)) in newest.items():
        ct = [str(data_dir / p) for p in index.series_instance_paths(source)]
        if not ct:
            logger.info("SEG %s: its CT series is not in the store", seg_path.name)
            continue
        # the SEG's Patient module is its CT's (PS3.3 C.7.1.1)
        patient = str(ds.get("PatientID", "")).strip()
        refs.append(DicomCaseRef(source, ct, str(seg_path), None, (source, study), patient))
    if not refs:
        raise DatasetError(f"no CT series with a reviewed (manual) SEG in {data_dir}")
    _apply_labels(refs, labels or {})
    logger.info("node index: %d case(s) with a reviewed SEG", len(refs))
    return DicomSource(refs)


# ---------------------------------------------------------------------- specs


def _split_options(text: str) -> tuple[str, dict[str, str]]:
    """``head,key=value,...`` -> (head, options); head may be empty."""
    parts = [p.strip() for p in text.split(",")]
    head = "" if "=" in parts[0] else parts.pop(0)
    options: dict[str, str] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise DatasetError(f"expected key=value, got {part!r}")
        options[key.strip().lower()] = value.strip()
    return head, options


def _open_index(data_dir: Path, url: str | None) -> Any:
    from storage.errors import IndexUnavailable
    from storage.index import StudyIndex

    if not data_dir.is_dir():  # the SEG and CT files lie there, whatever the database
        raise DatasetError(f"index: {data_dir} is not a folder (the node's data directory)")
    database = data_dir / "index.sqlite"
    if url is None and not database.exists():
        raise DatasetError(f"index: no index.sqlite in {data_dir}")
    try:
        return StudyIndex(url or f"sqlite:///{database}", schema="check")
    except IndexUnavailable as exc:  # its message hides a password in the URL
        raise DatasetError(f"index: {exc}") from exc


def parse_data_spec(spec: str, cache_dir: str | Path | None = None) -> CaseSource:
    """One ``--data`` value -> a source (lung masks not yet filled; see :func:`open_data`).

    ``phantoms:covid=N,cap=N,normal=N[,seed=S][,size=P][,slices=Z][,thickness=MM]
    [,spacing=MM][,cache=no][,lungs=node]``, ``nifti:/path/labels.csv``,
    ``dicom:/folder[,labels=CSV]``, ``index:/data_dir[,labels=CSV][,url=DATABASE_URL]``.
    ``cache_dir`` keeps generated phantoms (unless ``cache=no``).
    """
    scheme, sep, rest = spec.partition(":")
    scheme = scheme.strip().lower()
    if not sep:
        raise DatasetError(f"data spec {spec!r}: expected SCHEME:..., e.g. nifti:/data/labels.csv")
    try:
        if scheme == "phantoms":
            head, options = _split_options(rest)
            if head:
                raise DatasetError(f"unexpected {head!r}")
            return _phantom_source(options, None if cache_dir is None else Path(cache_dir))
        if scheme == "nifti":
            return NiftiSource.from_csv(rest.strip())
        if scheme == "dicom":
            head, options = _split_options(rest)
            _only(options, {"labels"})
            return scan_dicom_folder(head, options.get("labels"))
        if scheme == "index":
            head, options = _split_options(rest)
            _only(options, {"labels", "url"})
            if not head:  # `index:` alone: not the folder the command ran in
                raise DatasetError("index: give the node's data directory (index:/DATA_DIR)")
            labels = read_labels_csv(options["labels"]) if "labels" in options else None
            index = _open_index(Path(head), options.get("url"))
            try:
                return index_source(index, head, labels)
            finally:
                index.close()
    except DatasetError as exc:
        raise DatasetError(f"data spec {spec!r}: {exc}") from exc
    raise DatasetError(
        f"data spec {spec!r}: unknown scheme {scheme!r}; use phantoms, nifti, dicom or index"
    )


def _only(options: Mapping[str, str], allowed: set[str]) -> None:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise DatasetError(f"unknown option(s) {unknown}; known: {sorted(allowed)}")


def open_data(specs: str | Sequence[str], cache_dir: str | Path | None) -> CaseSource:
    """``--data`` values -> one source whose cases all carry a lung mask."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    if not specs:
        raise DatasetError("no data given")
    sources = [parse_data_spec(s, cache_dir) for s in specs]
    source: CaseSource = sources[0] if len(sources) == 1 else Concat(sources)
    return WithLungMasks(source, LungMaskCache(cache_dir))


# --------------------------------------------------------------- model inputs


@dataclass(frozen=True)
class Augmentation:
    """Random changes per training sample (ours; deepsc.md "Training").

    Left-right flip with probability ``flip``; in-plane rotation up to ``rotate_deg``;
    in-plane scaling by up to ``scale`` (fraction); slice spacing changed by up to
    ``z_scale`` (fraction; thicker slices are averaged, as a scanner would); Gaussian
    noise with a standard deviation drawn up to ``noise_hu`` inside the lungs.
    """

    flip: float = 0.5
    rotate_deg: float = 10.0
    scale: float = 0.1
    z_scale: float = 0.25
    noise_hu: float = 20.0

    @classmethod
    def off(cls) -> Augmentation:
        return cls(flip=0.0, rotate_deg=0.0, scale=0.0, z_scale=0.0, noise_hu=0.0)


def c_grid_shape(cls_input: Sequence[int]) -> tuple[int, int, int]:
    """The C stem's output grid for a classification input (the stem halves, ceil)."""
    return tuple(-(-int(n) // 2) for n in cls_input)  # type: ignore[return-value]


class TrainingSamples:
    """Model inputs for one training step per (epoch, case index) key.

    Everything random is drawn from ``numpy.random.default_rng((seed, epoch, index))``,
    so a sample depends on nothing but its key: any worker count, DDP rank or resumed
    run builds the same sample. The key comes from the sampler, not from dataset state,
    because persistent DataLoader workers hold their own copy of the dataset.

    A sample (dict of CPU tensors): ``x_cls`` (1, N, h, w), ``x_seg`` (1, *patch),
    ``seg_target`` and ``seg_lung`` (1, *patch), ``box`` (6,) in volume fractions,
    ``lesion_map`` (1, *C grid) the true lesion fraction on the C grid (stage 1 input of
    the classifier), ``label`` (``UNKNOWN_LABEL`` when unknown), ``case_id``, and with
    ``with_grid`` the whole preprocessed segmentation grid ``grid`` (S, gh, gw) for the
    whole-scan context.
    """

    def __init__(
        self,
        source: CaseSource,
        preprocess: PreprocessConfig,
        cls_input: Sequence[int],
        *,
        seed: int,
        augmentation: Augmentation | None = None,
        lesion_bias: float = 0.6,
        with_grid: bool = False,
    ) -> None:
        self.source = source
        self.preprocess = preprocess
        self.c_grid = c_grid_shape(cls_input)
        self.seed = seed
        self.augmentation = augmentation or Augmentation()
        self.lesion_bias = lesion_bias
        self.with_grid = with_grid

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        rng = np.random.default_rng((self.seed, epoch, index))
        case = self._usable_case(index)
        if case.lung_mask is None:
            raise DatasetError(f"{case.case_id}: no lung mask (open the data with open_data)")
        cfg = self.preprocess
        image = apply_lung_mask(normalise_hu(case.volume_hu, cfg), case.lung_mask)
        gh, gw = cfg.seg_inplane_size or image.shape[1:]
        stack = torch.stack(
            [
                image,
                torch.from_numpy(case.lesion_mask).float(),
                torch.from_numpy(case.lung_mask).float(),
            ]
        )
        fov = field_of_view_box(case.lung_mask, case.spacing_mm, cfg)
        stack = _augment(resize_inplane(fov.crop(stack), (gh, gw)), self.augmentation, rng)
        grid_img, lung = stack[0], stack[2] > 0.5
        lesion, lung = (stack[1] > 0.5) & lung, lung.float()
        sigma = rng.uniform(0.0, self.augmentation.noise_hu) / (cfg.hu_window[1] - cfg.hu_window[0])
        if sigma > 0:
            noise = torch.from_numpy(rng.standard_normal(grid_img.shape, dtype=np.float32))
            grid_img = (grid_img + sigma * noise * lung).clamp_(0.0, 1.0)
        x_cls = sample_cls_slices(grid_img, cfg)
        window = SlidingWindow(
            grid_img.shape,
            PreprocessConfig(
                seg_patch=cfg.seg_patch, seg_inplane_size=None, seg_overlap=cfg.seg_overlap
            ),
        )
        box = self._sample_box(window, lesion, lung, rng)
        whole = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0, 1.0]])
        lesion_map = paste_from_box(lesion[None, None].float(), whole, self.c_grid)[0]
        sample = {
            "x_cls": x_cls[None],
            "x_seg": window.extract(grid_img, box)[None],
            "seg_target": window.extract(lesion.float(), box)[None],
            "seg_lung": window.extract(lung, box)[None],
            "box": torch.tensor(box.fractions(), dtype=torch.float32),
            "lesion_map": lesion_map,
            "label": torch.tensor(UNKNOWN_LABEL if case.label is None else int(case.label)),
            "case_id": case.case_id,
        }
        if self.with_grid:
            sample["grid"] = grid_img
        return sample

    def _usable_case(self, index: int) -> Case:
        """The case at `index`, or when the node would refuse it, the next one that it
        would not (the same for the same index, so samples stay keyed)."""
        for step in range(len(self.source)):
            case = self.source[(index + step) % len(self.source)]
            if not case.refused:
                return case
        raise DatasetError("every training case is refused: no lungs could be segmented")

    def _sample_box(
        self,
        window: SlidingWindow,
        lesion: torch.Tensor,
        lung: torch.Tensor,
        rng: np.random.Generator,
    ) -> PatchBox:
        """Lesion-biased choice among the windows inference runs on this grid: one that
        holds lesion with probability ``lesion_bias``, else one that holds lung (a window
        of air outside the lungs teaches nothing).

        Inference windows, not patches centred on a voxel: the network normalises over
        the whole window (GroupNorm), so what a window holds besides the lung voxels
        (masked-out body, its place in the chest) must look in training as it will when
        the node runs; patches centred on lung voxels held far more lung than the
        inference tiles, and the network learnt a background level that did not carry
        over (docs/training.md).
        """
        for mask, wanted in ((lesion, rng.random() < self.lesion_bias), (lung, True)):
            if not wanted:
                continue
            holding = [box for box in window if bool(mask[box.inside()[0]].any())]
            if holding:
                return holding[int(rng.integers(len(holding)))]
        return window.boxes[int(rng.integers(len(window)))]


def _augment(stack: torch.Tensor, aug: Augmentation, rng: np.random.Generator) -> torch.Tensor:
    """Slice spacing, flip, rotation and scale of (channels, S, h, w) maps on one grid.

    Two passes over the data, both cheap on a worker's single core: one matrix product
    along z, one in-plane warp whose sampling grid holds the flip, rotation and zoom.
    """
    # Draw every number whatever the settings, so switching one off keeps the others.
    z_factor = 1.0 + rng.uniform(-aug.z_scale, aug.z_scale)
    flip = rng.random() < aug.flip
    angle = math.radians(rng.uniform(-aug.rotate_deg, aug.rotate_deg))
    zoom = 1.0 + rng.uniform(-aug.scale, aug.scale)
    channels, slices, h, w = stack.shape
    new_slices = max(1, round(slices * z_factor))
    if new_slices != slices:
        # Thicker slices are the average of the thin ones they cover (a box filter over
        # the same extent); thinner ones interpolate linearly.
        weights = area_weights if new_slices < slices else linear_weights
        wz = weights((0.0, 1.0), slices, (0.0, 1.0), new_slices).to(stack.dtype)
        stack = torch.matmul(wz, stack.reshape(channels, slices, h * w))
        slices = new_slices
        stack = stack.reshape(channels, slices, h, w)
    if flip or angle or zoom != 1.0:
        cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
        mirror = -1.0 if flip else 1.0  # the flip first: the input's x axis mirrored
        theta = torch.tensor(
            [[[mirror * cos, -mirror * sin, 0.0], [sin, cos, 0.0]]], dtype=stack.dtype
        )
        # One in-plane warp for every slice and channel: a single sampling grid.
        grid = F.affine_grid(theta, [1, 1, h, w], align_corners=False)
        planes = stack.reshape(1, channels * slices, h, w)
        planes = F.grid_sample(planes, grid, mode="bilinear", align_corners=False)
        stack = planes.reshape(channels, slices, h, w)
    return stack.contiguous()
