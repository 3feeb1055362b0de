#!/usr/bin/env bash
# One batched GPU call: install carried wheels, then for each system: correctness at GPU sizes, benches stored as a
# run under results/<gpu-slug>/, the system's experiments; then the claims report. Logs and results come back in $OUT.
# Usage on the device machine: LAB_COMMIT=<sha> bash .ci/gpu/run.sh "sort join" [--quick]
set -uo pipefail
export PYTHONUNBUFFERED=1 LAB_BACKEND=gpu LAB_HYPOTHESIS_PROFILE=${LAB_HYPOTHESIS_PROFILE:-gpu}
systems=${1:-"examples sort join fp8 l2cache seam serve kvstitch"}
shift || true
out=${OUT:-/tmp/out}; mkdir -p "$out/logs"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
summary="$out/logs/summary.txt"; touch "$summary"
step() {  # step NAME TIMEOUT CMD...
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$out/logs/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$summary"
  tail -4 "$out/logs/$name.log" | sed "s/^/    /" | tee -a "$summary"
}
for s in $systems; do
  ls correctness/test_"$s"*.py >/dev/null 2>&1 && step "correctness_$s" 600 python3 -m pytest -q -p no:cacheprovider correctness/test_"$s"*.py
  ls benches/bench_"$s"*.py >/dev/null 2>&1 && step "bench_$s" 600 python3 -m pytest -q -p no:cacheprovider benches/bench_"$s"*.py \
      --benchmark-save="$s" --benchmark-columns=median,iqr,rounds
  [ -z "${NO_EXPERIMENTS:-}" ] && [ -f "impl/$s/experiments.py" ] && step "experiments_$s" 900 python3 -m impl.$s.experiments "$@"
  tar czf "$out/results.tgz" results; tar czf "$out/logs.tgz" -C "$out" logs  # partial results survive a timeout
done
python3 -m impl report "$(python3 -c 'from impl.common.results import gpu_slug; print(gpu_slug())')" | tee -a "$summary"
tar czf "$out/results.tgz" results
tar czf "$out/logs.tgz" -C "$out" logs
cat "$summary"
