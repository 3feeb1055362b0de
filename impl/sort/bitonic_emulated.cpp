// bitonic.cu and its generated kernels, unchanged, run on the CPU (a shared library loaded by impl/sort/emulated.py;
// the tests and `python -m impl.sort.tune --dry-run` use it).
//
// A thin emulation of what the kernels use: one std::thread per CUDA thread of a block, the blocks of a launch one
// after another on those threads, __syncthreads as a std::barrier, the dynamic shared memory as one buffer per
// launch (poisoned with 0xA5 so a slot read before it is written shows up). Build:
//   g++ -std=c++20 -O1 -pthread -shared -fPIC -DSORT_SOURCE='"generated.cu"' bitonic_emulated.cpp -o libsort.so
#include <barrier>
#include <cstring>
#include <thread>
#include <vector>

#define SORT_HOST_EMULATION 1

struct EmuIndex {
    unsigned x = 0;
};
static thread_local EmuIndex threadIdx, blockIdx;
static std::barrier<>* g_block_barrier = nullptr;
static unsigned char* sort_smem = nullptr;

#define __global__
#define __launch_bounds__(...)
#define SORT_FN inline
#define SORT_HD
#define SORT_SYNC() g_block_barrier->arrive_and_wait()
#define SORT_TID threadIdx.x
#define SORT_BID blockIdx.x

typedef void (*SortKernel)(const void*, void*, void*, void*, long long, int, int, unsigned long long, unsigned);
struct SortEmuKernel {
    const char* name;
    SortKernel fn;
};

#include SORT_SOURCE

extern "C" {
int sort_emu_count() { return sort_emu_kernel_count; }

const char* sort_emu_name(int k) { return k >= 0 && k < sort_emu_kernel_count ? sort_emu_kernels[k].name : nullptr; }

// Launch kernel k on blocks block0..block0+grid-1 of `block` threads with `smem` bytes of dynamic shared memory;
// 0 on success.
int sort_emu_launch(int k, unsigned grid, unsigned block, unsigned smem, const void* src, void* keys, void* vals,
                    void* out, long long n, int kind, int canon, unsigned long long flip, unsigned block0) {
    if (k < 0 || k >= sort_emu_kernel_count || block == 0 || block > 1024) return 1;
    std::vector<unsigned char> shared(smem + 16, 0xA5);
    sort_smem = shared.data() + (16 - reinterpret_cast<unsigned long long>(shared.data()) % 16) % 16;
    std::barrier<> bar(block);
    g_block_barrier = &bar;
    const SortKernel fn = sort_emu_kernels[k].fn;
    std::vector<std::thread> threads;
    threads.reserve(block);
    for (unsigned t = 0; t < block; ++t)
        threads.emplace_back([=, &bar] {
            threadIdx.x = t;
            for (unsigned b = 0; b < grid; ++b) {
                blockIdx.x = b;
                fn(src, keys, vals, out, n, kind, canon, flip, block0);
                bar.arrive_and_wait();  // the block ends before the next one reuses the shared buffer
            }
        });
    for (auto& th : threads) th.join();
    g_block_barrier = nullptr;
    return 0;
}
}
