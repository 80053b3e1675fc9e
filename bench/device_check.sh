#!/usr/bin/env bash
# The GPU checks of issues 3-5 as one short run for the `device` tool (a lent machine
# gives a session about 15 minutes in all; this takes about 6). Everything lands in
# $OUT (the tool fetches it back): nvidia-smi and torch's view of the GPU, bench/infer.py
# on the GPU with the test-time defaults (four-way mirroring, half-overlapping windows)
# and without them (the paper's timing), the end-to-end benchmark, and the shipped
# weights evaluated on the fresh phantoms with the GPU default, as docs/training.md
# reports them from a CPU.
#
# The device image holds torch, numpy, scipy, tqdm, matplotlib, pillow and psutil, which
# is all that ai/, training/phantoms.py, training/trainer.py's evaluation and
# bench/infer.py import. The end-to-end benchmark (bench/e2e.py: the node itself, with a
# pynetdicom PACS and `dicomnode send`, as there is no Orthanc or dcmtk there) needs the
# DICOM packages too, carried as wheels in .whl/ (git-ignored, about 12 MB), made here
# once (the device's Python is 3.12):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_17_x86_64 -d .whl pydicom==3.0.2 \
#       pynetdicom==3.0.4 highdicom==0.28.2 SQLAlchemy==2.1.9 pyjpegls==1.5.1
#
# and then:
#
#   run(command="bash bench/device_check.sh", carry=[".whl"], timeout_s=540)
#
# Without .whl/ the end-to-end step is left out.
#
# Locally, as a smoke test of the script itself (small and on the CPU):
#   OUT=/tmp/check DEVICE=cpu SLICES=60 SIZES=lite FRESH=phantoms:covid=1,cap=1,normal=1,seed=950000,size=64,slices=24 \
#       bash bench/device_check.sh
set -u
OUT=${OUT:?set OUT to a folder for the results}
DEVICE=${DEVICE:-cuda}
SLICES=${SLICES:-300}
SIZES=${SIZES:-lite paper}
FRESH=${FRESH:-phantoms:covid=10,cap=10,normal=10,seed=950000,size=256,slices=64}
THREADS=$(nproc)
mkdir -p "$OUT"
export PYTHONPATH=$PWD

LOG=$OUT/log.txt  # one file: the tool fetches back at most 8

step() {  # name, seconds, command...: one check into the log, cut at its time limit
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    echo "=== $name" >>"$LOG"
    # timeout signals the whole process group: a node, its AI worker and its PACS too
    timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - started)) s (limit $limit s)" | tee -a "$LOG"
    return $rc
}

# Most important first (a step cut short still leaves the earlier ones' files): the GPU,
# the paper's model time (issue 3), the end to end (issue 5), then the rest.
step gpu 60 sh -c 'nvidia-smi; python3 -c "import torch; print(torch.__version__, torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else None)"'
# shellcheck disable=SC2086  # SIZES is a list
step infer-plain 120 python3 bench/infer.py --device "$DEVICE" --sizes $SIZES \
    --slices "$SLICES" --threads "$THREADS" --tta off --out "$OUT/infer-$DEVICE-plain.json"
if [ -d .whl ]; then
    step pip 60 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site
    step e2e 150 python3 bench/e2e.py --device "$DEVICE" --slices "$SLICES" \
        --pacs pynetdicom --out "$OUT/e2e-$DEVICE.json"
fi
# shellcheck disable=SC2086
step infer-tta 120 python3 bench/infer.py --device "$DEVICE" --sizes $SIZES \
    --slices "$SLICES" --threads "$THREADS" --tta auto --out "$OUT/infer-$DEVICE-tta.json"
step evaluate 150 python3 -c '
import argparse, sys
from training.trainer import add_evaluate_arguments, run_evaluate_command
parser = argparse.ArgumentParser()
add_evaluate_arguments(parser)
sys.exit(run_evaluate_command(parser.parse_args(sys.argv[1:])))
' --checkpoint ai/weights/deepsc-lite.pt --data "$FRESH" --out "$OUT/fresh-$DEVICE-default" \
    --device "$DEVICE" --workers 8 --mirror --overlap 0.5 --cache-dir /tmp/dicomnode-cache
tail -n 30 "$LOG"
