// Hash join kernels in CUDA C++ (loaded through CuPy RawModule by hash_cuda.py; compiled in CI with
// `nvcc -arch=sm_90 -cubin`). The algorithm is hash_numba.py's, line for line, so the numba kernels are this
// file's CPU twin; only the block scan differs (warp shuffles here, shared-memory Hillis-Steele there).
//
// Table: capacity = 2^b slots, interleaved in one array of the key type: table[2s] = key (-1 = empty),
// table[2s+1] = head (last-inserted build position with that key, -1 = none); table[2*cap+1] heads the side list
// of build rows whose key is -1 itself. nxt[i] chains build positions of equal keys (-1 ends a chain).
//
//   build:  claim the key's slot with atomicCAS (linear probing from mix32(key) & mask), push row i with atomicExch.
//   count:  JOIN_ITEMS consecutive probe rows per thread: chain head -> heads[j], chain length summed per thread;
//           block sums; the last block to take a ticket scans them into exclusive offsets[] and offsets[nblocks].
//   write:  block-exclusive scan of the per-thread counts + offsets[block]; walk chains writing the row-id pairs
//           (only below `capacity`, so a speculative launch into a too-small buffer writes nothing out of bounds).

#ifndef JOIN_THREADS
#define JOIN_THREADS 256
#endif
#ifndef JOIN_ITEMS
#define JOIN_ITEMS 4
#endif
#define EMPTY_KEY (-1)
#define HASH_MUL 0x45D9F3BLL

__device__ __forceinline__ long long slot_of(long long k, long long mask, long long wide) {
    long long x = k;
    if (wide) x = x ^ (x >> 32);  // fold the high word of int64 keys
    x &= 0xFFFFFFFFLL;
    x = (((x >> 16) ^ x) * HASH_MUL) & 0xFFFFFFFFLL;
    x = (((x >> 16) ^ x) * HASH_MUL) & 0xFFFFFFFFLL;
    return ((x >> 16) ^ x) & mask;
}

__device__ __forceinline__ int atom_cas(int* p, int cmp, int val) { return atomicCAS(p, cmp, val); }
__device__ __forceinline__ long long atom_cas(long long* p, long long cmp, long long val) {
    return (long long)atomicCAS((unsigned long long*)p, (unsigned long long)cmp, (unsigned long long)val);
}
__device__ __forceinline__ int atom_exch(int* p, int v) { return atomicExch(p, v); }
__device__ __forceinline__ long long atom_exch(long long* p, long long v) {
    return (long long)atomicExch((unsigned long long*)p, (unsigned long long)v);
}

// One vector load fetches a slot's (key, head): 8 bytes for int32 keys, 16 for int64.
__device__ __forceinline__ void load_slot(const int* table, long long s, long long& key, long long& head) {
    const int2 v = reinterpret_cast<const int2*>(table)[s];
    key = v.x;
    head = v.y;
}
__device__ __forceinline__ void load_slot(const long long* table, long long s, long long& key, long long& head) {
    const longlong2 v = reinterpret_cast<const longlong2*>(table)[s];
    key = v.x;
    head = v.y;
}

template <typename K>
__device__ __forceinline__ long long find_head(K k, const K* table, long long mask, long long wide) {
    if (k == (K)EMPTY_KEY) return (long long)table[2 * (mask + 1) + 1];  // side list
    long long s = slot_of((long long)k, mask, wide);
    while (true) {
        long long kk, head;
        load_slot(table, s, kk, head);
        if (kk == (long long)k) return head;
        if (kk == EMPTY_KEY) return EMPTY_KEY;
        s = (s + 1) & mask;
    }
}

// Exclusive scan of v over the block (JOIN_THREADS threads); *total = the block's sum. Every thread must call it.
__device__ __forceinline__ long long block_exclusive_scan(long long v, long long* total) {
    __shared__ long long warp_sums[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    constexpr int nwarps = JOIN_THREADS / 32;
    long long x = v;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
        const long long y = __shfl_up_sync(0xffffffffu, x, d);
        if (lane >= d) x += y;
    }
    if (lane == 31) warp_sums[warp] = x;
    __syncthreads();
    if (warp == 0) {
        long long w = lane < nwarps ? warp_sums[lane] : 0;
#pragma unroll
        for (int d = 1; d < 32; d <<= 1) {
            const long long y = __shfl_up_sync(0xffffffffu, w, d);
            if (lane >= d) w += y;
        }
        if (lane < nwarps) warp_sums[lane] = w;
    }
    __syncthreads();
    const long long prefix = warp > 0 ? warp_sums[warp - 1] : 0;
    *total = warp_sums[nwarps - 1];
    __syncthreads();  // warp_sums is reused by the next call
    return prefix + x - v;
}

template <typename K>
__device__ void build_impl(const K* __restrict__ keys, long long n, K* table, K* __restrict__ nxt, long long mask,
                           long long wide) {
    const long long side = 2 * (mask + 1) + 1;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += stride) {
        const K k = keys[i];
        if (k == (K)EMPTY_KEY) {
            nxt[i] = atom_exch(&table[side], (K)i);
            continue;
        }
        long long s = slot_of((long long)k, mask, wide);
        while (true) {
            K cur = table[2 * s];  // a stale EMPTY only costs a CAS; a claimed key never changes
            if (cur == (K)EMPTY_KEY) cur = atom_cas(&table[2 * s], (K)EMPTY_KEY, k);
            if (cur == (K)EMPTY_KEY || cur == k) {
                nxt[i] = atom_exch(&table[2 * s + 1], (K)i);
                break;
            }
            s = (s + 1) & mask;
        }
    }
}

template <typename K>
__device__ void count_impl(const K* __restrict__ pkeys, long long n, const K* __restrict__ table,
                           const K* __restrict__ nxt, long long mask, long long wide, K* __restrict__ heads,
                           long long* __restrict__ thread_counts, long long* block_counts, long long* offsets,
                           unsigned int* done) {
    __shared__ int is_last;
    const long long g = blockIdx.x * (long long)JOIN_THREADS + threadIdx.x;
    long long c = 0;
#pragma unroll
    for (int r = 0; r < JOIN_ITEMS; ++r) {
        const long long j = g * JOIN_ITEMS + r;
        if (j < n) {
            long long h = find_head(pkeys[j], table, mask, wide);
            heads[j] = (K)h;
            while (h != EMPTY_KEY) {
                ++c;
                h = nxt[h];
            }
        }
    }
    thread_counts[g] = c;
    long long total;
    block_exclusive_scan(c, &total);
    if (threadIdx.x == 0) {
        block_counts[blockIdx.x] = total;
        __threadfence();  // publish this block's sum before taking a ticket
        is_last = atomicAdd(done, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!is_last) return;  // uniform per block
    __threadfence();
    const long long nblocks = gridDim.x;
    const long long chunk = (nblocks + JOIN_THREADS - 1) / JOIN_THREADS;
    const long long lo = min((long long)threadIdx.x * chunk, nblocks), hi = min(lo + chunk, nblocks);
    long long s = 0;
    for (long long i = lo; i < hi; ++i) s += __ldcg(&block_counts[i]);  // L2: written by other SMs
    long long grand;
    long long run = block_exclusive_scan(s, &grand);
    for (long long i = lo; i < hi; ++i) {
        offsets[i] = run;
        run += __ldcg(&block_counts[i]);
    }
    if (threadIdx.x == 0) {
        offsets[nblocks] = grand;
        *done = 0;  // ready for the next launch
    }
}

template <typename K, typename R>
__device__ void write_impl(const K* __restrict__ heads, long long n, const K* __restrict__ nxt,
                           const long long* __restrict__ thread_counts, const long long* __restrict__ offsets,
                           const R* __restrict__ brows, const R* __restrict__ prows, R* __restrict__ out_b,
                           R* __restrict__ out_p, long long capacity) {
    const long long g = blockIdx.x * (long long)JOIN_THREADS + threadIdx.x;
    long long total;
    long long o = offsets[blockIdx.x] + block_exclusive_scan(thread_counts[g], &total);
#pragma unroll
    for (int r = 0; r < JOIN_ITEMS; ++r) {
        const long long j = g * JOIN_ITEMS + r;
        if (j < n) {
            long long h = heads[j];
            const R pj = prows[j];
            while (h != EMPTY_KEY) {
                if (o < capacity) {
                    out_b[o] = brows[h];
                    out_p[o] = pj;
                }
                ++o;
                h = nxt[h];
            }
        }
    }
}

#define JOIN_KEY_KERNELS(K, SUF)                                                                             \
    extern "C" __global__ void __launch_bounds__(JOIN_THREADS)                                              \
        hash_build_cu_##SUF(const K* keys, long long n, K* table, K* nxt, long long mask, long long wide) { \
        build_impl<K>(keys, n, table, nxt, mask, wide);                                                      \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(JOIN_THREADS)                                              \
        hash_count_cu_##SUF(const K* pkeys, long long n, const K* table, const K* nxt, long long mask,     \
                            long long wide, K* heads, long long* thread_counts, long long* block_counts,   \
                            long long* offsets, unsigned int* done) {                                        \
        count_impl<K>(pkeys, n, table, nxt, mask, wide, heads, thread_counts, block_counts, offsets, done); \
    }

#define JOIN_WRITE_KERNEL(K, R, SUF)                                                                         \
    extern "C" __global__ void __launch_bounds__(JOIN_THREADS)                                              \
        hash_write_cu_##SUF(const K* heads, long long n, const K* nxt, const long long* thread_counts,     \
                            const long long* offsets, const R* brows, const R* prows, R* out_b, R* out_p,  \
                            long long capacity) {                                                            \
        write_impl<K, R>(heads, n, nxt, thread_counts, offsets, brows, prows, out_b, out_p, capacity);     \
    }

JOIN_KEY_KERNELS(int, i32)
JOIN_KEY_KERNELS(long long, i64)
JOIN_WRITE_KERNEL(int, int, i32_r32)
JOIN_WRITE_KERNEL(int, long long, i32_r64)
JOIN_WRITE_KERNEL(long long, int, i64_r32)
JOIN_WRITE_KERNEL(long long, long long, i64_r64)
