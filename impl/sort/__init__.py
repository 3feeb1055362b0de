"""GPU bitonic sort: CUDA C++ passes generated per plan, numba kernels on a CPU, a pinned host pipeline.

    from impl.sort import sort, argsort
    sort(x) == numpy.sort(x);  argsort(x) == numpy.argsort(x, kind="stable")   (x: float16/32, int32, uint32, int64)

Modules, in dependency order: ``keys`` (order-key transform); the CUDA C++ sort: ``plan`` (tile pass + fused coset merge
passes, register/lane/warp layouts), ``twin`` (its numpy twin), ``codegen`` (``bitonic.cu`` + one kernel per pass),
``runtimes`` (CuPy on a GPU, the g++ emulation ``bitonic_emulated.cpp`` on a CPU), ``choose`` (the measured
configuration per slot mode and size), ``cuda_sort`` (``CudaSorter``); the numba sort: ``network`` (passes, programs,
numpy twin), ``kernels``; then ``bitonic`` (host API, picks one), ``merge`` (device merge of two sorted runs, numba),
``pipeline`` (host-to-host with pinned staging and streams, finished by a tree of those merges), ``reference`` (numpy references),
``ptxcheck`` / ``compile_check`` (sm_90 builds of the numba / CUDA C++ kernels), ``claims``, ``plots``, ``recipe`` (the
GPU experiments as functions), ``experiments`` (their command line), ``tune`` (the GPU search over the CUDA C++ sort's
configurations; writes the table ``choose`` reads).
"""
from impl.sort.bitonic import BitonicSorter, argsort, make_sorter, sort
from impl.sort.cuda_sort import CudaSorter
from impl.sort.network import CPU_CONFIG, GPU_CONFIG, SortConfig, default_config
from impl.sort.pipeline import HostSortPipeline, PipelineConfig
from impl.sort.plan import EMU_CUDA_CONFIG, GPU_CUDA_CONFIG, CudaSortConfig

__all__ = ["BitonicSorter", "CudaSorter", "argsort", "sort", "make_sorter", "SortConfig", "GPU_CONFIG", "CPU_CONFIG",
           "default_config", "CudaSortConfig", "GPU_CUDA_CONFIG", "EMU_CUDA_CONFIG", "HostSortPipeline",
           "PipelineConfig"]
