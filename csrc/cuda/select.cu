// CUDA radix-select histograms for the exact k-th largest |tau| (digit layout in
// csrc/common/mk_common.h): a grid-stride pass with 64-bit atomics into the [K, bins] histogram.
// Level 1 only counts the few elements whose level-0 digit matches the task's prefix.
#include "cuda_common.cuh"

namespace mk::cuda {
namespace {

template <typename in_t>
__global__ void magnitude_histogram_kernel(int k, const in_t* __restrict__ base, const InputPtrs ft, int64_t n,
                                           int level, const int64_t* __restrict__ prefix,
                                           unsigned long long* __restrict__ hist) {
  const int64_t bins = level == 0 ? kLevel0Bins : kLevel1Bins;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float b = to_float(base[e]);
    for (int t = 0; t < k; ++t) {
      const uint32_t key = abs_key(fsub(to_float(static_cast<const in_t*>(ft.p[t])[e]), b));
      if (level == 0) {
        atomicAdd(hist + t * bins + (key >> kLevel1Bits), 1ull);
      } else if ((key >> kLevel1Bits) == static_cast<uint32_t>(prefix[t])) {
        atomicAdd(hist + t * bins + (key & (kLevel1Bins - 1)), 1ull);
      }
    }
  }
}

}  // namespace

void launch_magnitude_histogram(int k, DType in, const void* base, const InputPtrs& ft, int64_t n, int level,
                                const int64_t* prefix, unsigned long long* hist, cudaStream_t stream) {
  if (n <= 0) return;
  const int grid = grid_for(n);
  dispatch_dtype(in, [&](auto tag) {
    using in_t = decltype(tag);
    MK_LAUNCH(grid, kThreads, 0, stream, magnitude_histogram_kernel<in_t>)(k, static_cast<const in_t*>(base), ft, n,
                                                                          level, prefix, hist);
  });
}

}  // namespace mk::cuda
