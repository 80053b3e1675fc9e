#!/usr/bin/env bash
# The shipped ai/weights/deepsc-lite.pt, made on a machine without a GPU (2 CPU cores):
# the joint lite model, both stages on 90 phantoms generated on the fly (24 stage-1
# epochs of about 4 minutes, 4 stage-2 epochs of about 13 minutes: about 2.5 hours,
# so it ran across sessions with --resume), then evaluated on 30 held-out phantoms
# whose seeds training never saw (lungs from the node's own segmentation, as in
# service). docs/training.md, attempt 5, has the results.
#
#   bash training/recipes/shipped_lite_cpu.sh runs/     # again with RESUME=1 after a stop
set -eu
OUT=${1:-runs}
TRAIN="phantoms:covid=30,cap=30,normal=30,seed=1000,size=256,slices=64"
VAL="phantoms:covid=3,cap=3,normal=3,seed=5000,size=256,slices=64"
HELD_OUT="phantoms:covid=10,cap=10,normal=10,seed=900000,size=256,slices=64"
mkdir -p "$OUT"
python3 -m dicomnode train --size lite --seed 0 --out "$OUT/lite-cpu" --device cpu \
    --workers 1 --data "$TRAIN" --val-data "$VAL" \
    --epochs1 24 --epochs2 4 --val-every 3 --patience 0 --batch-size 2 \
    ${RESUME:+--resume}
python3 -m dicomnode evaluate --checkpoint "$OUT/lite-cpu/model.pt" --data "$HELD_OUT" \
    --out "$OUT/lite-cpu/eval" --device cpu --workers 1
