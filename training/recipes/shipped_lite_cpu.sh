#!/usr/bin/env bash
# The joint lite model trained on a machine without a GPU (2 CPU cores, about 60
# minutes with two scans per step): both stages on 90 phantoms generated on the fly,
# then evaluated on 30 held-out phantoms whose seeds training never saw (lungs from the
# node's own segmentation, as in service). Far too few steps for the lesion
# segmentation to converge (docs/training.md, attempts 3 and 4): a reproducible
# CPU check of the whole pipeline, not how the shipped weights are made.
#
#   bash training/recipes/shipped_lite_cpu.sh runs/
set -eu
OUT=${1:-runs}
TRAIN="phantoms:covid=30,cap=30,normal=30,seed=1000,size=256,slices=64"
VAL="phantoms:covid=3,cap=3,normal=3,seed=5000,size=256,slices=64"
HELD_OUT="phantoms:covid=10,cap=10,normal=10,seed=900000,size=256,slices=64"
mkdir -p "$OUT"
python3 -m dicomnode train --size lite --seed 0 --out "$OUT/lite-cpu" --device cpu \
    --workers 1 --data "$TRAIN" --val-data "$VAL" \
    --epochs1 10 --epochs2 2 --val-every 2 --patience 0 --batch-size 2
python3 -m dicomnode evaluate --checkpoint "$OUT/lite-cpu/model.pt" --data "$HELD_OUT" \
    --out "$OUT/lite-cpu/eval" --device cpu --workers 1
