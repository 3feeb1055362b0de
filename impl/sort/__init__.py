"""GPU bitonic sort (issue 3): numba-cuda kernels, shared-memory tiles, fused wide passes, a pinned host pipeline.

    from impl.sort import sort, argsort
    sort(x) == numpy.sort(x);  argsort(x) == numpy.argsort(x, kind="stable")   (x: float16/32, int32, uint32, int64)

Modules, in dependency order: ``keys`` (order-key transform), ``network`` (passes, programs, numpy twin),
``kernels`` (numba-cuda), ``bitonic`` (host API), ``pipeline`` (host-to-host with pinned staging and streams),
``reference`` (numpy references), ``ptxcheck`` (sm_90 compile check), ``claims``, ``experiments``.
"""
from impl.sort.bitonic import BitonicSorter, argsort, sort
from impl.sort.network import CPU_CONFIG, GPU_CONFIG, SortConfig, default_config
from impl.sort.pipeline import HostSortPipeline, PipelineConfig

__all__ = ["BitonicSorter", "argsort", "sort", "SortConfig", "GPU_CONFIG", "CPU_CONFIG", "default_config",
           "HostSortPipeline", "PipelineConfig"]
