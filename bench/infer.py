"""Inference benchmark: per-stage times and peak memory of `ai.infer.analyse`.

For each model size and slice count, a child process generates a 512 x 512 phantom
chest CT, loads a checkpoint (the shipped lite weights when present, else random
weights of that size: the timing does not depend on the values), runs `analyse` once
to warm up and once timed, and reports the stage times, peak RSS and, on CUDA, peak GPU
memory. One process per case so each peak is its own. `--tta auto` runs `analyse` with
its device defaults (on a GPU: test-time mirroring and half-overlapping windows, 16 x
the segmentation windows); `--tta off` as the weights were trained (the paper's timing).

    python3 bench/infer.py --out bench/results/infer-cpu.json
    python3 bench/infer.py --device cuda --sizes lite paper --out bench/results/infer-cuda.json
    python3 bench/infer.py --device cuda --tta off --out bench/results/infer-cuda-plain.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine, write_report  # noqa: E402


def run_case(size: str, slices: int, device: str, threads: int, tta: str) -> dict[str, object]:
    import torch

    from ai.checkpoint import (
        Provenance,
        default_checkpoint_path,
        load_checkpoint,
        preprocess_config_for,
        save_checkpoint,
    )
    from ai.infer import analyse
    from ai.model import ModelConfig, build_model
    from training.phantoms import generate_phantom

    torch.set_num_threads(threads)
    phantom = generate_phantom("covid", 7, slices=slices, size=512)
    shipped = default_checkpoint_path()
    if size == "lite" and shipped.is_file():
        weights, source = shipped, "shipped"
    else:
        torch.manual_seed(0)
        cfg = ModelConfig.named(size)
        weights = Path(tempfile.mkdtemp()) / f"{size}.pt"
        save_checkpoint(weights, build_model(cfg), preprocess_config_for(cfg),
                        Provenance.now("random (benchmark)", 0))
        source = "random"
    t = time.perf_counter()
    ckpt = load_checkpoint(weights, device)
    load_s = time.perf_counter() - t
    # None: analyse's device default; "off": no mirroring, the checkpoint's own windows
    mirror = None if tta == "auto" else False
    overlap = None if tta == "auto" else ckpt.preprocess.seg_overlap
    analyse(phantom.volume_hu, phantom.spacing_mm, checkpoint=ckpt, mirror=mirror,
            overlap=overlap)  # warm-up
    if ckpt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    result = analyse(phantom.volume_hu, phantom.spacing_mm, checkpoint=ckpt, mirror=mirror,
                     overlap=overlap)
    total_s = time.perf_counter() - t
    stages = {k: round(v, 3) for k, v in result.timings.items()}
    model_keys = [k for k in ("preprocess", "segmentation", "classification") if k in stages]
    return {
        "size": size, "slices": slices, "device": str(ckpt.device), "weights": source,
        "threads": threads, "tta": tta, "load_s": round(load_s, 3), "total_s": round(total_s, 3),
        "model_s": round(sum(stages[k] for k in model_keys), 3), "stages_s": stages,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_gpu_mb": (round(torch.cuda.max_memory_allocated() / 2**20, 1)
                        if ckpt.device.type == "cuda" else None),
        "gpu": torch.cuda.get_device_name() if ckpt.device.type == "cuda" else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["lite", "paper"])
    parser.add_argument("--slices", nargs="+", type=int, default=[120, 300])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--tta", choices=["auto", "off"], default="auto",
                        help="test-time mirroring and window overlap: analyse's device "
                        "default (auto) or none (off)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "infer.json")
    parser.add_argument("--case", nargs=2, metavar=("SIZE", "SLICES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # child process: one measurement, JSON on stdout
        print(json.dumps(run_case(args.case[0], int(args.case[1]), args.device, args.threads,
                                  args.tta)))
        return 0
    cases = []
    for size in args.sizes:
        for slices in args.slices:
            child = subprocess.run(
                [sys.executable, __file__, "--case", size, str(slices), "--device", args.device,
                 "--threads", str(args.threads), "--tta", args.tta],
                capture_output=True, text=True,
            )
            if child.returncode != 0:
                cases.append({"size": size, "slices": slices, "error": child.stderr[-2000:]})
            else:
                cases.append(json.loads(child.stdout.strip().splitlines()[-1]))
            print(json.dumps(cases[-1]), flush=True)
    write_report({"benchmark": "infer", "machine": machine(), "cases": cases}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
