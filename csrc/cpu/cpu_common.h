// Helpers shared by the CPU kernel families.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>

#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "../common/mk_common.h"
#include "../common/philox.h"

namespace mk::cpu {

// Elements per block. Blocks are aligned to global element indices so that a block covers whole
// Philox quads whatever the call's element_offset; per-block scratch stays in L1/L2.
constexpr int64_t kBlock = 1024;

// Calls fn(block_begin_global, lo, hi) for the blocks of the global range [offset, offset + n),
// in parallel; lo/hi are the global bounds of the part inside the range.
template <typename Fn>
void for_each_block(int64_t offset, int64_t n, Fn&& fn) {
  if (n <= 0) return;
  const int64_t first = offset / kBlock, last = (offset + n - 1) / kBlock;
  at::parallel_for(first, last + 1, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t g0 = b * kBlock;
      fn(g0, std::max(g0, offset), std::min(g0 + kBlock, offset + n));
    }
  });
}

// Deterministic parallel reduction support: splits the blocks of [offset, offset + n) into at most
// kMaxChunks contiguous chunks (a function of n only, not of the thread count) and calls
// fn(chunk, g0, lo, hi) for each block; callers keep one partial result per chunk and sum the
// partials in chunk order.
constexpr int64_t kMaxChunks = 256;

inline int64_t num_chunks(int64_t offset, int64_t n) {
  if (n <= 0) return 0;
  const int64_t blocks = (offset + n - 1) / kBlock - offset / kBlock + 1;
  return std::min(blocks, kMaxChunks);
}

template <typename Fn>
void for_each_block_chunked(int64_t offset, int64_t n, Fn&& fn) {
  const int64_t chunks = num_chunks(offset, n);
  if (chunks == 0) return;
  const int64_t first = offset / kBlock, last = (offset + n - 1) / kBlock;
  const int64_t blocks = last - first + 1, per_chunk = (blocks + chunks - 1) / chunks;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ch = begin; ch < end; ++ch) {
      const int64_t b_end = std::min(first + (ch + 1) * per_chunk, last + 1);
      for (int64_t b = first + ch * per_chunk; b < b_end; ++b) {
        const int64_t g0 = b * kBlock;
        fn(ch, g0, std::max(g0, offset), std::min(g0 + kBlock, offset + n));
      }
    }
  });
}

// Philox words of the kBlock elements starting at the aligned global index g0, for one expert.
inline void fill_words(uint32_t* words, PhiloxKey key, int64_t g0, uint32_t expert) {
  const uint64_t q0 = static_cast<uint64_t>(g0) >> 2;
  for (int64_t q = 0; q < kBlock / 4; ++q) {
    const Philox4 r = quad_bits(key, q0 + q, expert, kStreamDropMask);
    words[4 * q + 0] = r.w[0];
    words[4 * q + 1] = r.w[1];
    words[4 * q + 2] = r.w[2];
    words[4 * q + 3] = r.w[3];
  }
}

// The len storage values at x as float32: float32 data is returned as is; half and bfloat16 are
// converted into buf (exactly). c10::Half's scalar conversion does not vectorise, so half goes
// through the F16C instruction 8 values at a time where the build targets it.
template <typename T>
inline const float* as_float(const T* __restrict__ x, float* __restrict__ buf, int64_t len) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    int64_t j = 0;
#if defined(__F16C__)
    if constexpr (std::is_same_v<T, c10::Half>) {
      for (; j + 8 <= len; j += 8)
        _mm256_storeu_ps(buf + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + j))));
    }
#endif
    for (; j < len; ++j) buf[j] = static_cast<float>(x[j]);
    return buf;
  }
}

// Whether any of the len float32 values at x is NaN or Inf: the largest magnitude bit pattern
// against the exponent's all-ones pattern, a max reduction the compiler vectorises.
inline bool any_nonfinite(const float* __restrict__ x, int64_t len) {
  uint32_t largest = 0;
  for (int64_t j = 0; j < len; ++j) largest = std::max(largest, abs_key(x[j]));
  return largest >= kInfKey;  // is_nonfinite of the largest magnitude
}

// Sets a flag that other threads may set too (the same value: no ordering needed).
inline void raise_flag(int32_t* flags, int index) { __atomic_store_n(flags + index, 1, __ATOMIC_RELAXED); }

// Runs fn.template operator()<scalar_t>() for the three supported storage dtypes.
#define MK_DISPATCH_FLOAT(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

}  // namespace mk::cpu
