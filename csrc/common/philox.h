// Counter-based random bits shared by the CPU and CUDA kernels.
//
// Philox-4x32-10 (Salmon et al., SC'11). A keep decision for element i of expert e in a tensor is a
// pure function of (seed, tensor key, e, i), so masks are identical on CPU and GPU and independent
// of chunking, launch order or the number of ranks:
//   key     = splitmix64(splitmix64(seed) ^ tensor_key)            -> (k0 = low 32, k1 = high 32)
//   counter = (q & 0xffffffff, q >> 32, e, stream),  q = i / 4      -> 4 words, word i % 4 is used
//   uniform = (word >> 8) * 2^-24                                   -> exact in float32, in [0, 1)
// and element i is kept iff uniform < keep probability.
#pragma once

#include "mk_common.h"

namespace mk {

// Independent streams for different random decisions about the same element.
constexpr uint32_t kStreamDropMask = 0;

MK_HD uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

struct PhiloxKey {
  uint32_t k0, k1;
};

MK_HD PhiloxKey philox_key(uint64_t seed, uint64_t tensor_key) {
  uint64_t k = splitmix64(splitmix64(seed) ^ tensor_key);
  return PhiloxKey{static_cast<uint32_t>(k), static_cast<uint32_t>(k >> 32)};
}

struct Philox4 {
  uint32_t w[4];
};

MK_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, PhiloxKey key) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
  uint32_t k0 = key.k0, k1 = key.k1;
#if defined(__CUDA_ARCH__)
#pragma unroll
#else
#pragma GCC unroll 10
#endif
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kMul0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kMul1) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// The four 24-bit uniforms of the aligned quad q = i / 4 of one expert.
MK_HD Philox4 quad_bits(PhiloxKey key, uint64_t quad, uint32_t expert, uint32_t stream) {
  return philox4x32_10(static_cast<uint32_t>(quad), static_cast<uint32_t>(quad >> 32), expert, stream,
                       key);
}

MK_HD float uniform24(uint32_t word) { return static_cast<float>(word >> 8) * 5.9604644775390625e-08f; }

}  // namespace mk
