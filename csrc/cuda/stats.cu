// CUDA task-vector statistics in one pass. Each block stages the task vectors of a 256-element tile
// in shared memory ([K, 256] floats); sign agreement and the exponent histogram are taken while
// staging, then every thread accumulates its fixed share of the K(K+1)/2 Gram pairs (and, on the
// diagonal pairs, max |tau| and the non-zero count) over the tile in float64 registers. At the end
// of the grid-stride loop each thread writes its Gram slots to the block's row of float64 partials,
// which the host sums in a fixed order (float64 atomics would make the low bits depend on the block
// order); the integer counts and maxima leave through atomics, which are exact in any order.
//
// All of the kernel's shared memory is dynamic, so the host knows its whole size (plan_tv_stats).
#include <stdexcept>
#include <string>

#include "cuda_common.cuh"

namespace mk::cuda {
namespace {

constexpr int kTile = kThreads;
// ceil(64 * 65 / 2 / 256): Gram slots per thread at K = kMaxExperts.
constexpr int kSlotsPerThread = (kMaxExperts * (kMaxExperts + 1) / 2 + kThreads - 1) / kThreads;
constexpr int kScratchDoubles = kThreads / 32;  // block_sum's per-warp partials, at the start of smem

// Gram pair p of the row-major upper triangle (i <= j), the order of the partials' pair axis.
__device__ __forceinline__ void pair_of(int p, int k, int& i, int& j) {
  i = 0;
  while (p >= k - i) {
    p -= k - i;
    ++i;
  }
  j = i + p;
}

template <typename in_t>
__global__ void __launch_bounds__(kThreads) tv_stats_kernel(int k, const in_t* __restrict__ base, const InputPtrs ft,
                                                            int64_t n, bool histogram, double* gram_partials,
                                                            uint32_t* absmax_bits, unsigned long long* nnz,
                                                            unsigned long long* signs, unsigned long long* hist) {
  MK_DYNAMIC_SHARED(double, smem);
  double* scratch = smem;                                                        // [kScratchDoubles]
  float* tile = reinterpret_cast<float*>(smem + kScratchDoubles);               // [k, kTile]
  uint32_t* shist = reinterpret_cast<uint32_t*>(tile + k * kTile);              // [k, 256]
  if (histogram)
    for (int b = threadIdx.x; b < k * kExponentBins; b += blockDim.x) shist[b] = 0;

  const int pairs = k * (k + 1) / 2;
  const int parts = pairs < kThreads ? kThreads / pairs : 1;  // element subsets per pair
  const int slots = pairs * parts;
  int slot_i[kSlotsPerThread], slot_j[kSlotsPerThread], slot_part[kSlotsPerThread];
  double dot[kSlotsPerThread];
  uint32_t amax[kSlotsPerThread];  // max |tau| as bit patterns, as on the CPU
  unsigned long long nz[kSlotsPerThread];
#pragma unroll
  for (int r = 0; r < kSlotsPerThread; ++r) {
    const int s = threadIdx.x + r * kThreads;
    slot_i[r] = slot_j[r] = -1;
    slot_part[r] = 0;
    if (s < slots) {
      pair_of(s % pairs, k, slot_i[r], slot_j[r]);
      slot_part[r] = s / pairs;
    }
    dot[r] = 0.0;
    amax[r] = 0;
    nz[r] = 0;
  }
  unsigned long long agree = 0, any = 0;
  __syncthreads();

  for (int64_t start = blockIdx.x * static_cast<int64_t>(kTile); start < n;
       start += static_cast<int64_t>(gridDim.x) * kTile) {
    const int64_t e = start + threadIdx.x;
    const bool valid = e < n;
    const float b = valid && base != nullptr ? to_float(base[e]) : 0.0f;  // no base: the origin
    bool pos = false, neg = false;
    for (int t = 0; t < k; ++t) {
      const float v = valid ? fsub(to_float(static_cast<const in_t*>(ft.p[t])[e]), b) : 0.0f;
      tile[t * kTile + threadIdx.x] = v;
      pos |= v > 0.0f;
      neg |= v < 0.0f;
      if (histogram && valid) atomicAdd(&shist[t * kExponentBins + (abs_key(v) >> 23)], 1u);
    }
    any += pos || neg;
    agree += pos != neg;
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kSlotsPerThread; ++r) {
      if (slot_i[r] < 0) continue;
      const float* a = tile + slot_i[r] * kTile;
      const float* c = tile + slot_j[r] * kTile;
      const bool diag = slot_i[r] == slot_j[r];
      for (int x = slot_part[r]; x < kTile; x += parts) {
        dot[r] += static_cast<double>(a[x]) * static_cast<double>(c[x]);
        if (diag) {
          amax[r] = max(amax[r], abs_key(a[x]));
          nz[r] += a[x] != 0.0f;
        }
      }
    }
    __syncthreads();
  }

  double* block_partials = gram_partials + static_cast<int64_t>(blockIdx.x) * slots;  // [parts, pairs]
#pragma unroll
  for (int r = 0; r < kSlotsPerThread; ++r) {
    if (slot_i[r] < 0) continue;
    block_partials[threadIdx.x + r * kThreads] = dot[r];
    if (slot_i[r] == slot_j[r]) {
      atomicMax(absmax_bits + slot_i[r], amax[r]);  // non-negative floats order as uints
      atomicAdd(nnz + slot_i[r], nz[r]);
    }
  }
  const double agree_sum = block_sum(static_cast<double>(agree), scratch);
  const double any_sum = block_sum(static_cast<double>(any), scratch);
  if (threadIdx.x == 0) {
    atomicAdd(signs, static_cast<unsigned long long>(agree_sum));
    atomicAdd(signs + 1, static_cast<unsigned long long>(any_sum));
  }
  if (histogram) {
    __syncthreads();
    for (int b = threadIdx.x; b < k * kExponentBins; b += blockDim.x)
      if (shist[b]) atomicAdd(hist + b, static_cast<unsigned long long>(shist[b]));
  }
}

template <typename in_t>
__global__ void element_variance_kernel(int k, const in_t* __restrict__ base, const InputPtrs ft, float* out,
                                        int64_t n) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float b = to_float(base[e]);
    double mean = 0.0, m2 = 0.0;
    for (int t = 0; t < k; ++t)
      welford_add(mean, m2, t + 1, fsub(to_float(static_cast<const in_t*>(ft.p[t])[e]), b));
    out[e] = static_cast<float>(m2 / static_cast<double>(k));
  }
}

}  // namespace

void launch_element_variance(int k, DType in, const void* base, const InputPtrs& ft, float* out, int64_t n,
                             cudaStream_t stream) {
  if (n <= 0) return;
  dispatch_dtype(in, [&](auto tag) {
    using in_t = decltype(tag);
    MK_LAUNCH(grid_for(n), kThreads, 0, stream, element_variance_kernel<in_t>)(k, static_cast<const in_t*>(base), ft,
                                                                              out, n);
  });
}

TvStatsPlan plan_tv_stats(int k, int64_t n, bool histogram) {
  TvStatsPlan p{};
  p.grid = n > 0 ? grid_for(n, 2) : 0;
  p.pairs = k * (k + 1) / 2;
  p.parts = p.pairs < kThreads ? kThreads / p.pairs : 1;
  p.shared_bytes = sizeof(double) * kScratchDoubles + sizeof(float) * k * kTile +
                   (histogram ? sizeof(uint32_t) * k * kExponentBins : 0);
  return p;
}

void launch_tv_stats(const TvStatsPlan& plan, int k, DType in, const void* base, const InputPtrs& ft, int64_t n,
                     bool histogram, double* gram_partials, uint32_t* absmax_bits, unsigned long long* nnz,
                     unsigned long long* signs, unsigned long long* hist, cudaStream_t stream) {
  if (n <= 0) return;
  int device = 0, optin = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (plan.shared_bytes > static_cast<size_t>(optin))
    throw std::length_error("tv_stats: " + std::to_string(k) + " fine-tuned tensors" +
                            (histogram ? " with the histogram" : "") + " need " +
                            std::to_string(plan.shared_bytes) + " bytes of shared memory per block; this device " +
                            "allows " + std::to_string(optin) + " (pass fewer tensors per call)");
  dispatch_dtype(in, [&](auto tag) {
    using in_t = decltype(tag);
    auto kernel = tv_stats_kernel<in_t>;
    // Beyond the default 48 KiB a kernel must opt in to its dynamic size (all its shared memory).
    if (plan.shared_bytes > kDefaultSharedBytes) {
      const cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                      static_cast<int>(plan.shared_bytes));
      if (status != cudaSuccess)
        throw std::runtime_error("tv_stats: could not raise the shared-memory limit to " +
                                 std::to_string(plan.shared_bytes) + " bytes: " + cudaGetErrorString(status));
    }
    MK_LAUNCH(plan.grid, kThreads, plan.shared_bytes, stream, kernel)(k, static_cast<const in_t*>(base), ft, n,
                                                                      histogram, gram_partials, absmax_bits, nnz,
                                                                      signs, hist);
  });
}

}  // namespace mk::cuda
