#!/usr/bin/env bash
# The shipped ai/weights/deepsc-lite.pt, made on a machine without a GPU (2 CPU cores), in
# two steps (docs/training.md, attempts 5 and 6):
#
# 1. Attempt 5: the joint lite model, both stages on 90 phantoms generated on the fly
#    (24 stage-1 epochs of about 4 minutes, 4 stage-2 epochs of about 13 minutes: about
#    2.5 hours, run across sessions with --resume). It was trained before the classifier
#    had a pooling option, with the paper's average pooling: --cls-pool mean.
# 2. Attempt 6: 4 more stage-2 epochs from those weights with max pooling in the
#    classifier and a learning rate of its own for the classification stream (1e-3;
#    5e-5 for the rest, so the segmenter stays where it was): about 55 minutes.
#
# Then the evaluation on 30 held-out phantoms whose seeds training never saw (lungs from
# the node's own segmentation, as in service).
#
#   bash training/recipes/shipped_lite_cpu.sh runs/     # again with RESUME=1 after a stop
set -eu
OUT=${1:-runs}
TRAIN="phantoms:covid=30,cap=30,normal=30,seed=1000,size=256,slices=64"
VAL="phantoms:covid=3,cap=3,normal=3,seed=5000,size=256,slices=64"
HELD_OUT="phantoms:covid=10,cap=10,normal=10,seed=900000,size=256,slices=64"
COMMON=(--size lite --seed 0 --device cpu --workers 1 --data "$TRAIN" --val-data "$VAL"
        --patience 0 --batch-size 2 ${RESUME:+--resume})
mkdir -p "$OUT"
python3 -m dicomnode train "${COMMON[@]}" --out "$OUT/lite-cpu5" --cls-pool mean \
    --epochs1 24 --epochs2 4 --val-every 3
python3 -m dicomnode train "${COMMON[@]}" --out "$OUT/lite-cpu6" --stage 2 \
    --init "$OUT/lite-cpu5/model.pt" --cls-pool max --epochs2 4 --lr2 5e-5 --lr2-cls 1e-3 \
    --val-every 2
python3 -m dicomnode evaluate --checkpoint "$OUT/lite-cpu6/model.pt" --data "$HELD_OUT" \
    --out "$OUT/lite-cpu6/eval" --device cpu --workers 1
