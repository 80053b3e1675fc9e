#!/usr/bin/env bash
# Single-task ablations at the budget of attempt 6 (docs/training.md): each starts from
# the attempt-5 weights (step 1 of shipped_lite_cpu.sh) and trains 4 epochs on the same
# 90 phantoms with the same seed, batch and rates as the stream it stands for in the
# joint run (classification stream 1e-3, segmentation stream 5e-5), then is evaluated on
# the same 30 held-out phantoms:
#   cls-only        the C stream alone: images only, no lesion map, no task-aware loss
#   seg-only        the L stream alone: no classifier, no cross-stitch, no task-aware loss
#   no-task-aware   the joint stage 2 of attempt 6 with --lambda-ta 0
# RUNS picks some (default all three); INIT the attempt-5 checkpoint.
#
#   INIT=runs/lite-cpu5/model.pt bash training/recipes/ablations_lite_cpu.sh runs/
# (again with RESUME=1 to continue runs that were stopped)
set -eu
OUT=${1:-runs}
INIT=${INIT:-$OUT/lite-cpu5/model.pt}
RUNS=${RUNS:-"cls-only seg-only no-task-aware"}
TRAIN="phantoms:covid=30,cap=30,normal=30,seed=1000,size=256,slices=64"
VAL="phantoms:covid=3,cap=3,normal=3,seed=5000,size=256,slices=64"
HELD_OUT="phantoms:covid=10,cap=10,normal=10,seed=900000,size=256,slices=64"
COMMON=(--size lite --seed 0 --device cpu --workers 1 --data "$TRAIN" --val-data "$VAL"
        --patience 0 --batch-size 2 --init "$INIT" --cls-pool max
        --field-of-view-mm 0)  # the whole matrix, as the runs they compare with
declare -A EXTRA=(
    [cls-only]="--task cls --stage 1 --epochs1 4 --lr1 1e-3 --val-every 2"
    [seg-only]="--task seg --stage 1 --epochs1 4 --lr1 5e-5 --val-every 2"
    [no-task-aware]="--stage 2 --epochs2 4 --lr2 5e-5 --lr2-cls 1e-3 --val-every 2 --lambda-ta 0"
)
mkdir -p "$OUT"
for run in $RUNS; do
    # shellcheck disable=SC2086
    python3 -m dicomnode train "${COMMON[@]}" ${EXTRA[$run]} --out "$OUT/ablation-$run" \
        ${RESUME:+--resume}
    python3 -m dicomnode evaluate --checkpoint "$OUT/ablation-$run/model.pt" \
        --data "$HELD_OUT" --out "$OUT/ablation-$run/eval" --device cpu --workers 1
done
