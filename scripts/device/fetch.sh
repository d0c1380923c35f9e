#!/usr/bin/env bash
# Here, after the GPU call (DEVELOPERS.md): check what came back and put it into the package.
#   scripts/device/fetch.sh FILES_DIR     # FILES_DIR: the run reply's files_at (the call's $OUT files)
# v3.tar.* -> src/selfcascade/embedded_v3/{unet,scheduler,selfcascade.json,train_state.json}
# video.tar.* -> src/selfcascade/embedded_v3/video/{unet,scheduler,train_state.json} (its selfcascade.json stays)
# bank-256.tar, bank-512.tar -> src/selfcascade/embedded_v3/banks/bank-256, bank-512
# log.txt, the banks' validation grids and run states -> runs/device-<time>/ (git-ignored), for the record.
# Whatever is missing (a call cut short) is skipped; every part is checked against SHA256SUMS first.
set -euo pipefail
FROM=$(cd "${1:?usage: $0 FILES_DIR}" && pwd)
cd "$(dirname "$0")/../.."
V3=src/selfcascade/embedded_v3
REPORT=${FETCH_REPORT:-runs/device-$(date +%Y%m%d-%H%M%S)}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$REPORT"
for f in log.txt SHA256SUMS; do [ ! -f "$FROM/$f" ] || cp "$FROM/$f" "$REPORT/"; done

verified() {  # verified NAME: $TMP/NAME matches its line in SHA256SUMS
    grep -q "  $1\$" "$FROM/SHA256SUMS" 2>/dev/null || { echo "no checksum for $1: skipped" >&2; return 1; }
    (cd "$TMP" && grep "  $1\$" "$FROM/SHA256SUMS" | sha256sum --quiet -c -) || { echo "$1 is damaged: skipped" >&2; return 1; }
}
steps() {  # steps JSON: "N steps, ..." of a train_state.json or a bank's config.json
    python3 - "$1" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
extra = f", {s['train_seconds']} s on {s['hardware']}, loss {s['loss']:.4f}" if "hardware" in s else ""
print(f"{s['train_steps']} steps{extra}")
PY
}
replace() {  # replace NEW DEST: swap a folder or file in, the old one out
    rm -rf "$2.old"
    [ ! -e "$2" ] || mv "$2" "$2.old"
    mkdir -p "$(dirname "$2")"
    mv "$1" "$2"
    rm -rf "$2.old"
}

if ls "$FROM"/v3.tar.[0-9]* >/dev/null 2>&1; then
    cat "$FROM"/v3.tar.[0-9]* > "$TMP/v3.tar"
    if verified v3.tar; then
        mkdir "$TMP/v3" && tar -C "$TMP/v3" -xf "$TMP/v3.tar"
        for part in unet scheduler selfcascade.json train_state.json; do replace "$TMP/v3/$part" "$V3/$part"; done
        echo "UNet: $(steps "$V3/train_state.json") -> $V3"
    fi
else
    echo "no v3.tar parts in $FROM: the UNet was not returned" >&2
fi
if ls "$FROM"/video.tar.[0-9]* >/dev/null 2>&1; then
    cat "$FROM"/video.tar.[0-9]* > "$TMP/video.tar"
    if verified video.tar; then
        mkdir "$TMP/video" && tar -C "$TMP/video" -xf "$TMP/video.tar"
        for part in unet scheduler train_state.json; do replace "$TMP/video/$part" "$V3/video/$part"; done
        echo "video sibling: $(steps "$V3/video/train_state.json") -> $V3/video"
    fi
fi
for size in 256 512; do
    tar_file=bank-$size.tar
    [ -f "$FROM/$tar_file" ] || { echo "no $tar_file in $FROM" >&2; continue; }
    cp "$FROM/$tar_file" "$TMP/"
    verified "$tar_file" || continue
    mkdir "$TMP/bank-$size" && tar -C "$TMP/bank-$size" -xf "$TMP/$tar_file"
    replace "$TMP/bank-$size/bank-$size" "$V3/banks/bank-$size"
    for extra in "$TMP/bank-$size"/bank-"$size".*; do [ ! -e "$extra" ] || cp "$extra" "$REPORT/"; done
    echo "bank-$size: $(steps "$V3/banks/bank-$size/config.json") -> $V3/banks/bank-$size"
done
echo "log, grids and run states: $REPORT"
