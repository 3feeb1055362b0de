// hash_join.cu's kernels, unchanged, run on the CPU (test-only; built with g++ by correctness/test_join.py).
//
// A thin emulation of the CUDA features the kernels use: one std::thread per CUDA thread, blocks one after another
// (as numba's simulator does), __syncthreads as a block barrier, __shfl_up_sync through a per-warp barrier, shared
// variables as statics, atomics as GCC __atomic builtins. The driver repeats hash_cuda.py's launch sequence
// (memset -> build -> count -> total -> write), so the C++ source itself, not only its numba twin, is checked
// against pandas.merge on the CPU. It also guards the output buffers to catch writes past `capacity`.
//
// Input (text, stdin): "wide nb np cap threads capacity_mode" then nb build keys, nb build rows, np probe keys,
// np probe rows. capacity_mode 0 = exact (capacity = total), 1 = speculative (capacity = np, then exact if short).
// Output: "total done_counter guards_intact clipped", then one "build_row probe_row" line per pair.
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstdio>
#include <memory>
#include <thread>
#include <vector>

struct dim3_t {
    unsigned int x = 0, y = 0, z = 0;
};
thread_local dim3_t threadIdx, blockIdx;
dim3_t blockDim, gridDim;
static std::barrier<>* g_block;
static std::vector<std::unique_ptr<std::barrier<>>> g_warps;
static long long g_lanes[1024];

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static
#define __restrict__ __restrict

struct int2 {
    int x, y;
};
struct alignas(16) longlong2 {
    long long x, y;
};
using std::min;

inline void __syncthreads() { g_block->arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
template <typename T>
T __ldcg(const T* p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
template <typename T>
T __shfl_up_sync(unsigned, T v, int d) {
    const int t = threadIdx.x, lane = t & 31;
    std::barrier<>& warp = *g_warps[t >> 5];
    g_lanes[t] = (long long)v;
    warp.arrive_and_wait();
    const T out = lane >= d ? (T)g_lanes[t - d] : v;
    warp.arrive_and_wait();
    return out;
}
template <typename T>
T atomicCAS(T* p, T cmp, T val) {
    __atomic_compare_exchange_n(p, &cmp, val, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return cmp;  // the old value either way
}
template <typename T>
T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
inline unsigned int atomicAdd(unsigned int* p, unsigned int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }

#include "hash_join.cu"

template <typename... P, typename... A>
void launch(void (*kernel)(P...), unsigned grid, unsigned block, A... args) {
    gridDim.x = grid;
    blockDim.x = block;
    for (unsigned b = 0; b < grid; ++b) {
        std::barrier<> bar(block);
        g_block = &bar;
        g_warps.clear();
        for (unsigned w = 0; w * 32 < block; ++w) g_warps.emplace_back(new std::barrier<>(std::min(32u, block - 32 * w)));
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < block; ++t)
            threads.emplace_back([=] {
                threadIdx.x = t;
                blockIdx.x = b;
                kernel(args...);
            });
        for (auto& th : threads) th.join();
    }
}

template <typename K>
int run(long long nb, long long np, long long cap, unsigned threads, int mode,
        void (*build)(const K*, long long, K*, K*, long long, long long),
        void (*count)(const K*, long long, const K*, const K*, long long, long long, K*, long long*, long long*,
                      long long*, unsigned int*),
        void (*write)(const K*, long long, const K*, const long long*, const long long*, const K*, const K*, K*, K*,
                      long long)) {
    std::vector<K> bk(nb), br(nb), pk(np), pr(np);
    for (auto* v : {&bk, &br, &pk, &pr})
        for (auto& x : *v) {
            long long t = 0;
            if (std::scanf("%lld", &t) != 1) return 4;
            x = (K)t;
        }
    const long long wide = sizeof(K) == 8, mask = cap - 1;
    std::vector<K> table(2 * cap + 2, (K)-1), nxt(std::max(nb, 1LL));  // memset 0xFF
    if (nb) launch(build, (unsigned)std::min<long long>((nb + threads - 1) / threads, 8), threads, bk.data(), nb,
                   table.data(), nxt.data(), mask, wide);
    const long long nblocks = (np + threads * JOIN_ITEMS - 1) / (threads * JOIN_ITEMS);
    std::vector<K> heads(std::max(np, 1LL));
    std::vector<long long> tcounts(std::max(nblocks * threads, 1LL)), bcounts(std::max(nblocks, 1LL)),
        offsets(nblocks + 1, 0);
    unsigned int done = 0;
    if (np) launch(count, (unsigned)nblocks, threads, (const K*)pk.data(), np, (const K*)table.data(),
                   (const K*)nxt.data(), mask, wide, heads.data(), tcounts.data(), bcounts.data(), offsets.data(), &done);
    const long long total = offsets[nblocks];
    long long capacity = mode == 1 ? np : total;
    const K guard = (K)0x5A5A5A5A;
    std::vector<K> ob(capacity + 16, guard), op(capacity + 16, guard);
    if (np) launch(write, (unsigned)nblocks, threads, (const K*)heads.data(), np, (const K*)nxt.data(),
                   (const long long*)tcounts.data(), (const long long*)offsets.data(), (const K*)br.data(),
                   (const K*)pr.data(), ob.data(), op.data(), capacity);
    bool guards = std::all_of(ob.begin() + capacity, ob.end(), [&](K v) { return v == guard; }) &&
                  std::all_of(op.begin() + capacity, op.end(), [&](K v) { return v == guard; });
    const bool clipped = capacity < total;
    if (clipped) {  // the speculative buffer was short: write again, exact-size (as hash_cuda.py does)
        capacity = total;
        ob.assign(capacity, guard);
        op.assign(capacity, guard);
        launch(write, (unsigned)nblocks, threads, (const K*)heads.data(), np, (const K*)nxt.data(),
               (const long long*)tcounts.data(), (const long long*)offsets.data(), (const K*)br.data(),
               (const K*)pr.data(), ob.data(), op.data(), capacity);
    }
    std::printf("%lld %u %d %d\n", total, done, (int)guards, (int)clipped);
    for (long long i = 0; i < total; ++i) std::printf("%lld %lld\n", (long long)ob[i], (long long)op[i]);
    return 0;
}

int main() {
    long long wide, nb, np, cap, threads, mode;
    if (std::scanf("%lld %lld %lld %lld %lld %lld", &wide, &nb, &np, &cap, &threads, &mode) != 6) return 2;
    if (threads != JOIN_THREADS) return 3;  // the kernels' block scan is compiled for JOIN_THREADS
    if (wide)
        return run<long long>(nb, np, cap, (unsigned)threads, (int)mode, hash_build_cu_i64, hash_count_cu_i64,
                              hash_write_cu_i64_r64);
    return run<int>(nb, np, cap, (unsigned)threads, (int)mode, hash_build_cu_i32, hash_count_cu_i32,
                    hash_write_cu_i32_r32);
}
