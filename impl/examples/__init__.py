"""Two tiny kernels, one Triton and one numba-cuda, that prove the CPU/GPU execution mechanism and the harness."""
