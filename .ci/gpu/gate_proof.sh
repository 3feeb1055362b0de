#!/usr/bin/env bash
# Device side: the regression gate's proof on this card. Stores a fresh baseline run of the gated benches (from
# committed code: LAB_COMMIT), runs `python -m impl gate` three times on that unchanged code (each must pass) and
# once with the axpy canary doing 25% more work (it must fail), each gate run a fresh pytest process with its own
# re-run of any bench over its threshold; writes results/<slug>/examples/gate_proof.json (the examples.gate_* claims)
# and packs results/<slug>/ and the log into $OUT.
# Benches gated (-k below): the examples canary, the CUDA hash join (all cases; the 1M hash join is the bench whose
# run-to-run spread made the old 10% gate fail on unchanged code) and the tensor-core join's 1M cases except its
# ~1 µs empty build phase (so the stored baseline run holds both sides of the join's 1M ratio claim); not the 100M
# joins (25 s of every run's ~37 s, and no claim of the gate reads them).
# Usage there: LAB_COMMIT=<sha> LAB_TREE=<tree> bash .ci/gpu/gate_proof.sh [budget seconds, default 220]
set -uo pipefail
source "$(dirname "$0")/provenance.sh"  # exits unless the files here are LAB_COMMIT's
export PYTHONUNBUFFERED=1 LAB_BACKEND=gpu
budget=${1:-220}
out=${OUT:-/tmp/out}; mkdir -p "$out/logs" "$out/gate"
k='(examples or (join_hash and cuda) or (join_tc and 1M and not build)) and not 100M'
slug=$(python3 -c "from impl.common.results import gpu_slug; print(gpu_slug())")
timeout -k 10 $((budget + 30)) python3 -m impl gate examples join -k "$k" --proof --budget-s "$budget" \
  --out "$out/gate/gate_proof.json" > "$out/logs/gate_proof.log" 2>&1
rc=$?
echo "gate proof rc=$rc (0: three unchanged runs passed and the slowed canary was caught)" | tee -a "$out/logs/gate_proof.log"
grep -E "^gate|^gate proof|passed|failed" "$out/logs/gate_proof.log" | tail -20
tar czf "$out/results.tgz" "results/$slug"; tar czf "$out/logs.tgz" -C "$out" logs
exit $rc
