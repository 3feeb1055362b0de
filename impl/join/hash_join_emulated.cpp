// hash_join.cu's kernels, unchanged, run on the CPU (test-only; built with g++ by correctness/test_join.py).
//
// A thin emulation of the CUDA features the kernels use: one std::thread per CUDA thread; blocks one after another
// for ordinary launches, all at once for the cooperative (fused) kernel, whose grid barriers need every block
// resident; __syncthreads as a per-block barrier; __shfl_up_sync, __shfl_sync and __ballot_sync through a per-warp
// barrier; each block's shared variables (JOIN_SHARED) in its own storage; atomics as GCC __atomic builtins. The
// driver repeats hash_cuda.py's launch sequence (epochs, table reuse, speculative capacity, the exact-size re-write),
// so the C++ source itself, not only its numba twin, is checked against pandas.merge on the CPU. Output buffers carry
// guard words past their capacity to catch out-of-bounds writes.
//
// Input (text, stdin): "wide scheme joins" (scheme 0 = build/count/write kernels, 1 = the fused kernel, 2 = the
// linear64 lbuild/lprobe kernels, 3 = linear64's lfused kernel, 4 = the partitioned pcount/pscatter/pjoin kernels,
// 5 = scheme 4 with a planted bug for the tests to catch: the last partition's probe rows are hidden from pjoin,
// 6 = scheme 2 in 4 table slices, 7 / 8 / 9 = schemes 2 / 3 / 6 with chains (int32 keys only; exit 8 when wide);
// wide = int64 keys), then per join a line "nbuild nprobe buckets shift epoch clear capacity grid" (schemes 4-5:
// buckets = the partition bits, shift/epoch/clear unused) and the build keys, build rows, probe keys, probe rows.
// Output per join: "total error guards_intact rewritten", then one "build_row probe_row" line per pair.
#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

struct dim3_t {
    unsigned int x = 0, y = 0, z = 0;
};
struct BlockContext {  // what the threads of one block share
    std::unique_ptr<std::barrier<>> block;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    std::vector<long long> lanes;
    std::map<std::pair<int, size_t>, std::vector<long long>> shared;
    std::mutex shared_mutex;
};
thread_local dim3_t threadIdx, blockIdx;
thread_local BlockContext* g_ctx;
dim3_t blockDim, gridDim;

template <typename T>
T* emu_shared(int site, size_t n) {
    std::lock_guard<std::mutex> lock(g_ctx->shared_mutex);
    auto& buf = g_ctx->shared[{site, n * sizeof(T)}];
    if (buf.empty()) buf.resize((n * sizeof(T) + 7) / 8 + 1);
    return reinterpret_cast<T*>(buf.data());
}

#define JOIN_EMULATED 1
#ifndef JOIN_CHAINS  // the chains compiled in: they run where the driver passes a chain array (schemes 7-9)
#define JOIN_CHAINS 1
#endif
#define JOIN_SHARED(T, name, n) T* name = emu_shared<T>(__LINE__, (n))
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __align__(n) alignas(n)

struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
using std::min;
typedef unsigned long long u64;

inline void __syncthreads() { g_ctx->block->arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }
template <typename T>
T __ldcg(const T* p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
inline uint4 __ldcg(const uint4* p) {  // 4-byte atomic loads: a CAS may land between them, as on the GPU
    const unsigned* q = reinterpret_cast<const unsigned*>(p);
    return uint4{__atomic_load_n(q, __ATOMIC_SEQ_CST), __atomic_load_n(q + 1, __ATOMIC_SEQ_CST),
                 __atomic_load_n(q + 2, __ATOMIC_SEQ_CST), __atomic_load_n(q + 3, __ATOMIC_SEQ_CST)};
}
template <typename T>
T __ldg(const T* p) { return __ldcg(p); }
inline void __syncwarp() { g_ctx->warps[threadIdx.x >> 5]->arrive_and_wait(); }
template <typename T>
T __shfl_up_sync(unsigned, T v, int d) {
    const int t = threadIdx.x, lane = t & 31;
    std::barrier<>& warp = *g_ctx->warps[t >> 5];
    g_ctx->lanes[t] = (long long)v;
    warp.arrive_and_wait();
    const T out = lane >= d ? (T)g_ctx->lanes[t - d] : v;
    warp.arrive_and_wait();
    return out;
}
template <typename T>
T __shfl_sync(unsigned, T v, int src) {
    const int t = threadIdx.x;
    std::barrier<>& warp = *g_ctx->warps[t >> 5];
    g_ctx->lanes[t] = (long long)v;
    warp.arrive_and_wait();
    const T out = (T)g_ctx->lanes[(t & ~31) + src];
    warp.arrive_and_wait();
    return out;
}
inline unsigned __ballot_sync(unsigned, bool p) {
    const int t = threadIdx.x, first = t & ~31;
    std::barrier<>& warp = *g_ctx->warps[t >> 5];
    g_ctx->lanes[t] = p ? 1 : 0;
    warp.arrive_and_wait();
    unsigned out = 0;
    for (int l = 0; l < 32 && first + l < (int)blockDim.x; ++l) out |= (unsigned)(g_ctx->lanes[first + l] != 0) << l;
    warp.arrive_and_wait();
    return out;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(unsigned x) { return __builtin_ffs((int)x); }
template <typename T>
T atomicCAS(T* p, T cmp, T val) {
    __atomic_compare_exchange_n(p, &cmp, val, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return cmp;  // the old value either way
}
template <typename T>
T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
template <typename T>
T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline u64 load_acquire(const u64* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
inline u64 now_ns() {
    return (u64)std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch()).count();
}
inline void pause_ns() { std::this_thread::yield(); }

#include "hash_join.cu"

// Run `kernel` on grid x block threads: blocks one after another, or all at once when `cooperative`.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), unsigned grid, unsigned block, bool cooperative, A... args) {
    gridDim.x = grid;
    blockDim.x = block;
    auto make_ctx = [&] {
        auto ctx = std::make_unique<BlockContext>();
        ctx->block = std::make_unique<std::barrier<>>(block);
        for (unsigned w = 0; w * 32 < block; ++w)
            ctx->warps.emplace_back(new std::barrier<>(std::min(32u, block - 32 * w)));
        ctx->lanes.assign(block, 0);
        return ctx;
    };
    const unsigned together = cooperative ? grid : 1;
    for (unsigned b0 = 0; b0 < grid; b0 += together) {
        std::vector<std::unique_ptr<BlockContext>> ctxs;
        std::vector<std::thread> threads;
        for (unsigned b = b0; b < b0 + together; ++b) {
            ctxs.push_back(make_ctx());
            BlockContext* ctx = ctxs.back().get();
            for (unsigned t = 0; t < block; ++t)
                threads.emplace_back([=] {
                    threadIdx.x = t;
                    blockIdx.x = b;
                    g_ctx = ctx;
                    kernel(args...);
                });
        }
        for (auto& th : threads) th.join();
    }
}

template <typename T>
bool read_values(std::vector<T>& v) {
    for (auto& x : v) {
        long long t = 0;
        if (std::scanf("%lld", &t) != 1) return false;
        x = (T)t;
    }
    return true;
}

template <typename K>
struct Kernels {
    void (*build)(const K*, long long, Slot<K>*, long long, long long, long long, long long*, long long*);
    void (*count)(const K*, long long, const Slot<K>*, long long, long long, long long, int*, long long*, long long*,
                  long long*, long long*, long long*);
    void (*write)(const K*, long long, const Slot<K>*, long long, long long, long long, const int*, const long long*,
                  const long long*, const K*, const K*, K*, K*, long long);
    void (*fused)(const K*, long long, const K*, long long, Slot<K>*, long long, long long, long long, int*,
                  long long*, long long*, long long*, const K*, const K*, K*, K*, long long, long long*, long long*,
                  long long, long long);
};

// One join as the Python driver writes it: the header, then build keys, build rows, probe keys, probe rows. The
// table grows to the layout's buckets (grown memory starts zeroed) and is zeroed when the join asks for a clear.
template <typename K>
struct JoinInput {
    long long nbuild = 0, n = 0, nb = 0, shift = 0, epoch = 0, clear = 0, capacity = 0, grid = 0;
    std::vector<K> bk, br, pk, pr;
};

template <typename K>
bool read_join(JoinInput<K>& in, std::vector<Slot<K>>& table) {
    if (std::scanf("%lld %lld %lld %lld %lld %lld %lld %lld", &in.nbuild, &in.n, &in.nb, &in.shift, &in.epoch,
                   &in.clear, &in.capacity, &in.grid) != 8)
        return false;
    in.bk.assign(in.nbuild, 0);
    in.br.assign(in.nbuild, 0);
    in.pk.assign(in.n, 0);
    in.pr.assign(in.n, 0);
    if (!read_values(in.bk) || !read_values(in.br) || !read_values(in.pk) || !read_values(in.pr)) return false;
    if ((long long)table.size() < in.nb * Bucket<K>::SLOTS) table.resize(in.nb * Bucket<K>::SLOTS, Slot<K>{});
    if (in.clear) std::fill(table.begin(), table.end(), Slot<K>{});
    return true;
}

// Whether every element of v from `from` on still holds the guard (nothing was written past the capacity).
template <typename T>
bool guarded_from(const std::vector<T>& v, long long from, T guard) {
    return std::all_of(v.begin() + from, v.end(), [&](T x) { return x == guard; });
}

// The result line (total, device error, guards intact, rewritten exact-size) and the first `total` pairs.
template <typename T>
void print_join(long long total, long long error, bool guards, bool rewrite, const std::vector<T>& ob,
                const std::vector<T>& op) {
    std::printf("%lld %lld %d %d\n", total, error, (int)guards, (int)rewrite);
    for (long long i = 0; i < total; ++i) std::printf("%lld %lld\n", (long long)ob[i], (long long)op[i]);
}

// The end of a join as hash_cuda.py ends it: when the total exceeds the speculative capacity, `rewrite(total)` writes
// again into exact-size outputs; then the result line and pairs. Returns 0, or 7 when a re-write's kernel that
// publishes the total (state[0], when `check_total`) published another one.
template <typename T, typename F>
int finish_join(long long total, long long capacity, std::vector<T>& ob, std::vector<T>& op, T guard,
                const std::vector<long long>& state, bool check_total, F rewrite) {
    bool guards = guarded_from(ob, capacity, guard) && guarded_from(op, capacity, guard);
    const bool rewritten = total > capacity;
    if (rewritten) {
        ob.assign(total + 16, guard);
        op.assign(total + 16, guard);
        rewrite(total);
        if (check_total && state[0] != total) return 7;
        guards = guards && guarded_from(ob, total, guard) && guarded_from(op, total, guard);
    }
    print_join(total, state[1], guards, rewritten, ob, op);
    return 0;
}

template <typename K>
struct LinearKernels {
    void (*build)(const K*, long long, Slot<K>*, long long, long long, long long, int*, long long*, long long*,
                  long long, long long, const int*);
    void (*probe)(const K*, long long, const Slot<K>*, long long, long long, long long, const int*, const K*,
                  const K*, K*, K*, long long, long long*, long long*, long long, long long, long long, const int*);
    void (*fused)(const K*, long long, const K*, long long, Slot<K>*, long long, long long, long long, int*,
                  const K*, const K*, K*, K*, long long, long long*, long long*, long long, long long);
};

// scheme 2 (linear64; int32 keys, or int64 keys in 16-byte slots when wide): lbuild + lprobe over `grid` blocks
// (grid-stride loops), speculative capacity, the lprobe again exact-size when the total exceeds it; scheme 3: the
// first two in one cooperative lfused launch; scheme 6: lbuild + lprobe slice by slice (`slices` table slices, the
// total published by the last slice's lprobe), the exact-size rewrite one lprobe over the whole table. With
// `chains` (int32 keys) the kernels get a chain array of 2 ints per build row, poisoned before every join.
template <typename K>
int run_linear(int joins, bool fused, LinearKernels<K> k, int slices = 1, bool chains = false) {
    using S = Slot<K>;
    const unsigned threads = JOIN_THREADS;
    std::vector<S> table;
    std::vector<long long> state(8, 0);
    long long bar_base = 0;
    for (int q = 0; q < joins; ++q) {
        JoinInput<K> in;
        if (!read_join(in, table)) return 4;
        auto& [nbuild, n, nb, shift, epoch, clear, capacity, grid, bk, br, pk, pr] = in;
        long long host[2] = {-7, 0};
        const K guard = (K)0x5A5A5A5A;
        std::vector<K> ob(capacity + 16, guard), op(capacity + 16, guard);
        std::vector<int> chain_buf(chains ? 2 * nbuild + 2 : 0, -0x5A5A5A5A);
        int* chain = chains ? chain_buf.data() : nullptr;
        state[0] = 0;
        const long long slice_shift = 32 - __builtin_ctz((unsigned)slices);
        auto build = [&](long long slice) {
            launch(k.build, (unsigned)std::min(grid, (nbuild + threads - 1) / threads), threads, false,
                   (const K*)bk.data(), nbuild, table.data(), nb, shift, epoch, chain, state.data(), host, slice_shift,
                   slice, (const int*)nullptr);
        };
        if (nbuild && !(fused && n) && slices == 1) build(0);
        const unsigned pgrid = (unsigned)std::max(1LL, std::min(grid, (n + threads - 1) / threads));
        auto probe_slice = [&](long long cap, long long sshift, long long slice, long long publish) {
            launch(k.probe, pgrid, threads, false, (const K*)pk.data(), n, (const S*)table.data(), nb, shift, epoch,
                   (const int*)chain, (const K*)br.data(), (const K*)pr.data(), ob.data(), op.data(), cap, state.data(),
                   host, sshift, slice, publish, (const int*)nullptr);
        };
        auto probe = [&](long long cap) { probe_slice(cap, 32, 0, 1); };
        if (n && slices > 1) {
            for (int q = 0; q < slices; ++q) {
                if (nbuild) build(q);
                probe_slice(capacity, slice_shift, q, q == slices - 1);
                if (q < slices - 1 && state[6] != 0) return 7;  // each slice's lprobe leaves its ticket at zero
            }
        } else if (n && fused) {  // the whole grid at once (cooperative): its grid barrier needs every block resident
            launch(k.fused, (unsigned)grid, threads, true, (const K*)bk.data(), nbuild, (const K*)pk.data(), n,
                   table.data(), nb, shift, epoch, chain, (const K*)br.data(), (const K*)pr.data(), ob.data(),
                   op.data(), capacity, state.data(), host, bar_base, 2000000000LL);
            bar_base += grid;
        } else if (n) {
            probe(capacity);
        } else {
            host[0] = 0;
        }
        const long long total = state[0];
        if (host[0] != total || host[1] != state[1]) return 5;
        if (state[5] != 0 || state[6] != 0) return 6;  // the probe must leave its counter and ticket at zero
        if (int rc = finish_join(total, capacity, ob, op, guard, state, true, probe)) return rc;
    }
    return 0;
}

template <typename K>
struct PartKernels {
    void (*count)(const K*, long long, const K*, long long, long long, int*, int*, int*, long long*);
    void (*scatter)(const K*, const K*, long long, const K*, const K*, long long, long long, int*, K*, K*, K*, K*);
    void (*join)(const int*, long long, const K*, const K*, const K*, const K*, K*, K*, long long, long long*,
                 long long*);
};

// schemes 4-5 (partitioned): pcount, pscatter, pjoin over at most `grid` blocks each (grid-stride loops), the
// counts, starts, cursors, partitioned buffers and state reused across joins as hash_cuda.py reuses its workspace;
// pjoin again exact-size when the total exceeds the speculative capacity. After each join the counts, the tickets
// and the pair counter must be back at zero, every partition's write cursor must have reached its end, and pjoin's
// work items must be numbered as the two sides' starts say.
template <typename K>
int run_partitioned(int joins, bool hide_last, PartKernels<K> k) {
    const unsigned threads = JOIN_THREADS;
    const long long tile = TILE;
    std::vector<long long> state(8, 0);
    std::vector<int> counts(2 * PART_MAX, 0), starts(3 * PART_MAX + 3, -1);
    std::vector<int> cursors(2 * PART_MAX * PART_PAD, -1);
    std::vector<K> bpk, bpr, ppk, ppr;
    std::vector<Slot<K>> unused;
    for (int q = 0; q < joins; ++q) {
        JoinInput<K> in;
        if (!read_join(in, unused)) return 4;
        auto& [nbuild, n, pbits, shift, epoch, clear, capacity, grid, bk, br, pk, pr] = in;
        if (pbits < 0 || pbits > JOIN_PART_BITS_MAX) return 3;
        const long long nparts = 1LL << pbits;
        long long host[2] = {-7, 0};
        const K guard = (K)0x5A5A5A5A;
        std::vector<K> ob(capacity + 16, guard), op(capacity + 16, guard);
        bpk.assign(nbuild, guard), bpr.assign(nbuild, guard), ppk.assign(n, guard), ppr.assign(n, guard);
        state[0] = 0;
        auto join = [&](long long cap) {
            const long long items = nparts + (n + JOIN_PART_PROBE - 1) / JOIN_PART_PROBE;  // >= pjoin's work items
            launch(k.join, (unsigned)std::min(grid, items), threads, false, (const int*)starts.data(), pbits,
                   (const K*)bpk.data(), (const K*)bpr.data(), (const K*)ppk.data(), (const K*)ppr.data(), ob.data(),
                   op.data(), cap, state.data(), host);
        };
        if (n) {  // the host returns before any launch when the probe side is empty
            const long long rows = std::max(nbuild, n), chunks = (nbuild + tile - 1) / tile + (n + tile - 1) / tile;
            launch(k.count, (unsigned)std::max(1LL, std::min(grid, (rows + tile - 1) / tile)), threads, false,
                   (const K*)bk.data(), nbuild, (const K*)pk.data(), n, pbits, counts.data(), starts.data(),
                   cursors.data(), state.data());
            launch(k.scatter, (unsigned)std::max(1LL, std::min(grid, chunks)), threads, false, (const K*)bk.data(),
                   (const K*)br.data(), nbuild, (const K*)pk.data(), (const K*)pr.data(), n, pbits, cursors.data(),
                   bpk.data(), bpr.data(), ppk.data(), ppr.data());
            for (int side = 0; side < 2; ++side)
                for (long long p = 0; p < nparts; ++p)
                    if (cursors[(side * nparts + p) * PART_PAD] != starts[side * (nparts + 1) + p + 1]) return 8;
            long long items = 0;  // pjoin's work items: numbered by pcount's last block after both sides' starts
            for (long long p = 0; p < nparts; ++p) {
                const long long probe = starts[nparts + 1 + p + 1] - starts[nparts + 1 + p];
                if (starts[2 * (nparts + 1) + p] != items) return 9;
                if (starts[p + 1] > starts[p]) items += (probe + JOIN_PART_PROBE - 1) / JOIN_PART_PROBE;
            }
            if (starts[2 * (nparts + 1) + nparts] != items) return 9;
            if (hide_last) starts[2 * nparts] = starts[2 * nparts + 1];
            join(capacity);
        } else {
            host[0] = 0;
        }
        const long long total = state[0];
        if (host[0] != total || host[1] != state[1]) return 5;
        if (state[5] != 0 || state[6] != 0 || state[PART_TICKET] != 0) return 6;
        if (std::any_of(counts.begin(), counts.end(), [](int c) { return c != 0; })) return 6;
        // a re-write is pjoin alone again, exact-size: the partitioned buffers are still there
        if (int rc = finish_join(total, capacity, ob, op, guard, state, true, join)) return rc;
    }
    return 0;
}

template <typename K>
int run(int scheme, int joins, Kernels<K> k) {
    using S = Slot<K>;
    const unsigned threads = JOIN_THREADS;
    std::vector<S> table;
    std::vector<long long> state(8, 0);
    long long bar_base = 0;
    for (int q = 0; q < joins; ++q) {
        JoinInput<K> in;
        if (!read_join(in, table)) return 4;
        auto& [nbuild, n, nb, shift, epoch, clear, capacity, grid, bk, br, pk, pr] = in;
        const long long ntiles = (n + TILE - 1) / TILE;
        std::vector<int> heads(std::max(n, 1LL));
        std::vector<long long> tcounts(std::max(ntiles * threads, 1LL)), totals(std::max(ntiles, 1LL)),
            offsets(std::max(ntiles, 1LL));
        long long host[2] = {-7, 0};
        const K guard = (K)0x5A5A5A5A;
        std::vector<K> ob(capacity + 16, guard), op(capacity + 16, guard);
        state[0] = 0;
        if (scheme == 1) {
            launch(k.fused, (unsigned)grid, threads, true, (const K*)bk.data(), nbuild,
                   (const K*)pk.data(), n, table.data(), nb, shift, epoch, heads.data(), tcounts.data(), totals.data(),
                   offsets.data(), (const K*)br.data(), (const K*)pr.data(), ob.data(), op.data(), capacity,
                   state.data(), host, bar_base, 2000000000LL);
            bar_base += 2 * grid;
        } else {
            if (nbuild)
                launch(k.build, (unsigned)std::min(grid, (nbuild + TILE - 1) / TILE), threads, false,
                       (const K*)bk.data(), nbuild, table.data(), nb, shift, epoch, state.data(), host);
            if (n) {
                launch(k.count, (unsigned)ntiles, threads, false, (const K*)pk.data(), n,
                       (const S*)table.data(), nb, shift, epoch, heads.data(), tcounts.data(), totals.data(),
                       offsets.data(), state.data(), host);
                launch(k.write, (unsigned)ntiles, threads, false, (const K*)pk.data(), n,
                       (const S*)table.data(), nb, shift, epoch, (const int*)heads.data(),
                       (const long long*)tcounts.data(), (const long long*)offsets.data(), (const K*)br.data(),
                       (const K*)pr.data(), ob.data(), op.data(), capacity);
            } else {
                host[0] = 0;
            }
        }
        const long long total = state[0];
        if (host[0] != total || host[1] != state[1]) return 5;  // the pinned host words must carry total and error
        auto write = [&](long long cap) {  // the write kernel publishes no total
            launch(k.write, (unsigned)ntiles, threads, false, (const K*)pk.data(), n, (const S*)table.data(), nb, shift,
                   epoch, (const int*)heads.data(), (const long long*)tcounts.data(),
                   (const long long*)offsets.data(), (const K*)br.data(), (const K*)pr.data(), ob.data(), op.data(),
                   cap);
        };
        if (int rc = finish_join(total, capacity, ob, op, guard, state, false, write)) return rc;
    }
    return 0;
}

#ifdef JOIN_EMULATED_LIB
// Test-only entry point (built with -shared -DJOIN_EMULATED_LIB): emu_launch("join_<kind>_<suffix>", grid, block,
// cooperative, args) runs one kernel with its arguments given as 8-byte words in the kernel's order, the way CuPy
// passes pointers and long longs, so hash_cuda.py's own launch code can drive the kernels on the CPU.
#include <functional>
#include <string>
#include <type_traits>
#include <utility>

template <typename T>
T from_word(long long w) {
    if constexpr (std::is_pointer_v<T>)
        return reinterpret_cast<T>(w);
    else
        return (T)w;
}

template <typename... P, size_t... I>
void launch_words(void (*kernel)(P...), unsigned grid, bool cooperative, const long long* a,
                  std::index_sequence<I...>) {
    launch(kernel, grid, JOIN_THREADS, cooperative, from_word<P>(a[I])...);
}

using WordKernel = std::function<void(unsigned, bool, const long long*)>;

template <typename... P>
std::pair<std::string, WordKernel> entry(const char* name, void (*kernel)(P...)) {
    return {name, [kernel](unsigned grid, bool coop, const long long* a) {
                launch_words(kernel, grid, coop, a, std::index_sequence_for<P...>{});
            }};
}

#define ENTRY(k) entry(#k, k)
#define ROW_ENTRIES(SUF)                                                                                           \
    ENTRY(join_write_##SUF), ENTRY(join_fused_##SUF), ENTRY(join_lprobe_##SUF), ENTRY(join_lfused_##SUF),        \
        ENTRY(join_pscatter_##SUF), ENTRY(join_pjoin_##SUF)

extern "C" int emu_launch(const char* name, unsigned grid, unsigned block, int cooperative, const long long* args) {
    static const std::map<std::string, WordKernel> kernels = {
        ENTRY(join_build_i32), ENTRY(join_count_i32), ENTRY(join_lbuild_i32), ENTRY(join_pcount_i32),
        ENTRY(join_build_i64), ENTRY(join_count_i64), ENTRY(join_lbuild_i64), ENTRY(join_pcount_i64),
        ROW_ENTRIES(i32_r32),  ROW_ENTRIES(i32_r64),  ROW_ENTRIES(i64_r32),   ROW_ENTRIES(i64_r64)};
    if (block != JOIN_THREADS) return 2;  // the block size is compiled in
    auto it = kernels.find(name);
    if (it == kernels.end()) return 3;
    it->second(grid, cooperative != 0, args);
    return 0;
}
#else
int main() {
    int wide, scheme, joins;
    if (std::scanf("%d %d %d", &wide, &scheme, &joins) != 3) return 2;
    if ((scheme == 4 || scheme == 5) && wide)
        return run_partitioned<long long>(joins, scheme == 5,
                                          {join_pcount_i64, join_pscatter_i64_r64, join_pjoin_i64_r64});
    if (scheme == 4 || scheme == 5)
        return run_partitioned<int>(joins, scheme == 5, {join_pcount_i32, join_pscatter_i32_r32, join_pjoin_i32_r32});
    const bool chains = scheme >= 7;  // schemes 7, 8, 9: schemes 2, 3, 6 with chains (int32 keys)
    if (chains) scheme = scheme == 9 ? 6 : scheme - 5;
    const int slices = scheme == 6 ? 4 : 1;
    if (scheme >= 2 && wide)
        return chains ? 8
                      : run_linear<long long>(joins, scheme == 3,
                                              {join_lbuild_i64, join_lprobe_i64_r64, join_lfused_i64_r64}, slices);
    if (scheme >= 2)
        return run_linear<int>(joins, scheme == 3, {join_lbuild_i32, join_lprobe_i32_r32, join_lfused_i32_r32},
                               slices, chains);
    if (wide)
        return run<long long>(scheme, joins, {join_build_i64, join_count_i64, join_write_i64_r64, join_fused_i64_r64});
    return run<int>(scheme, joins, {join_build_i32, join_count_i32, join_write_i32_r32, join_fused_i32_r32});
}
#endif
