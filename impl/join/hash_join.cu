// Hash join kernels in CUDA C++ (loaded through CuPy RawModule by hash_cuda.py; compiled in CI with
// `nvcc -arch=sm_90 -cubin`, and run on the CPU under hash_join_emulated.cpp). hash_numba.py is the same algorithm in
// numba-cuda (its CPU twin); the tests hold all of them to pandas.merge.
//
// Table: B buckets (B prime) of BUCKET_BYTES bytes, each SLOTS slots {key, tag}; every build row owns one slot
// (duplicate keys too: a multiset, no chains, no key sentinel). tag = epoch << shift | build position; a slot is
// empty iff its tag's epoch field differs from the join's epoch, so a new join needs no clear (the host clears only
// when the epoch field wraps). Bucket sequence of a key: b0 = hash * B >> 32, then + step (mod B), step = 1 + mix(hash)
// % (B - 1) (double hashing: a prime B makes every step visit every bucket).
// Slots of a bucket are taken in order (a thread passes slot s only after seeing it taken) and a taken slot stays
// taken, so a probe stops at the first empty slot: the common case reads one bucket (one 32-byte sector).
//
//   build:  per row: first bucket with an empty slot along its sequence; CAS the slot's tag, then store the key.
//   count:  tiles of TILE = JOIN_THREADS * JOIN_ITEMS probe rows, row r*THREADS + t of a tile on thread t; every
//           thread issues its JOIN_ITEMS first-bucket loads before inspecting any (probes in flight). Per row:
//           head = -1 (no match) / the build position (one match) / -2 (several: the write re-walks). Thread counts
//           -> tile totals; the last block to finish scans them into tile offsets and publishes the total.
//   write:  block scan of the thread counts + the tile's offset; pairs staged in shared memory a window of TILE pairs
//           at a time and copied out coalesced; pairs at offsets >= capacity are not written (speculative buffers).
//   fused:  one cooperative (all blocks resident) kernel: build | grid barrier | count | grid barrier whose last
//           arriver scans the tile totals | write. When every block has at most one tile, heads and counts stay in
//           registers across the barriers.
//   linear64: lbuild / lprobe near the end of this file (linear probing; int32 keys: packed 64-bit slots).
//   partitioned: pcount / pscatter / pjoin after them (radix partitions, a shared-memory table per partition).

#ifndef JOIN_THREADS
#define JOIN_THREADS 256
#endif
#ifndef JOIN_ITEMS
#define JOIN_ITEMS 8
#endif
#ifndef BUCKET_BYTES
#define BUCKET_BYTES 32
#endif
#ifndef JOIN_SHARED  // the CPU emulation gives every block its own copy
#define JOIN_SHARED(T, name, n) __shared__ T name[n]
#endif

#ifndef JOIN_MIN_BLOCKS
#define JOIN_MIN_BLOCKS 1
#endif

// linear64 kernels: rows per thread per grid-stride step (all their key loads, then all their first-bucket loads, are
// issued before any is used; the build then issues all its CASes before checking any).
#ifndef JOIN_LROWS
#define JOIN_LROWS 1
#endif
#define LSTEP (JOIN_THREADS * JOIN_LROWS)

// JOIN_CHAINS=1 compiles the linear64 kernels' chains (see linear64 below; they run where the host passes a chain
// array); 0 compiles them out, so the kernels without chains keep their registers (28 for lbuild instead of 38).
#ifndef JOIN_CHAINS
#define JOIN_CHAINS 0
#endif

// JOIN_RECONVERGE=1: every lane of a warp meets (__syncwarp) before each of its JOIN_ITEMS rows of a build or count,
// so lanes whose row needed more buckets or CAS retries do not leave the warp split across rows. Every lane reaches
// the same number of these points (rows past n included), as __syncwarp with a full mask requires.
#ifndef JOIN_RECONVERGE
#define JOIN_RECONVERGE 0
#endif
#if JOIN_RECONVERGE
#define ROW_RECONVERGE() __syncwarp()
#else
#define ROW_RECONVERGE() ((void)0)
#endif

#define TILE (JOIN_THREADS * JOIN_ITEMS)
#define HASH_MUL 0x45D9F3Bu
#define STEP_SALT 0x9E3779B9u
#define HEAD_NONE (-1)
#define HEAD_MANY (-2)
#define ERR_BARRIER_TIMEOUT 1
#define ERR_TABLE_FULL 2

typedef unsigned long long u64;

template <typename K>
struct Slot;
template <>
struct __align__(8) Slot<int> {
    int key;
    unsigned tag;
};
template <>
struct __align__(16) Slot<long long> {
    long long key;
    unsigned tag;
    unsigned pad;
};

template <typename K>
struct Bucket {
    static constexpr int SLOTS = BUCKET_BYTES / sizeof(Slot<K>);
    union {
        uint4 v[BUCKET_BYTES / 16];
        Slot<K> s[SLOTS];
    };
};

// ---- hashing (the arithmetic of common.hash_keys / bucket_of / step_of) --------------------------------------------

__device__ __forceinline__ unsigned mix32(unsigned x) {
    x = ((x >> 16) ^ x) * HASH_MUL;
    x = ((x >> 16) ^ x) * HASH_MUL;
    return (x >> 16) ^ x;
}
__device__ __forceinline__ unsigned fold(int k) { return (unsigned)k; }
__device__ __forceinline__ unsigned fold(long long k) { return (unsigned)(k ^ (k >> 32)); }
__device__ __forceinline__ long long first_bucket(unsigned h, long long nb) {
    return (long long)(((u64)h * (u64)nb) >> 32);
}
__device__ __forceinline__ long long bucket_step(unsigned h, long long nb) {
    return 1 + (long long)(mix32(h ^ STEP_SALT) % (unsigned)(nb - 1));
}
__device__ __forceinline__ long long next_bucket(long long b, long long step, long long nb) {
    b += step;
    return b >= nb ? b - nb : b;
}
__device__ __forceinline__ bool is_live(unsigned tag, unsigned shift, unsigned epoch) {
    return (tag >> shift) == epoch;
}

template <typename K>
__device__ __forceinline__ Bucket<K> load_bucket(const Slot<K>* table, long long b) {
    Bucket<K> bk;
    const uint4* p = reinterpret_cast<const uint4*>(table + b * Bucket<K>::SLOTS);
#pragma unroll
    for (int v = 0; v < BUCKET_BYTES / 16; ++v) bk.v[v] = __ldcg(p + v);  // L2: the table changes during the build
    return bk;
}

// The same for a table no thread writes during the launch (the probe): through L1, so hot keys hit there.
template <typename K>
__device__ __forceinline__ Bucket<K> load_bucket_ro(const Slot<K>* table, long long b) {
    Bucket<K> bk;
    const uint4* p = reinterpret_cast<const uint4*>(table + b * Bucket<K>::SLOTS);
#pragma unroll
    for (int v = 0; v < BUCKET_BYTES / 16; ++v) bk.v[v] = __ldg(p + v);
    return bk;
}

// Record an error code on the device and, when the host passed a pinned word pair, in host[1] (read after the sync).
__device__ __forceinline__ void set_error(long long* state, long long* host, long long code) {
    atomicExch((u64*)&state[1], (u64)code);
    if (host) {
        host[1] = code;
        __threadfence_system();  // the host reads the error once it sees the total, which the last block writes later
    }
}

// ---- block-wide scan and the tile-offset scan ------------------------------------------------------------------

// Exclusive scan of v over the block (JOIN_THREADS threads); *total = the block's sum. Every thread must call it.
__device__ __forceinline__ long long block_exclusive_scan(long long v, long long* total) {
    JOIN_SHARED(long long, warp_sums, 32);
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

// Whether this block is the last of the launch to get here: every thread's earlier global writes and atomics are
// made visible, then one ticket a block on *ticket; the last block leaves the ticket at zero for the next launch.
// Every thread of the block calls it.
__device__ bool last_block(long long* ticket) {
    JOIN_SHARED(int, is_last, 1);
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) is_last[0] = atomicAdd((u64*)ticket, 1ull) == (u64)gridDim.x - 1;
    __syncthreads();
    if (!is_last[0]) return false;  // uniform per block
    __threadfence();
    if (threadIdx.x == 0) *ticket = 0;
    return true;
}

// One block: the exclusive prefix sums of value(i) over i = 0..n-1, each passed to write(i, prefix) (value(i) is
// read before write(i, .) runs); returns the total. A thread takes a run of consecutive i. Every thread of the block
// calls it.
template <typename V, typename W>
__device__ long long block_scan_runs(long long n, V value, W write) {
    const long long chunk = (n + JOIN_THREADS - 1) / JOIN_THREADS;
    const long long lo = min((long long)threadIdx.x * chunk, n), hi = min(lo + chunk, n);
    long long s = 0;
    for (long long i = lo; i < hi; ++i) s += value(i);
    long long total;
    long long run = block_exclusive_scan(s, &total);
    for (long long i = lo; i < hi; ++i) {
        const long long v = value(i);
        write(i, run);
        run += v;
    }
    return total;
}

// One block scans the tile totals into exclusive offsets and publishes the grand total (state[0], and host[0] when a
// pinned host word is given). Tile totals were written by other blocks: read through L2.
__device__ void scan_tiles(const long long* tile_totals, long long ntiles, long long* tile_offsets, long long* state,
                           long long* host) {
    const long long grand = block_scan_runs(
        ntiles, [&](long long i) { return __ldcg(&tile_totals[i]); },
        [&](long long i, long long run) { tile_offsets[i] = run; });
    if (threadIdx.x == 0) {
        state[0] = grand;
        if (host) host[0] = grand;
    }
}

// ---- build ---------------------------------------------------------------------------------------------------------

// Rows base + r * THREADS + t (r < JOIN_ITEMS): all first-bucket loads are issued before the first CAS.
template <typename K>
__device__ void build_chunk(const K* __restrict__ keys, long long n, long long base, Slot<K>* table, long long nb,
                            unsigned shift, unsigned epoch, long long* state, long long* host) {
    constexpr int SLOTS = Bucket<K>::SLOTS;
    K key[JOIN_ITEMS];
    Bucket<K> bk[JOIN_ITEMS];
#pragma unroll
    for (int r = 0; r < JOIN_ITEMS; ++r) {
        const long long i = base + r * JOIN_THREADS + threadIdx.x;
        key[r] = i < n ? keys[i] : (K)0;
    }
#pragma unroll
    for (int r = 0; r < JOIN_ITEMS; ++r) {
        const long long i = base + r * JOIN_THREADS + threadIdx.x;
        if (i < n) bk[r] = load_bucket(table, first_bucket(mix32(fold(key[r])), nb));
    }
#pragma unroll
    for (int r = 0; r < JOIN_ITEMS; ++r) {
        ROW_RECONVERGE();
        const long long i = base + r * JOIN_THREADS + threadIdx.x;
        if (i >= n) continue;
        const unsigned mine = (epoch << shift) | (unsigned)i, h = mix32(fold(key[r]));
        long long b = first_bucket(h, nb), step = 0;
        bool placed = false;
        for (long long tries = 0; tries < nb && !placed; ++tries) {
            if (tries) bk[r] = load_bucket(table, b);
            for (int s = 0; s < SLOTS && !placed; ++s) {
                unsigned t = bk[r].s[s].tag;
                while (!is_live(t, shift, epoch)) {
                    Slot<K>* slot = table + b * SLOTS + s;
                    const unsigned old = atomicCAS(&slot->tag, t, mine);
                    if (old == t) {
                        slot->key = key[r];
                        placed = true;
                        break;
                    }
                    t = old;
                }
            }
            if (!placed) {
                if (!step) step = bucket_step(h, nb);
                b = next_bucket(b, step, nb);
            }
        }
        if (!placed) set_error(state, host, ERR_TABLE_FULL);  // cannot happen: B * SLOTS > n
    }
}

// ---- count ---------------------------------------------------------------------------------------------------------

// Matches of k in one bucket: count them, remember the first one's build position; true when the bucket is full
// (the key's sequence goes on).
template <typename K>
__device__ __forceinline__ bool scan_bucket(const Bucket<K>& bk, K k, unsigned shift, unsigned epoch, long long& cnt,
                                            int& first) {
#pragma unroll
    for (int s = 0; s < Bucket<K>::SLOTS; ++s) {
        const unsigned t = bk.s[s].tag;
        if (!is_live(t, shift, epoch)) return false;
        if (bk.s[s].key == k) {
            if (cnt == 0) first = (int)(t & ((1u << shift) - 1u));
            ++cnt;
        }
    }
    return true;
}

// Count the matches of one tile's rows: hd[r] = head of row r (see the file comment), *c = this thread's matches;
// returns the tile's total (every thread of the block calls it).
template <typename K>
__device__ long long count_tile(const K* __restrict__ pkeys, long long n, long long tile, const Slot<K>* table,
                                long long nb, unsigned shift, unsigned epoch, int (&hd)[JOIN_ITEMS], long long* c) {
    const long long base = tile * TILE;
    K key[JOIN_ITEMS];
    Bucket<K> bk[JOIN_ITEMS];
#pragma unroll
    for (int r = 0; r < JOIN_ITEMS; ++r) {
        const long long j = base + r * JOIN_THREADS + threadIdx.x;
        key[r] = j < n ? pkeys[j] : (K)0;
    }
#pragma unroll
    for (int r = 0; r < JOIN_ITEMS; ++r) {
        const long long j = base + r * JOIN_THREADS + threadIdx.x;
        if (j < n) bk[r] = load_bucket(table, first_bucket(mix32(fold(key[r])), nb));
    }
    long long mine = 0;
#pragma unroll
    for (int r = 0; r < JOIN_ITEMS; ++r) {
        ROW_RECONVERGE();
        const long long j = base + r * JOIN_THREADS + threadIdx.x;
        hd[r] = HEAD_NONE;
        if (j >= n) continue;
        long long cnt = 0;
        int first = HEAD_NONE;
        if (scan_bucket(bk[r], key[r], shift, epoch, cnt, first)) {  // full: the key's sequence goes on
            const unsigned h = mix32(fold(key[r]));
            const long long step = bucket_step(h, nb);
            long long b = first_bucket(h, nb);
            bool full = true;
            for (long long tries = 1; full && tries < nb; ++tries) {
                b = next_bucket(b, step, nb);
                full = scan_bucket(load_bucket(table, b), key[r], shift, epoch, cnt, first);
            }
        }
        hd[r] = cnt == 0 ? HEAD_NONE : cnt == 1 ? first : HEAD_MANY;
        mine += cnt;
    }
    *c = mine;
    long long total;
    block_exclusive_scan(mine, &total);
    return total;
}

// ---- write ---------------------------------------------------------------------------------------------------------

template <typename R>
__device__ __forceinline__ R row_id(const R* rows, long long i) { return rows ? rows[i] : (R)i; }

// Write one tile's pairs: thread counts c (scanned here) + the tile's offset give each pair's place; pairs go through
// shared memory a window of TILE pairs at a time and out in coalesced runs; places >= capacity are skipped.
template <typename K, typename R>
__device__ void write_tile(const K* __restrict__ pkeys, long long n, long long tile, long long tile_offset,
                           const Slot<K>* table, long long nb, unsigned shift, unsigned epoch,
                           const int (&hd)[JOIN_ITEMS], long long c, const R* __restrict__ brows,
                           const R* __restrict__ prows, R* __restrict__ out_b, R* __restrict__ out_p,
                           long long capacity) {
    JOIN_SHARED(R, stage_b, TILE);
    JOIN_SHARED(R, stage_p, TILE);
    const long long base = tile * TILE;
    long long tile_total;
    const long long excl = block_exclusive_scan(c, &tile_total);
    if (tile_offset >= capacity) return;  // uniform over the block
    for (long long w = 0; w < tile_total; w += TILE) {
        if (excl < w + TILE && excl + c > w) {  // this thread has pairs in the window
            long long o = excl;
#pragma unroll
            for (int r = 0; r < JOIN_ITEMS; ++r) {
                const long long j = base + r * JOIN_THREADS + threadIdx.x;
                if (o >= w + TILE) break;  // the rest of this thread's pairs fall in later windows
                if (hd[r] == HEAD_NONE) continue;
                const R pj = row_id(prows, j);
                if (hd[r] >= 0) {
                    if (o >= w && o < w + TILE) {
                        stage_b[o - w] = row_id(brows, hd[r]);
                        stage_p[o - w] = pj;
                    }
                    ++o;
                    continue;
                }
                const K k = pkeys[j];  // several matches: walk the key's buckets again
                const unsigned h = mix32(fold(k));
                long long b = first_bucket(h, nb), step = 0;
                for (long long tries = 0; tries < nb; ++tries) {
                    const Bucket<K> bk = load_bucket(table, b);
                    bool full = true;
#pragma unroll
                    for (int s = 0; s < Bucket<K>::SLOTS; ++s) {
                        const unsigned t = bk.s[s].tag;
                        if (!is_live(t, shift, epoch)) {
                            full = false;
                            break;
                        }
                        if (bk.s[s].key == k) {
                            if (o >= w && o < w + TILE) {
                                stage_b[o - w] = row_id(brows, (long long)(t & ((1u << shift) - 1u)));
                                stage_p[o - w] = pj;
                            }
                            ++o;
                        }
                    }
                    if (!full || o >= w + TILE) break;
                    if (!step) step = bucket_step(h, nb);
                    b = next_bucket(b, step, nb);
                }
            }
        }
        __syncthreads();
        const long long m = min((long long)TILE, tile_total - w);
        for (long long i = threadIdx.x; i < m; i += JOIN_THREADS) {
            const long long at = tile_offset + w + i;
            if (at < capacity) {
                out_b[at] = stage_b[i];
                out_p[at] = stage_p[i];
            }
        }
        __syncthreads();
    }
}

// ---- grid barrier (fused kernel only: all blocks are resident under a cooperative launch) -------------------------

#ifndef JOIN_EMULATED
__device__ __forceinline__ u64 load_acquire(const u64* p) {
    u64 v;
    asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ u64 now_ns() {
    u64 t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
__device__ __forceinline__ void pause_ns() { __nanosleep(64); }
#endif

// Arrive at barrier `target` (bar[0] counts arrivals, monotonic over launches: the host passes each launch's base).
// Returns true in the block that arrived last; that block must call release_barrier after its extra work. Every other
// block waits here until released, or until timeout_ns passes (then the error flag is set and false is returned).
__device__ bool arrive_barrier(u64* bar, u64 target, long long timeout_ns, long long* state, long long* host) {
    JOIN_SHARED(int, last, 1);
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();  // publish this block's writes before arriving
        last[0] = atomicAdd(&bar[0], 1ull) + 1 == target;
        if (!last[0]) {
            const u64 start = now_ns();
            while (load_acquire(&bar[1]) < target) {
                if (now_ns() - start > (u64)timeout_ns) {
                    set_error(state, host, ERR_BARRIER_TIMEOUT);
                    break;
                }
                pause_ns();
            }
            __threadfence();
        }
    }
    __syncthreads();
    return last[0];
}

__device__ void release_barrier(u64* bar, u64 target) {
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        atomicExch(&bar[1], target);
    }
}

// ---- kernels -------------------------------------------------------------------------------------------------------

template <typename K>
__device__ void build_kernel(const K* keys, long long n, Slot<K>* table, long long nb, long long shift,
                             long long epoch, long long* state, long long* host) {
    for (long long base = (long long)blockIdx.x * TILE; base < n; base += (long long)gridDim.x * TILE)
        build_chunk(keys, n, base, table, nb, (unsigned)shift, (unsigned)epoch, state, host);
}

template <typename K>
__device__ void count_kernel(const K* pkeys, long long n, const Slot<K>* table, long long nb, long long shift,
                             long long epoch, int* heads, long long* tcounts, long long* tile_totals,
                             long long* tile_offsets, long long* state, long long* host) {
    const long long tile = blockIdx.x;
    int hd[JOIN_ITEMS];
    long long c;
    const long long total = count_tile(pkeys, n, tile, table, nb, (unsigned)shift, (unsigned)epoch, hd, &c);
#pragma unroll
    for (int r = 0; r < JOIN_ITEMS; ++r) {
        const long long j = tile * TILE + r * JOIN_THREADS + threadIdx.x;
        if (j < n) heads[j] = hd[r];
    }
    tcounts[tile * JOIN_THREADS + threadIdx.x] = c;
    if (threadIdx.x == 0) tile_totals[tile] = total;
    if (!last_block(&state[4])) return;  // uniform per block: the last one scans every tile's total
    scan_tiles(tile_totals, gridDim.x, tile_offsets, state, host);
}

template <typename K, typename R>
__device__ void write_kernel(const K* pkeys, long long n, const Slot<K>* table, long long nb, long long shift,
                             long long epoch, const int* heads, const long long* tcounts,
                             const long long* tile_offsets, const R* brows, const R* prows, R* out_b, R* out_p,
                             long long capacity) {
    const long long tile = blockIdx.x;
    int hd[JOIN_ITEMS];
#pragma unroll
    for (int r = 0; r < JOIN_ITEMS; ++r) {
        const long long j = tile * TILE + r * JOIN_THREADS + threadIdx.x;
        hd[r] = j < n ? heads[j] : HEAD_NONE;
    }
    write_tile(pkeys, n, tile, tile_offsets[tile], table, nb, (unsigned)shift, (unsigned)epoch, hd,
               tcounts[tile * JOIN_THREADS + threadIdx.x], brows, prows, out_b, out_p, capacity);
}

// The whole join in one launch; grid = resident blocks (cooperative launch). bar_base = bar[0] before this launch.
// With total > capacity the write phase is skipped and heads/counts are left in memory for the host's exact-size
// write_kernel launch.
template <typename K, typename R>
__device__ void fused_kernel(const K* bkeys, long long nbuild, const K* pkeys, long long n, Slot<K>* table,
                             long long nb, long long shift, long long epoch, int* heads, long long* tcounts,
                             long long* tile_totals, long long* tile_offsets, const R* brows, const R* prows,
                             R* out_b, R* out_p, long long capacity, long long* state, long long* host,
                             long long bar_base, long long timeout_ns) {
    u64* bar = (u64*)&state[2];
    const u64 grid = gridDim.x;
    const unsigned sh = (unsigned)shift, ep = (unsigned)epoch;
    for (long long base = (long long)blockIdx.x * TILE; base < nbuild; base += (long long)grid * TILE)
        build_chunk(bkeys, nbuild, base, table, nb, sh, ep, state, host);
    if (arrive_barrier(bar, (u64)bar_base + grid, timeout_ns, state, host)) release_barrier(bar, (u64)bar_base + grid);
    const long long ntiles = (n + TILE - 1) / TILE;
    const bool in_regs = ntiles <= (long long)grid;  // at most one tile per block: heads stay in registers
    int hd[JOIN_ITEMS];
    long long c = 0;
    for (long long tile = blockIdx.x; tile < ntiles; tile += grid) {
        const long long total = count_tile(pkeys, n, tile, table, nb, sh, ep, hd, &c);
        if (!in_regs) {
#pragma unroll
            for (int r = 0; r < JOIN_ITEMS; ++r) {
                const long long j = tile * TILE + r * JOIN_THREADS + threadIdx.x;
                if (j < n) heads[j] = hd[r];
            }
            tcounts[tile * JOIN_THREADS + threadIdx.x] = c;
        }
        if (threadIdx.x == 0) tile_totals[tile] = total;
    }
    const u64 second = (u64)bar_base + 2 * grid;
    if (arrive_barrier(bar, second, timeout_ns, state, host)) {
        scan_tiles(tile_totals, ntiles, tile_offsets, state, host);
        release_barrier(bar, second);
    }
    if (__ldcg(&state[1]) != 0) return;
    if (__ldcg(&state[0]) > capacity) {  // the host re-runs write_kernel exact-size: it needs heads and counts
        if (in_regs && (long long)blockIdx.x < ntiles) {
#pragma unroll
            for (int r = 0; r < JOIN_ITEMS; ++r) {
                const long long j = blockIdx.x * (long long)TILE + r * JOIN_THREADS + threadIdx.x;
                if (j < n) heads[j] = hd[r];
            }
            tcounts[blockIdx.x * (long long)JOIN_THREADS + threadIdx.x] = c;
        }
        return;
    }
    for (long long tile = blockIdx.x; tile < ntiles; tile += grid) {
        if (!in_regs) {
#pragma unroll
            for (int r = 0; r < JOIN_ITEMS; ++r) {
                const long long j = tile * TILE + r * JOIN_THREADS + threadIdx.x;
                hd[r] = j < n ? heads[j] : HEAD_NONE;
            }
            c = tcounts[tile * JOIN_THREADS + threadIdx.x];
        }
        write_tile(pkeys, n, tile, __ldcg(&tile_offsets[tile]), table, nb, sh, ep, hd, c, brows, prows, out_b,
                   out_p, capacity);
    }
}

// ---- linear64: linear probing, one row per thread (int32 keys: packed 64-bit slots; int64 keys: 16-byte slots) ----
//
// The same table memory as above (int32 keys: 8-byte slots {key, tag}, int64 keys: 16-byte slots {key, tag, pad};
// SLOTS = BUCKET_BYTES / slot per bucket, the same epoch tags, so a slot is empty iff its tag's epoch field is not the
// join's: every key, -1, 0 and the dtype's MIN/MAX included, is an ordinary key), but a key's sequence is linear: the
// slots of its first bucket in order, then the next bucket (b + 1 mod B). An int32 slot is ONE 64-bit word (key in
// the low half, tag in the high half) written by ONE atomicCAS; an int64 slot is claimed by a CAS of its tag word and
// its key stored right after: builders look at tags only, and the probe runs after the build's launch (or grid
// barrier) ends, so no reader sees a claimed slot without its key. Slots are taken in order and never freed, so every
// slot before a key's slot in its sequence is taken and a probe stops at the first empty slot (duplicates: it walks
// the whole cluster and sees every copy).
//   lbuild: grid-stride loop, JOIN_LROWS rows per thread per step: load the first buckets (one sector each), CAS
//           each row's first empty slot; a row whose CAS lost (or whose first bucket was full) walks its sequence,
//           re-testing a slot it lost only against the CAS's returned word.
//   lprobe: grid-stride loop, JOIN_LROWS rows per thread per step: count each row's matches (first one remembered);
//           the block reserves the pairs of its rows with one atomicAdd on state[5] (within a warp per row: ballot +
//           popc when no lane has more than one match, a shuffle scan otherwise; warps in order) and writes them at
//           once (pairs at offsets >= capacity are dropped; capacity 0 = count only); the last block to finish
//           publishes the total (state[0], host[0]) and resets the counter.
//   slices: either kernel may take only the rows of one of the join's 2^(32 - slice_shift) table slices: the
//           rows whose hash h has h >> slice_shift == slice, whose first buckets (h * B >> 32, monotone in h) fill
//           the slice-th 1/slices of the table. The host runs lbuild and lprobe slice by slice, so each pair of
//           launches works on one slice that stays in L2 while the keys stream past it (loaded evict-first); lprobe
//           publishes the total only on the last slice (the counter goes on across slices, the ticket is reset by
//           each). slice_shift 32 takes every row. With `bounds` (both sides partitioned by slice first: pcount and
//           pscatter below), a launch takes rows bounds[slice] .. bounds[slice + 1] - 1 only, all of that slice.
//   chains: with a `chain` array (int32 keys only; else nullptr), duplicate build keys share ONE slot, the head of
//           a list of their rows: the tag's bit shift - 1 (MULTI, below the epoch field; the position takes the bits
//           below it) says the list has more than one row, the tag's position is the row pushed last, and for every
//           pushed row p chain[2p] = the row pushed before it, chain[2p + 1] = the list's length up to p. A row
//           whose key has a slot pushes itself onto its list with one CAS of the slot (its chain entry written and
//           fenced first); a slot without MULTI holds one row and no chain entry. Every slot then has a distinct
//           key: clusters stay as short as the distinct keys make them, a probe stops at its key's slot, counts
//           its pairs from the head's length, and writes them by walking the list.
// Pair order in the output is not deterministic (blocks reserve their ranges in arrival order).

#define FULL_MASK 0xffffffffu
#define LIN_COUNTER 5  // state[5]: pairs reserved so far by this lprobe launch
#define LIN_TICKET 6   // state[6]: blocks finished

__device__ __forceinline__ u64 pack_slot(int key, unsigned tag) { return (u64)(unsigned)key | ((u64)tag << 32); }

// A linear64 launch's tag fields: position = tag & pos_mask; multi = the MULTI bit (0 without chains).
struct TagBits {
    unsigned pos_mask, multi;
};
__device__ __forceinline__ TagBits tag_bits(unsigned shift, const int* chain) {
    const unsigned multi = chain ? 1u << (shift - 1) : 0u;
    return {(chain ? multi : 1u << shift) - 1u, multi};
}

// Whether a row of hash h belongs to the slice (slice_shift 32: every row does).
__device__ __forceinline__ bool in_slice(unsigned h, long long slice_shift, long long slice) {
    return slice_shift >= 32 || ((u64)h >> slice_shift) == (u64)slice;
}

// Row i's key: a sliced launch streams its keys past its slice of the table, so it loads them evict-first.
template <typename K>
__device__ __forceinline__ K load_key(const K* keys, long long i, bool stream) {
#ifdef JOIN_EMULATED
    return keys[i];
#else
    return stream ? __ldcs(keys + i) : keys[i];
#endif
}
__device__ __forceinline__ long long linear_next(long long b, long long nb) { return b + 1 == nb ? 0 : b + 1; }

// Claim slot s of the loaded bucket bk (bucket b) for (key, tag) if it is empty: true once claimed; false when it
// is (or became) live. int32: one 64-bit CAS of the packed slot.
__device__ __forceinline__ bool linear_claim(const Bucket<int>& bk, int s, Slot<int>* table, long long b, int key,
                                             unsigned tag, unsigned shift, unsigned epoch) {
    u64* word = reinterpret_cast<u64*>(table + b * Bucket<int>::SLOTS + s);
    const u64 mine = pack_slot(key, tag);
    u64 cur = pack_slot(bk.s[s].key, bk.s[s].tag);
    while (!is_live((unsigned)(cur >> 32), shift, epoch)) {
        const u64 old = atomicCAS(word, cur, mine);
        if (old == cur) return true;
        cur = old;  // taken meanwhile (or a torn read): look at what is there now
    }
    return false;
}

// int64: CAS the tag word, then store the key (nobody reads keys before the build is over).
__device__ __forceinline__ bool linear_claim(const Bucket<long long>& bk, int s, Slot<long long>* table, long long b,
                                             long long key, unsigned tag, unsigned shift, unsigned epoch) {
    Slot<long long>* slot = table + b * Bucket<long long>::SLOTS + s;
    unsigned cur = bk.s[s].tag;
    while (!is_live(cur, shift, epoch)) {
        const unsigned old = atomicCAS(&slot->tag, cur, tag);
        if (old == cur) {
            slot->key = key;
            return true;
        }
        cur = old;
    }
    return false;
}

// chains: a bucket read slot by slot in 8-byte loads, so that no slot is seen torn. A 16-byte vector load may show a
// slot being claimed meanwhile as its new (live) tag beside its stale key, and a chained build acts on a live slot's
// key without a CAS: it goes on to the next slot when the key is another.
__device__ __forceinline__ Bucket<int> load_bucket_slots(const Slot<int>* table, long long b) {
    Bucket<int> bk;
    const u64* p = reinterpret_cast<const u64*>(table + b * Bucket<int>::SLOTS);
#pragma unroll
    for (int s = 0; s < Bucket<int>::SLOTS; ++s) {
        const u64 w = __ldcg(p + s);
        bk.s[s].key = (int)(unsigned)w;
        bk.s[s].tag = (unsigned)(w >> 32);
    }
    return bk;
}
__device__ __forceinline__ Bucket<long long> load_bucket_slots(const Slot<long long>* table, long long b) {
    return load_bucket(table, b);  // int64 keys have no chains
}

// chains: slot s of the loaded bucket bk (bucket b) for row i (key, tag): claim it if it is empty, or push row i
// onto its list if it holds the key (chain[2i] = the old head, chain[2i + 1] = its length + 1, fenced before the
// CAS that makes i the head); true once done, false when the slot holds another key. bk comes from
// load_bucket_slots (each slot's key and tag read together); a retry starts from the word the CAS returned.
__device__ __forceinline__ bool chain_claim(const Bucket<int>& bk, int s, Slot<int>* table, long long b, int key,
                                            unsigned tag, unsigned shift, unsigned epoch, long long i, int* chain,
                                            TagBits tb) {
    u64* word = reinterpret_cast<u64*>(table + b * Bucket<int>::SLOTS + s);
    u64 cur = pack_slot(bk.s[s].key, bk.s[s].tag);
    for (;;) {
        const unsigned t = (unsigned)(cur >> 32);
        u64 want = pack_slot(key, tag);
        if (is_live(t, shift, epoch)) {
            if ((int)(unsigned)cur != key) return false;
            const int head = (int)(t & tb.pos_mask);
            chain[2 * i] = head;
            chain[2 * i + 1] = ((t & tb.multi) ? __ldcg(&chain[2 * head + 1]) : 1) + 1;
            __threadfence();  // the entry is visible before the slot names row i as its head
            want = pack_slot(key, tag | tb.multi);
        }
        const u64 old = atomicCAS(word, cur, want);
        if (old == cur) return true;
        cur = old;
    }
}
// int64 keys have no chains (the host passes none).
__device__ __forceinline__ bool chain_claim(const Bucket<long long>& bk, int s, Slot<long long>* table, long long b,
                                            long long key, unsigned tag, unsigned shift, unsigned epoch, long long,
                                            int*, TagBits) {
    return linear_claim(bk, s, table, b, key, tag, shift, epoch);
}

// Insert one build row (position i) into the first empty slot of its linear sequence (chains: or onto its key's
// list); false if none (table full).
template <typename K>
__device__ __forceinline__ bool linear_insert(K key, long long i, Slot<K>* table, long long nb, unsigned shift,
                                              unsigned epoch, int* chain, TagBits tb) {
    constexpr int SLOTS = Bucket<K>::SLOTS;
    const unsigned tag = (epoch << shift) | (unsigned)i;
    long long b = first_bucket(mix32(fold(key)), nb);
    for (long long tries = 0; tries < nb; ++tries, b = linear_next(b, nb)) {
        const Bucket<K> bk = chain ? load_bucket_slots(table, b) : load_bucket(table, b);
#pragma unroll
        for (int s = 0; s < SLOTS; ++s)
            if (chain ? chain_claim(bk, s, table, b, key, tag, shift, epoch, i, chain, tb)
                      : linear_claim(bk, s, table, b, key, tag, shift, epoch))
                return true;
    }
    return false;
}

// Whether a live slot of the loaded bucket before slot `end` holds key k (chains: the row belongs on its list).
template <typename K>
__device__ __forceinline__ bool key_before(const Bucket<K>& bk, int end, K k) {
    bool found = false;
#pragma unroll
    for (int s = 0; s < Bucket<K>::SLOTS; ++s) found |= s < end && bk.s[s].key == k;
    return found;
}

// The first slot of a loaded bucket whose tag is not live (SLOTS when every slot is live).
template <typename K>
__device__ __forceinline__ int first_free(const Bucket<K>& bk, unsigned shift, unsigned epoch) {
    unsigned live = 0;
#pragma unroll
    for (int s = 0; s < Bucket<K>::SLOTS; ++s) live |= (unsigned)is_live(bk.s[s].tag, shift, epoch) << s;
    return __ffs(~live & (live + 1u)) - 1;  // the lowest clear bit of live (bit SLOTS when all are live)
}

// One CAS on slot s of bucket b from the loaded value to (key, tag), issued without waiting for its result:
// int32 slots swap the packed 64-bit word, int64 slots the tag word (the key is stored by claimed()).
__device__ __forceinline__ u64 cas_expected(const Bucket<int>& bk, int s) {
    return pack_slot(bk.s[s].key, bk.s[s].tag);
}
__device__ __forceinline__ u64 cas_expected(const Bucket<long long>& bk, int s) { return bk.s[s].tag; }
__device__ __forceinline__ u64 cas_issue(Slot<int>* table, long long b, int s, u64 expected, int key, unsigned tag) {
    return atomicCAS(reinterpret_cast<u64*>(table + b * Bucket<int>::SLOTS + s), expected, pack_slot(key, tag));
}
__device__ __forceinline__ u64 cas_issue(Slot<long long>* table, long long b, int s, u64 expected, long long key,
                                         unsigned tag) {
    return atomicCAS(&table[b * Bucket<long long>::SLOTS + s].tag, (unsigned)expected, tag);
}
// After a successful cas_issue: int64 slots get their key now.
__device__ __forceinline__ void claimed(Slot<int>*, long long, int, int) {}
__device__ __forceinline__ void claimed(Slot<long long>* table, long long b, int s, long long key) {
    table[b * Bucket<long long>::SLOTS + s].key = key;
}

// JOIN_LROWS rows per thread and step (row base + r * THREADS + t): key loads, first-bucket loads, then one CAS per
// row on its first free slot, all issued before any result is looked at; a row whose CAS lost or whose first bucket
// was full walks its sequence again (linear_insert).
template <typename K>
__device__ void linear_build_kernel(const K* __restrict__ keys, long long n, Slot<K>* table, long long nb,
                                    long long shift, long long epoch, int* chain, long long* state, long long* host,
                                    long long slice_shift, long long slice, const int* bounds) {
    if (!JOIN_CHAINS) chain = nullptr;  // compiled out
    const unsigned sh = (unsigned)shift, ep = (unsigned)epoch;
    const TagBits tb = tag_bits(sh, chain);
    const long long stride = (long long)gridDim.x * LSTEP;
    const long long lo = bounds ? bounds[slice] : 0;
    const bool stream = slice_shift < 32 || bounds;
    if (bounds) n = bounds[slice + 1];  // rows lo .. n - 1
    if (JOIN_LROWS == 1) {  // one row per step: the CAS loop straight away (fewer registers)
        for (long long i = lo + (long long)blockIdx.x * JOIN_THREADS + threadIdx.x; i < n; i += stride) {
            const K key = load_key(keys, i, stream);
            if (in_slice(mix32(fold(key)), slice_shift, slice) && !linear_insert(key, i, table, nb, sh, ep, chain, tb))
                set_error(state, host, ERR_TABLE_FULL);
        }
        return;
    }
    for (long long base = lo + (long long)blockIdx.x * LSTEP; base < n; base += stride) {
        K key[JOIN_LROWS];
        long long b[JOIN_LROWS];
        Bucket<K> bk[JOIN_LROWS];
        int s[JOIN_LROWS];
        bool live[JOIN_LROWS];  // a row of this launch: below n and in its slice
        u64 expected[JOIN_LROWS], old[JOIN_LROWS];
#pragma unroll
        for (int r = 0; r < JOIN_LROWS; ++r) {
            const long long i = base + r * JOIN_THREADS + threadIdx.x;
            key[r] = i < n ? load_key(keys, i, stream) : (K)0;
        }
#pragma unroll
        for (int r = 0; r < JOIN_LROWS; ++r) {
            const unsigned h = mix32(fold(key[r]));
            b[r] = first_bucket(h, nb);
            live[r] = base + r * JOIN_THREADS + threadIdx.x < n && in_slice(h, slice_shift, slice);
            if (live[r]) bk[r] = chain ? load_bucket_slots(table, b[r]) : load_bucket(table, b[r]);
        }
#pragma unroll
        for (int r = 0; r < JOIN_LROWS; ++r) {
            const long long i = base + r * JOIN_THREADS + threadIdx.x;
            s[r] = live[r] ? first_free(bk[r], sh, ep) : Bucket<K>::SLOTS;
            if (chain && s[r] < Bucket<K>::SLOTS && key_before(bk[r], s[r], key[r]))
                s[r] = Bucket<K>::SLOTS;  // the key has a slot already: its list, through linear_insert
            if (s[r] < Bucket<K>::SLOTS) {
                expected[r] = cas_expected(bk[r], s[r]);
                old[r] = cas_issue(table, b[r], s[r], expected[r], key[r], (ep << sh) | (unsigned)i);
            }
        }
#pragma unroll
        for (int r = 0; r < JOIN_LROWS; ++r) {
            const long long i = base + r * JOIN_THREADS + threadIdx.x;
            if (!live[r]) continue;
            if (s[r] < Bucket<K>::SLOTS && old[r] == expected[r]) {
                claimed(table, b[r], s[r], key[r]);
            } else if (!linear_insert(key[r], i, table, nb, sh, ep, chain, tb)) {
                set_error(state, host, ERR_TABLE_FULL);  // cannot happen: B * SLOTS > n
            }
        }
    }
}

// chain[i] read by a probe: RO through L1 (a launch that did not write the chains), else through L2.
template <bool RO>
__device__ __forceinline__ int chain_at(const int* chain, long long i) {
    return RO ? __ldg(chain + i) : __ldcg(chain + i);
}

// Write the pairs of a chained key's list: its head row `first` and the cnt - 1 rows linked behind it, to
// out_[bp][at...] (>= capacity dropped).
template <typename R, bool RO>
__device__ __forceinline__ void chain_emit(int first, long long cnt, const int* chain, long long at, R pj,
                                           const R* brows, R* out_b, R* out_p, long long capacity) {
    int pos = first;
    for (long long c = 0; c < cnt && at + c < capacity; ++c) {
        out_b[at + c] = brows ? brows[pos] : (R)pos;
        out_p[at + c] = pj;
        if (c + 1 < cnt) pos = chain_at<RO>(chain, 2 * (long long)pos);
    }
}

// One bucket of key k's cluster (bucket b, loaded as bk): count its matches before the first empty slot (the first
// one's build position -> *first); with `emit` their pairs go to out_[bp][at + cnt...] (>= capacity dropped).
// Returns true when the cluster goes on into the next bucket. The slots are tested as bit masks (no branch between
// the bucket's loads and its test: both 16-byte halves are in flight together). chains: the key's one slot ends the
// walk; its list's length (the head's chain entry when MULTI) is the count.
template <typename K, typename R, bool RO>
__device__ __forceinline__ bool linear_scan(const Bucket<K>& bk, K k, unsigned shift, unsigned epoch, long long& cnt,
                                            int* first, bool emit, long long at, R pj, const R* brows, R* out_b,
                                            R* out_p, long long capacity, const int* chain, TagBits tb) {
    constexpr int SLOTS = Bucket<K>::SLOTS;
    unsigned live = 0, match = 0;
#pragma unroll
    for (int s = 0; s < SLOTS; ++s) {
        live |= (unsigned)is_live(bk.s[s].tag, shift, epoch) << s;
        match |= (unsigned)(bk.s[s].key == k) << s;
    }
    const unsigned taken = ~live & (live + 1u);  // the first empty slot's bit (bit SLOTS when all are live)
    match &= taken - 1u;                           // live slots before it: this key's part of the cluster
    if (chain && match) {
        const unsigned t = bk.s[__ffs(match) - 1].tag;
        const int pos = (int)(t & tb.pos_mask);
        const long long c = (t & tb.multi) ? chain_at<RO>(chain, 2 * (long long)pos + 1) : 1;
        *first = pos;
        if (emit) chain_emit<R, RO>(pos, c, chain, at + cnt, pj, brows, out_b, out_p, capacity);
        cnt += c;
        return false;
    }
    if (match) {
#pragma unroll
        for (int s = 0; s < SLOTS; ++s) {
            if (!((match >> s) & 1u)) continue;
            const int pos = (int)(bk.s[s].tag & tb.pos_mask);
            if (cnt == 0) *first = pos;
            if (emit && at + cnt < capacity) {
                out_b[at + cnt] = brows ? brows[pos] : (R)pos;
                out_p[at + cnt] = pj;
            }
            ++cnt;
        }
    }
    return taken == (1u << SLOTS);
}

template <typename K, bool RO>
__device__ __forceinline__ Bucket<K> linear_load(const Slot<K>* table, long long b) {
    return RO ? load_bucket_ro(table, b) : load_bucket(table, b);
}

// Walk key k's cluster from bucket b (the key's first bucket, or the one after an already scanned bucket), adding
// to cnt (see linear_scan).
template <typename K, typename R, bool RO>
__device__ __forceinline__ void linear_walk_from(long long b, K k, const Slot<K>* table, long long nb, unsigned shift,
                                                 unsigned epoch, long long& cnt, int* first, bool emit, long long at,
                                                 R pj, const R* brows, R* out_b, R* out_p, long long capacity,
                                                 const int* chain, TagBits tb) {
    for (long long tries = 0; tries < nb; ++tries, b = linear_next(b, nb))
        if (!linear_scan<K, R, RO>(linear_load<K, RO>(table, b), k, shift, epoch, cnt, first, emit, at, pj, brows,
                                   out_b, out_p, capacity, chain, tb))
            return;
}

// Exclusive prefix of cnt over the warp's lanes plus *wsum (pairs of the warp's earlier rows); *wsum grows by the
// warp's sum. Every lane calls it (full-mask votes): ballot + popc when no lane has more than one pair, a shuffle scan
// otherwise.
__device__ __forceinline__ long long warp_offset(long long cnt, int lane, long long* wsum) {
    long long excl;
    if (__ballot_sync(FULL_MASK, cnt > 1) == 0) {  // common case: 0 or 1 match per lane
        const unsigned hit = __ballot_sync(FULL_MASK, cnt == 1);
        excl = *wsum + __popc(hit & ((1u << lane) - 1u));
        *wsum += __popc(hit);
    } else {
        long long x = cnt;
#pragma unroll
        for (int d = 1; d < 32; d <<= 1) {
            const long long y = __shfl_up_sync(FULL_MASK, x, d);
            if (lane >= d) x += y;
        }
        excl = *wsum + x - cnt;
        *wsum += __shfl_sync(FULL_MASK, x, 31);
    }
    return excl;
}

// Output ranges for a block's pairs with one atomicAdd on *counter (instead of one a warp: every atomic on the one
// counter waits for the one before it): each warp passes its pair count (uniform over the warp) and gets the base of
// its range (the earlier warps' pairs through block_exclusive_scan). Every thread of the block calls it.
__device__ __forceinline__ long long block_reserve(long long wsum, u64* counter) {
    JOIN_SHARED(long long, base, 1);
    long long total;
    const long long before = block_exclusive_scan((threadIdx.x & 31) == 0 ? wsum : 0, &total);
    if (threadIdx.x == 0) base[0] = total ? (long long)atomicAdd(counter, (u64)total) : 0;
    __syncthreads();
    const long long at = base[0] + __shfl_sync(FULL_MASK, before, 0);  // lane 0's prefix: the earlier warps' pairs
    __syncthreads();  // base is reused by the next call
    return at;
}


// The end of a kernel whose warps reserved their pairs on *counter: the last block to finish (ticket state[6])
// publishes the total (state[0], host[0]) and leaves the counter and the ticket at zero for the next launch. Every
// thread of every block calls it.
__device__ void publish_total(u64* counter, long long* state, long long* host) {
    if (last_block(&state[LIN_TICKET]) && threadIdx.x == 0) {
        const long long total = (long long)atomicExch(counter, 0ull);  // ready for the next launch
        state[0] = total;
        if (host) host[0] = total;
    }
}

// RO: the table is read-only for the whole launch (lprobe: loads through L1); the fused kernel wrote it earlier in
// the same launch, so it reads through L2. JOIN_LROWS rows per thread and step (row base + r * THREADS + t): their
// key loads, then their first-bucket loads, are all issued before any bucket is inspected; the block reserves the
// pairs of all its rows with one atomicAdd (block_reserve), row r's pairs of a warp contiguous (coalesced writes).
template <typename K, typename R, bool RO>
__device__ void linear_probe_kernel(const K* __restrict__ pkeys, long long n, const Slot<K>* table, long long nb,
                                    long long shift, long long epoch, const int* chain, const R* __restrict__ brows,
                                    const R* __restrict__ prows, R* __restrict__ out_b, R* __restrict__ out_p,
                                    long long capacity, long long* state, long long* host, long long slice_shift,
                                    long long slice, bool publish, const int* bounds) {
    if (!JOIN_CHAINS) chain = nullptr;  // compiled out
    const unsigned sh = (unsigned)shift, ep = (unsigned)epoch;
    const TagBits tb = tag_bits(sh, chain);
    const int lane = threadIdx.x & 31;
    const long long stride = (long long)gridDim.x * LSTEP;
    const long long lo = bounds ? bounds[slice] : 0;
    const bool stream = slice_shift < 32 || bounds;
    if (bounds) n = bounds[slice + 1];  // rows lo .. n - 1
    u64* counter = (u64*)&state[LIN_COUNTER];
    // base is uniform over the block, so every lane of a warp runs the same number of steps (full-mask votes).
    for (long long base = lo + (long long)blockIdx.x * LSTEP; base < n; base += stride) {
        K k[JOIN_LROWS];
        Bucket<K> bk[JOIN_LROWS];
        long long cnt[JOIN_LROWS], excl[JOIN_LROWS];
        int first[JOIN_LROWS];
        bool live[JOIN_LROWS];  // a row of this launch: below n and in its slice
#pragma unroll
        for (int r = 0; r < JOIN_LROWS; ++r) {
            const long long j = base + r * JOIN_THREADS + threadIdx.x;
            k[r] = j < n ? load_key(pkeys, j, stream) : (K)0;
            live[r] = j < n && in_slice(mix32(fold(k[r])), slice_shift, slice);
        }
        if (JOIN_LROWS > 1) {
#pragma unroll
            for (int r = 0; r < JOIN_LROWS; ++r)
                if (live[r]) bk[r] = linear_load<K, RO>(table, first_bucket(mix32(fold(k[r])), nb));
        }
        long long wsum = 0;  // pairs of the warp's rows 0..r-1
#pragma unroll
        for (int r = 0; r < JOIN_LROWS; ++r) {
            const long long b0 = first_bucket(mix32(fold(k[r])), nb);
            cnt[r] = 0;
            first[r] = HEAD_NONE;
            if (live[r] && JOIN_LROWS == 1)  // one row: walk straight from the first bucket (fewer registers)
                linear_walk_from<K, R, RO>(b0, k[r], table, nb, sh, ep, cnt[r], &first[r], false, 0, (R)0, brows,
                                           out_b, out_p, 0, chain, tb);
            else if (live[r] && linear_scan<K, R, RO>(bk[r], k[r], sh, ep, cnt[r], &first[r], false, 0, (R)0, brows,
                                                      out_b, out_p, 0, chain, tb))
                linear_walk_from<K, R, RO>(linear_next(b0, nb), k[r], table, nb, sh, ep, cnt[r], &first[r], false, 0,
                                           (R)0, brows, out_b, out_p, 0, chain, tb);
            excl[r] = warp_offset(cnt[r], lane, &wsum);
        }
        const long long wbase = block_reserve(wsum, counter);  // every thread: base is uniform over the block
        if (wsum == 0 || capacity == 0) continue;  // uniform over the warp
#pragma unroll
        for (int r = 0; r < JOIN_LROWS; ++r) {
            const long long j = base + r * JOIN_THREADS + threadIdx.x, at = wbase + excl[r];
            if (cnt[r] == 0 || at >= capacity) continue;
            const R pj = prows ? prows[j] : (R)j;
            if (cnt[r] == 1) {
                out_b[at] = brows ? brows[first[r]] : (R)first[r];
                out_p[at] = pj;
            } else if (chain) {  // the list from its head: no walk of the table again
                chain_emit<R, RO>(first[r], cnt[r], chain, at, pj, brows, out_b, out_p, capacity);
            } else {
                long long c = 0;
                linear_walk_from<K, R, RO>(first_bucket(mix32(fold(k[r])), nb), k[r], table, nb, sh, ep, c, &first[r],
                                           true, at, pj, brows, out_b, out_p, capacity, chain, tb);
            }
        }
    }
    if (publish)
        publish_total(counter, state, host);
    else
        last_block(&state[LIN_TICKET]);  // the ticket back to zero; the counter goes on into the next slice
}

// linear64 in one cooperative launch (grid = resident blocks): lbuild | grid barrier | lprobe. bar_base as for
// fused_kernel (state[2] before this launch). The barrier's fences publish the int64 keys stored after their tags
// and the chain entries.
template <typename K, typename R>
__device__ void linear_fused_kernel(const K* bkeys, long long nbuild, const K* pkeys, long long n, Slot<K>* table,
                                    long long nb, long long shift, long long epoch, int* chain, const R* brows,
                                    const R* prows, R* out_b, R* out_p, long long capacity, long long* state,
                                    long long* host, long long bar_base, long long timeout_ns) {
    linear_build_kernel<K>(bkeys, nbuild, table, nb, shift, epoch, chain, state, host, 32, 0, nullptr);
    u64* bar = (u64*)&state[2];
    const u64 target = (u64)bar_base + gridDim.x;
    if (arrive_barrier(bar, target, timeout_ns, state, host)) release_barrier(bar, target);
    linear_probe_kernel<K, R, false>(pkeys, n, table, nb, shift, epoch, chain, brows, prows, out_b, out_p, capacity,
                                     state, host, 32, 0, true, nullptr);
}

// ---- partitioned: radix partitions small enough for a shared-memory table (pcount, pscatter, pjoin) -----------------
//
// P = 2^pbits partitions (pbits = 0: one) of both sides by the high pbits bits of h = mix32(fold(key)); int64 keys
// fold both halves into h and are compared whole. Every phase streams its input; the only random accesses go to
// shared memory (and, per match, to the partition's build row ids, which the join just wrote).
//   pcount:   grid-stride over the build keys, then the probe keys (JOIN_ITEMS rows per thread and step, loads first):
//             a shared histogram of partition ids per block and side, added to counts[side * P + q] with one
//             atomicAdd per non-empty (block, partition). The last block to finish (ticket state[7]) scans each
//             side's counts into starts[side * (P + 1) + q] (the side's row count at q = P), copies them into the
//             write cursors, and leaves the counts and the ticket at zero for the next join (no memset launches).
//   pscatter: chunks of TILE rows of one side (the build side's chunks first), grid-stride: each row's rank among the
//             chunk's rows of its partition (shared atomicAdd); the partition's first row reserves the chunk's run
//             with one atomicAdd on the partition's cursor; (key, row id) pairs go to run + rank in the side's
//             partitioned key and row buffers. Order inside a partition is arbitrary. With at most STAGE_PARTS
//             partitions the pairs first go to a shared stage in partition order and leave from consecutive threads
//             (each run's stores coalesced); with more, each row is stored from its own thread.
//   pjoin:    one block per work item, grid-stride: an item is a partition's build rows and at most JOIN_PART_PROBE
//             of its probe rows (pcount's last block numbers the items: a partition with both sides non-empty has
//             ceil(probe rows / JOIN_PART_PROBE) of them, at starts[2 * (P + 1) + q] onwards, the total at
//             starts[3 * P + 2]), so a partition that a hot probe key fills is shared by several blocks. The item's
//             build rows go into a shared linear-probing table in rounds of at most JOIN_PART_CAP rows (PART_SLOTS >=
//             2 * JOIN_PART_CAP 16-bit slots, each the index of one round row, whose key is in tkey[]; every
//             duplicate owns a slot), then every probe row of the item walks the table from slot h mod PART_SLOTS (the
//             low bits of h; the partition took the high ones) to the first empty slot. A partition with more build
//             rows than JOIN_PART_CAP (build-side skew) takes several rounds and streams the item's probe rows once
//             per round: slower, never wrong. Pairs as in lprobe: a block reserves the ranges of THREADS probe rows
//             on state[5] with one atomicAdd, pairs at offsets >= capacity are dropped (capacity 0: count only), the
//             last block publishes the total (state[0], host[0]) and resets the counter and its ticket.
//             An exact-size re-write runs pjoin alone again: the partitioned buffers are still there.

#ifndef JOIN_PART_CAP  // build rows per pjoin round (the shared table's capacity); HashConfig.part_capacity
#define JOIN_PART_CAP 2560
#endif
#ifndef JOIN_PART_PROBE  // probe rows per pjoin work item at most; HashConfig.part_probe
#define JOIN_PART_PROBE 8192
#endif
#ifndef JOIN_PART_BITS_MAX  // at most 2^JOIN_PART_BITS_MAX partitions (pcount's and pscatter's shared histogram)
#define JOIN_PART_BITS_MAX 13
#endif
#define PART_MAX (1 << JOIN_PART_BITS_MAX)
#ifndef JOIN_PART_PAD  // ints between two partitions' write cursors: one 128-byte line each, so pscatter's
#define JOIN_PART_PAD 32  // reservations (atomics that return) on different partitions do not queue behind each other
#endif
#define PART_PAD JOIN_PART_PAD
#define PART_TICKET 7  // state[7]: pcount blocks finished
#define PART_EMPTY 0xFFFFu

template <int X>  // the smallest power of two >= X (a type, not a function: NVRTC compiles no host code)
struct Pow2AtLeast {
    static constexpr int value = 2 * Pow2AtLeast<(X + 1) / 2>::value;
};
template <>
struct Pow2AtLeast<1> {
    static constexpr int value = 1;
};
#define PART_SLOTS (Pow2AtLeast<2 * JOIN_PART_CAP>::value)
static_assert(JOIN_PART_CAP >= 1 && JOIN_PART_CAP < (int)PART_EMPTY, "a slot holds a round row's 16-bit index");

__device__ __forceinline__ int part_of(unsigned h, int pbits) { return pbits ? (int)(h >> (32 - pbits)) : 0; }

// Add one side's partition histogram to counts[0, P): this block's rows of the grid-stride loop, then one atomicAdd
// per non-empty partition (no value returned: the counters stay packed). Every thread of the block calls it.
template <typename K>
__device__ void part_count_side(const K* __restrict__ keys, long long n, int pbits, int* hist, int* counts) {
    const int nparts = 1 << pbits;
    for (int q = threadIdx.x; q < nparts; q += JOIN_THREADS) hist[q] = 0;
    __syncthreads();
    for (long long base = (long long)blockIdx.x * TILE; base < n; base += (long long)gridDim.x * TILE) {
        K k[JOIN_ITEMS];
#pragma unroll
        for (int r = 0; r < JOIN_ITEMS; ++r) {
            const long long i = base + r * JOIN_THREADS + threadIdx.x;
            k[r] = i < n ? keys[i] : (K)0;
        }
#pragma unroll
        for (int r = 0; r < JOIN_ITEMS; ++r)
            if (base + r * JOIN_THREADS + threadIdx.x < n) atomicAdd(&hist[part_of(mix32(fold(k[r])), pbits)], 1);
    }
    __syncthreads();
    for (int q = threadIdx.x; q < nparts; q += JOIN_THREADS)
        if (hist[q]) atomicAdd(&counts[q], hist[q]);
    __syncthreads();  // the histogram is reused by the next side
}

// pjoin's work items of a partition with b build and p probe rows: ceil(p / JOIN_PART_PROBE) when both sides have rows.
__device__ __forceinline__ long long part_items(long long b, long long p) {
    return b > 0 && p > 0 ? (p + JOIN_PART_PROBE - 1) / JOIN_PART_PROBE : 0;
}

// One block: each side's starts (build: starts[q] = counts[0] + ... + counts[q - 1] for q <= P, starts[P] = its rows;
// probe: the same at starts + P + 1) and write cursors (cursors[(side * P + q) * PART_PAD] = the start), both sides
// through one scan as b + (p << 32) (a side has fewer than 2^31 rows: no carry), the counts left at zero (they were
// added by other blocks' atomics: read through L2); then pjoin's work items (items[q] = the items of partitions
// 0..q-1, items[P] their total; items = starts + 2(P + 1)) from the starts.
__device__ void part_scan(int* counts, int nparts, int* starts, int* cursors) {
    int* pstarts = starts + nparts + 1;
    int* items = starts + 2 * (nparts + 1);
    const long long both = block_scan_runs(
        nparts,
        [&](long long q) { return __ldcg(&counts[q]) + ((long long)__ldcg(&counts[nparts + q]) << 32); },
        [&](long long q, long long run) {
            starts[q] = cursors[q * PART_PAD] = (int)(run & 0xFFFFFFFFll);
            pstarts[q] = cursors[(nparts + q) * PART_PAD] = (int)(run >> 32);
            counts[q] = counts[nparts + q] = 0;
        });
    if (threadIdx.x == 0) {
        starts[nparts] = (int)(both & 0xFFFFFFFFll);
        pstarts[nparts] = (int)(both >> 32);
    }
    __syncthreads();  // every start is written (a thread's last partition ends at the next thread's first start)
    const long long total = block_scan_runs(
        nparts,
        [&](long long q) { return part_items(starts[q + 1] - starts[q], pstarts[q + 1] - pstarts[q]); },
        [&](long long q, long long run) { items[q] = (int)run; });
    if (threadIdx.x == 0) items[nparts] = (int)total;
}

// The partition of work item w: the last q with items[q] <= w (items ascending, items[P] > w).
__device__ __forceinline__ int part_of_item(const int* items, int nparts, long long w) {
    int lo = 0, hi = nparts;  // items[lo] <= w < items[hi]
    while (hi - lo > 1) {
        const int mid = (lo + hi) >> 1;
        if (items[mid] <= w) lo = mid; else hi = mid;
    }
    return lo;
}

template <typename K>
__device__ void part_count_kernel(const K* bkeys, long long nbuild, const K* pkeys, long long nprobe, long long pbits,
                                  int* counts, int* starts, int* cursors, long long* state) {
    JOIN_SHARED(int, hist, PART_MAX);
    const int pb = (int)pbits, nparts = 1 << pb;
    part_count_side(bkeys, nbuild, pb, hist, counts);
    part_count_side(pkeys, nprobe, pb, hist, counts + nparts);
    if (!last_block(&state[PART_TICKET])) return;  // uniform per block
    part_scan(counts, nparts, starts, cursors);
}

// pscatter's shared memory: the direct path's histogram (PART_MAX counters), or, staged, a histogram and the chunk's
// offsets for at most STAGE_PARTS partitions and the chunk's (key, row id) pairs in partition order. Staged when the
// chunk's pairs fit STAGE_BYTES and the partitions STAGE_PARTS: then every partition's run leaves through consecutive
// threads (coalesced stores); otherwise each row is stored from its own thread to its run (one sector a row).
#ifndef JOIN_STAGE_PARTS  // staged pscatter for at most this many partitions (tests set 1: the direct path)
#define JOIN_STAGE_PARTS 1024
#endif
#define STAGE_PARTS JOIN_STAGE_PARTS
#define STAGE_BYTES 32768
template <typename K, typename R>
struct ScatterSmem {
    static constexpr bool staged = TILE * (sizeof(K) + sizeof(R)) <= STAGE_BYTES;
    static constexpr int stage_words = staged ? TILE * (int)(sizeof(K) + sizeof(R)) / 4 : 0;
    static constexpr int words = PART_MAX > 2 * STAGE_PARTS + stage_words ? PART_MAX : 2 * STAGE_PARTS + stage_words;
    static constexpr int words64 = (words + 1) / 2;  // declared as 8-byte words: the stage may hold int64 keys
};

// Chunks of TILE rows of one side (the build side's first), grid-stride. Per chunk: each row's rank among the chunk's
// rows of its partition (shared atomics on hist), one cursor atomicAdd per non-empty partition by its first row (the
// run's base replaces the count in hist), then the (key, row id) pairs go to base + rank. Staged: first into the stage
// in partition order (offsets loc), then stage slot s -> base[p] + s - loc[p] from thread s mod THREADS, so each run
// is stored by consecutive threads. hist is zero at the start and the end of every chunk.
template <typename K, typename R>
__device__ void part_scatter_kernel(const K* __restrict__ bkeys, const R* __restrict__ brows, long long nbuild,
                                    const K* __restrict__ pkeys, const R* __restrict__ prows, long long nprobe,
                                    long long pbits, int* cursors, K* __restrict__ bpk, R* __restrict__ bpr,
                                    K* __restrict__ ppk, R* __restrict__ ppr) {
    using Smem = ScatterSmem<K, R>;
    JOIN_SHARED(long long, smem64, Smem::words64);
    int* smem = reinterpret_cast<int*>(smem64);
    int* hist = smem;  // per partition the chunk's rows in it, then the base of the chunk's run
    const int pb = (int)pbits, nparts = 1 << pb;
    const bool staged = Smem::staged && nparts <= STAGE_PARTS;  // uniform over the launch
    int* loc = smem + STAGE_PARTS;
    K* stage_k = reinterpret_cast<K*>(smem + 2 * STAGE_PARTS);
    R* stage_r = reinterpret_cast<R*>(stage_k + TILE);
    const long long bchunks = (nbuild + TILE - 1) / TILE, chunks = bchunks + (nprobe + TILE - 1) / TILE;
    for (int p = threadIdx.x; p < nparts; p += JOIN_THREADS) hist[p] = 0;
    for (long long c = blockIdx.x; c < chunks; c += gridDim.x) {
        const bool probe = c >= bchunks;
        const K* keys = probe ? pkeys : bkeys;
        const R* rows = probe ? prows : brows;
        K* out_k = probe ? ppk : bpk;
        R* out_r = probe ? ppr : bpr;
        int* cursor = probe ? cursors + nparts * PART_PAD : cursors;
        const long long n = probe ? nprobe : nbuild, base = (probe ? c - bchunks : c) * TILE;
        K k[JOIN_ITEMS];
        int q[JOIN_ITEMS], rank[JOIN_ITEMS];
        __syncthreads();  // the histogram is zero again (the previous chunk's first rows reset their entries)
#pragma unroll
        for (int r = 0; r < JOIN_ITEMS; ++r) {
            const long long i = base + r * JOIN_THREADS + threadIdx.x;
            k[r] = i < n ? keys[i] : (K)0;
        }
#pragma unroll
        for (int r = 0; r < JOIN_ITEMS; ++r) {
            q[r] = part_of(mix32(fold(k[r])), pb);
            rank[r] = base + r * JOIN_THREADS + threadIdx.x < n ? atomicAdd(&hist[q[r]], 1) : -1;
        }
        __syncthreads();
        if (staged) {  // the chunk's offsets per partition in partition order
            block_scan_runs(nparts, [&](long long p) { return (long long)hist[p]; },
                            [&](long long p, long long run) { loc[p] = (int)run; });
            __syncthreads();  // every count is read: hist may now hold the runs' bases
        }
#pragma unroll
        for (int r = 0; r < JOIN_ITEMS; ++r)  // the partition's first row reserves the chunk's run
            if (rank[r] == 0) hist[q[r]] = atomicAdd(&cursor[q[r] * PART_PAD], hist[q[r]]);
        if (staged) {
#pragma unroll
            for (int r = 0; r < JOIN_ITEMS; ++r) {
                if (rank[r] < 0) continue;
                const int at = loc[q[r]] + rank[r];
                stage_k[at] = k[r];
                stage_r[at] = row_id(rows, base + r * JOIN_THREADS + threadIdx.x);
            }
        }
        __syncthreads();  // every run's base (and, staged, every pair) is in shared memory
        if (staged) {
            const int m = (int)min((long long)TILE, n - base);
            for (int at = threadIdx.x; at < m; at += JOIN_THREADS) {
                const K key = stage_k[at];
                const int p = part_of(mix32(fold(key)), pb);
                const long long g = (long long)hist[p] + (at - loc[p]);
                out_k[g] = key;
                out_r[g] = stage_r[at];
            }
        } else {
#pragma unroll
            for (int r = 0; r < JOIN_ITEMS; ++r) {
                if (rank[r] < 0) continue;
                const long long i = base + r * JOIN_THREADS + threadIdx.x, at = (long long)hist[q[r]] + rank[r];
                out_k[at] = k[r];
                out_r[at] = row_id(rows, i);
            }
        }
        __syncthreads();  // every base is read
#pragma unroll
        for (int r = 0; r < JOIN_ITEMS; ++r)
            if (rank[r] == 0) hist[q[r]] = 0;
    }
}

// Put round row i (key k) into the first empty slot from its home slot (the table has room: PART_SLOTS > rows).
template <typename K>
__device__ __forceinline__ void part_insert(unsigned short* slots, K k, int i) {
    unsigned s = mix32(fold(k)) & (PART_SLOTS - 1);
    while (atomicCAS(&slots[s], (unsigned short)PART_EMPTY, (unsigned short)i) != PART_EMPTY)
        s = (s + 1) & (PART_SLOTS - 1);
}

// Matches of probe key k among the round's rows: their count, the first one's round index in *first; with `emit`
// the pairs (brows[index], pj) go to out_[bp][at + c] where at + c < capacity.
template <typename K, typename R>
__device__ __forceinline__ long long part_walk(const unsigned short* slots, const K* tkey, K k, int* first, bool emit,
                                               long long at, R pj, const R* brows, R* out_b, R* out_p,
                                               long long capacity) {
    long long cnt = 0;
    for (unsigned s = mix32(fold(k)) & (PART_SLOTS - 1);; s = (s + 1) & (PART_SLOTS - 1)) {
        const unsigned v = slots[s];
        if (v == PART_EMPTY) return cnt;
        if (tkey[v] == k) {
            if (cnt == 0) *first = (int)v;
            if (emit && at + cnt < capacity) {
                out_b[at + cnt] = brows[v];
                out_p[at + cnt] = pj;
            }
            ++cnt;
        }
    }
}

template <typename K, typename R>
__device__ void part_join_kernel(const int* starts, long long pbits, const K* __restrict__ bpk,
                                 const R* __restrict__ bpr, const K* __restrict__ ppk, const R* __restrict__ ppr,
                                 R* __restrict__ out_b, R* __restrict__ out_p, long long capacity, long long* state,
                                 long long* host) {
    JOIN_SHARED(unsigned short, slots, PART_SLOTS);
    JOIN_SHARED(K, tkey, JOIN_PART_CAP);
    const int nparts = 1 << (int)pbits, lane = threadIdx.x & 31;
    const int* pstarts = starts + nparts + 1;
    const int* items = starts + 2 * (nparts + 1);
    u64* counter = (u64*)&state[LIN_COUNTER];
    const long long nitems = items[nparts];
    for (long long w = blockIdx.x; w < nitems; w += gridDim.x) {
        const int q = part_of_item(items, nparts, w);
        // long long: stepping past a partition that ends near 2^31 rows must not overflow
        const long long bs = starts[q], be = starts[q + 1];
        const long long ps = pstarts[q] + (w - items[q]) * JOIN_PART_PROBE;
        const long long pe = min((long long)pstarts[q + 1], ps + JOIN_PART_PROBE);
        if (bs == be || ps >= pe) continue;  // uniform over the block
        for (long long r0 = bs; r0 < be; r0 += JOIN_PART_CAP) {  // rounds of the partition's build rows
            const int m = (int)min((long long)JOIN_PART_CAP, be - r0);
            __syncthreads();  // the previous round's probes are done with the table
            for (int s = threadIdx.x; s < PART_SLOTS; s += JOIN_THREADS) slots[s] = (unsigned short)PART_EMPTY;
            __syncthreads();
            for (int i = threadIdx.x; i < m; i += JOIN_THREADS) {
                const K k = bpk[r0 + i];
                tkey[i] = k;
                part_insert(slots, k, i);
            }
            __syncthreads();
            const R* brows = bpr + r0;
            for (long long j0 = ps; j0 < pe; j0 += JOIN_THREADS) {  // uniform over the block: full-mask votes
                const long long j = j0 + threadIdx.x;
                const K k = j < pe ? ppk[j] : (K)0;
                int first = 0;
                const long long cnt =
                    j < pe ? part_walk<K, R>(slots, tkey, k, &first, false, 0, (R)0, brows, out_b, out_p, 0) : 0;
                long long wsum = 0;
                const long long excl = warp_offset(cnt, lane, &wsum);
                const long long at = block_reserve(wsum, counter) + excl;  // every thread: j0 is uniform
                if (cnt == 0 || at >= capacity) continue;
                const R pj = ppr[j];
                if (cnt == 1) {
                    out_b[at] = brows[first];
                    out_p[at] = pj;
                } else {
                    part_walk<K, R>(slots, tkey, k, &first, true, at, pj, brows, out_b, out_p, capacity);
                }
            }
        }
    }
    publish_total(counter, state, host);
}

#define JOIN_PART_COUNT(K, SUF)                                                                                   \
    extern "C" __global__ void __launch_bounds__(JOIN_THREADS, JOIN_MIN_BLOCKS)                                  \
        join_pcount_##SUF(const K* bkeys, long long nbuild, const K* pkeys, long long nprobe, long long pbits,  \
                          int* counts, int* starts, int* cursors, long long* state) {                           \
        part_count_kernel<K>(bkeys, nbuild, pkeys, nprobe, pbits, counts, starts, cursors, state);              \
    }

#define JOIN_PART_ROWS(K, R, SUF)                                                                                 \
    extern "C" __global__ void __launch_bounds__(JOIN_THREADS, JOIN_MIN_BLOCKS)                                  \
        join_pscatter_##SUF(const K* bkeys, const R* brows, long long nbuild, const K* pkeys, const R* prows,    \
                            long long nprobe, long long pbits, int* cursors, K* bpk, R* bpr, K* ppk, R* ppr) {   \
        part_scatter_kernel<K, R>(bkeys, brows, nbuild, pkeys, prows, nprobe, pbits, cursors, bpk, bpr, ppk,    \
                                  ppr);                                                                          \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(JOIN_THREADS, JOIN_MIN_BLOCKS)                                  \
        join_pjoin_##SUF(const int* starts, long long pbits, const K* bpk, const R* bpr, const K* ppk,          \
                         const R* ppr, R* out_b, R* out_p, long long capacity, long long* state,                \
                         long long* host) {                                                                      \
        part_join_kernel<K, R>(starts, pbits, bpk, bpr, ppk, ppr, out_b, out_p, capacity, state, host);         \
    }

#define JOIN_LINEAR_BUILD(K, SUF)                                                                                 \
    extern "C" __global__ void __launch_bounds__(JOIN_THREADS, JOIN_MIN_BLOCKS)                                  \
        join_lbuild_##SUF(const K* keys, long long n, Slot<K>* table, long long nb, long long shift,            \
                          long long epoch, int* chain, long long* state, long long* host, long long slice_shift, \
                          long long slice, const int* bounds) {                                                  \
        linear_build_kernel<K>(keys, n, table, nb, shift, epoch, chain, state, host, slice_shift, slice, bounds); \
    }

#define JOIN_LINEAR_PROBE(K, R, SUF)                                                                              \
    extern "C" __global__ void __launch_bounds__(JOIN_THREADS, JOIN_MIN_BLOCKS)                                  \
        join_lprobe_##SUF(const K* pkeys, long long n, const Slot<K>* table, long long nb, long long shift,     \
                          long long epoch, const int* chain, const R* brows, const R* prows, R* out_b, R* out_p, \
                          long long capacity, long long* state, long long* host, long long slice_shift,          \
                          long long slice, long long publish, const int* bounds) {                               \
        linear_probe_kernel<K, R, true>(pkeys, n, table, nb, shift, epoch, chain, brows, prows, out_b, out_p,    \
                                        capacity, state, host, slice_shift, slice, publish != 0, bounds);        \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(JOIN_THREADS, JOIN_MIN_BLOCKS)                                  \
        join_lfused_##SUF(const K* bkeys, long long nbuild, const K* pkeys, long long n, Slot<K>* table,         \
                          long long nb, long long shift, long long epoch, int* chain, const R* brows,            \
                          const R* prows, R* out_b, R* out_p, long long capacity, long long* state,              \
                          long long* host, long long bar_base, long long timeout_ns) {                           \
        linear_fused_kernel<K, R>(bkeys, nbuild, pkeys, n, table, nb, shift, epoch, chain, brows, prows, out_b,  \
                                  out_p, capacity, state, host, bar_base, timeout_ns);                           \
    }

#define JOIN_KEY_KERNELS(K, SUF)                                                                                  \
    extern "C" __global__ void __launch_bounds__(JOIN_THREADS, JOIN_MIN_BLOCKS)                                   \
        join_build_##SUF(const K* keys, long long n, Slot<K>* table, long long nb, long long shift,             \
                         long long epoch, long long* state, long long* host) {                                   \
        build_kernel<K>(keys, n, table, nb, shift, epoch, state, host);                                         \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(JOIN_THREADS, JOIN_MIN_BLOCKS)                                   \
        join_count_##SUF(const K* pkeys, long long n, const Slot<K>* table, long long nb, long long shift,      \
                         long long epoch, int* heads, long long* tcounts, long long* tile_totals,               \
                         long long* tile_offsets, long long* state, long long* host) {                          \
        count_kernel<K>(pkeys, n, table, nb, shift, epoch, heads, tcounts, tile_totals, tile_offsets, state,    \
                        host);                                                                                   \
    }

#define JOIN_ROW_KERNELS(K, R, SUF)                                                                               \
    extern "C" __global__ void __launch_bounds__(JOIN_THREADS, JOIN_MIN_BLOCKS)                                   \
        join_write_##SUF(const K* pkeys, long long n, const Slot<K>* table, long long nb, long long shift,      \
                         long long epoch, const int* heads, const long long* tcounts,                           \
                         const long long* tile_offsets, const R* brows, const R* prows, R* out_b, R* out_p,     \
                         long long capacity) {                                                                   \
        write_kernel<K, R>(pkeys, n, table, nb, shift, epoch, heads, tcounts, tile_offsets, brows, prows, out_b, \
                           out_p, capacity);                                                                     \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(JOIN_THREADS, JOIN_MIN_BLOCKS)                                   \
        join_fused_##SUF(const K* bkeys, long long nbuild, const K* pkeys, long long n, Slot<K>* table,         \
                         long long nb, long long shift, long long epoch, int* heads, long long* tcounts,        \
                         long long* tile_totals, long long* tile_offsets, const R* brows, const R* prows,       \
                         R* out_b, R* out_p, long long capacity, long long* state, long long* host,             \
                         long long bar_base, long long timeout_ns) {                                             \
        fused_kernel<K, R>(bkeys, nbuild, pkeys, n, table, nb, shift, epoch, heads, tcounts, tile_totals,       \
                           tile_offsets, brows, prows, out_b, out_p, capacity, state, host, bar_base,           \
                           timeout_ns);                                                                          \
    }

// JOIN_KEY_BITS / JOIN_ROW_BITS (32 or 64) compile only the kernels of one key / row-id type (a quarter of the
// compile time); unset, every combination is compiled.
#if !defined(JOIN_KEY_BITS) || JOIN_KEY_BITS == 32
JOIN_KEY_KERNELS(int, i32)
JOIN_LINEAR_BUILD(int, i32)
JOIN_PART_COUNT(int, i32)
#if !defined(JOIN_ROW_BITS) || JOIN_ROW_BITS == 32
JOIN_ROW_KERNELS(int, int, i32_r32)
JOIN_LINEAR_PROBE(int, int, i32_r32)
JOIN_PART_ROWS(int, int, i32_r32)
#endif
#if !defined(JOIN_ROW_BITS) || JOIN_ROW_BITS == 64
JOIN_ROW_KERNELS(int, long long, i32_r64)
JOIN_LINEAR_PROBE(int, long long, i32_r64)
JOIN_PART_ROWS(int, long long, i32_r64)
#endif
#endif
#if !defined(JOIN_KEY_BITS) || JOIN_KEY_BITS == 64
JOIN_KEY_KERNELS(long long, i64)
JOIN_LINEAR_BUILD(long long, i64)
JOIN_PART_COUNT(long long, i64)
#if !defined(JOIN_ROW_BITS) || JOIN_ROW_BITS == 32
JOIN_ROW_KERNELS(long long, int, i64_r32)
JOIN_LINEAR_PROBE(long long, int, i64_r32)
JOIN_PART_ROWS(long long, int, i64_r32)
#endif
#if !defined(JOIN_ROW_BITS) || JOIN_ROW_BITS == 64
JOIN_ROW_KERNELS(long long, long long, i64_r64)
JOIN_LINEAR_PROBE(long long, long long, i64_r64)
JOIN_PART_ROWS(long long, long long, i64_r64)
#endif
#endif
