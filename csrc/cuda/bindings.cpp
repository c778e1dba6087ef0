// Torch side of the CUDA kernels: the shared runners of runners.h on torch's current stream, each
// launch followed by a launch-error check, registered for the CUDA dispatch key.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../covariance.h"
#include "runners.h"

namespace mk::cuda {
namespace {

struct CudaDevice {
  using Guard = c10::cuda::CUDAGuard;
  static cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }
  static void check_launch() { C10_CUDA_KERNEL_LAUNCH_CHECK(); }
};

}  // namespace

TORCH_LIBRARY_IMPL(mergekernels, CUDA, m) {
  m.impl("row_ranks", &row_ranks_op<run_row_ranks<CudaDevice>>);
  m.impl("fused_merge", &fused_merge_op<run_merge<CudaDevice>>);
  m.impl("fused_merge.out", &fused_merge_out_op<run_merge<CudaDevice>>);
  m.impl("masked_drop", &masked_drop_op<run_drop<CudaDevice>>);
  m.impl("drop_l1", &drop_l1_op<run_drop_l1<CudaDevice>>);
  m.impl("tv_stats", &tv_stats_op<run_stats<CudaDevice>>);
  m.impl("element_variance", &element_variance_op<run_variance<CudaDevice>>);
  m.impl("magnitude_histogram_", &magnitude_histogram_op<run_histogram<CudaDevice>>);
  m.impl("covariance_moments", &covariance_moments_op<run_moments<CudaDevice>>);
  m.impl("covariance_assemble", &covariance_assemble_op<run_assemble<CudaDevice>>);
  // Device-independent drivers (csrc/covariance.cpp): ATen routes their dense algebra to cuBLAS /
  // cuSOLVER and their kernel calls to the two above.
  m.impl("sym_gram", &mk::sym_gram);
  m.impl("spd_solve", &mk::spd_solve);
  m.impl("ace_merge", &mk::ace_merge);
}

}  // namespace mk::cuda
