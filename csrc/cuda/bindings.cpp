// Torch side of the CUDA kernels: runners for the shared op front-ends of csrc/host_args.h,
// registered for the CUDA dispatch key. Launches go on torch's current stream; every launch is
// followed by a launch-error check.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <ATen/ops/abs.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/argsort.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/sum.h>

#include "../covariance.h"
#include "../host_args.h"
#include "launch.h"

namespace mk::cuda {
namespace {

DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return kFloat16;
    case at::kBFloat16:
      return kBFloat16;
    default:
      return kFloat32;
  }
}

InputPtrs pointers(const Inputs& in) {
  InputPtrs p{};
  for (int t = 0; t < in.num_experts(); ++t) p.p[t] = in.finetuned[t].data_ptr();
  return p;
}

void run_merge(const MergeConfig& c, const Inputs& in, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(in.base.device());
  launch_fused_merge(c, dtype_of(in.base.scalar_type()), dtype_of(out.scalar_type()), in.base.data_ptr(),
                     pointers(in), out.data_ptr(), in.numel(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void run_drop(const MergeConfig& c, const Inputs& in, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(in.base.device());
  launch_masked_drop(c, dtype_of(in.base.scalar_type()), in.base.data_ptr(), in.finetuned[0].data_ptr(),
                     out.data_ptr<float>(), in.numel(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void run_drop_l1(const MergeConfig& c, const Inputs& in, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(in.base.device());
  launch_drop_l1(c, dtype_of(in.base.scalar_type()), in.base.data_ptr(), pointers(in), out.data_ptr<double>(),
                 in.numel(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void run_stats(const Inputs& in, bool histogram, StatsOutputs& out) {
  const c10::cuda::CUDAGuard guard(in.base.device());
  launch_tv_stats(in.num_experts(), dtype_of(in.base.scalar_type()), in.base.data_ptr(), pointers(in), in.numel(),
                  histogram, out.gram.data_ptr<double>(), reinterpret_cast<uint32_t*>(out.absmax.data_ptr<float>()),
                  reinterpret_cast<unsigned long long*>(out.nnz.data_ptr<int64_t>()),
                  reinterpret_cast<unsigned long long*>(out.signs.data_ptr<int64_t>()),
                  reinterpret_cast<unsigned long long*>(out.hist.data_ptr<int64_t>()),
                  c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void run_histogram(const Inputs& in, int level, const at::Tensor& prefix, at::Tensor& hist) {
  const c10::cuda::CUDAGuard guard(in.base.device());
  launch_magnitude_histogram(in.num_experts(), dtype_of(in.base.scalar_type()), in.base.data_ptr(), pointers(in),
                             in.numel(), level, level == 1 ? prefix.data_ptr<int64_t>() : nullptr,
                             reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>()),
                             c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Per-row ranks on the GPU through ATen's stable segmented sort (the sort is the whole job; a
// custom kernel would only re-implement it). The float32 subtraction is the kernels' tau.
void run_row_ranks(const Inputs& in, int64_t row_len, at::Tensor& ranks) {
  const c10::cuda::CUDAGuard guard(in.base.device());
  const int64_t rows = in.numel() / row_len;
  const at::Tensor mags =
      at::abs(at::sub(in.finetuned[0].to(at::kFloat), in.base.to(at::kFloat))).reshape({rows, row_len});
  const at::Tensor order = at::argsort(mags, /*stable=*/true, /*dim=*/1, /*descending=*/false);
  const at::Tensor positions =
      at::arange(row_len, in.base.options().dtype(at::kInt)).expand({rows, row_len});
  ranks.view({rows, row_len}).scatter_(1, order, positions);
}

void run_moments(const Inputs& in, MomentsOutputs& o) {
  const c10::cuda::CUDAGuard guard(in.base.device());
  const int k = in.num_experts();
  const int64_t layers = in.base.size(0), m = in.base.size(1), n = in.base.size(2);
  TORCH_CHECK(k * layers < (int64_t{1} << 31), "covariance_moments: too many experts x layers in one call");
  const int64_t strips = (n + 31) / 32;
  const auto f64 = in.base.options().dtype(at::kDouble);
  at::Tensor e_part = at::empty({k * layers, strips}, f64), s_part = at::empty({k * layers, strips}, f64);
  launch_covariance_moments(k, static_cast<int>(layers), m, n, dtype_of(in.base.scalar_type()), in.base.data_ptr(),
                            pointers(in), o.centred.data_ptr<float>(), o.colmean.data_ptr<float>(),
                            e_part.data_ptr<double>(), s_part.data_ptr<double>(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  o.energy.copy_(e_part.sum(1).view({k, layers}));
  o.centred_energy.copy_(s_part.sum(1).view({k, layers}));
}

void run_assemble(const at::Tensor& gram_sum, const at::Tensor& ridge, const at::Tensor& prior_scale,
                  at::Tensor& system, at::Tensor& prior) {
  const c10::cuda::CUDAGuard guard(gram_sum.device());
  launch_covariance_assemble(gram_sum.size(0), gram_sum.size(1), gram_sum.data_ptr<float>(), ridge.data_ptr<double>(),
                             prior_scale.data_ptr<double>(), system.data_ptr<double>(), prior.data_ptr<double>(),
                             c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(mergekernels, CUDA, m) {
  m.impl("row_ranks", &row_ranks_op<run_row_ranks>);
  m.impl("fused_merge", &fused_merge_op<run_merge>);
  m.impl("masked_drop", &masked_drop_op<run_drop>);
  m.impl("drop_l1", &drop_l1_op<run_drop_l1>);
  m.impl("tv_stats", &tv_stats_op<run_stats>);
  m.impl("magnitude_histogram_", &magnitude_histogram_op<run_histogram>);
  m.impl("covariance_moments", &covariance_moments_op<run_moments>);
  m.impl("covariance_assemble", &covariance_assemble_op<run_assemble>);
  // Device-independent drivers (csrc/covariance.cpp): ATen routes their dense algebra to cuBLAS /
  // cuSOLVER and their kernel calls to the two above.
  m.impl("sym_gram", &mk::sym_gram);
  m.impl("spd_solve", &mk::spd_solve);
  m.impl("ace_merge", &mk::ace_merge);
}

}  // namespace mk::cuda
