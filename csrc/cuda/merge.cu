// CUDA fused merges: one thread per aligned quad of four elements (one Philox call per task per
// quad), a grid-stride loop, one read of every input and one write of the output. The arithmetic
// is csrc/common/merge_element.h, identical to the CPU kernels.
#include "cuda_common.cuh"

namespace mk::cuda {
namespace {

template <typename in_t, typename out_t>
__global__ void fused_merge_kernel(const MergeConfig c, const in_t* __restrict__ base, const InputPtrs ft,
                                   out_t* __restrict__ out, int64_t n) {
  const int64_t offset = c.element_offset;
  const int64_t q_first = offset >> 2, q_last = (offset + n - 1) >> 2;
  for (int64_t q = q_first + blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q <= q_last;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float base_f[4];
    bool valid[4];
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const int64_t g = 4 * q + l;
      valid[l] = g >= offset && g < offset + n;
      base_f[l] = valid[l] ? to_float(base[g - offset]) : 0.0f;
      if (c.nonfinite != nullptr && is_nonfinite(base_f[l])) c.nonfinite[0] = 1;  // same value from any thread
    }
    ElementAccumulator acc[4];
    for (int t = 0; t < c.num_experts; ++t) {
      Philox4 words{{0, 0, 0, 0}};
      if (c.sparsify == kSparsifyDrop) words = quad_bits(c.key, q, c.expert_offset + t, kStreamDropMask);
      const in_t* x = static_cast<const in_t*>(ft.p[t]);
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        if (!valid[l]) continue;
        const int64_t g = 4 * q + l;
        const float value = to_float(x[g - offset]);
        if (c.nonfinite != nullptr && is_nonfinite(value)) c.nonfinite[1 + t] = 1;
        const float tau = task_value(c, value, base_f[l]);
        accumulate(c, acc[l], t, sparsify(c, t, g, g - offset, tau, words.w[l]));
      }
    }
#pragma unroll
    for (int l = 0; l < 4; ++l)
      if (valid[l]) out[4 * q + l - offset] = from_float<out_t>(merged_output(c, base_f[l], acc[l]));
  }
}

template <typename in_t>
__global__ void masked_drop_kernel(const MergeConfig c, const in_t* __restrict__ base, const in_t* __restrict__ x,
                                   float* __restrict__ out, int64_t n) {
  const int64_t offset = c.element_offset;
  const int64_t q_first = offset >> 2, q_last = (offset + n - 1) >> 2;
  for (int64_t q = q_first + blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q <= q_last;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    Philox4 words{{0, 0, 0, 0}};
    if (c.sparsify == kSparsifyDrop) words = quad_bits(c.key, q, c.expert_offset, kStreamDropMask);
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const int64_t g = 4 * q + l;
      if (g < offset || g >= offset + n) continue;
      const float tau = fsub(to_float(x[g - offset]), to_float(base[g - offset]));
      out[g - offset] = canonical_nan(sparsify(c, 0, g, g - offset, tau, words.w[l]));
    }
  }
}

// Per block and task: sum |tau| and sum |mask * tau| into the block's row of `partials` ([grid, 2, K]),
// which the host sums in a fixed order (float64 atomics would make the low bits depend on the block
// order).
template <typename in_t>
__global__ void drop_l1_kernel(const MergeConfig c, const in_t* __restrict__ base, const InputPtrs ft,
                               double* __restrict__ partials, int64_t n) {
  __shared__ double scratch[kThreads / 32];
  const int64_t offset = c.element_offset;
  const int64_t q_first = offset >> 2, q_last = (offset + n - 1) >> 2;
  for (int t = 0; t < c.num_experts; ++t) {
    const in_t* x = static_cast<const in_t*>(ft.p[t]);
    double full = 0.0, kept = 0.0;
    for (int64_t q = q_first + blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q <= q_last;
         q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const Philox4 words = quad_bits(c.key, q, c.expert_offset + t, kStreamDropMask);
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        const int64_t g = 4 * q + l;
        if (g < offset || g >= offset + n) continue;
        const float tau = fsub(to_float(x[g - offset]), to_float(base[g - offset]));
        full += abs_f(tau);
        kept += abs_f(sparsify_as<kSparsifyDrop>(c, t, g, g - offset, tau, words.w[l]));
      }
    }
    full = block_sum(full, scratch);
    kept = block_sum(kept, scratch);
    if (threadIdx.x == 0) {
      double* row = partials + static_cast<int64_t>(blockIdx.x) * 2 * c.num_experts;
      row[t] = full;
      row[c.num_experts + t] = kept;
    }
  }
}

int64_t quads(int64_t offset, int64_t n) { return n <= 0 ? 0 : ((offset + n - 1) >> 2) - (offset >> 2) + 1; }

}  // namespace

void launch_fused_merge(const MergeConfig& c, DType in, DType out_dtype, const void* base, const InputPtrs& ft,
                        void* out, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  const int grid = grid_for(quads(c.element_offset, n));
  dispatch_dtype(in, [&](auto in_tag) {
    using in_t = decltype(in_tag);
    dispatch_dtype(out_dtype, [&](auto out_tag) {
      using out_t = decltype(out_tag);
      MK_LAUNCH(grid, kThreads, 0, stream, fused_merge_kernel<in_t, out_t>)(c, static_cast<const in_t*>(base), ft,
                                                                           static_cast<out_t*>(out), n);
    });
  });
}

void launch_masked_drop(const MergeConfig& c, DType in, const void* base, const void* ft, float* out, int64_t n,
                        cudaStream_t stream) {
  if (n <= 0) return;
  const int grid = grid_for(quads(c.element_offset, n));
  dispatch_dtype(in, [&](auto tag) {
    using in_t = decltype(tag);
    MK_LAUNCH(grid, kThreads, 0, stream, masked_drop_kernel<in_t>)(c, static_cast<const in_t*>(base),
                                                                  static_cast<const in_t*>(ft), out, n);
  });
}

int plan_drop_l1(const MergeConfig& c, int64_t n) { return n > 0 ? grid_for(quads(c.element_offset, n), 4) : 0; }

void launch_drop_l1(const MergeConfig& c, int grid, DType in, const void* base, const InputPtrs& ft,
                    double* partials, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  dispatch_dtype(in, [&](auto tag) {
    using in_t = decltype(tag);
    MK_LAUNCH(grid, kThreads, 0, stream, drop_l1_kernel<in_t>)(c, static_cast<const in_t*>(base), ft, partials, n);
  });
}

}  // namespace mk::cuda
