#!/usr/bin/env bash
# Device side, one call per carried piece: keep it in /tmp (it survives while the machine stays warm, ~30 s idle)
# until a later call joins the pieces. Usage: bash .ci/gpu/stash_part.sh .carry/kvparts/part_00 [...]
set -euo pipefail
mkdir -p /tmp/lab_parts
cp -r "$@" /tmp/lab_parts/
echo "stashed: $(ls /tmp/lab_parts | tr '\n' ' ')($(du -sh /tmp/lab_parts | cut -f1))"
