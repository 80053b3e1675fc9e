#!/usr/bin/env bash
# The GPU recipe (attempt 1 in docs/training.md; the shipped weights came from
# shipped_lite_cpu.sh, no GPU being lent since): four runs side by side on one GPU with
# the same data, seed and time budget (joint; segmentation only; classification only;
# joint without the task-aware loss), each stopped after BUDGET_S seconds if not done, then each
# evaluated on held-out phantoms whose seeds the training never saw. Since session 20 the
# runs see a 360 mm field around the lungs (the default; attempt 1 saw the whole matrix:
# add --field-of-view-mm 0 to COMMON to repeat it).
#
#   BUDGET_S=420 bash training/recipes/shipped_lite.sh runs/
set -u
OUT=${1:-runs}
BUDGET_S=${BUDGET_S:-420}
WORKERS=${WORKERS:-3}
DEVICE=${DEVICE:-cuda}
TRAIN=${TRAIN:-"phantoms:covid=48,cap=48,normal=48,seed=1000,size=256,slices=80"}
HELD_OUT=${HELD_OUT:-"phantoms:covid=12,cap=12,normal=12,seed=900000,size=256,slices=80"}
COMMON=(--data "$TRAIN" --size lite --epochs1 4 --epochs2 6 --val-fraction 0.1 --seed 0
        --patience 0 --workers "$WORKERS" --device "$DEVICE")

declare -A EXTRA=([joint]="" [seg-only]="--task seg" [cls-only]="--task cls"
                  [no-task-aware]="--lambda-ta 0")
mkdir -p "$OUT"
pids=()
for run in "${!EXTRA[@]}"; do
    # shellcheck disable=SC2086
    python3 -m dicomnode train "${COMMON[@]}" ${EXTRA[$run]} --out "$OUT/$run" \
        > "$OUT/$run.train.log" 2>&1 &
    pids+=($!)
done
( sleep "$BUDGET_S"; kill -TERM "${pids[@]}" 2>/dev/null ) &
watchdog=$!
wait "${pids[@]}"
kill "$watchdog" 2>/dev/null

for run in "${!EXTRA[@]}"; do
    ckpt="$OUT/$run/model.pt"
    [ -f "$ckpt" ] || ckpt="$OUT/$run/last.pt"
    python3 -m dicomnode evaluate --checkpoint "$ckpt" --data "$HELD_OUT" \
        --out "$OUT/$run/eval" --device "$DEVICE" --workers "$WORKERS" \
        > "$OUT/$run.eval.log" 2>&1 &
done
wait
