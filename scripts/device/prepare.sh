#!/usr/bin/env bash
# Here, before the GPU call (DEVELOPERS.md): fill the git-ignored staging folder .gpu-run/ with what the device
# lacks, and print what the call would send against its 64 MiB. Idempotent: what is staged is kept (FRESH=1 redoes it).
#   .gpu-run/wheels    diffusers and what it needs that the device image lacks (importlib_metadata, its
#                      lazy-importer and zipp), and resvg_py, the SVG renderer; the versions installed here
#   .gpu-run/packages  the emoji npm tarballs holding only the members the readers use (from the data cache's
#                      packages/, which `selfcascade data build` fills; npm fetches any that are missing)
#   .gpu-run/minilm    the MiniLM text encoder, weights in fp16 and xz-compressed (scripts/device/stage.py)
# Exit status: 0 when the call fits as the tree is now, 3 when it fits after scripts/device/slim.sh hide, 1 when not.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1
S=.gpu-run
CARRY="$S/wheels,$S/packages,$S/minilm"
[ "${FRESH:-0}" != 1 ] || rm -rf "$S/wheels" "$S/packages" "$S/minilm"
mkdir -p "$S"
if ! ls "$S"/wheels/*.whl >/dev/null 2>&1; then
    pins=$("$PY" -c "from importlib.metadata import version as v
print(*(f'{n}=={v(n)}' for n in ('diffusers', 'importlib_metadata', 'lazy-importer', 'zipp', 'resvg_py')))")
    echo "downloading wheels for the device (Python 3.12, x86-64): $pins"
    # shellcheck disable=SC2086  # one argument per pin
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$S/wheels" $pins
fi
if [ ! -f "$S/minilm/model.safetensors.xz" ]; then
    echo "packing MiniLM (fp16, xz: about 20 s of one core)"
    nice -n 19 "$PY" scripts/device/stage.py pack-encoder "$S/minilm"
fi
if ! ls "$S"/packages/*.tgz >/dev/null 2>&1; then
    echo "slimming the emoji tarballs"
    nice -n 19 "$PY" scripts/device/stage.py slim-packages "$S/packages"
fi
echo
if "$PY" scripts/device/stage.py sizes --call "run=$CARRY"; then
    echo "fits: make the call (DEVELOPERS.md)"
    exit 0
fi
echo
echo "over the limit as the tree is now; after scripts/device/slim.sh hide it would be:"
"$PY" scripts/device/stage.py sizes --call "run=$CARRY" --without-from scripts/device/hide.txt --top 5
echo "fits then: run scripts/device/slim.sh hide, make the call, then scripts/device/slim.sh restore"
exit 3
