"""Field-of-view benchmark: does the diagnosis depend on how wide the scan was reconstructed?

A scanner reconstructs the same chest in a field of view its protocol chooses (about
320-500 mm across at 512 pixels). Each held-out phantom is generated again at fixed
pixel spacings, the same patient and lesions in mm in a wider or narrower field, and
`ai.infer.analyse` runs on each as the node serves it (its own lung segmentation, CPU
defaults). Reported per field: accuracy, the lesion DSC, and the largest and mean change
of any class probability against the phantom's own drawn field; over all fields:
accuracy, DSC, and the phantoms called right in every one.

    python3 bench/fov.py --seed 950000 --out bench/results/fov-cpu.json
    python3 bench/fov.py --field-of-view-mm 360 --out bench/results/fov-cpu-360.json
    python3 bench/fov.py --checkpoint runs/cls20/model.pt --out bench/results/fov-cpu-cls20.json
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine, write_report  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=950000, help="first phantom seed per class")
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--size", type=int, default=256, help="matrix (phantoms as trained)")
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--fields-mm", type=float, nargs="+", default=[340.0, 420.0, 500.0],
                        help="fields of view to reconstruct each phantom in (mm across)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="the weights (default: the shipped ones)")
    parser.add_argument("--field-of-view-mm", type=float, default=None,
                        help="override the checkpoint's PreprocessConfig.field_of_view_mm"
                             " (0: the whole matrix, as before it existed)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    from ai.errors import InputVolumeError
    from ai.infer import analyse, load_model
    from training.datasets import PhantomSource
    from training.metrics import dice_coefficient

    ckpt = load_model(args.checkpoint, "cpu")
    if args.field_of_view_mm is not None:
        fov = args.field_of_view_mm or None
        ckpt = dataclasses.replace(
            ckpt, preprocess=dataclasses.replace(ckpt.preprocess, field_of_view_mm=fov))
    items = [(kind, args.seed + i) for kind in ("covid", "cap", "normal")
             for i in range(args.per_class)]
    fields: list[float | None] = [None, *args.fields_mm]
    scans: list[dict[str, Any]] = []
    started = time.perf_counter()
    for field in fields:
        spacing = None if field is None else round(field / args.size, 4)
        source = PhantomSource(items, size=args.size, slices=args.slices,
                               pixel_spacing_mm=spacing, lungs="truth")
        for i in range(len(source)):
            case = source[i]
            row: dict[str, Any] = {"case_id": case.case_id, "label": int(case.label),
                                   "field_mm": round(case.volume_hu.shape[2]
                                                     * case.spacing_mm[2], 1),
                                   "drawn": field is None}
            try:
                result = analyse(case.volume_hu, case.spacing_mm, checkpoint=ckpt)
            except InputVolumeError as exc:  # a refusal (lungs cut off) is a result here
                row["refused"] = f"{type(exc).__name__}: {exc}"
            else:
                row |= {"diagnosis": int(result.diagnosis),
                        "probabilities": list(result.probabilities.values()),
                        "dsc": (dice_coefficient(result.lesion_mask, case.lesion_mask)
                                if case.lesion_mask.any() else None)}
            scans.append(row)
            print(row, flush=True)
    report = {
        "benchmark": "fov", "machine": machine(), "checkpoint": ckpt.info,
        "field_of_view_mm": ckpt.preprocess.field_of_view_mm,
        "phantoms": {"seed": args.seed, "per_class": args.per_class, "size": args.size,
                     "slices": args.slices},
        "seconds": round(time.perf_counter() - started, 1),
        "overall": overall(scans), "by_field": summarise(scans, fields), "scans": scans,
    }
    write_report(report, args.out)
    return 0


def overall(scans: list[dict[str, Any]]) -> dict[str, Any]:
    """Over every field: accuracy, mean DSC, and the phantoms called right in all."""
    done = [s for s in scans if "refused" not in s]
    right: dict[str, bool] = {}
    for s in scans:
        right[s["case_id"]] = right.get(s["case_id"], True) and s.get("diagnosis") == s["label"]
    dscs = [s["dsc"] for s in done if s["dsc"] is not None]
    return {
        "scans": len(scans), "refused": len(scans) - len(done),
        "accuracy": round(float(np.mean([s["diagnosis"] == s["label"] for s in done])), 4),
        "dsc": round(float(np.mean(dscs)), 4) if dscs else None,
        "phantoms": len(right), "right_in_every_field": sum(right.values()),
    }


def summarise(scans: list[dict[str, Any]], fields: list[float | None]) -> list[dict[str, Any]]:
    """Per field: accuracy, mean DSC, refusals, and the largest probability change
    against the same phantom in its drawn field."""
    drawn = {s["case_id"]: s for s in scans if s["drawn"]}
    rows = []
    for field in fields:
        these = [s for s in scans if s["drawn"] == (field is None)
                 and (field is None or abs(s["field_mm"] - field) < 1.0)]
        done = [s for s in these if "refused" not in s]
        shifts = [max(abs(a - b) for a, b in zip(s["probabilities"],
                                                  drawn[s["case_id"]]["probabilities"],
                                                  strict=True))
                  for s in done if "probabilities" in drawn[s["case_id"]]]
        dscs = [s["dsc"] for s in done if s["dsc"] is not None]
        rows.append({
            "field_mm": "drawn" if field is None else field,
            "scans": len(these), "refused": len(these) - len(done),
            "accuracy": (round(float(np.mean([s["diagnosis"] == s["label"] for s in done])), 4)
                         if done else None),
            "dsc": round(float(np.mean(dscs)), 4) if dscs else None,
            "max_probability_change": round(max(shifts), 3) if shifts else None,
            "mean_probability_change": round(float(np.mean(shifts)), 3) if shifts else None,
        })
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
