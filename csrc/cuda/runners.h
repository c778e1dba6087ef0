// Runners of the CUDA kernels for the op front-ends of csrc/host_args.h: they take validated,
// contiguous inputs and preallocated outputs and launch the kernels of launch.h on them. Shared by
// the real CUDA bindings (bindings.cpp) and the emulated build of the tests (csrc/emulation/), which
// differ only in `Device`:
//   Device::Guard(device)     selects the tensor's device for the launch;
//   Device::stream()          the stream to launch on;
//   Device::check_launch()    turns a failed launch into an error.
#pragma once

#include <ATen/ops/abs.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/argsort.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/triu_indices.h>

#include "../host_args.h"
#include "launch.h"

namespace mk::cuda {

inline DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return kFloat16;
    case at::kBFloat16:
      return kBFloat16;
    default:
      return kFloat32;
  }
}

inline InputPtrs pointers(const Inputs& in) {
  InputPtrs p{};
  for (int t = 0; t < in.num_experts(); ++t) p.p[t] = in.finetuned[t].data_ptr();
  return p;
}

template <typename Device>
void run_merge(const MergeConfig& c, const Inputs& in, at::Tensor& out) {
  const typename Device::Guard guard(in.base.device());
  launch_fused_merge(c, dtype_of(in.base.scalar_type()), dtype_of(out.scalar_type()), in.base.data_ptr(),
                     pointers(in), out.data_ptr(), in.numel(), Device::stream());
  Device::check_launch();
}

template <typename Device>
void run_drop(const MergeConfig& c, const Inputs& in, at::Tensor& out) {
  const typename Device::Guard guard(in.base.device());
  launch_masked_drop(c, dtype_of(in.base.scalar_type()), in.base.data_ptr(), in.finetuned[0].data_ptr(),
                     out.data_ptr<float>(), in.numel(), Device::stream());
  Device::check_launch();
}

// Float64 sums leave the kernels as per-block partials, summed here over blocks in a fixed order:
// the same bits on every run (float64 atomics would depend on the block order).
template <typename Device>
void run_drop_l1(const MergeConfig& c, const Inputs& in, at::Tensor& out) {
  const typename Device::Guard guard(in.base.device());
  const int grid = plan_drop_l1(c, in.numel());
  if (grid == 0) return;
  at::Tensor partials = at::empty({grid, 2, in.num_experts()}, out.options());
  launch_drop_l1(c, grid, dtype_of(in.base.scalar_type()), in.base.data_ptr(), pointers(in),
                 partials.data_ptr<double>(), in.numel(), Device::stream());
  Device::check_launch();
  out.copy_(partials.sum(0));
}

template <typename Device>
void run_stats(const Inputs& in, bool histogram, StatsOutputs& out) {
  const typename Device::Guard guard(in.reference().device());
  const int k = in.num_experts();
  const TvStatsPlan plan = plan_tv_stats(k, in.numel(), histogram);
  if (plan.grid == 0) return;
  at::Tensor partials = at::empty({plan.grid, plan.parts, plan.pairs}, out.gram.options());
  const void* base = in.base.defined() ? in.base.data_ptr() : nullptr;  // none: the origin
  launch_tv_stats(plan, k, dtype_of(in.reference().scalar_type()), base, pointers(in), in.numel(), histogram,
                  partials.data_ptr<double>(), reinterpret_cast<uint32_t*>(out.absmax.data_ptr<float>()),
                  reinterpret_cast<unsigned long long*>(out.nnz.data_ptr<int64_t>()),
                  reinterpret_cast<unsigned long long*>(out.signs.data_ptr<int64_t>()),
                  reinterpret_cast<unsigned long long*>(out.hist.data_ptr<int64_t>()), Device::stream());
  Device::check_launch();
  const at::Tensor upper = at::triu_indices(k, k, 0, out.gram.options().dtype(at::kLong));
  out.gram.index_put_({upper[0], upper[1]}, partials.sum(at::IntArrayRef{0, 1}));
}

template <typename Device>
void run_variance(const Inputs& in, at::Tensor& out) {
  const typename Device::Guard guard(in.base.device());
  launch_element_variance(in.num_experts(), dtype_of(in.base.scalar_type()), in.base.data_ptr(), pointers(in),
                          out.data_ptr<float>(), in.numel(), Device::stream());
  Device::check_launch();
}

template <typename Device>
void run_histogram(const Inputs& in, int level, const at::Tensor& prefix, at::Tensor& hist) {
  const typename Device::Guard guard(in.base.device());
  launch_magnitude_histogram(in.num_experts(), dtype_of(in.base.scalar_type()), in.base.data_ptr(), pointers(in),
                             in.numel(), level, level == 1 ? prefix.data_ptr<int64_t>() : nullptr,
                             reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>()), Device::stream());
  Device::check_launch();
}

// Per-row ranks through ATen's stable segmented sort (the sort is the whole job; a custom kernel
// would only re-implement it). The float32 subtraction is the kernels' tau.
template <typename Device>
void run_row_ranks(const Inputs& in, int64_t row_len, at::Tensor& ranks) {
  const typename Device::Guard guard(in.base.device());
  const int64_t rows = in.numel() / row_len;
  const at::Tensor mags =
      at::abs(at::sub(in.finetuned[0].to(at::kFloat), in.base.to(at::kFloat))).reshape({rows, row_len});
  const at::Tensor order = at::argsort(mags, /*stable=*/true, /*dim=*/1, /*descending=*/false);
  const at::Tensor positions = at::arange(row_len, in.base.options().dtype(at::kInt)).expand({rows, row_len});
  ranks.view({rows, row_len}).scatter_(1, order, positions);
}

template <typename Device>
void run_moments(const Inputs& in, MomentsOutputs& o) {
  const typename Device::Guard guard(in.base.device());
  const int k = in.num_experts();
  const int64_t layers = in.base.size(0), m = in.base.size(1), n = in.base.size(2);
  TORCH_CHECK(k * layers < (int64_t{1} << 31), "covariance_moments: too many experts x layers in one call");
  const int64_t strips = (n + 31) / 32;
  const auto f64 = in.base.options().dtype(at::kDouble);
  at::Tensor e_part = at::empty({k * layers, strips}, f64), s_part = at::empty({k * layers, strips}, f64);
  launch_covariance_moments(k, static_cast<int>(layers), m, n, dtype_of(in.base.scalar_type()), in.base.data_ptr(),
                            pointers(in), o.centred.data_ptr<float>(), o.colmean.data_ptr<float>(),
                            e_part.data_ptr<double>(), s_part.data_ptr<double>(), Device::stream());
  Device::check_launch();
  o.energy.copy_(e_part.sum(1).view({k, layers}));
  o.centred_energy.copy_(s_part.sum(1).view({k, layers}));
}

template <typename Device>
void run_assemble(const at::Tensor& gram_sum, const at::Tensor& ridge, const at::Tensor& prior_scale,
                  at::Tensor& system, at::Tensor& prior) {
  const typename Device::Guard guard(gram_sum.device());
  launch_covariance_assemble(gram_sum.size(0), gram_sum.size(1), gram_sum.data_ptr<float>(), ridge.data_ptr<double>(),
                             prior_scale.data_ptr<double>(), system.data_ptr<double>(), prior.data_ptr<double>(),
                             Device::stream());
  Device::check_launch();
}

}  // namespace mk::cuda
