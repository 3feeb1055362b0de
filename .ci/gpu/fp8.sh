#!/usr/bin/env bash
# FP8 kernels on the device in about 230 s: tune (refreshes results/<card>/fp8/{tune,launch_table}.json) -> GPU
# correctness of the kernels and of the launch table (hypothesis 'ci' profile) -> benches saved as run "fp8", which
# launch with the table just written. Every step has its own wall-clock limit (SIGINT: pytest still saves the
# benchmarks it finished); results/ and the logs are packed into $OUT after each step.
# Usage there: LAB_COMMIT=<sha> LAB_TREE=<tree> bash .ci/gpu/fp8.sh [tune_s=90] [check_s=45] [bench_s=85]
set -uo pipefail
source "$(dirname "$0")/provenance.sh"  # exits unless the files here are LAB_COMMIT's
export PYTHONUNBUFFERED=1 LAB_BACKEND=gpu LAB_HYPOTHESIS_PROFILE=ci
tune_s=${1:-90}; check_s=${2:-45}; bench_s=${3:-85}
out=${OUT:-/tmp/out}; mkdir -p "$out/logs" "$out/fp8"
pack() { tar czf "$out/results.tgz" results; tar czf "$out/logs.tgz" -C "$out" logs; }
step() {
  local name=$1 limit=$2; shift 2
  local t0; t0=$(date +%s)
  timeout -s INT -k 10 "$limit" "$@" > "$out/logs/$name.log" 2>&1
  echo "$name rc=$? $(( $(date +%s) - t0 ))s" | tee -a "$out/logs/summary.txt"
  pack
}
# the sweep's own budget leaves ~20 s of the step for start-up, the copy-bandwidth measurement and writing
step tune "$tune_s" python3 -m impl.fp8.tune --out "$out/fp8" --budget-s $(( tune_s - 22 ))
tail -n 16 "$out/logs/tune.log"
step check "$check_s" python3 -m pytest -q -x -p no:cacheprovider correctness/test_fp8_launch.py \
  correctness/test_fp8_kernels.py correctness/test_fp8_linear.py \
  -k "(gpu or table or launches or codec or delayed or amax or saturates or empty or bad_input or matches_reference or identity) and not tune"
tail -n 6 "$out/logs/check.log"
step bench "$bench_s" python3 -m pytest benches/bench_fp8.py -q -p no:cacheprovider --benchmark-save=fp8 \
  --benchmark-columns=median,iqr,rounds
grep -E "passed|failed|error" "$out/logs/bench.log" | tail -4
cat "$out/logs/summary.txt"
