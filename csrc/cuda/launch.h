// Host entry points of the CUDA kernels. The .cu files include no torch headers (plain CUDA +
// csrc/common), which keeps nvcc's translation units small and fast to build; the torch side
// (argument checks, allocation, streams, registration) is csrc/cuda/bindings.cpp.
#pragma once

#if defined(MK_CUDA_EMULATION)
#include "../emulation/runtime.h"  // cudaStream_t of the host emulation (tests only)
#else
#include <cuda_runtime.h>
#endif

#include <cstdint>

#include "../common/merge_element.h"

namespace mk::cuda {

enum DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Data pointers of the fine-tuned tensors, passed by value to kernels.
struct InputPtrs {
  const void* p[kMaxExperts];
};

void launch_fused_merge(const MergeConfig& c, DType in, DType out_dtype, const void* base, const InputPtrs& ft,
                        void* out, int64_t n, cudaStream_t stream);

// c.num_experts == 1; c.expert_offset is the expert index.
void launch_masked_drop(const MergeConfig& c, DType in, const void* base, const void* ft, float* out, int64_t n,
                        cudaStream_t stream);

// The grid of launch_drop_l1 for this call (0 when n == 0).
int plan_drop_l1(const MergeConfig& c, int64_t n);
// partials: [grid, 2, K] float64, every entry written: block b's sum |tau| and sum |mask * tau| per
// task; the caller sums them over blocks in a fixed order.
void launch_drop_l1(const MergeConfig& c, int grid, DType in, const void* base, const InputPtrs& ft,
                    double* partials, int64_t n, cudaStream_t stream);

// Launch geometry of tv_stats: `grid` blocks, each with `shared_bytes` of shared memory (all of it
// dynamic, so this is the kernel's whole use) and K(K+1)/2 Gram `pairs` split into `parts` element
// subsets (pairs * parts slots).
struct TvStatsPlan {
  int grid, pairs, parts;
  size_t shared_bytes;
};
TvStatsPlan plan_tv_stats(int k, int64_t n, bool histogram);
// gram_partials: [grid, parts, pairs] float64, every entry written (the caller sums them in a fixed
// order into the upper triangle, pairs in row-major order). Zero-initialised: absmax_bits [K] (float
// bits), nnz [K], signs [2], hist [K, 256] (only when histogram). Throws std::length_error when the
// device cannot give a block plan.shared_bytes.
void launch_tv_stats(const TvStatsPlan& plan, int k, DType in, const void* base, const InputPtrs& ft, int64_t n,
                     bool histogram, double* gram_partials, uint32_t* absmax_bits, unsigned long long* nnz,
                     unsigned long long* signs, unsigned long long* hist, cudaStream_t stream);

// out: [n] float32, the population variance of the K task vectors per element (Welford, float64).
void launch_element_variance(int k, DType in, const void* base, const InputPtrs& ft, float* out, int64_t n,
                             cudaStream_t stream);

// hist: [K, bins] counts accumulated in place; prefix: [K] int64 on the device (level 1).
void launch_magnitude_histogram(int k, DType in, const void* base, const InputPtrs& ft, int64_t n, int level,
                                const int64_t* prefix, unsigned long long* hist, cudaStream_t stream);

// Moments of the covariance merges (csrc/covariance.h): base and ft are [layers, m, n];
// centred [layers, k, m, n], colmean [k, layers, n]; e_part / s_part: [k * layers, ceil(n / 32)]
// float64 partials of ||Delta||^2 and ||centred||^2, summed by the caller.
void launch_covariance_moments(int k, int layers, int64_t m, int64_t n, DType in, const void* base,
                               const InputPtrs& ft, float* centred, float* colmean, double* e_part, double* s_part,
                               cudaStream_t stream);

// system[l] = gram_sum[l] + ridge[l] I (float64), prior[l, i] = sum_j gram_sum[l, i, j] / n / prior_scale[l].
void launch_covariance_assemble(int64_t layers, int64_t n, const float* gram_sum, const double* ridge,
                                const double* prior_scale, double* system, double* prior, cudaStream_t stream);

}  // namespace mk::cuda
