#!/usr/bin/env bash
# The shipped ai/weights/deepsc-lite.pt (attempt 21 in docs/training.md), made on a machine
# without a GPU (2 CPU cores), in steps whose checkpoints feed the next by --init (a later
# --init replaces the streams it holds):
#
# 1. Attempts 5 and 6: the earlier joint lite model (both stages, then 4 stage-2 epochs
#    with max pooling in the classifier; about 3.5 hours across sessions with --resume).
#    It gives the final model its cross-stitch unit; both of its streams are replaced.
# 2. Attempt 8's classification stream: `--task cls`, images only, max pooling, 6 epochs
#    from random weights (9 minutes).
# 3. Attempt 9's segmentation stream: `--task seg` from random weights with the
#    per-channel affine layers at 20 x the learning rate, a 24-epoch schedule stopped
#    after its 6th epoch (the session's time; the script stops it the same way), then
#    12 more epochs from there with a fresh schedule decaying to zero (about 65 minutes).
# 4. Stage 2 of the joint model from those three, 3 epochs (classification stream 5e-4,
#    the rest 5e-5; the best validation epoch, the first, is attempt 9): about 40 minutes.
# 5. Attempt 11: the classification stream alone, 2 more stage-2 epochs on the node's own
#    lung masks (lungs=node), the segmentation stream and cross-stitch frozen (--lr2 0);
#    the better validation epoch, the second, is the model: about 20 minutes.
#
# 6. Attempts 13 and 15: the segmentation stream of step 5 alone on the node's own lung
#    masks, 8 epochs (attempt 13's, 17 minutes) and 20 more (about an hour), then stage 2
#    with both streams moving (segmentation 5e-5, classification 2e-4), 3 epochs; the
#    best validation epoch, the second, is attempt 15 (34 minutes).
# 7. Attempt 16: its classification stream alone, 2 stage-2 epochs, the rest frozen
#    (as step 5); the second epoch is the model (25 minutes).
# 8. Attempt 17: the segmentation stream of step 7 alone, 10 more epochs at 1.5e-4 (20
#    minutes), then stage 2 with both streams moving, 2 epochs; the first is the model
#    (25 minutes).
# 9. Attempt 18: the same again from attempt 17, 20 segmentation epochs (the best
#    validation epoch, the 10th, is kept: 40 minutes), then stage 2, 2 epochs; the
#    second is the model (20 minutes).
# 10. Attempt 19: the same again from attempt 18 (the 10th segmentation epoch kept again;
#    stage 2's first epoch is the model): an hour.
# 11. Attempt 20 (session 20): attempt 19's classification stream fine-tuned at a 360 mm
#    field of view around the lungs, 2 stage-2 epochs with the rest frozen (as step 7);
#    the first epoch is the model; the checkpoint records the field, and the node serves
#    it so (20 minutes).
# 12. Attempt 21 (session 21): attempt 20's segmentation stream alone at the same field of
#    view, 20 epochs at 1.5e-4 (the best validation epoch, the 20th, is kept: 45
#    minutes), then stage 2 at that field with both streams moving (segmentation 5e-5,
#    classification 1e-4), 2 epochs; the first is the model (20 minutes).
#
# Then the evaluations (lungs from the node's own segmentation, as in service) on two
# sets of 30 phantoms whose seeds training never saw: HELD_OUT chose between attempts
# (so its numbers flatter the chosen one), FRESH was evaluated once, for the final report.
# Their evaluation.json files ship as ai/weights/deepsc-lite.evaluation.json (fresh) and
# deepsc-lite.evaluation-gpu-default.json (fresh-mirror-overlap: since session 16 the
# four-way mirroring; 47 s per scan on 2 CPU cores).
#
#   bash training/recipes/shipped_lite_cpu.sh runs/     # again with RESUME=1 after a stop
set -eu
OUT=${1:-runs}
TRAIN="phantoms:covid=30,cap=30,normal=30,seed=1000,size=256,slices=64"
VAL="phantoms:covid=3,cap=3,normal=3,seed=5000,size=256,slices=64"
HELD_OUT="phantoms:covid=10,cap=10,normal=10,seed=900000,size=256,slices=64"  # selection
FRESH="phantoms:covid=10,cap=10,normal=10,seed=950000,size=256,slices=64"  # final report
# two more, to tell how far the fresh set's numbers carry (sessions 27-28); with the fresh
# set they decided only the in-plane vote's yes or no (session 29, docs/training.md)
THIRD="phantoms:covid=10,cap=10,normal=10,seed=980000,size=256,slices=64"
FOURTH="phantoms:covid=10,cap=10,normal=10,seed=970000,size=256,slices=64"
# --field-of-view-mm 0: these runs saw the whole matrix (they came before the option).
RUN=(--size lite --device cpu --workers 1 --patience 0 --batch-size 2 --field-of-view-mm 0
     ${RESUME:+--resume})
COMMON=("${RUN[@]}" --data "$TRAIN" --val-data "$VAL")
NODE_LUNGS=("${RUN[@]}" --data "$TRAIN,lungs=node" --val-data "$VAL,lungs=node")
mkdir -p "$OUT"
# 1
python3 -m dicomnode train "${COMMON[@]}" --seed 0 --out "$OUT/lite-cpu5" --cls-pool mean \
    --epochs1 24 --epochs2 4 --val-every 3
python3 -m dicomnode train "${COMMON[@]}" --seed 0 --out "$OUT/lite-cpu6" --stage 2 \
    --init "$OUT/lite-cpu5/model.pt" --cls-pool max --epochs2 4 --lr2 5e-5 --lr2-cls 1e-3 \
    --val-every 2
# 2
python3 -m dicomnode train "${COMMON[@]}" --seed 0 --out "$OUT/lite-cls8" --task cls \
    --stage 1 --cls-pool max --epochs1 6 --val-every 2
# 3: six epochs of a 24-epoch schedule (stopped once metrics.csv has their six rows)
python3 -m dicomnode train "${COMMON[@]}" --seed 0 --out "$OUT/seg9-start" --task seg \
    --stage 1 --epochs1 24 --val-every 3 --lr-affine-scale 20 &
TRAINING=$!
until [ "$(tail -n +2 "$OUT/seg9-start/metrics.csv" 2>/dev/null | wc -l)" -ge 6 ]; do
    kill -0 "$TRAINING" 2>/dev/null || break
    sleep 10
done
kill "$TRAINING" 2>/dev/null || true
wait "$TRAINING" || true
python3 -m dicomnode train "${COMMON[@]}" --seed 1 --out "$OUT/seg9" --task seg --stage 1 \
    --epochs1 12 --val-every 3 --lr-affine-scale 20 --init "$OUT/seg9-start/last.pt"
# 4
python3 -m dicomnode train "${COMMON[@]}" --seed 0 --out "$OUT/lite-cpu9" --stage 2 \
    --init "$OUT/lite-cpu6/model.pt" --init "$OUT/seg9/model.pt" \
    --init "$OUT/lite-cls8/model.pt" --cls-pool max --epochs2 3 --lr2 5e-5 --lr2-cls 5e-4 \
    --val-every 1
# 5
python3 -m dicomnode train "${NODE_LUNGS[@]}" --seed 2 --out "$OUT/lite-cpu11" \
    --stage 2 --init "$OUT/lite-cpu9/model.pt" --cls-pool max --epochs2 2 --lr2 0 \
    --lr2-cls 2e-4 --val-every 1
# 6
python3 -m dicomnode train "${NODE_LUNGS[@]}" --seed 3 --out "$OUT/seg13" --task seg \
    --stage 1 --init "$OUT/lite-cpu11/model.pt" --epochs1 8 --lr1 3e-4 \
    --lr-affine-scale 20 --val-every 4
python3 -m dicomnode train "${NODE_LUNGS[@]}" --seed 7 --out "$OUT/seg15" --task seg \
    --stage 1 --init "$OUT/seg13/model.pt" --epochs1 20 --lr1 3e-4 --lr-affine-scale 20 \
    --val-every 5
python3 -m dicomnode train "${NODE_LUNGS[@]}" --seed 8 --out "$OUT/lite-cpu15" --stage 2 \
    --init "$OUT/lite-cpu11/model.pt" --init "$OUT/seg15/model.pt" --cls-pool max \
    --epochs2 3 --lr2 5e-5 --lr2-cls 2e-4 --val-every 1
# 7
python3 -m dicomnode train "${NODE_LUNGS[@]}" --seed 2 --out "$OUT/lite-cpu16" \
    --stage 2 --init "$OUT/lite-cpu15/model.pt" --cls-pool max --epochs2 2 --lr2 0 \
    --lr2-cls 2e-4 --val-every 1
# 8-10: a round of the segmentation stream alone (from FROM's, EPOCHS at 1.5e-4, seed
# SEED; its best validation epoch kept), then stage 2 of FROM with it (seed SEED + 1)
segmenter_round() {
    local from=$1 seg=$2 joint=$3 seed=$4 epochs=$5
    python3 -m dicomnode train "${NODE_LUNGS[@]}" --seed "$seed" --out "$OUT/$seg" \
        --task seg --stage 1 --init "$OUT/$from/model.pt" --epochs1 "$epochs" --lr1 1.5e-4 \
        --lr-affine-scale 20 --val-every 5
    python3 -m dicomnode train "${NODE_LUNGS[@]}" --seed $((seed + 1)) --out "$OUT/$joint" \
        --stage 2 --init "$OUT/$from/model.pt" --init "$OUT/$seg/model.pt" --cls-pool max \
        --epochs2 2 --lr2 5e-5 --lr2-cls 2e-4 --val-every 1
}
segmenter_round lite-cpu16 seg17 lite-cpu17 11 10  # 8
segmenter_round lite-cpu17 seg18 lite-cpu18 13 20  # 9
segmenter_round lite-cpu18 seg19 lite-cpu19 15 20  # 10
python3 -m dicomnode train "${NODE_LUNGS[@]}" --seed 21 --out "$OUT/lite-cpu20" \
    --stage 2 --init "$OUT/lite-cpu19/model.pt" --cls-pool max --epochs2 2 --lr2 0 \
    --lr2-cls 2e-4 --val-every 1 --field-of-view-mm 360  # 11
AT_360=(--field-of-view-mm 360)  # 12 (after RUN's 0: the last one counts)
python3 -m dicomnode train "${NODE_LUNGS[@]}" "${AT_360[@]}" --seed 22 --out "$OUT/seg21" \
    --task seg --stage 1 --init "$OUT/lite-cpu20/model.pt" --epochs1 20 --lr1 1.5e-4 \
    --lr-affine-scale 20 --val-every 5
python3 -m dicomnode train "${NODE_LUNGS[@]}" "${AT_360[@]}" --seed 23 --out "$OUT/lite-cpu21" \
    --stage 2 --init "$OUT/lite-cpu20/model.pt" --init "$OUT/seg21/model.pt" --cls-pool max \
    --epochs2 2 --lr2 5e-5 --lr2-cls 1e-4 --val-every 1
for attempt in lite-cpu18 lite-cpu19 lite-cpu20 lite-cpu21; do  # the selection between attempts
    python3 -m dicomnode evaluate --checkpoint "$OUT/$attempt/model.pt" --data "$HELD_OUT" \
        --out "$OUT/$attempt/eval" --device cpu --workers 1
done
# the shipped evaluation, on scans no decision saw (CPU default; then the GPU default)
# (attempt 20 was chosen over 19, and 21 over 20 with the selection set as well, by
# bench/fov.py: docs/benchmarks.md, "Field of view")
python3 -m dicomnode evaluate --checkpoint "$OUT/lite-cpu21/model.pt" --data "$FRESH" \
    --out "$OUT/lite-cpu21/fresh" --device cpu --workers 1
python3 -m dicomnode evaluate --checkpoint "$OUT/lite-cpu21/model.pt" --data "$FRESH" \
    --out "$OUT/lite-cpu21/fresh-mirror-overlap" --device cpu --workers 1 --mirror --overlap 0.5
for set in THIRD FOURTH; do  # both defaults again (docs/training.md, "How sure")
    python3 -m dicomnode evaluate --checkpoint "$OUT/lite-cpu21/model.pt" --data "${!set}" \
        --out "$OUT/lite-cpu21/${set,,}" --device cpu --workers 1
    python3 -m dicomnode evaluate --checkpoint "$OUT/lite-cpu21/model.pt" --data "${!set}" \
        --out "$OUT/lite-cpu21/${set,,}-mirror-overlap" --device cpu --workers 1 --mirror \
        --overlap 0.5
done
