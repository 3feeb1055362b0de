"""l2cache: L2-persistence and prefetch policies for batch-1 inference of weight-shared networks (issue 5).

Modules, in reading order:
  control.py   L2 control through ``cuda.bindings.runtime`` (carve-out, access-policy windows, persisting-line reset)
               behind a driver object, and the context manager that always restores the previous state
  fake.py      an in-memory driver with the device's rules, so CPU tests exercise every control path
  arena.py     one flat buffer holding many tensors, so one window covers all shared weights
  linear.py    Triton GEMV/GEMM linear (+bias, ReLU) with its torch reference
  conv.py      Triton implicit-GEMM conv2d (+bias, residual, ReLU), deterministic split-K, with its reference
  touch.py     Triton read kernel that pulls a byte range into L2 (the prefetcher's workhorse)
  nets.py      weight-shared networks from those kernels: ALBERT-style MLP, conv net reusing one block
  ofa.py       once-for-all MobileNetV3 supernet over timm's mobilenetv3_large_100 (elastic depth/width/kernel)
  policies.py  default / persist weights / stream activations / dynamic prefetch, as objects any model can take
  serving.py   serve a workload's batch-1 requests under a policy (CUDA graphs on a GPU) and time them
  ncu.py       Nsight Compute command lines and CSV parsing
  experiments.py  the GPU evidence (latency table, ncu DRAM bytes, plot data); ``--smoke`` on the CPU
  claims.py    ledger entries and the gain-vs-weight-bytes plot
  testing.py   pytest fixtures: the L2 driver for tests and the autouse guard that checks state is restored
"""
