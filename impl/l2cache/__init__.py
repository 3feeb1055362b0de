"""l2cache: L2-persistence and prefetch policies for batch-1 inference of weight-shared networks.

    from impl.l2cache import CudaRuntimeDriver, L2Controller, build_workload, serve_best
    with serve_best(build_workload("mlp_16mb"), L2Controller(CudaRuntimeDriver())) as (runner, choice):
        out = runner.request()      # served under choice.policy; on exit the device's L2 state is put back

Modules, in reading order:
  control.py   L2 control through ``cuda.bindings.runtime`` (carve-out, access-policy windows, persisting-line reset)
               behind a driver object, and the context manager that always restores the previous state
  fake.py      an in-memory driver with the device's rules, so CPU tests exercise every control path
  arena.py     one flat buffer holding many tensors, so one window covers all shared weights
  prefetch.py  in-kernel L2 prefetch (cp.async.bulk.prefetch.L2 through inline PTX; a LOG mode and numpy twin on
               the CPU) and a kernel that only prefetches
  linear.py    Triton GEMV/GEMM linear (+bias, ReLU; the GEMV can prefetch a later layer's weights) with its reference
  conv.py      Triton implicit-GEMM conv2d (+bias, residual, ReLU), deterministic split-K, with its reference
  touch.py     Triton read kernel that pulls a byte range into L2 (the prefetcher's workhorse)
  nets.py      weight-shared networks from those kernels: ALBERT-style MLP, conv net reusing one block, chains that
               mix a shared block with per-layer weights (sized from the card's L2 and carve-out)
  ofa.py       once-for-all MobileNetV3 supernet over timm's mobilenetv3_large_100 (elastic depth/width/kernel)
  workloads.py workloads as stored specs: fixed presets (benches, tests), the selection's candidates, the sweep
  policies.py  default / persist weights / stream activations / prefetch (side stream, ahead, in-kernel), as objects
               any model can take
  serving.py   serve a workload's batch-1 requests under a policy (CUDA graphs on a GPU) and time them
  stats.py     the gain over the default with a bootstrap interval over rounds and requests
  chooser.py   compare policies on a model, the one pick rule, choose and serve with the best
  ncu.py       Nsight Compute command lines and CSV parsing; a (workload, policy) pair profiled against the default
  compile_check.py  the prefetching kernels compiled for sm_90 without a GPU (PTX/SASS facts)
  recipe.py    the GPU evidence: a selection run, then a verdict run in a fresh process; the CPU smoke run
  experiments.py  its command line
  claims.py    ledger entries (judged on the verdict run's intervals) and failing cases; plots.py their figures
Test fixtures (the shared controller, the L2-state guard) live in ``fixtures/l2cache.py``.
"""
from impl.common.exports import lazy_exports

# lazy: ``python -m impl.l2cache.compile_check`` must switch Triton's interpreter off before any kernel module loads
__all__, __getattr__ = lazy_exports(__name__, {
    "chooser": ("CANDIDATES", "choose_policy", "compare_policies", "pick_best", "serve_best"),
    "control": ("AccessWindow", "CudaRuntimeDriver", "L2Controller", "L2Error"),
    "conv": ("conv2d",), "fake": ("FakeL2Driver",), "policies": ("POLICIES", "get_policy"),
    "serving": ("PolicyRunner",), "workloads": ("build_workload",)})
