// Shared host/device definitions for mergekernels kernels.
//
// Everything in csrc/common is compiled both by the host compiler (CPU kernels) and by nvcc (CUDA
// kernels), so the per-element arithmetic is written once. Bitwise CPU == CUDA agreement of masks
// and merges relies on three rules kept here:
//   * only correctly rounded IEEE operations (add, mul, div, compare) are used on floats;
//   * no contraction into fused multiply-add (host: -ffp-contract=off, device: --fmad=false);
//   * every operation is applied in the same order on both sides (tasks in index order).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MK_HD __host__ __device__ __forceinline__
#else
#define MK_HD inline
#endif

namespace mk {

// Upper bound on the number of fine-tuned models per op call: per-task parameters travel by value
// in the kernel argument struct (well under CUDA's 4 KB parameter limit).
constexpr int kMaxExperts = 64;

// Radix selection digits over the IEEE bit pattern of |tau| (sign cleared, so 31 significant bits
// that order like the float values): level 0 looks at bits 30..15, level 1 at bits 14..0.
constexpr int kLevel0Bits = 16;
constexpr int kLevel1Bits = 15;
constexpr int kLevel0Bins = 1 << kLevel0Bits;
constexpr int kLevel1Bins = 1 << kLevel1Bits;
// Magnitude histogram of the statistics op: one bin per IEEE exponent of |tau| (bin 0 holds zeros
// and subnormals, bin 255 Inf/NaN); a log2-scale histogram that is also radix digit 0 of 8 bits.
constexpr int kExponentBins = 256;

MK_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  __builtin_memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

MK_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  __builtin_memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// |x| as an order-preserving unsigned key.
MK_HD uint32_t abs_key(float x) { return float_bits(x) & 0x7FFFFFFFu; }
// abs_key of +Inf: the keys of Inf and NaN (exponent bits all ones) are this or above.
constexpr uint32_t kInfKey = 0x7F800000u;

MK_HD float abs_f(float x) { return bits_float(abs_key(x)); }

}  // namespace mk
