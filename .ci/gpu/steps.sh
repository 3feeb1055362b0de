#!/usr/bin/env bash
# Device side: named measurement steps, each with its own wall-clock limit and log, packing results/ and the logs into
# $OUT after every step so a call cut off by its limit still returns what it finished.
#   sort   tune (table of launch configs) -> stored bench run "sort" -> quick experiments (passes, transfers, pipeline)
#   join   stored bench run "join" (CuPy kernels) -> quick experiments (ncu of both joins)
#   join_tune   the hash and tensor-core joins' design sweep (impl.join.tune) into results/<card>/join/tune.json, where
#               the join bench takes its hash join's configuration from (run it before "join")
#   join_ncu    ncu's full section set over the second of two 1M joins, linear64 with 1 and 2 rows per thread (logs/)
#   sort_ncu    ncu over the passes of one 10M sort (results/<card>/sort/ncu.json)
#   fp8_bench   the stored bench run "fp8" alone (its calibration included)
#   fp8    .ci/gpu/fp8.sh (tune -> GPU checks -> stored bench run "fp8")
#   serve  GEMM table tune -> decode curve experiments (the table written lands in results/<card>/serve/)
#   serve_check   the fused kernels' and FP8 linears' property tests on the GPU (bf16, native FP8 conversion)
#   serve_mma     the decode GEMVs' property tests on the GPU (the CUDA C++ tensor-core kernel and the Triton ones)
#   seam   the full recipe (anchors, family, selector) with its checkpoints in /tmp
#   seam_ablate   ResNet50 anchors alone under five variants of the anchor recipe (impl.seam.ablate, one seed each)
#   gate   .ci/gpu/gate_proof.sh
# Usage there: LAB_COMMIT=<sha> LAB_TREE=<tree> bash .ci/gpu/steps.sh "sort join fp8"
set -uo pipefail
source "$(dirname "$0")/provenance.sh"  # exits unless the files here are LAB_COMMIT's
export PYTHONUNBUFFERED=1 LAB_BACKEND=gpu LAB_HYPOTHESIS_PROFILE=ci PYTHONFAULTHANDLER=1  # a crash prints its Python stack
out=${OUT:-/tmp/out}; mkdir -p "$out/logs"
pack() { tar czf "$out/results.tgz" results; tar czf "$out/logs.tgz" -C "$out" logs; }
run() {  # run NAME LIMIT_S CMD...: one step, its log, its exit status and seconds in summary.txt
  local name=$1 limit=$2; shift 2
  local t0; t0=$(date +%s)
  timeout -s INT -k 10 "$limit" "$@" > "$out/logs/$name.log" 2>&1
  echo "$name rc=$? $(( $(date +%s) - t0 ))s" | tee -a "$out/logs/summary.txt"
  tail -n 12 "$out/logs/$name.log" | cut -c1-220
  pack
}
for step in $1; do
  case $step in
    sort)
      run sort_tune 75 python3 -m impl.sort.tune --budget-s 60
      run sort_bench 100 python3 -m pytest benches/bench_sort.py -q -p no:cacheprovider --benchmark-save=sort
      run sort_exp 45 python3 -m impl.sort.experiments --quick ;;
    join)
      run join_bench 110 python3 -m pytest benches/bench_join.py -q -p no:cacheprovider --benchmark-save=join -k "not numba"
      run join_exp 45 python3 -m impl.join.experiments --quick ;;
    join_tune)
      slug=$(python3 -c 'from impl.common.results import gpu_slug; print(gpu_slug())')
      run join_tune 110 python3 -m impl.join.tune --out "results/$slug/join" --budget-s 85 ;;
    join_ncu)
      for lrows in 1 2; do  # second join of one operator: its lbuild + lprobe (linear64), 1 or 2 rows per thread
        run "join_ncu_linear64_r$lrows" 60 "$(command -v ncu || echo /usr/local/cuda/bin/ncu)" --clock-control none --set full -k regex:join_l --launch-skip 2 \
          --launch-count 2 python3 -m impl.join.ncu_driver --n 1000000 --impls hash-cuda --repeat 2 \
          --config "{\"hash-cuda\": {\"scheme\": \"linear64\", \"lrows\": $lrows}}"
      done ;;
    sort_ncu)
      run sort_ncu 90 python3 -m impl.sort.experiments --ncu-only ;;
    fp8_bench)
      run fp8_bench 80 python3 -m pytest benches/bench_fp8.py -q -p no:cacheprovider --benchmark-save=fp8 \
        --benchmark-columns=median,iqr,rounds ;;
    fp8)
      bash .ci/gpu/fp8.sh ;;  # same $OUT layout: logs/{tune,check,bench}.log, summary.txt, results.tgz
    serve)
      mkdir -p /tmp/serve
      run serve_tune 130 python3 -m impl.serve.tune --out /tmp/serve --budget-s 110 --decode-reserve-s 25
      cp /tmp/serve/*.json "results/$(python3 -c 'from impl.common.results import gpu_slug; print(gpu_slug())')/serve/"
      run serve_exp 60 python3 -m impl.serve.experiments --gemm-table /tmp/serve/gemm_table.json --budget-s 50 ;;
    serve_check)
      run serve_check 150 python3 -m pytest correctness/test_serve_fused_quant.py correctness/test_serve_deferred.py \
        correctness/test_serve_fused.py correctness/test_fp8_linear.py -q -p no:cacheprovider ;;
    serve_mma)
      run serve_mma 120 python3 -m pytest correctness/test_serve_mma.py correctness/test_serve_fp8_gemv.py -q \
        -p no:cacheprovider ;;
    seam)
      run seam 450 python3 -m impl.seam.experiments --out /tmp/seam --checkpoint /tmp/seam_ckpt
      tar czf "$out/seam.tgz" --exclude seam/checkpoint -C /tmp seam ;;
    seam_ablate)
      run seam_ablate 330 python3 -m impl.seam.ablate --out "$out/seam_ablation" --archs resnet50 \
        --variant wd5e-5:weight_decay=5e-5 --variant lr0.1:lr=0.1 --variant ls0:label_smoothing=0 \
        --variant unit-noclip:zero_init_last=false,grad_clip=none --variant ep30:epochs=30 ;;
    gate)
      OUT=/tmp/gate_out bash .ci/gpu/gate_proof.sh 240 > "$out/logs/gate.log" 2>&1; tail -n 20 "$out/logs/gate.log"
      cp /tmp/gate_out/logs/* "$out/logs/" 2>/dev/null; pack ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
cat "$out/logs/summary.txt"
