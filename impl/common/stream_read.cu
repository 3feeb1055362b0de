// The card's streaming read of a buffer: out[0] ^= XOR of every 32-bit word of p[0 .. 16 n16).
//   p 16-byte aligned, n16 pieces of 16 bytes; out one uint32, zeroed by the caller.
// Each thread keeps STREAM_UNROLL 16-byte loads in flight (evict-first: the bytes are read once), grid-stride over
// the buffer so at any moment the grid reads one contiguous window; XOR makes the result independent of the order
// (a CPU twin checks it), warp shuffles then one atomic per warp combine the threads.
// No headers: NVRTC (CuPy's compiler) finds none by default.
#ifndef STREAM_UNROLL
#define STREAM_UNROLL 4
#endif

extern "C" __global__ void __launch_bounds__(256)
stream_read_xor(const uint4* __restrict__ p, long long n16, unsigned int* __restrict__ out) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  unsigned int acc = 0u;
  // step j: pieces i + u * stride (u < STREAM_UNROLL), each guarded, all loads issued before any is used; no tail
  // loop of one load at a time (a buffer of a few pieces a thread would end in serial round trips)
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n16; i += STREAM_UNROLL * stride) {
    uint4 v[STREAM_UNROLL];
#pragma unroll
    for (int u = 0; u < STREAM_UNROLL; ++u)
      v[u] = i + u * stride < n16 ? __ldcs(p + i + u * stride) : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
    for (int u = 0; u < STREAM_UNROLL; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc ^= __shfl_xor_sync(0xffffffffu, acc, off);
  if ((threadIdx.x & 31) == 0) atomicXor(out, acc);
}
