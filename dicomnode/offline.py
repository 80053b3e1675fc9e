"""`dicomnode infer`: the node's pipeline on files, without a network or an index.

The quick path for a radiologist or researcher: point it at a folder, get the SEG, SR,
key images and PDF the node would have sent, and a one-line summary per series.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from ai.errors import InputVolumeError
from ai.infer import load_model
from ai.labels import CLASS_NAMES
from dicomnode.config import Settings
from dicomnode.pipeline import analyse_volume, build_outputs
from dicomnode.scu import dicom_files
from dicomnode.volume import SeriesRejected, read_series
from storage.filestore import InvalidUID, check_uid

logger = logging.getLogger(__name__)

ALL_OUTPUTS = {"seg", "sr", "key_images", "pdf"}


def group_ct_series(paths: list[Path]) -> tuple[dict[str, list[Path]], list[str]]:
    """CT files by SeriesInstanceUID, and notes on what was left out."""
    series: dict[str, list[Path]] = defaultdict(list)
    other: dict[str, int] = defaultdict(int)
    for path in dicom_files(paths):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True,
                                 specific_tags=["Modality", "SeriesInstanceUID"])
        except (InvalidDicomError, OSError):
            other["not DICOM"] += 1
            continue
        if ds.get("Modality") != "CT" or "SeriesInstanceUID" not in ds:
            other[f"modality {ds.get('Modality', '?')}"] += 1
            continue
        series[str(ds.SeriesInstanceUID)].append(path)
    notes = [f"skipped {n} file(s): {why}" for why, n in sorted(other.items())]
    return dict(series), notes


def run_offline(
    paths: list[Path], out: Path, settings: Settings, *, checkpoint: Path | None = None,
    device: str | None = None, as_json: bool = False,
) -> int:
    """Analyse every CT series under `paths`; 0 if all succeeded, 1 otherwise."""
    if device:
        settings = dataclasses.replace(settings, ai=dataclasses.replace(settings.ai, device=device))
    series, notes = group_ct_series(paths)
    for note in notes:
        logger.warning(note)
    if not series:
        print("no CT series found under " + ", ".join(str(p) for p in paths))
        return 1
    model = load_model(str(checkpoint) if checkpoint else _configured(settings), settings.ai.device)
    summaries, failed = [], 0
    for uid, files in sorted(series.items()):
        try:
            # The UID names the output folder: "../x" or "/etc" must not lead out of `out`.
            folder = out / check_uid("SeriesInstanceUID", uid)
            summaries.append(_analyse_series(uid, files, folder, settings, model))
        except (SeriesRejected, InputVolumeError, InvalidUID) as exc:
            failed += 1
            summaries.append({"series_instance_uid": uid, "error": str(exc)})
        except Exception as exc:  # one broken series must not cost the others' results
            logger.exception("series %s: internal error", uid)
            failed += 1
            summaries.append({"series_instance_uid": uid,
                              "error": f"internal error: {type(exc).__name__}: {exc}"})
    if as_json:
        print(json.dumps({"series": summaries, "notes": notes}, indent=2))
    else:
        for s in summaries:
            print(_summary_line(s))
        print(f"results in {out}/")
    return 1 if failed else 0


def _analyse_series(
    uid: str, files: list[Path], folder: Path, settings: Settings, model: Any
) -> dict[str, Any]:
    """Analyse one series and write its outputs into `folder`; returns its summary."""
    t0 = time.perf_counter()
    volume = read_series(files, min_slices=1)
    analysis = analyse_volume(volume, settings, model)
    outputs, _ = build_outputs(volume, analysis, settings, ALL_OUTPUTS)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for kind, datasets in outputs.items():
        for i, ds in enumerate(datasets, start=1):
            name = f"{kind}.dcm" if len(datasets) == 1 else f"{kind}-{i}.dcm"
            ds.save_as(folder / name, enforce_file_format=True)
            written.append(str(folder / name))
    return {
        "series_instance_uid": uid,
        "slices": volume.shape[0],
        "left_out": len(volume.left_out),
        "diagnosis": CLASS_NAMES[int(analysis.diagnosis)],
        "probabilities": {k: round(v, 4) for k, v in analysis.probabilities.items()},
        "lvr_percent": round(100 * analysis.lvr, 2),
        "plr_percent": None if analysis.plr is None else round(100 * analysis.plr, 2),
        "lesions": len(analysis.lesions),
        "caveats": [caveat.detail for caveat in analysis.caveats],
        "seconds": round(time.perf_counter() - t0, 2),
        "files": written,
    }


def _configured(settings: Settings) -> str | None:
    path = settings.ai.checkpoint
    return str(settings.base_dir / path) if path else None


def _summary_line(s: dict[str, object]) -> str:
    if "error" in s:
        return f"{s['series_instance_uid']}: NOT ANALYSED: {s['error']}"
    probs = ", ".join(f"{k} {100 * float(v):.1f}%"  # type: ignore[arg-type]
                      for k, v in s["probabilities"].items())  # type: ignore[attr-defined]
    plr = "n/a" if s["plr_percent"] is None else f"{s['plr_percent']}%"
    left_out = f" ({s['left_out']} non-slice instance(s) left out)" if s["left_out"] else ""
    caveats = "".join(f"\n  caveat: {c}" for c in s["caveats"])  # type: ignore[attr-defined]
    return (f"{s['series_instance_uid']}: {s['diagnosis']} ({probs}); LVR {s['lvr_percent']}%, "
            f"PLR {plr}, {s['lesions']} lesion(s); {s['slices']} slices{left_out} in "
            f"{s['seconds']} s{caveats}")
