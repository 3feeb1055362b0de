#!/usr/bin/env bash
# Device side, after every piece of `python -m impl.kvstitch.prepare split` is stashed (stash_part.sh): join them
# into /tmp/lab_assets/kvstitch (smollm2.gguf, gemma3.gguf, text/, wiki.txt) and run the real-model experiments,
# each with its own log and timeout; results/ and the logs are packed into $OUT after each.
# Usage there: LAB_COMMIT=<sha> LAB_TREE=<tree> bash .ci/gpu/models.sh "kvstitch fp8 serve loadtest" [seconds/step]
# (FP8_ARGS: more arguments for the fp8 step, e.g. FP8_ARGS="--policies all first-last top4")
# (a step kvstitch:SERIES runs one series; any other word W runs correctness/test_W.py; carried wheels in
# .carry/whlkv, e.g. the transformers this machine was tested with, go first on PYTHONPATH)
set -uo pipefail
source "$(dirname "$0")/provenance.sh"  # exits unless the files here are LAB_COMMIT's
export PYTHONUNBUFFERED=1 LAB_BACKEND=gpu
steps=${1:-"kvstitch fp8 serve"}; limit=${2:-420}
out=${OUT:-/tmp/out}; mkdir -p "$out/logs"
if ls .carry/whlkv/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .carry/whlkv/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
assets=/tmp/lab_assets/kvstitch
if [ ! -e "$assets/smollm2.gguf" ]; then
  python3 -m impl.kvstitch.prepare join --parts /tmp/lab_parts --out /tmp/lab_assets || exit 3
fi
ls -la "$assets" | tee "$out/logs/assets.txt"
export LAB_SMOLLM2_GGUF=$assets/smollm2.gguf LAB_CACHE=/tmp/lab_cache
for s in $steps; do
  t0=$(date +%s)
  case $s in
    kvstitch) cmd=(python3 -m impl.kvstitch.experiments --quick --assets "$assets") ;;
    kvstitch:*) cmd=(python3 -m impl.kvstitch.experiments --quick --assets "$assets" --series "${s#kvstitch:}") ;;
    fp8)      cmd=(python3 -m impl.fp8.experiments --text "$assets/wiki.txt" --budget-s $(( limit * 9 / 10 )) ${FP8_ARGS:-}) ;;
    serve)    cmd=(python3 -m impl.serve.experiments) ;;
    loadtest) cmd=(python3 -m impl.serve.loadtest --model smollm2 --budget-s $(( limit * 3 / 4 ))) ;;
    *)        cmd=(python3 -m pytest -v -p no:cacheprovider "correctness/test_$s.py") ;;  # -v: names survive a timeout
  esac
  timeout "$limit" "${cmd[@]}" > "$out/logs/${s/:/_}.log" 2>&1
  echo "$s rc=$? $(( $(date +%s) - t0 ))s" | tee -a "$out/logs/summary.txt"
  tail -4 "$out/logs/${s/:/_}.log" | cut -c1-300 | sed "s/^/    /" | tee -a "$out/logs/summary.txt"
  tar czf "$out/results.tgz" results; tar czf "$out/logs.tgz" -C "$out" logs
done
