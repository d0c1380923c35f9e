#!/usr/bin/env bash
# Install selfcascade and run the main job on the embedded models: one 512x512 image (16x the base
# model's pixels) from the tuned cascade (with its 128 and 256 px stages), a grid of direct inference vs
# the tuning-free and tuned cascades at 128/256/512 px, and an 8-frame 256x256 GIF from the embedded video
# model (v3's video sibling, tuned cascade: 128 -> 256 px).
# Usage: bash scripts/quickstart.sh ["your prompt"]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PROMPT="${1:-red apple}"
bash scripts/install.sh
. "${VENV:-.venv}/bin/activate"
selfcascade generate "$PROMPT" --size 512 --mode tuned --steps 25 --save-stages -o outputs/quickstart.png
selfcascade compare "$PROMPT" --sizes 128 256 512 --modes direct tuning-free tuned --steps 25 -o outputs/quickstart-compare.png
selfcascade generate-video "$PROMPT, moving right" --size 256 --mode tuned --steps 25 -o outputs/quickstart-video.gif
echo "done: outputs/quickstart.png (and -stage0/-stage1), outputs/quickstart-compare.png, outputs/quickstart-video.gif"
