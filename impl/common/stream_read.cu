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
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  unsigned int acc = 0u;
  for (; i + (STREAM_UNROLL - 1) * stride < n16; i += STREAM_UNROLL * stride) {
    uint4 v[STREAM_UNROLL];
#pragma unroll
    for (int u = 0; u < STREAM_UNROLL; ++u) v[u] = __ldcs(p + i + u * stride);  // all loads first
#pragma unroll
    for (int u = 0; u < STREAM_UNROLL; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  for (; i < n16; i += stride) {  // the last pieces, fewer than STREAM_UNROLL strides
    const uint4 v = __ldcs(p + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc ^= __shfl_xor_sync(0xffffffffu, acc, off);
  if ((threadIdx.x & 31) == 0) atomicXor(out, acc);
}
