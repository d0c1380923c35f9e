#!/usr/bin/env bash
# The GPU run of the v3 embedded model, in one call of the device tool (DEVELOPERS.md):
#
#   run(command="bash scripts/device/run.sh", timeout_s=600,
#       carry=[".gpu-run/wheels", ".gpu-run/packages", ".gpu-run/minilm"])
#
# after scripts/device/prepare.sh (and scripts/device/slim.sh hide) here. Phases, each bounded so that the whole
# ends SC_DEADLINE_S seconds after the start:
#   setup    wheels into SC_SITE, MiniLM back to fp32 in the work folder, the emoji tarballs into its data cache
#   check    imports, the GPU, where MiniLM loads from (stops here on a machine with no GPU unless SC_TINY=1)
#   render   `selfcascade data build` at 128/256/512 px on every core, offline from the tarballs
#   train    `selfcascade train-sd` for the time left after the video's and banks' shares (--max-minutes), then --ship
#   video    (only when asked for) 3,000 motion clips at 128/256 px on every core, then `train-sd-video` inflating
#            the UNet in the tree (the one just trained) for the rest of its share, then --ship
#   bank256  `train-upsamplers --model embedded --scale 4 --size 256`
#   bank512  the same at 512 px, --init-from the 256 bank
# Each result goes to $OUT as soon as it exists: v3.tar.000, v3.tar.001 (unet/, scheduler/, selfcascade.json,
# train_state.json, split under the 16 MiB a returned file may have), video.tar.NNN (the sibling's unet/,
# scheduler/, train_state.json), bank-256.tar, bank-512.tar (the bank, its
# last validation grid and its run state), SHA256SUMS, and log.txt (everything printed). The work folder
# (.gpu-run/work, never carried) stays on a warm machine: a second call skips what is done and resumes training.
#
# Knobs (environment): SC_PHASES ("render train bank256 bank512"), SC_DEADLINE_S (560), SC_BATCH (512),
# SC_LR (1e-3), SC_WARMUP (500), SC_PREDICTION (v_prediction), SC_NAME_PROB and SC_NAME_STYLE_PROB (0.2 each: the caption-form
# dropout), SC_MIXED_PRECISION (no; bf16 for train-sd), SC_INIT_FROM (a v3 folder to continue,
# or none; default: src/selfcascade/embedded_v3 if it holds a UNet), SC_BANK_MINUTES (1.0 per bank, loading included),
# SC_BANK_STEPS (3000), SC_BANK_BATCH (16), SC_BANK_IMAGES (4000 train renders), SC_WORKERS (all cores); for the
# video phase (SC_PHASES="render train video bank256 bank512"): SC_VIDEO_MINUTES (2.5, clips included),
# SC_VIDEO_CLIPS (3000), SC_VIDEO_BATCH (64 clips of 8 frames), SC_VIDEO_LR (3e-4: the CPU run's 1e-4 at batch 8,
# scaled by the square root of the batch).
# Dry run on a CPU: scripts/device/dryrun.sh (SC_TINY=1: a few SVGs, a few steps, OUT and SC_SITE in a temp folder).
set -euo pipefail
cd "$(dirname "$0")/../.."
START=$(date +%s)
: "${OUT:?OUT must name the folder whose files come back (the device sets it)}"
STAGE=.gpu-run
WORK=${SC_WORK:-$STAGE/work}
SITE=${SC_SITE:-/tmp/site}
PY=${SC_PYTHON:-python3}
TINY=${SC_TINY:-0}
PHASES=" ${SC_PHASES:-render train bank256 bank512} "
DEADLINE_S=${SC_DEADLINE_S:-560}
SAVE_S=${SC_SAVE_S:-20}                   # per command: interpreter start, final checkpoint, shipping, packing
BANK_S=$(awk "BEGIN { print int(60 * ${SC_BANK_MINUTES:-1.0}) }")
VIDEO_S=$(awk "BEGIN { print int(60 * ${SC_VIDEO_MINUTES:-2.5}) }")
V3=src/selfcascade/embedded_v3
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/log.txt") 2>&1

export PYTHONPATH="$PWD/src:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TQDM_MININTERVAL=10
export SELFCASCADE_CACHE="$PWD/$WORK/cache" SELFCASCADE_TEXT_ENCODER="$PWD/$WORK/minilm"
export TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1  # TF32 matmuls (cuDNN convolutions use TF32 already)

left() { echo $((START + DEADLINE_S - $(date +%s))); }
say() { echo "=== [$(($(date +%s) - START)) s, $(left) s left] $*"; }
minutes() { awk "BEGIN { m = $1 / 60; printf \"%.2f\", (m > 0.05 ? m : 0.05) }"; }
checksum() { (cd "$(dirname "$1")" && sha256sum "$(basename "$1")") >> "$OUT/SHA256SUMS"; }
if [ "$TINY" = 1 ]; then
    BUILD_EXTRA=(--limit 6 --min-eval-concepts 4)
    SD_EXTRA=(--batch-size 4 --max-steps 2 --checkpoint-every 1 --log-every 1 --threads 1)
    BANK_EXTRA=(--batch-size 1 --max-steps 2 --validate-every 2 --validation-steps 2 --threads 1
                --validation-prompts "red apple, noto style")
    BANK_IMAGES=8
    VIDEO_EXTRA=(--batch-size 2 --max-steps 2 --checkpoint-every 1 --log-every 1 --threads 1)
    VIDEO_CLIPS=6
else
    BUILD_EXTRA=()
    SD_EXTRA=(--batch-size "${SC_BATCH:-512}" --max-steps 1000000 --checkpoint-every 1000 --log-every 50)
    BANK_EXTRA=(--batch-size "${SC_BANK_BATCH:-16}" --max-steps "${SC_BANK_STEPS:-3000}" --validate-every 1000
                --checkpoint-every 1000 --cache-gb 16 --log-every 25)
    BANK_IMAGES=${SC_BANK_IMAGES:-4000}
    VIDEO_EXTRA=(--batch-size "${SC_VIDEO_BATCH:-64}" --lr "${SC_VIDEO_LR:-3e-4}" --max-steps 1000000
                 --checkpoint-every 500 --log-every 25)
    VIDEO_CLIPS=${SC_VIDEO_CLIPS:-3000}
fi

say "setup: wheels into $SITE, MiniLM into $WORK/minilm, tarballs into $WORK/cache/packages"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$STAGE"/wheels/*.whl
[ -f "$WORK/minilm/model.safetensors" ] || "$PY" scripts/device/stage.py unpack-encoder "$STAGE/minilm" "$WORK/minilm"
mkdir -p "$WORK/cache/packages" && cp "$STAGE"/packages/*.tgz "$WORK/cache/packages/"

say "check"
command -v nvidia-smi >/dev/null && nvidia-smi -L || true
"$PY" - "$TINY" "$PWD/src" <<'PY'
import os, sys
import accelerate, diffusers, resvg_py, torch, transformers  # noqa: F401  (every package the run imports)
import selfcascade
from selfcascade.text_encoder import _model_path
print("torch", torch.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__,
      "accelerate", accelerate.__version__, "| MiniLM from", _model_path(), "| selfcascade from", selfcascade.__file__)
if not os.path.realpath(selfcascade.__file__).startswith(os.path.realpath(sys.argv[2]) + os.sep):
    sys.exit("selfcascade is imported from outside this tree: --ship would write elsewhere")
gpu = torch.cuda.is_available()
print("GPU:", torch.cuda.get_device_name(0) if gpu else "none")
if not gpu and sys.argv[1] != "1":
    sys.exit("no GPU: stopping before spending the lease on CPU work (SC_TINY=1 rehearses on a CPU)")
PY

if [[ $PHASES == *" render "* && ! -f $WORK/render.done ]]; then
    say "render 128/256/512 px on ${SC_WORKERS:-$(nproc)} processes"
    timeout 300 "$PY" -m selfcascade data build --sizes 128,256,512 --workers "${SC_WORKERS:-$(nproc)}" "${BUILD_EXTRA[@]}"
    "$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); print('rendered', d['counts'], 'failed', d['skipped_render_failures'])" \
        "$WORK/cache/dataset.json"
    touch "$WORK/render.done"
fi

SD_ARGS=(--vae "$V3/vae" --run-dir "$WORK/runs/sd" --lr "${SC_LR:-1e-3}" --warmup "${SC_WARMUP:-500}"
         --prediction-type "${SC_PREDICTION:-v_prediction}" --name-prob "${SC_NAME_PROB:-0.2}"
         --name-style-prob "${SC_NAME_STYLE_PROB:-0.2}" "${SD_EXTRA[@]}")
INIT=${SC_INIT_FROM-}
[ -n "$INIT" ] || { [ -f "$V3/unet/config.json" ] && INIT=$V3; } || true
[ "$INIT" != none ] || INIT=
[ -z "$INIT" ] || SD_ARGS+=(--init-from "$INIT")
SHIPPED=0
if [[ $PHASES == *" train "* ]]; then
    BANKS=$(( $( [[ $PHASES == *" bank256 "* ]] && echo 1 || echo 0) + $( [[ $PHASES == *" bank512 "* ]] && echo 1 || echo 0) ))
    VIDEO=$( [[ $PHASES == *" video "* ]] && echo 1 || echo 0)
    TRAIN_S=$(( $(left) - BANKS * (BANK_S + SAVE_S) - VIDEO * (VIDEO_S + SAVE_S) - SAVE_S ))
    [ "$TRAIN_S" -ge 60 ] || TRAIN_S=60
    say "train-sd for $(minutes "$TRAIN_S") min (data encoding included), init: ${INIT:-none}, then ship"
    if ACCELERATE_MIXED_PRECISION=${SC_MIXED_PRECISION:-no} timeout $((TRAIN_S + 120)) \
            "$PY" -m selfcascade train-sd "${SD_ARGS[@]}" --max-minutes "$(minutes "$TRAIN_S")" --ship; then
        SHIPPED=1
    elif [ -f "$WORK/runs/sd/checkpoint/state.json" ] || [ -f "$WORK/runs/sd/checkpoint.old/state.json" ]; then
        say "train-sd failed: shipping its last checkpoint"
        timeout 180 "$PY" -m selfcascade train-sd "${SD_ARGS[@]}" --max-minutes 0 --ship && SHIPPED=1
    fi
elif [ -f "$WORK/runs/sd/checkpoint/state.json" ]; then
    say "no training asked for: shipping the run's checkpoint"
    timeout 180 "$PY" -m selfcascade train-sd "${SD_ARGS[@]}" --max-minutes 0 --ship && SHIPPED=1
fi
if [ "$SHIPPED" = 1 ]; then
    cat "$V3/train_state.json"
    tar -C "$V3" -cf "$WORK/v3.tar" unet scheduler selfcascade.json train_state.json
    rm -f "$OUT"/v3.tar.*
    split -b 15M -d -a 3 "$WORK/v3.tar" "$OUT/v3.tar."
    checksum "$WORK/v3.tar"
    say "UNet in \$OUT: $(ls "$OUT" | grep -c '^v3.tar.') parts"
elif [ ! -f "$V3/unet/config.json" ]; then
    say "no UNet shipped and none in the tree: no banks to tune"
    exit 1
fi

if [[ $PHASES == *" video "* ]]; then
    VSTART=$(date +%s)
    say "video: $VIDEO_CLIPS clips at 128/256 px, then train-sd-video from $V3 for the rest of $(minutes "$VIDEO_S") min"
    if timeout "$VIDEO_S" "$PY" -m selfcascade data clips --sizes 128 256 --count "$VIDEO_CLIPS" \
            --workers "${SC_WORKERS:-$(nproc)}"; then
        VTRAIN_S=$(( VIDEO_S - ($(date +%s) - VSTART) ))
        [ "$VTRAIN_S" -ge 30 ] || VTRAIN_S=30
        if ACCELERATE_MIXED_PRECISION=${SC_MIXED_PRECISION:-no} timeout $((VTRAIN_S + 120)) \
                "$PY" -m selfcascade train-sd-video --init-from "$V3" --run-dir "$WORK/runs/sd-video" \
                --max-minutes "$(minutes "$VTRAIN_S")" --ship "${VIDEO_EXTRA[@]}"; then
            cat "$V3/video/train_state.json"
            tar -C "$V3/video" -cf "$WORK/video.tar" unet scheduler train_state.json
            rm -f "$OUT"/video.tar.*
            split -b 15M -d -a 3 "$WORK/video.tar" "$OUT/video.tar."
            checksum "$WORK/video.tar"
            say "video UNet in \$OUT: $(ls "$OUT" | grep -c '^video.tar.') parts"
        else
            say "train-sd-video failed"
        fi
    else
        say "motion clips failed"
    fi
fi

# the banks tune on a seeded subset of the train renders (all 12.8k at 512 px would take a minute to load)
mkdir -p "$WORK/bank-data"
ln -sfn ../cache/images "$WORK/bank-data/images"
"$PY" - "$WORK/cache/manifest.jsonl" "$WORK/bank-data/manifest.jsonl" "$BANK_IMAGES" <<'PY'
import json, random, sys
records = [line for line in open(sys.argv[1]) if json.loads(line)["split"] == "train"]
chosen = random.Random(0).sample(records, min(int(sys.argv[3]), len(records)))
open(sys.argv[2], "w").writelines(chosen)
print(f"banks tune on {len(chosen)} of {len(records)} train renders")
PY

bank() {  # bank SIZE BANKS_LEFT [INIT_BANK]
    local size=$1 n=$2 init=${3-} budget run=$WORK/runs/bank-$1 out=$WORK/banks/bank-$1
    budget=$(( ($(left) - n * SAVE_S) / n ))
    [ "$budget" -lt "$BANK_S" ] || budget=$BANK_S
    [ "$budget" -ge 20 ] || budget=20
    say "bank-$size for $(minutes "$budget") min${init:+, from $init}"
    rm -rf "$run" "$out"
    timeout $((budget + 120)) "$PY" -m selfcascade train-upsamplers --model embedded --scale 4 --size "$size" \
        --data "$WORK/bank-data" --run-dir "$run" --output "$out" --max-minutes "$(minutes "$budget")" \
        ${init:+--init-from "$init"} "${BANK_EXTRA[@]}" || return 1
    local pack=$WORK/pack-$size grid
    rm -rf "$pack" && mkdir -p "$pack" && cp -r "$out" "$pack/bank-$size"
    grid=$(ls "$run"/validation/*.png 2>/dev/null | tail -1 || true)
    [ -z "$grid" ] || cp "$grid" "$pack/bank-$size.validation.png"
    "$PY" -c "import json,sys; s=json.load(open(sys.argv[1])); s.pop('optimizer',None); json.dump(s,open(sys.argv[2],'w'),indent=1)" \
        "$run/checkpoint/state.json" "$pack/bank-$size.state.json"
    tar -C "$pack" -cf "$OUT/bank-$size.tar" .
    checksum "$OUT/bank-$size.tar"
}
if [[ $PHASES == *" bank256 "* ]]; then
    bank 256 $( [[ $PHASES == *" bank512 "* ]] && echo 2 || echo 1) || say "bank-256 failed"
fi
if [[ $PHASES == *" bank512 "* ]]; then
    INIT_BANK=$WORK/banks/bank-256
    [ -f "$INIT_BANK/config.json" ] || INIT_BANK=
    bank 512 1 "$INIT_BANK" || say "bank-512 failed"
fi
say "done; \$OUT holds:"
ls -l "$OUT"
