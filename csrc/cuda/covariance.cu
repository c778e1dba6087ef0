// CUDA covariance kernels (csrc/covariance.h): the moments pass and the system assembly.
// Moments: one block per (expert x layer, 32-column strip), strips in a grid-stride loop over y;
// 8 warps split the rows, each warp reading 32 consecutive columns of a row. The block walks its
// rows twice: column sums and the energy first, then the centred values and their energy (written
// layer-major, [layers, k, m, n], so one layer's experts stack into one [k * m, n] matrix). Per-block energies leave as partials that the
// host sums in a fixed order, so the results are deterministic.
#include "cuda_common.cuh"

namespace mk::cuda {
namespace {

constexpr int kCols = 32;
constexpr int kRowLanes = kThreads / kCols;

template <typename in_t>
__global__ void __launch_bounds__(kThreads)
    moments_kernel(int layers, int64_t m, int64_t n, int64_t strips, const in_t* __restrict__ base,
                   const InputPtrs ft, float* __restrict__ centred, float* __restrict__ colmean,
                   double* __restrict__ e_part, double* __restrict__ s_part) {
  __shared__ double col_part[kRowLanes][kCols];
  __shared__ float mu_shared[kCols];
  __shared__ double scratch[kThreads / 32];
  const int lane = threadIdx.x % kCols, row_lane = threadIdx.x / kCols;
  const int64_t tl = blockIdx.x;
  const int64_t t = tl / layers, l = tl % layers;
  const in_t* b = base + l * m * n;
  const in_t* x = static_cast<const in_t*>(ft.p[t]) + l * m * n;
  // Strips in a grid-stride loop over y: gridDim.y is capped by the device (65535 on current GPUs).
  for (int64_t strip = blockIdx.y; strip < strips; strip += gridDim.y) {
    const int64_t col = strip * kCols + lane;
    const bool active = col < n;
    double colsum = 0.0, e = 0.0;
    if (active)
      for (int64_t i = row_lane; i < m; i += kRowLanes) {
        const float d = fsub(to_float(x[i * n + col]), to_float(b[i * n + col]));
        colsum += d;
        e += static_cast<double>(d) * d;
      }
    col_part[row_lane][lane] = colsum;
    __syncthreads();
    if (row_lane == 0) {
      double sum = 0.0;
      for (int r = 0; r < kRowLanes; ++r) sum += col_part[r][lane];
      const float mu = static_cast<float>(sum / static_cast<double>(m));
      mu_shared[lane] = mu;
      if (active) colmean[tl * n + col] = mu;
    }
    const double e_block = block_sum(e, scratch);  // also orders mu_shared before its reads below
    if (threadIdx.x == 0) e_part[tl * strips + strip] = e_block;

    const float mu = mu_shared[lane];
    double s = 0.0;
    if (active) {
      float* out = centred + (l * (gridDim.x / layers) + t) * m * n;  // [layers, k, m, n]
      for (int64_t i = row_lane; i < m; i += kRowLanes) {
        const float c = fsub(fsub(to_float(x[i * n + col]), to_float(b[i * n + col])), mu);
        out[i * n + col] = c;
        s += static_cast<double>(c) * c;
      }
    }
    // Its barriers also keep the next strip's writes of col_part and mu_shared behind every read.
    const double s_block = block_sum(s, scratch);
    if (threadIdx.x == 0) s_part[tl * strips + strip] = s_block;
  }
}

// One block per row of the float64 system: the row plus the ridge on its diagonal, and its sum
// (the column sum too: gram_sum is exactly symmetric) for the prior.
__global__ void __launch_bounds__(kThreads)
    assemble_kernel(int64_t n, const float* __restrict__ gram_sum, const double* __restrict__ ridge,
                    const double* __restrict__ prior_scale, double* __restrict__ system, double* __restrict__ prior) {
  __shared__ double scratch[kThreads / 32];
  const int64_t row = blockIdx.x, l = row / n, i = row % n;
  double sum = 0.0;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const double v = gram_sum[row * n + j];
    sum += v;
    system[row * n + j] = j == i ? v + ridge[l] : v;
  }
  const double total = block_sum(sum, scratch);
  if (threadIdx.x == 0) prior[row] = total / static_cast<double>(n) / prior_scale[l];
}

}  // namespace

void launch_covariance_moments(int k, int layers, int64_t m, int64_t n, DType in, const void* base,
                               const InputPtrs& ft, float* centred, float* colmean, double* e_part, double* s_part,
                               cudaStream_t stream) {
  const int64_t strips = (n + kCols - 1) / kCols;
  int device = 0, max_y = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&max_y, cudaDevAttrMaxGridDimY, device);
  const dim3 grid(static_cast<unsigned>(k) * static_cast<unsigned>(layers),
                  static_cast<unsigned>(strips < max_y ? strips : max_y));
  dispatch_dtype(in, [&](auto tag) {
    using in_t = decltype(tag);
    MK_LAUNCH(grid, kThreads, 0, stream, moments_kernel<in_t>)(layers, m, n, strips, static_cast<const in_t*>(base),
                                                              ft, centred, colmean, e_part, s_part);
  });
}

void launch_covariance_assemble(int64_t layers, int64_t n, const float* gram_sum, const double* ridge,
                                const double* prior_scale, double* system, double* prior, cudaStream_t stream) {
  MK_LAUNCH(static_cast<unsigned>(layers * n), kThreads, 0, stream, assemble_kernel)(n, gram_sum, ridge, prior_scale,
                                                                                    system, prior);
}

}  // namespace mk::cuda
