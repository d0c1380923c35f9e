#!/usr/bin/env bash
# Rehearse the device call on this machine's CPU (DEVELOPERS.md): copy exactly what the call would send (the tree
# as `slim.sh hide` leaves it, and the carried .gpu-run folders) into a temp folder and run run.sh there with
# SC_TINY=1: 6 SVGs a source, 2 training steps, 2 steps per bank; OUT and the wheels' SC_SITE in the temp folder.
# Nothing in this checkout is written. About 3 minutes of one core (niced); run scripts/device/prepare.sh first.
#   scripts/device/dryrun.sh [DIR]        # DIR: where to rehearse (default: a new temp folder); prints it
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
DIR=${1:-$(mktemp -d /tmp/selfcascade-dryrun.XXXXXX)}
PY=${PY:-$REPO/.venv/bin/python}
mkdir -p "$DIR"
OMP_NUM_THREADS=1 "$PY" "$REPO/scripts/device/stage.py" copy-tree "$DIR/tree" --repo "$REPO" \
    --carry .gpu-run/wheels .gpu-run/packages .gpu-run/minilm --without-from "$REPO/scripts/device/hide.txt"
echo "rehearsing in $DIR/tree (out: $DIR/out)"
cd "$DIR/tree"
env OUT="$DIR/out" SC_SITE="$DIR/site" SC_TINY=1 SC_PYTHON="$PY" SC_WORKERS=1 OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 nice -n 19 bash scripts/device/run.sh
echo "rehearsal done: $DIR/out"
