#!/usr/bin/env bash
# On the H100: harness check + baseline store + gate pass + deliberately slowed variant must fail the gate.
# Usage (device machine, repo root): LAB_COMMIT=<sha> LAB_TREE=<tree> bash .ci/gpu/foundation.sh
set -uo pipefail
source "$(dirname "$0")/provenance.sh"  # exits unless the files here are LAB_COMMIT's
export PYTHONUNBUFFERED=1 LAB_BACKEND=gpu
python3 -c "import torch, triton, numba; print(torch.__version__, triton.__version__, numba.__version__, torch.cuda.get_device_name())"
python3 -m pytest -q -p no:cacheprovider correctness/test_examples.py correctness/test_harness.py 2>&1 | tail -5
echo "== baseline"
python3 -m pytest -q -p no:cacheprovider benches/bench_examples.py --benchmark-save=baseline 2>&1 | tail -12
echo "== gate: same code (must pass)"
python3 -m pytest -q -p no:cacheprovider benches/bench_examples.py --benchmark-compare --benchmark-compare-fail=median:10% 2>&1 | tail -12
echo "gate_same_rc=${PIPESTATUS[0]}"
echo "== gate: slowed variant (kernel launched twice; must fail)"
cp impl/examples/axpy_triton.py /tmp/axpy_orig.py
python3 - <<'PY'
p = "impl/examples/axpy_triton.py"; s = open(p).read()
s = s.replace("        axpy_kernel[(triton.cdiv(n, block),)](x, y, out, float(a), n, BLOCK=block)",
              "        axpy_kernel[(triton.cdiv(n, block),)](x, y, out, float(a), n, BLOCK=block)\n"
              "        axpy_kernel[(triton.cdiv(n, block),)](x, y, out, float(a), n, BLOCK=block)  # SLOWED")
open(p, "w").write(s)
PY
grep -c SLOWED impl/examples/axpy_triton.py
python3 -m pytest -q -p no:cacheprovider benches/bench_examples.py --benchmark-compare --benchmark-compare-fail=median:10% 2>&1 | tail -12
echo "gate_slowed_rc=${PIPESTATUS[0]}"
cp /tmp/axpy_orig.py impl/examples/axpy_triton.py
