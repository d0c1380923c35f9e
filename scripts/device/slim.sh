#!/usr/bin/env bash
# Keep the tree a device call sends under its 64 MiB (DEVELOPERS.md): take the folders listed in
# scripts/device/hide.txt out of it, and put them back afterwards. The files stay on disk: hidden paths are
# dropped from git's index (`git rm --cached`) and ignored through .git/info/exclude, so that neither the
# tracked nor the untracked-not-ignored files under them travel.
#
#   scripts/device/slim.sh hide      # before the device call
#   scripts/device/slim.sh restore   # right after it (idempotent: also after a crash or an aborted session)
#   scripts/device/slim.sh status
#
# While hidden, `git status` shows those files as deleted (staged): commit nothing until `restore`.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
LIST=scripts/device/hide.txt
STATE="$(git rev-parse --git-path info)/selfcascade-device-slim"
EXCLUDE="$(git rev-parse --git-path info/exclude)"
BEGIN="# selfcascade-device-slim begin (scripts/device/slim.sh restore removes this block)"
END="# selfcascade-device-slim end"
PY=${PY:-$(command -v .venv/bin/python || command -v python3)}

listed() { sed -e 's/#.*//' -e 's/[[:space:]]*$//' -e 's:^/*::' -e 's:/*$::' "$LIST" | grep -v '^$' || true; }

hide() {
    if [ -f "$STATE" ]; then echo "already hidden (see $STATE); run '$0 restore' first"; return 0; fi
    local tracked=() hidden=() p
    while read -r p; do
        [ -e "$p" ] || continue
        if [ -n "$(git ls-files -- "$p" | head -1)" ]; then
            if ! git diff --quiet HEAD -- "$p"; then
                echo "refusing: $p has uncommitted changes (commit or stash them first)" >&2
                return 1
            fi
            tracked+=("$p")
        fi
        hidden+=("$p")
    done < <(listed)
    mkdir -p "$(dirname "$STATE")"
    { for p in "${tracked[@]}"; do echo "tracked $p"; done; for p in "${hidden[@]}"; do echo "hidden $p"; done; } > "$STATE"
    { echo "$BEGIN"; for p in "${hidden[@]}"; do echo "/$p"; done; echo "$END"; } >> "$EXCLUDE"
    [ ${#tracked[@]} -eq 0 ] || git rm -r -q --cached -- "${tracked[@]}"
    echo "hidden: ${hidden[*]}"
}

restore() {
    if [ -f "$STATE" ]; then
        local tracked
        mapfile -t tracked < <(sed -n 's/^tracked //p' "$STATE")
        [ ${#tracked[@]} -eq 0 ] || git reset -q -- "${tracked[@]}"
    fi
    if [ -f "$EXCLUDE" ]; then
        sed -i "/^# selfcascade-device-slim begin/,/^# selfcascade-device-slim end\$/d" "$EXCLUDE"
    fi
    rm -f "$STATE"
    echo "restored: git status should show no deleted files under the listed folders"
}

case "${1:-status}" in
    hide) hide ;;
    restore) restore ;;
    status)
        if [ -f "$STATE" ]; then echo "hidden now:"; sed 's/^/  /' "$STATE"; else echo "nothing hidden"; fi
        OMP_NUM_THREADS=1 "$PY" scripts/device/stage.py sizes --top 5 ;;
    *) echo "usage: $0 hide|restore|status" >&2; exit 2 ;;
esac
