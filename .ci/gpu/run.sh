#!/usr/bin/env bash
# The device-machine wrapper around `python -m impl gpu`: installs carried wheels (.whl/), runs each system with its
# own log, and packs results/ and the logs into $OUT after every system, so a call cut off by its time limit still
# returns what it finished.
# Usage there: LAB_COMMIT=<sha> LAB_TREE=<tree> bash .ci/gpu/run.sh "sort join" [--quick] [--no-experiments]
set -uo pipefail
source "$(dirname "$0")/provenance.sh"  # exits unless the files here are LAB_COMMIT's
export PYTHONUNBUFFERED=1 LAB_BACKEND=gpu LAB_HYPOTHESIS_PROFILE=${LAB_HYPOTHESIS_PROFILE:-gpu}
systems=${1:-"examples sort join fp8 l2cache seam serve kvstitch"}
shift || true
out=${OUT:-/tmp/out}; mkdir -p "$out/logs"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
for s in $systems; do
  t0=$(date +%s)
  timeout 900 python3 -m impl gpu "$s" "$@" > "$out/logs/$s.log" 2>&1
  echo "$s rc=$? $(( $(date +%s) - t0 ))s" | tee -a "$out/logs/summary.txt"
  grep -E "passed|failed|error|^== |report " "$out/logs/$s.log" | tail -6 | sed "s/^/    /" | tee -a "$out/logs/summary.txt"
  tar czf "$out/results.tgz" results; tar czf "$out/logs.tgz" -C "$out" logs
done
