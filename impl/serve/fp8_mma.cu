// Weight-only FP8 GEMV on the tensor cores: y[m, n] = bf16(s[n] * sum_k x[m, k] * q[n, k]).
//   x bf16 [M, K] (row stride ldx elements), q e4m3 codes [N, K] (row stride ldw bytes), s float32 [N] or [1],
//   y bf16 [M, N] (row stride ldy). K % 16 == 0; x, q and their row strides 16-byte aligned (the wrapper checks).
//
// One block computes 8 weight rows n0..n0+7 for one tile of up to 16 tokens m0..m0+15, over all of K. Its warps
// split K into chunks of 64 codes (warp v takes chunks v, v + W, v + 2W, ...); each lane (g = lane / 4, t = lane % 4)
// loads 16 consecutive codes of weight row n0 + g with one 16-byte load, so a warp reads 8 rows x 64 bytes per
// chunk, and MMA_UNROLL chunks' loads are in flight before any is used: register-resident, no shared memory, no
// barrier in the loop. The 16 codes become 4 mma.m16n8k16 steps: B = the codes (k x 8 weight rows, decoded to bf16
// by integer bit operations: PRMT spreads two codes into two 16-bit lanes with their sign replicated, a shift and a
// mask leave bf16 bits of value x 2^-120, a bf16x2 multiply by 2^120 restores the value exactly), A = x (16 tokens x
// k, as loaded: bf16 needs no conversion). Step j of a lane's 16 codes pairs the mma's k slots {2t, 2t+1, 2t+8,
// 2t+9} with codes 4j..4j+3 of its load; A's and B's fragments use the same slots, so each lane feeds both operands
// from its own loads. D's fragment (token g / g + 8, weight rows 2t, 2t + 1) is summed over the block's warps in
// warp order through shared memory, scaled and rounded once.
// e4m3's NaN codes (0x7F, 0xFF) decode to +-480; impl.fp8's quantizer saturates at 448 and stores no NaN.
// fp8_mma.py holds the launcher and the CPU twin (``mma_gemv_twin``), which follows these lanes step by step.
// No headers: NVRTC (CuPy's compiler) finds none by default; bf16 travels as its 16 bits (unsigned short).
typedef unsigned int uint32_t;
typedef unsigned char uint8_t;
typedef unsigned short bf16_bits;

#ifndef MMA_WARPS
#define MMA_WARPS 8  // warps per block, splitting K
#endif
#ifndef MMA_UNROLL
#define MMA_UNROLL 8  // chunks of 64 codes per warp in flight
#endif
#ifndef MMA_MIN_BLOCKS
#define MMA_MIN_BLOCKS 1  // blocks per SM the registers must allow (__launch_bounds__)
#endif
#ifndef MMA_TOKENS
#define MMA_TOKENS 16  // 8: tokens g only (M <= 8, A's rows g + 8 are zero); 16: tokens g and g + 8
#endif

#define MMA_THREADS (MMA_WARPS * 32)

__device__ __forceinline__ void decode4(uint32_t codes, uint32_t& lo, uint32_t& hi) {
  uint32_t t0, t1;
  asm("prmt.b32 %0, %1, 0, 0x9180;" : "=r"(t0) : "r"(codes));  // [sign(b1) b1 | sign(b0) b0]
  asm("prmt.b32 %0, %1, 0, 0xB3A2;" : "=r"(t1) : "r"(codes));  // [sign(b3) b3 | sign(b2) b2]
  t0 = (t0 << 4) & 0x87F087F0u;
  t1 = (t1 << 4) & 0x87F087F0u;
  asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(lo) : "r"(t0), "r"(0x7B807B80u));  // x 2^120 in both lanes
  asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(hi) : "r"(t1), "r"(0x7B807B80u));
}

// Programmatic dependent launch: with the launch attribute the kernel may start while the previous one on the stream
// finishes; griddepcontrol.wait returns once that grid has completed and its memory is visible (without the attribute,
// at once), and launch_dependents lets the next kernel start its own prologue. Codes are never written by a kernel, so
// they are loaded before the wait; x, the scales and y only after it.
__device__ __forceinline__ void wait_for_previous_grid() {
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

__device__ __forceinline__ bf16_bits to_bf16(float v) {  // round to nearest even; NaN stays NaN
  bf16_bits out;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(out) : "f"(v));
  return out;
}

__device__ __forceinline__ void mma_bf16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, MMA_MIN_BLOCKS)
fp8_mma_gemv(const bf16_bits* __restrict__ x, const uint8_t* __restrict__ q, const float* __restrict__ s,
             bf16_bits* __restrict__ y, int M, int N, int K, long long ldx, long long ldw, long long ldy,
             int per_tensor, int m_tiles) {
  __shared__ float part[MMA_WARPS][16][8];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  // token tiles vary fastest, so the blocks of one weight slab run together and its later reads hit L2
  const int m0 = (blockIdx.x % m_tiles) * 16, n0 = (blockIdx.x / m_tiles) * 8;
  const bool row_ok = n0 + g < N;
  const bool lo_ok = m0 + g < M, hi_ok = MMA_TOKENS == 16 && m0 + g + 8 < M;
  const uint8_t* qrow = q + (long long)(row_ok ? n0 + g : 0) * ldw + t * 16;
  const bf16_bits* xlo = x + (long long)(lo_ok ? m0 + g : 0) * ldx + t * 16;
  const bf16_bits* xhi = x + (long long)(hi_ok ? m0 + g + 8 : 0) * ldx + t * 16;
  const int chunks = (K + 63) / 64;
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  float d[4] = {0.f, 0.f, 0.f, 0.f};
  bool waited = false;
  for (int c0 = warp; c0 < chunks; c0 += MMA_WARPS * MMA_UNROLL) {
    uint4 w[MMA_UNROLL];
#pragma unroll
    for (int u = 0; u < MMA_UNROLL; ++u) {  // every load first: MMA_UNROLL x 16 bytes a lane in flight
      const int k = (c0 + u * MMA_WARPS) * 64;
      w[u] = (row_ok && k + t * 16 < K) ? __ldcs(reinterpret_cast<const uint4*>(qrow + k)) : zero;
    }
    if (!waited) {  // the codes are in flight; x (and y's memory) may belong to the kernel before this one
      wait_for_previous_grid();
      waited = true;
    }
#pragma unroll
    for (int u = 0; u < MMA_UNROLL; ++u) {
      const int c = c0 + u * MMA_WARPS;
      if (c >= chunks) break;  // the same for every lane of the warp: mma.sync stays converged
      const int k = c * 64;
      const bool in_k = k + t * 16 < K;
      uint4 a_lo0 = zero, a_lo1 = zero, a_hi0 = zero, a_hi1 = zero;
      if (lo_ok && in_k) {
        a_lo0 = __ldg(reinterpret_cast<const uint4*>(xlo + k));
        a_lo1 = __ldg(reinterpret_cast<const uint4*>(xlo + k + 8));
      }
      if (hi_ok && in_k) {
        a_hi0 = __ldg(reinterpret_cast<const uint4*>(xhi + k));
        a_hi1 = __ldg(reinterpret_cast<const uint4*>(xhi + k + 8));
      }
      uint32_t b0, b1;
      decode4(w[u].x, b0, b1);
      mma_bf16(d, a_lo0.x, a_hi0.x, a_lo0.y, a_hi0.y, b0, b1);
      decode4(w[u].y, b0, b1);
      mma_bf16(d, a_lo0.z, a_hi0.z, a_lo0.w, a_hi0.w, b0, b1);
      decode4(w[u].z, b0, b1);
      mma_bf16(d, a_lo1.x, a_hi1.x, a_lo1.y, a_hi1.y, b0, b1);
      decode4(w[u].w, b0, b1);
      mma_bf16(d, a_lo1.z, a_hi1.z, a_lo1.w, a_hi1.w, b0, b1);
    }
  }
  wait_for_previous_grid();  // (again: a warp without chunks has not waited; once it has resolved it returns at once)
  part[warp][g][2 * t] = d[0];
  part[warp][g][2 * t + 1] = d[1];
  part[warp][g + 8][2 * t] = d[2];
  part[warp][g + 8][2 * t + 1] = d[3];
  __syncthreads();
  for (int i = threadIdx.x; i < 16 * 8; i += MMA_THREADS) {
    const int m = i >> 3, r = i & 7;
    if (m0 + m < M && n0 + r < N) {
      float acc = part[0][m][r];
#pragma unroll
      for (int v = 1; v < MMA_WARPS; ++v) acc += part[v][m][r];
      const float scale = per_tensor ? s[0] : s[n0 + r];
      y[(long long)(m0 + m) * ldy + n0 + r] = to_bf16(acc * scale);
    }
  }
}

// One token (M == 1), each warp its own weight rows: y[n] = bf16(s[n] * sum_k x[k] q[n, k]).
// Lane l = 4g + t loads 16 codes at k = c * 512 + 16 l of each of its warp's MMA_ROW_RUN rows (rows n, n + 1, ...), so
// one warp instruction reads 512 contiguous bytes of a row (whole 128-byte lines, as a copy does), and the 16 x
// values at the same k. The mma's A rows are then lane groups, not tokens: row g of A holds the x of lanes (g, 0..3)
// and column g of B their codes, so D[g][g] is the dot product over lane group g's 64 codes of the chunk (the other
// entries pair mismatched k and are never read). Lane (g, t = g / 2) holds D[g][g] in d[g % 2]; a butterfly of warp
// shuffles sums the 8 diagonal entries, lane 0 scales and stores. No shared memory, no barrier.
#ifndef MMA_ROW_RUN
#define MMA_ROW_RUN 1  // weight rows a warp computes together (x loaded once for all of them)
#endif
#ifndef MMA_PIPE
#define MMA_PIPE 0  // 1: two register sets, the next MMA_UNROLL pieces' loads issued before this set is used
#endif

// Loads of pieces c0 .. c0 + MMA_UNROLL - 1 of the warp's rows (pieces past K, or rows past N, are zero: no access).
__device__ __forceinline__ void row_load(uint4 (&w)[MMA_UNROLL][MMA_ROW_RUN], const uint8_t* __restrict__ q, int n0,
                                         int N, int K, long long ldw, int c0, int lane) {
#pragma unroll
  for (int u = 0; u < MMA_UNROLL; ++u) {
    const int k = (c0 + u) * 512 + lane * 16;
#pragma unroll
    for (int r = 0; r < MMA_ROW_RUN; ++r)
      w[u][r] = (n0 + r < N && k < K) ? __ldcs(reinterpret_cast<const uint4*>(q + (long long)(n0 + r) * ldw + k))
                                      : make_uint4(0u, 0u, 0u, 0u);
  }
}

__device__ __forceinline__ void mma_e4m3(float (&d)[4], uint32_t a0, uint32_t a2, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1));
}

// D[g][g] of lane group g (lane (g, g / 2) holds it in d[g % 2]) summed over the warp by a butterfly.
__device__ __forceinline__ float diagonal_sum(const float (&d)[4], int lane) {
  const int g = lane >> 2, t = lane & 3;
  float v = (t == (g >> 1)) ? ((g & 1) ? d[1] : d[0]) : 0.f;  // D[g][g]
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// A lane's 16 bf16 x values of a piece at k (zero past K).
__device__ __forceinline__ void load_x16(const bf16_bits* __restrict__ x, int k, int K, uint4& a0, uint4& a1) {
  a0 = a1 = make_uint4(0u, 0u, 0u, 0u);
  if (k < K) {
    a0 = __ldg(reinterpret_cast<const uint4*>(x + k));
    a1 = __ldg(reinterpret_cast<const uint4*>(x + k + 8));
  }
}

// A lane's share of one 512-code piece: its 16 x values against its 16 codes, decoded, in four m16n8k16 steps
// (step j: codes 4j..4j+3).
__device__ __forceinline__ void piece_bf16(float (&d)[4], const uint4& a0, const uint4& a1, const uint4& w) {
  uint32_t b0, b1;
  decode4(w.x, b0, b1);
  mma_bf16(d, a0.x, 0u, a0.y, 0u, b0, b1);
  decode4(w.y, b0, b1);
  mma_bf16(d, a0.z, 0u, a0.w, 0u, b0, b1);
  decode4(w.z, b0, b1);
  mma_bf16(d, a1.x, 0u, a1.y, 0u, b0, b1);
  decode4(w.w, b0, b1);
  mma_bf16(d, a1.z, 0u, a1.w, 0u, b0, b1);
}

// D[r] += the pieces' products, piece by piece in k order (the order every variant keeps: the twin's).
// A8 false: x bf16, four m16n8k16 steps a piece (the codes decoded to bf16). A8 true (W8A8): x e4m3 codes, two
// m16n8k32 e4m3 steps a piece and no decoding: lane (g, t) gives A's row g and B's column g the same 8 codes a step
// (its k slots 4t..4t+3 and 16+4t..16+4t+3), so D[g][g] again sums lane group g's products.
template <bool A8>
__device__ __forceinline__ void row_accumulate(float (&d)[MMA_ROW_RUN][4], const uint4 (&w)[MMA_UNROLL][MMA_ROW_RUN],
                                               const void* __restrict__ xv, int K, int c0, int chunks, int lane) {
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
  for (int u = 0; u < MMA_UNROLL; ++u) {
    if (c0 + u >= chunks) break;  // the same for the whole warp
    const int k = (c0 + u) * 512 + lane * 16;
    if constexpr (A8) {
      const uint4 a = k < K ? __ldg(reinterpret_cast<const uint4*>(static_cast<const uint8_t*>(xv) + k)) : zero;
#pragma unroll
      for (int r = 0; r < MMA_ROW_RUN; ++r) {
        mma_e4m3(d[r], a.x, a.y, w[u][r].x, w[u][r].y);
        mma_e4m3(d[r], a.z, a.w, w[u][r].z, w[u][r].w);
      }
    } else {
      uint4 a0, a1;
      load_x16(static_cast<const bf16_bits*>(xv), k, K, a0, a1);
#pragma unroll
      for (int r = 0; r < MMA_ROW_RUN; ++r) piece_bf16(d[r], a0, a1, w[u][r]);
    }
  }
}

// MMA_PIPE 0: load MMA_UNROLL pieces, use them, repeat (the warp's loads come in bursts). MMA_PIPE 1: two register
// sets alternate, and the loads of one are issued before the other's products, so a warp's loads stay in flight
// while it computes; the pieces are summed in the same order either way. A8: y = bf16((sum * sx) * s[n]).
template <bool A8>
__device__ __forceinline__ void row_kernel(const void* __restrict__ x, const float* __restrict__ sx,
                                           const uint8_t* __restrict__ q, const float* __restrict__ s,
                                           bf16_bits* __restrict__ y, int N, int K, long long ldw, int per_tensor) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n0 = (blockIdx.x * MMA_WARPS + warp) * MMA_ROW_RUN;
  const int chunks = (K + 511) / 512;
  float d[MMA_ROW_RUN][4];
#pragma unroll
  for (int r = 0; r < MMA_ROW_RUN; ++r) d[r][0] = d[r][1] = d[r][2] = d[r][3] = 0.f;
  uint4 wa[MMA_UNROLL][MMA_ROW_RUN];
  row_load(wa, q, n0, N, K, ldw, 0, lane);
  wait_for_previous_grid();  // the first codes are in flight; x may belong to the kernel before this one
#if MMA_PIPE
  uint4 wb[MMA_UNROLL][MMA_ROW_RUN];
  for (int c0 = 0; c0 < chunks; c0 += 2 * MMA_UNROLL) {
    row_load(wb, q, n0, N, K, ldw, c0 + MMA_UNROLL, lane);
    row_accumulate<A8>(d, wa, x, K, c0, chunks, lane);
    row_load(wa, q, n0, N, K, ldw, c0 + 2 * MMA_UNROLL, lane);
    row_accumulate<A8>(d, wb, x, K, c0 + MMA_UNROLL, chunks, lane);
  }
#else
  for (int c0 = 0; c0 < chunks; c0 += MMA_UNROLL) {
    if (c0) row_load(wa, q, n0, N, K, ldw, c0, lane);
    row_accumulate<A8>(d, wa, x, K, c0, chunks, lane);
  }
#endif
#pragma unroll
  for (int r = 0; r < MMA_ROW_RUN; ++r) {
    float v = diagonal_sum(d[r], lane);
    if (A8) v *= sx[0];
    if (lane == 0 && n0 + r < N) y[n0 + r] = to_bf16(v * (per_tensor ? s[0] : s[n0 + r]));
  }
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, MMA_MIN_BLOCKS)
fp8_mma_gemv_row(const bf16_bits* __restrict__ x, const uint8_t* __restrict__ q, const float* __restrict__ s,
                 bf16_bits* __restrict__ y, int N, int K, long long ldw, int per_tensor) {
  row_kernel<false>(x, nullptr, q, s, y, N, K, ldw, per_tensor);
}

// W8A8, one token: x as e4m3 codes with its per-token scale sx[0] (impl.fp8's activation quantisation).
extern "C" __global__ void __launch_bounds__(MMA_THREADS, MMA_MIN_BLOCKS)
fp8_mma_gemv_row_a8(const uint8_t* __restrict__ xq, const float* __restrict__ sx, const uint8_t* __restrict__ q,
                    const float* __restrict__ s, bf16_bits* __restrict__ y, int N, int K, long long ldw,
                    int per_tensor) {
  row_kernel<true>(xq, sx, q, s, y, N, K, ldw, per_tensor);
}

// One token, a block's warps sweeping its rows' bytes in address order: block b takes rows r0 = b * MMA_SWEEP_ROWS ..
// r0 + MMA_SWEEP_ROWS - 1 and numbers their 512-byte pieces j = (row - r0) * P + c (P = pieces a row, c the piece of
// the row); warp v takes pieces v, v + W, v + 2W, ..., so at any moment the block's W warps read W consecutive pieces
// (one contiguous window of the block's region) instead of W rows far apart. A piece is the row kernel's (lane l loads
// its codes and x at k = 512 c + 16 l, D[g][g] the group's dot product). A warp's pieces of one row are consecutive in
// its sequence: it accumulates them in D, and when its row changes sums D's diagonal (the butterfly) into
// part[row][v]; at the end the block sums each row's part over the warps in warp order, scales and rounds once.
#ifndef MMA_SWEEP_ROWS
#define MMA_SWEEP_ROWS 8
#endif

__device__ __forceinline__ void sweep_load(uint4 (&w)[MMA_UNROLL], const uint8_t* __restrict__ q, int r0, int N,
                                           int K, long long ldw, int pieces, int j0, int lane) {
#pragma unroll
  for (int u = 0; u < MMA_UNROLL; ++u) {
    const int j = j0 + u * MMA_WARPS;
    const int row = r0 + j / pieces, k = (j % pieces) * 512 + lane * 16;
    w[u] = (j < MMA_SWEEP_ROWS * pieces && row < N && k < K)
               ? __ldcs(reinterpret_cast<const uint4*>(q + (long long)row * ldw + k))
               : make_uint4(0u, 0u, 0u, 0u);
  }
}

__device__ __forceinline__ void sweep_accumulate(float (&d)[4], int& cur, float (*part)[MMA_WARPS],
                                                 const uint4 (&w)[MMA_UNROLL], const bf16_bits* __restrict__ x, int K,
                                                 int pieces, int j0, int warp, int lane) {
#pragma unroll
  for (int u = 0; u < MMA_UNROLL; ++u) {
    const int j = j0 + u * MMA_WARPS;
    if (j >= MMA_SWEEP_ROWS * pieces) break;  // the same for the whole warp
    const int rr = j / pieces, k = (j % pieces) * 512 + lane * 16;
    if (rr != cur) {  // the warp's pieces of row cur are done: its partial sum, then a fresh D
      if (cur >= 0) {
        const float v = diagonal_sum(d, lane);
        if (lane == 0) part[cur][warp] = v;
      }
      d[0] = d[1] = d[2] = d[3] = 0.f;
      cur = rr;
    }
    uint4 a0, a1;
    load_x16(x, k, K, a0, a1);
    piece_bf16(d, a0, a1, w[u]);
  }
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, MMA_MIN_BLOCKS)
fp8_mma_gemv_sweep(const bf16_bits* __restrict__ x, const uint8_t* __restrict__ q, const float* __restrict__ s,
                   bf16_bits* __restrict__ y, int N, int K, long long ldw, int per_tensor) {
  __shared__ float part[MMA_SWEEP_ROWS][MMA_WARPS];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int r0 = blockIdx.x * MMA_SWEEP_ROWS, pieces = (K + 511) / 512, total = MMA_SWEEP_ROWS * pieces;
  for (int i = threadIdx.x; i < MMA_SWEEP_ROWS * MMA_WARPS; i += MMA_THREADS) part[i / MMA_WARPS][i % MMA_WARPS] = 0.f;
  float d[4] = {0.f, 0.f, 0.f, 0.f};
  int cur = -1;
  uint4 wa[MMA_UNROLL];
  sweep_load(wa, q, r0, N, K, ldw, pieces, warp, lane);
  wait_for_previous_grid();
  __syncthreads();  // part zeroed before any warp writes its partial sums
#if MMA_PIPE
  uint4 wb[MMA_UNROLL];
  for (int j0 = warp; j0 < total; j0 += 2 * MMA_WARPS * MMA_UNROLL) {
    sweep_load(wb, q, r0, N, K, ldw, pieces, j0 + MMA_WARPS * MMA_UNROLL, lane);
    sweep_accumulate(d, cur, part, wa, x, K, pieces, j0, warp, lane);
    sweep_load(wa, q, r0, N, K, ldw, pieces, j0 + 2 * MMA_WARPS * MMA_UNROLL, lane);
    sweep_accumulate(d, cur, part, wb, x, K, pieces, j0 + MMA_WARPS * MMA_UNROLL, warp, lane);
  }
#else
  for (int j0 = warp; j0 < total; j0 += MMA_WARPS * MMA_UNROLL) {
    if (j0 != warp) sweep_load(wa, q, r0, N, K, ldw, pieces, j0, lane);
    sweep_accumulate(d, cur, part, wa, x, K, pieces, j0, warp, lane);
  }
#endif
  if (cur >= 0) {
    const float v = diagonal_sum(d, lane);
    if (lane == 0) part[cur][warp] = v;
  }
  __syncthreads();
  for (int rr = threadIdx.x; rr < MMA_SWEEP_ROWS; rr += MMA_THREADS) {
    const int row = r0 + rr;
    if (row < N) {
      float acc = part[rr][0];
#pragma unroll
      for (int v = 1; v < MMA_WARPS; ++v) acc += part[rr][v];
      y[row] = to_bf16(acc * (per_tensor ? s[0] : s[row]));
    }
  }
}
