// Bitonic sort passes in CUDA C++ (CuPy RawModule on the GPU; nvcc -arch=sm_90 in CI; g++ with the thread
// emulation of bitonic_emulated.cpp on the CPU). This file holds the generic parts; impl/sort/codegen.py appends one
// `extern "C"` kernel per pass of a plan (impl/sort/plan.py): a short, straight sequence of the calls below with the
// pass's coordinates, layouts and register bits as template arguments, so every index is a compile-time constant.
//
// A block holds 2^T slots (a contiguous tile or a coset, see plan.py): position(s) = x0 ^ XOR of basis(i) over the
// coordinates i set in s. A thread holds 2^E slots in registers r[c]; a Layout maps coordinates to register bits
// (c), lane bits and warp bits (the thread index). Kernel arguments, the same for every pass:
//   src   raw input bits (read by the encode pass)      keys  key workspace (uint32 or uint64 per slot)
//   vals  uint32 index workspace (pairs mode)            out   output: raw bits (keys-only) or int64 indices
//   n     real slots (positions >= n are +inf pads, never read or written)
//   kind  0 unsigned, 1 signed, 2 float   canon  -0.0 -> +0.0 (argsort)   flip  all ones: descending
//   block0  index of the launch's first block (the host pipeline runs contiguous passes chunk by chunk)

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

#ifndef SORT_HOST_EMULATION
#define SORT_FN __device__ __forceinline__
#define SORT_HD __host__ __device__
#define SORT_SYNC() __syncthreads()
#define SORT_TID threadIdx.x
#define SORT_BID blockIdx.x
extern __shared__ __align__(16) unsigned char sort_smem[];
#endif
SORT_FN u32 vmin(u32 a, u32 b) { return a < b ? a : b; }  // min.u32 / max.u32 in PTX, no header needed
SORT_FN u32 vmax(u32 a, u32 b) { return a < b ? b : a; }
SORT_FN u64 vmin(u64 a, u64 b) { return a < b ? a : b; }
SORT_FN u64 vmax(u64 a, u64 b) { return a < b ? b : a; }
#define CV(X) decltype(X)::value  // the index of a static_for step, as a constant expression

// ---- compile-time helpers ---------------------------------------------------------------------------------------

template <int V>
struct Int {
    static constexpr int value = V;
};

template <int N, int I = 0, class F>
SORT_FN void static_for(F&& f) {  // f(Int<0>{}), ..., f(Int<N-1>{}): each index a constant expression
    if constexpr (I < N) {
        f(Int<I>{});
        static_for<N, I + 1>(f);
    }
}

template <int... I>
struct Seq {
    static constexpr int size = sizeof...(I);
    SORT_HD static constexpr int get(int j) {
        const int v[] = {I..., -1};
        return v[j];
    }
    SORT_HD static constexpr int find(int x) {  // index of x, -1 if absent
        for (int j = 0; j < size; ++j)
            if (get(j) == x) return j;
        return -1;
    }
};

SORT_HD constexpr int pivot_of(u32 b) {  // highest set bit
    int p = 0;
    while (p < 31 && (b >> (p + 1))) ++p;
    return p;
}

SORT_HD constexpr u32 pad_index(u32 s) { return s + (s >> 5) + (s >> 10); }  // shared slot: conflict padding

// Coordinates of register bit k (REGS), lane bit j (LANES, 5) and warp bit j (WARPS) of one layout.
template <class REGS, class LANES, class WARPS>
struct Layout {
    typedef REGS Regs;
    SORT_HD static constexpr u32 reg_slot(int c) {  // coordinate bits of register c
        u32 s = 0;
        for (int k = 0; k < REGS::size; ++k)
            if ((c >> k) & 1) s |= 1u << REGS::get(k);
        return s;
    }
    SORT_FN static u32 thread_slot(u32 tid) {  // coordinate bits of this thread
        u32 s = 0;
        static_for<LANES::size>([&](auto J) { s |= ((tid >> CV(J)) & 1u) << LANES::get(CV(J)); });
        static_for<WARPS::size>([&](auto J) { s |= ((tid >> (5 + CV(J))) & 1u) << WARPS::get(CV(J)); });
        return s;
    }
    template <class B, int ABOVE = -1>
    SORT_FN static u32 thread_offset(u32 tid) {  // sum of the thread's single-bit basis vectors (coordinates > ABOVE)
        u32 g = 0;
        static_for<LANES::size>([&](auto J) {
            if constexpr (LANES::get(CV(J)) > ABOVE) g += ((tid >> CV(J)) & 1u) * B::basis(LANES::get(CV(J)));
        });
        static_for<WARPS::size>([&](auto J) {
            if constexpr (WARPS::get(CV(J)) > ABOVE) g += ((tid >> (5 + CV(J))) & 1u) * B::basis(WARPS::get(CV(J)));
        });
        return g;
    }
};

// ---- order keys (impl/sort/keys.py, same transform) -------------------------------------------------------------

template <int NB>
struct Word {
    typedef u32 T;
};
template <>
struct Word<64> {
    typedef u64 T;
};

// Branch-free per key: the key's form is a compile-time argument, so a pass dispatches on it once per block
// (Block::by_form) rather than once per key. FORM bits 0-1: the kind (0 unsigned, 1 signed, 2 float); bit 2: canon
// (-0.0 as +0.0); bit 3: descending (the key complemented, as the runtime argument flip = all ones asks).
template <int FORM>
struct Form {
    static constexpr int KIND = FORM & 3;
    static constexpr bool CANON = (FORM >> 2) & 1, DESC = (FORM >> 3) & 1;
};

template <int FORM, class RAW>
SORT_FN u64 encode_key_as(RAW raw) {
    constexpr int NB = 8 * sizeof(RAW);
    typedef typename Word<NB>::T W;
    constexpr W SIGN = (W)1 << (NB - 1);
    constexpr W FULL = NB == 64 ? ~(W)0 : (W)(((u64)1 << NB) - 1);
    constexpr W INF = NB == 16 ? (W)0x7C00u : (W)0x7F800000u;  // +inf bits (float16, float32)
    const W u = (W)raw;
    W key = u;
    if constexpr (Form<FORM>::KIND == 2) {
        const W mag = u & (FULL ^ SIGN);
        key = u ^ ((u & SIGN) ? FULL : SIGN);  // negative: ~u; otherwise u | SIGN
        key = mag > INF ? FULL : key;          // every NaN after +inf
        if constexpr (Form<FORM>::CANON) key = mag == 0 ? SIGN : key;  // -0.0 as +0.0
    } else if constexpr (Form<FORM>::KIND == 1) {
        key = u ^ SIGN;
    }
    return (u64)(Form<FORM>::DESC ? key ^ FULL : key);
}

template <int FORM, class RAW>
SORT_FN RAW decode_key_as(u64 key64) {
    constexpr int NB = 8 * sizeof(RAW);
    typedef typename Word<NB>::T W;
    constexpr W SIGN = (W)1 << (NB - 1);
    constexpr W FULL = NB == 64 ? ~(W)0 : (W)(((u64)1 << NB) - 1);
    const W key = (W)(Form<FORM>::DESC ? ~key64 : key64) & FULL;
    if constexpr (Form<FORM>::KIND == 2) return (RAW)((key & SIGN) ? key ^ SIGN : (W)(~key & FULL));
    return (RAW)(Form<FORM>::KIND == 1 ? key ^ SIGN : key);
}

// ---- slot modes: what a register holds, how it compares, where it lives -----------------------------------------

// The minimum and the compare-exchange of a slot mode ordered by its own M::less (no min/max instruction fits).
template <class M, class V>
SORT_FN V lo_by_less(V a, V b) {
    return M::less(b, a) ? b : a;
}
template <class M, class V>
SORT_FN void cx_by_less(V& a, V& b) {
    const bool swap = M::less(b, a);
    const V l = swap ? b : a, h = swap ? a : b;
    a = l;
    b = h;
}

struct Keys32 {  // keys-only, keys of up to 32 bits
    typedef u32 V;
    SORT_FN static V pad() { return 0xFFFFFFFFu; }
    SORT_FN static V cpl(V a) { return ~a; }
    SORT_FN static V xmask(V a, u32 m) { return a ^ m; }
    SORT_FN static V lo(V a, V b) { return vmin(a, b); }
    SORT_FN static void cx(V& a, V& b) {
        const V l = vmin(a, b), h = vmax(a, b);
        a = l;
        b = h;
    }
    // The same exchange with the maximum as a + b - min (exact modulo 2^32) in two integer multiply-adds, which issue
    // to the FMA pipe while min and max share the ALU pipe. `one` is 1 at run time; a constant 1 would let ptxas fold
    // the products back into one ALU add.
    SORT_FN static void cx_fma(V& a, V& b, u32 one) {
        const V l = vmin(a, b), h = (a * one + b) - l * one;
        a = l;
        b = h;
    }
    SORT_FN static V ld(const void* k, const void*, u32 b, i64 o) { return (static_cast<const u32*>(k) + b)[o]; }
    SORT_FN static void st(void* k, void*, u32 b, i64 o, V v) { (static_cast<u32*>(k) + b)[o] = v; }
    template <u32 S>
    SORT_FN static void sst(unsigned char* m, u32 i, V v) { reinterpret_cast<u32*>(m)[i] = v; }
    template <u32 S>
    SORT_FN static V sld(const unsigned char* m, u32 i) { return reinterpret_cast<const u32*>(m)[i]; }
    SORT_FN static V make(u64 key, u32) { return (V)key; }
    template <class RAW, int FORM>
    SORT_FN static void emit(void* out, u32 b, i64 o, V v) {
        (static_cast<RAW*>(out) + b)[o] = decode_key_as<FORM, RAW>(v);
    }
};

struct Keys64 {  // keys-only, 64-bit keys
    typedef u64 V;
    SORT_FN static V pad() { return ~0ull; }
    SORT_FN static V cpl(V a) { return ~a; }
    SORT_FN static V xmask(V a, u32 m) { return a ^ (u64)(i64)(int)m; }
    SORT_FN static V lo(V a, V b) { return vmin(a, b); }
    SORT_FN static void cx(V& a, V& b) {
        const V l = vmin(a, b), h = vmax(a, b);
        a = l;
        b = h;
    }
    SORT_FN static V ld(const void* k, const void*, u32 b, i64 o) { return (static_cast<const u64*>(k) + b)[o]; }
    SORT_FN static void st(void* k, void*, u32 b, i64 o, V v) { (static_cast<u64*>(k) + b)[o] = v; }
    template <u32 S>
    SORT_FN static void sst(unsigned char* m, u32 i, V v) { reinterpret_cast<u64*>(m)[i] = v; }
    template <u32 S>
    SORT_FN static V sld(const unsigned char* m, u32 i) { return reinterpret_cast<const u64*>(m)[i]; }
    SORT_FN static V make(u64 key, u32) { return key; }
    template <class RAW, int FORM>
    SORT_FN static void emit(void* out, u32 b, i64 o, V v) {
        (static_cast<RAW*>(out) + b)[o] = decode_key_as<FORM, RAW>(v);
    }
};

// Argsort of keys up to 32 bits in one 64-bit word, compared as a double: c = key << 31 | index (index < 2^31) is
// stored as the bits of a normal, finite double that is monotone in c (H = 2^62, O = 2^52, the smallest normal),
//     c < H:  sign set, magnitude bits H + O - c          c >= H:  sign clear, bits c - H + O,
// so one double comparison (DSETP, on the FP64 pipe) orders two slots where a 64-bit integer one takes four ALU
// compares; negation (the sign bit) reverses the order as ~ does for integers, and +inf is the pad.
SORT_FN double as_f64(u64 v) {
#ifdef SORT_HOST_EMULATION
    double d;
    memcpy(&d, &v, 8);
    return d;
#else
    return __longlong_as_double((long long)v);
#endif
}

struct Composite : Keys64 {  // Keys64's loads and stores; its own order, pad and slot contents
    static constexpr u64 SIGN = 1ull << 63, H = 1ull << 62, O = 1ull << 52;
    SORT_FN static V pad() { return 0x7FF0000000000000ull; }  // +inf
    SORT_FN static V cpl(V a) { return a ^ SIGN; }
    SORT_FN static V xmask(V a, u32 m) { return a ^ ((u64)(m & 0x80000000u) << 32); }
    SORT_FN static bool less(V a, V b) { return as_f64(a) < as_f64(b); }
    SORT_FN static V lo(V a, V b) { return lo_by_less<Composite>(a, b); }
    SORT_FN static void cx(V& a, V& b) { cx_by_less<Composite>(a, b); }
    SORT_FN static V make(u64 key, u32 p) {
        const u64 c = (key << 31) | p;
        return c < H ? SIGN | (H + O - c) : c - H + O;
    }
    template <class RAW, int FORM>
    SORT_FN static void emit(void* out, u32 b, i64 o, V v) {
        const u64 c = (v & SIGN) ? H + O - (v ^ SIGN) : v + H - O;
        (static_cast<i64*>(out) + b)[o] = (i64)(c & 0x7FFFFFFFull);
    }
};

struct Pairs {  // argsort of 64-bit keys: (key, index) compared lexicographically, two arrays
    struct V {
        u64 k;
        u32 v;
    };
    SORT_FN static V pad() { return V{~0ull, 0xFFFFFFFFu}; }
    SORT_FN static V cpl(V a) { return V{~a.k, ~a.v}; }
    SORT_FN static V xmask(V a, u32 m) { return V{a.k ^ (u64)(i64)(int)m, a.v ^ m}; }
    SORT_FN static bool less(V a, V b) { return a.k < b.k || (a.k == b.k && a.v < b.v); }
    SORT_FN static V lo(V a, V b) { return lo_by_less<Pairs>(a, b); }
    SORT_FN static void cx(V& a, V& b) { cx_by_less<Pairs>(a, b); }
    SORT_FN static V ld(const void* k, const void* x, u32 b, i64 o) {
        return V{(static_cast<const u64*>(k) + b)[o], (static_cast<const u32*>(x) + b)[o]};
    }
    SORT_FN static void st(void* k, void* x, u32 b, i64 o, V v) {
        (static_cast<u64*>(k) + b)[o] = v.k;
        (static_cast<u32*>(x) + b)[o] = v.v;
    }
    template <u32 S>
    SORT_FN static void sst(unsigned char* m, u32 i, V v) {
        reinterpret_cast<u64*>(m)[i] = v.k;
        reinterpret_cast<u32*>(m + 8 * S)[i] = v.v;
    }
    template <u32 S>
    SORT_FN static V sld(const unsigned char* m, u32 i) {
        return V{reinterpret_cast<const u64*>(m)[i], reinterpret_cast<const u32*>(m + 8 * S)[i]};
    }
    SORT_FN static V make(u64 key, u32 p) { return V{key, p}; }
    template <class RAW, int FORM>
    SORT_FN static void emit(void* out, u32 b, i64 o, V v) { (static_cast<i64*>(out) + b)[o] = (i64)v.v; }
};

// ---- one block of one pass --------------------------------------------------------------------------------------
// P: the pass (T, E, F, basis(i)); M: slot mode; RAW: input bits (encode/decode passes); ENC/DEC: first/last pass.
template <class P, class M, class RAW, bool ENC, bool DEC>
struct Block {
    typedef typename M::V V;
    static constexpr int E = 1 << P::E;
    static constexpr u32 S = pad_index((1u << P::T) - 1) + 1;  // shared slots (with padding)
    static constexpr u32 FMASK = P::F >= 0 ? P::basis(P::F < 0 ? 0 : P::F) : 0u;

    const void* src;
    void* keys;
    void* vals;
    void* out;
    u32 n;
    int kind, canon;
    u64 flip;
    // Slots with s_f = 0 sit at base0 + G(s); with s_f = 1 at base1 - G(s) + 2 H(s), H(s) the part of G(s) above the
    // flip coordinate (a coset whose fillers lie above its flip mask: a merge pass of a stage inside the tile).
    u32 tid, base0, base1;
    u32 one;                // 1, from a kernel argument (Keys32::cx_fma)
    bool full;              // every slot of the block is real: no bounds checks
    bool half;              // the s_f = 0 half is real and the flip half all pads: that half is neither read nor
                            // written (a top stage's flip pass holds many such blocks when n is not a power of two)

    SORT_FN Block(const void* src_, void* keys_, void* vals_, void* out_, i64 n_, int kind_, int canon_, u64 flip_,
                  u32 block0)
        : src(src_), keys(keys_), vals(vals_), out(out_), n((u32)n_), kind(kind_), canon(canon_), flip(flip_) {
        tid = SORT_TID;
        one = n_ >= 0 ? 1u : 3u;  // n_ is never negative; ptxas cannot know that
        u32 x0 = SORT_BID + block0;  // block index with zeros inserted at the basis pivots (ascending)
        static_for<P::T>([&](auto I) {
            constexpr int p = pivot_of(P::basis(CV(I)));
            x0 = ((x0 >> p) << (p + 1)) | (x0 & ((1u << p) - 1u));
        });
        base0 = x0;
        base1 = x0 ^ FMASK;
        u32 gall = 0, gabove = 0;
        static_for<P::T>([&](auto I) {
            if constexpr (CV(I) != P::F) gall += P::basis(CV(I));
            if constexpr (P::F >= 0 && CV(I) > P::F) gabove += P::basis(CV(I));
        });
        const u64 top = P::F >= 0 ? (u64)base1 + gabove : (u64)x0 + gall;  // the coset's largest position
        full = top < (u64)n;
        // flip half: positions base1 - Gbelow + H (H: the part above the flip coordinate), the least base1 - gbelow
        half = P::F >= 0 && !full && (u64)base0 + gall < (u64)n && (u64)base1 - (gall - gabove) >= (u64)n;
    }

    template <class L>
    SORT_HD static constexpr int freg() { return P::F >= 0 ? L::Regs::find(P::F) : -1; }
    template <class L>
    SORT_HD static constexpr bool sf(int c) { return freg<L>() >= 0 && ((c >> freg<L>()) & 1); }
    template <class L, int ABOVE = -1>
    SORT_HD static constexpr u32 gc(int c) {  // single-bit basis vectors of register c (of coordinates > ABOVE)
        u32 g = 0;
        for (int k = 0; k < L::Regs::size; ++k)
            if (((c >> k) & 1) && L::Regs::get(k) != P::F && L::Regs::get(k) > ABOVE) g += P::basis(L::Regs::get(k));
        return g;
    }
    template <class L>
    SORT_FN u32 high_offset() const {  // the part of the thread's offset above the flip coordinate
        if constexpr (P::F >= 0) return L::template thread_offset<P, P::F>(tid);
        return 0u;
    }

    // Slot at position base + off (off a compile-time constant, negative for the flip half): indexing from a
    // per-thread base pointer lets the offsets become immediates of the load and store instructions.
    template <int FORM>
    SORT_FN V fetch(u32 base, i64 off) const {
        if constexpr (ENC) {
            const RAW raw = (static_cast<const RAW*>(src) + base)[off];
            return M::make(encode_key_as<FORM>(raw), (u32)(base + off));
        } else {
            return M::ld(keys, vals, base, off);
        }
    }
    template <int FORM>
    SORT_FN void put(u32 base, i64 off, V v) const {
        if constexpr (DEC) M::template emit<RAW, FORM>(out, base, off, v);
        else M::st(keys, vals, base, off, v);
    }

    template <class L>
    SORT_FN static constexpr i64 off(int c) {
        return sf<L>(c) ? 2 * (i64)gc<L, P::F>(c) - (i64)gc<L>(c) : (i64)gc<L>(c);  // flip half: -G + 2H
    }

    // f(Int<form>{}) for the pass's key form (Form: kind, canon, descending) where the pass encodes or decodes keys
    // (USES), else f(Int<0>{}): one branch per block, every key's transform then specialised to its form.
    template <bool USES, class F>
    SORT_FN void by_form(F&& f) const {
        if constexpr (USES) {
            const bool desc = flip != 0;
            if (kind == 2) {
                bool canon_used = false;  // -0.0 matters to encoding only
                if constexpr (ENC) canon_used = canon != 0;
                if (canon_used) {
                    if (desc) f(Int<14>{});
                    else f(Int<6>{});
                } else {
                    if (desc) f(Int<10>{});
                    else f(Int<2>{});
                }
            } else if (kind == 1) {
                if (desc) f(Int<9>{});
                else f(Int<1>{});
            } else {
                if (desc) f(Int<8>{});
                else f(Int<0>{});
            }
        } else {
            f(Int<0>{});
        }
    }

    template <class L>
    SORT_FN void load(V* r) const {  // global -> registers in layout L (lanes on the run: coalesced)
        by_form<ENC>([&](auto K) { load_as<L, CV(K)>(r); });
    }
    template <class L, int FORM>
    SORT_FN void load_as(V* r) const {
        static_assert(P::F < 0 || freg<L>() >= 0, "the load layout must hold the flip coordinate in registers");
        const u32 g = L::template thread_offset<P>(tid), lo = base0 + g, hi = base1 - g + 2 * high_offset<L>();
        if (full) {
            static_for<E>([&](auto C) {
                constexpr int c = CV(C);
                const V v = fetch<FORM>(sf<L>(c) ? hi : lo, off<L>(c));
                r[c] = sf<L>(c) ? M::cpl(v) : v;
            });
        } else if (half) {
            static_for<E>([&](auto C) {
                constexpr int c = CV(C);
                if constexpr (sf<L>(c)) r[c] = M::cpl(M::pad());
                else r[c] = fetch<FORM>(lo, off<L>(c));
            });
        } else {
            const i64 room_lo = (i64)n - lo, room_hi = (i64)n - hi;  // position < n  <=>  off < room
            static_for<E>([&](auto C) {
                constexpr int c = CV(C);
                const bool real = off<L>(c) < (sf<L>(c) ? room_hi : room_lo);
                const V v = real ? fetch<FORM>(sf<L>(c) ? hi : lo, off<L>(c)) : M::pad();
                r[c] = sf<L>(c) ? M::cpl(v) : v;
            });
        }
    }

    template <class L>
    SORT_FN void store(const V* r) const {  // registers -> global; pads are never written
        by_form<DEC>([&](auto K) { store_as<L, CV(K)>(r); });
    }
    template <class L, int FORM>
    SORT_FN void store_as(const V* r) const {
        static_assert(P::F < 0 || freg<L>() >= 0, "the store layout must hold the flip coordinate in registers");
        const u32 g = L::template thread_offset<P>(tid), lo = base0 + g, hi = base1 - g + 2 * high_offset<L>();
        if (full) {
            static_for<E>([&](auto C) {
                constexpr int c = CV(C);
                put<FORM>(sf<L>(c) ? hi : lo, off<L>(c), sf<L>(c) ? M::cpl(r[c]) : r[c]);
            });
        } else if (half) {
            static_for<E>([&](auto C) {
                constexpr int c = CV(C);
                if constexpr (!sf<L>(c)) put<FORM>(lo, off<L>(c), r[c]);
            });
        } else {
            const i64 room_lo = (i64)n - lo, room_hi = (i64)n - hi;
            static_for<E>([&](auto C) {
                constexpr int c = CV(C);
                if (off<L>(c) < (sf<L>(c) ? room_hi : room_lo))
                    put<FORM>(sf<L>(c) ? hi : lo, off<L>(c), sf<L>(c) ? M::cpl(r[c]) : r[c]);
            });
        }
    }

    // Registers of layout A -> shared memory -> registers of layout B. SYNC_FIRST: an earlier exchange may still be
    // reading the shared slots this one overwrites.
    template <class A, class B, bool SYNC_FIRST>
    SORT_FN void exchange(V* r) const {
        if constexpr (SYNC_FIRST) SORT_SYNC();
        const u32 ta = pad_index(A::thread_slot(tid));
        static_for<E>([&](auto C) { M::template sst<S>(sort_smem, ta + pad_index(A::reg_slot(CV(C))), r[CV(C)]); });
        SORT_SYNC();
        const u32 tb = pad_index(B::thread_slot(tid));
        static_for<E>([&](auto C) { r[CV(C)] = M::template sld<S>(sort_smem, tb + pad_index(B::reg_slot(CV(C)))); });
    }

    // Compare-exchange of registers c and c | 2^K: P::FMA of every 6 pairs of a step (by their rank among its pairs)
    // take the maximum on the FMA pipe (Keys32 tile passes only), so the ALU-bound tile pass uses two pipes.
    template <int K, int C>
    SORT_FN void cxp(V& a, V& b) const {
        constexpr int rank = ((C >> (K + 1)) << K) | (C & ((1 << K) - 1));
        if constexpr (P::FMA > 0 && rank % 6 < P::FMA) M::cx_fma(a, b, one);
        else M::cx(a, b);
    }

    template <int K>
    SORT_FN void cx(V* r) const {  // half-cleaner step on register bit K: minimum to the slot with bit K clear
        static_for<E>([&](auto C) {
            constexpr int c = CV(C);
            if constexpr (!((c >> K) & 1)) cxp<K, c>(r[c], r[c | (1 << K)]);
        });
    }

    template <int K>
    SORT_FN static void fx(V* r) {  // flip step on register bit K (the flip coordinate: its upper half complemented)
        static_for<E>([&](auto C) {
            constexpr int c = CV(C);
            if constexpr (!((c >> K) & 1)) {
                const V a = r[c], b = r[c | (1 << K)];
                r[c] = M::lo(a, M::cpl(b));
                r[c | (1 << K)] = M::lo(M::cpl(a), b);
            }
        });
    }

    // Merge-pass steps (flip form) that leave out work whose result is known. Positions >= n hold pads, the largest
    // keys, from the load on (every comparator keeps the minimum at the lower position), so in a half block the flip
    // half never changes: its compare-exchanges and the flip step itself are no-ops. The test is uniform over the
    // block or, where the flip coordinate is a warp bit, over the warp. Passes without a flip coordinate test
    // nothing: a per-step test of theirs ("are the step's upper slots all pads?") costs their 8-step kernels 10
    // registers and one resident block per multiprocessor.
    template <class L, int K>
    SORT_FN void mcx(V* r) const {
        if constexpr (P::F < 0) {
            cx<K>(r);
        } else if constexpr (freg<L>() >= 0) {
            if (half) {
                static_for<E>([&](auto C) {
                    constexpr int c = CV(C);
                    if constexpr (!((c >> K) & 1) && !sf<L>(c)) cxp<K, c>(r[c], r[c | (1 << K)]);
                });
            } else {
                cx<K>(r);
            }
        } else {
            if (half && ((L::thread_slot(tid) >> P::F) & 1u)) return;  // this thread holds flip-half pads only
            cx<K>(r);
        }
    }
    template <class L, int K>
    SORT_FN void mfx(V* r) const {
        if (!half) fx<K>(r);
    }

    // Complement the slots whose coordinate bits A ^ B are 1 (-1: no bit): stage changes of the tile pass.
    template <class L, int A, int B>
    SORT_FN void xr(V* r) const {
        constexpr int ka = A >= 0 ? L::Regs::find(A) : -1, kb = B >= 0 ? L::Regs::find(B) : -1;
        const u32 ts = L::thread_slot(tid);
        const u32 ta = A >= 0 && ka < 0 ? ts >> (A < 0 ? 0 : A) : 0u;  // runtime parts: coordinates of the thread
        const u32 tb = (ta ^ (B >= 0 && kb < 0 ? ts >> (B < 0 ? 0 : B) : 0u)) & 1u;
        const u32 m = 0u - tb;
        static_for<E>([&](auto C) {
            constexpr int c = CV(C);
            constexpr int cb = ((ka >= 0 ? c >> ka : 0) ^ (kb >= 0 ? c >> kb : 0)) & 1;
            if constexpr ((ka >= 0 || A < 0) && (kb >= 0 || B < 0)) {
                if constexpr (cb) r[c] = M::cpl(r[c]);
            } else {
                r[c] = M::xmask(r[c], cb ? ~m : m);
            }
        });
    }
};

#define SORT_PARAMS                                                                                             \
    const void *src, void *keys, void *vals, void *out, long long n, int kind, int canon, unsigned long long flip, \
        unsigned block0
#define SORT_ARGS src, keys, vals, out, n, kind, canon, flip, block0
