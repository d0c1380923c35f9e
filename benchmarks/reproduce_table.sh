#!/usr/bin/env bash
# Reproduce an embedded model's table of every method side by side, training runs included, with the Fig. 5 curves
# and time to quality (steps and wall time each trained run needs to reach the bank's FID_b). Writes
# benchmarks/results/table_$MODEL.* (copy them into results/v2 or results/v3 when they replace a published table).
#
#   bash benchmarks/reproduce_table.sh                          # v3 (MODEL=embedded): 4x and 16x, 8 images
#   MODEL=embedded-v2 IMAGES=16 THREADS=2 bash benchmarks/reproduce_table.sh   # the published v2 table (~3 h)
#   SIZES64=1 bash benchmarks/reproduce_table.sh                # also 64x (v3: 1024 px, hours per method on a CPU)
#   ONLY4X=1 bash benchmarks/reproduce_table.sh                 # stop after 4x: curves and time to quality
#
# RESULTS (default: benchmarks/results) is where the table goes; TABLE (default: $RUNS/table) caches its images, so the
# folder of an earlier table run of the same model and settings is reused, image for image.
#
# Every step resumes: training runs from their last checkpoint (a finished run only re-exports), the table from the
# images cached under $TABLE. Fair budgets: at 4x every trained row (upsampler bank, full fine-tuning, LoRA r4
# and r32) gets 500 steps at batch 8 on the same training images at 2x the base side, from scratch, with snapshots
# every 125 steps for the curves (the bank's row is `tuned-run`, beside `tuned` with the model's shipped banks); at
# 16x the fine-tunes get 300 steps at 4x the base side, and the tuned row uses the model's shipped banks (their
# steps are in the table). 64x reuses the 16x fine-tunes and the banks. Cost on one CPU thread (v3): the 4x part
# about 3 h; a 512 px fine-tuning step at batch 8 about 50 s, so the 16x fine-tunes about 12 h.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
MODEL=${MODEL:-embedded}
RUNS=${RUNS:-runs/bench-$MODEL}
THREADS=${THREADS:-2}
STEPS=${STEPS:-25}
RESULTS=${RESULTS:-benchmarks/results}
TABLE=${TABLE:-$RUNS/table}
ONLY4X=${ONLY4X:-0}
case "$MODEL" in
  embedded-v2) BASE=32; IMAGES=${IMAGES:-16}; REPEATS=${REPEATS:-2} ;;
  embedded) BASE=128; IMAGES=${IMAGES:-8}; REPEATS=${REPEATS:-1} ;;
  *) echo "MODEL must be embedded or embedded-v2 (the models with emoji training data), got $MODEL" >&2; exit 1 ;;
esac
S4=$((2 * BASE)); S16=$((4 * BASE)); S64=$((8 * BASE))
SIZES64=${SIZES64:-$([ "$MODEL" = embedded-v2 ] && echo 1 || echo 0)}
BIG=$S16; [ "$SIZES64" = 1 ] && BIG="$S16 $S64"
"$PY" -c "import matplotlib, peft" 2>/dev/null || {
  echo "needs the bench and baselines extras: $PY -m pip install -e '.[bench,baselines]'" >&2; exit 1; }
sc() { "$PY" -m selfcascade.cli "$@" --model "$MODEL"; }
table() { "$PY" benchmarks/bench_table.py --num-images "$IMAGES" --steps "$STEPS" --repeats "$REPEATS" \
  --threads "$THREADS" --out "$TABLE" --results "$RESULTS" --model "$MODEL" "$@"; }

"$PY" -m selfcascade.cli data build --sizes "$(echo "$BASE $S4 $BIG" | tr ' ' ,)" --workers 2

# 4x: the bank and the training baselines, with snapshots for the curves and time to quality
sc train-upsamplers --size "$S4" --max-steps 500 --batch-size 8 --snapshot-every 125 --validate-every 0 \
  --threads "$THREADS" --run-dir "$RUNS/bank$S4"
sc finetune --method full --size "$S4" --max-steps 500 --batch-size 8 --lr 1e-4 --snapshot-every 125 \
  --threads "$THREADS" --run-dir "$RUNS/ft$S4-full"
for rank in 4 32; do
  sc finetune --method lora --rank "$rank" --size "$S4" --max-steps 500 --batch-size 8 --lr 1e-4 --snapshot-every 125 \
    --threads "$THREADS" --run-dir "$RUNS/ft$S4-lora$rank"
done
table --sizes "$S4" --bank "$RUNS/bank$S4" --full "$RUNS/ft$S4-full" --lora4 "$RUNS/ft$S4-lora4" \
  --lora32 "$RUNS/ft$S4-lora32"
table --sizes --curves --curve-size "$S4" --bank "$RUNS/bank$S4" --full "$RUNS/ft$S4-full" \
  --lora4 "$RUNS/ft$S4-lora4" --lora32 "$RUNS/ft$S4-lora32"
[ "$ONLY4X" = 1 ] && exit 0

# 16x (and 64x): fine-tunes at 4x the base side, the shipped banks for the tuned row
sc finetune --method full --size "$S16" --max-steps 300 --batch-size 8 --lr 1e-4 --threads "$THREADS" \
  --run-dir "$RUNS/ft$S16-full"
for rank in 4 32; do
  sc finetune --method lora --rank "$rank" --size "$S16" --max-steps 300 --batch-size 8 --lr 1e-4 \
    --threads "$THREADS" --run-dir "$RUNS/ft$S16-lora$rank"
done
# shellcheck disable=SC2086  # BIG is one or two sizes
table --sizes $BIG --full "$RUNS/ft$S16-full" --lora4 "$RUNS/ft$S16-lora4" --lora32 "$RUNS/ft$S16-lora32"
