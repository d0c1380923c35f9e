#!/usr/bin/env bash
# Reproduce the v2 embedded model's table (benchmarks/results/v2/table_embedded.{md,csv}, made when v2 was the
# default "embedded"), its grids and the Fig. 5 curve (table_embedded_curves.*), training runs included: about
# 3 hours on 2 CPU cores (half of it at 256 px). It writes benchmarks/results/table_$MODEL.* (MODEL=embedded-v2).
#
#   bash benchmarks/reproduce_table.sh            # everything; rerun after an interruption to resume
#   RUNS=/tmp/bench THREADS=4 bash benchmarks/reproduce_table.sh
#
# Every step resumes: training runs from their last checkpoint (a finished run only re-exports), the table
# from the images cached under $RUNS/table. Fair budgets: at 4x every trained row (upsampler bank, full
# fine-tuning, LoRA r4/r32) has 500 steps at batch 8 on the same 64 px training images, from scratch; at 16x
# the fine-tunes get 300 steps at 128 px, the tuned row uses the shipped banks (their steps are in the table).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
RUNS=${RUNS:-runs/bench}
THREADS=${THREADS:-2}
IMAGES=${IMAGES:-16}
STEPS=${STEPS:-25}
MODEL=${MODEL:-embedded-v2}
"$PY" -c "import matplotlib, peft" 2>/dev/null || {
  echo "needs the bench and baselines extras: $PY -m pip install -e '.[bench,baselines]'" >&2; exit 1; }
sc() { "$PY" -m selfcascade.cli "$@" --model "$MODEL"; }
table() { "$PY" benchmarks/bench_table.py --num-images "$IMAGES" --steps "$STEPS" --repeats 2 --threads "$THREADS" \
  --out "$RUNS/table" --model "$MODEL" "$@"; }

"$PY" -m selfcascade.cli data build --sizes 32,64,128,256 --workers 2

# 4x: the bank and the training baselines, with snapshots for the curve
sc train-upsamplers --size 64 --max-steps 500 --batch-size 8 --snapshot-every 125 --threads "$THREADS" \
  --run-dir "$RUNS/bank64"
sc finetune --method full --size 64 --max-steps 500 --batch-size 8 --lr 1e-4 --snapshot-every 125 \
  --threads "$THREADS" --run-dir "$RUNS/ft64-full"
for rank in 4 32; do
  sc finetune --method lora --rank "$rank" --size 64 --max-steps 500 --batch-size 8 --lr 1e-4 --snapshot-every 125 \
    --threads "$THREADS" --run-dir "$RUNS/ft64-lora$rank"
done
table --sizes 64 --bank "$RUNS/bank64" --full "$RUNS/ft64-full" --lora4 "$RUNS/ft64-lora4" \
  --lora32 "$RUNS/ft64-lora32"
table --sizes --curves --curve-size 64 --bank "$RUNS/bank64" --full "$RUNS/ft64-full" --lora4 "$RUNS/ft64-lora4" \
  --lora32 "$RUNS/ft64-lora32"

# 16x and 64x: fine-tunes at 128 px (used at 128 and 256 px), the shipped banks for the tuned row
sc finetune --method full --size 128 --max-steps 300 --batch-size 8 --lr 1e-4 --threads "$THREADS" \
  --run-dir "$RUNS/ft128-full"
for rank in 4 32; do
  sc finetune --method lora --rank "$rank" --size 128 --max-steps 300 --batch-size 8 --lr 1e-4 \
    --threads "$THREADS" --run-dir "$RUNS/ft128-lora$rank"
done
table --sizes 128 256 --full "$RUNS/ft128-full" --lora4 "$RUNS/ft128-lora4" --lora32 "$RUNS/ft128-lora32"
