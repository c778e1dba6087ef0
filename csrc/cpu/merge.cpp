// CPU fused merges (task arithmetic, TIES, DARE, Breadcrumbs, DELLA, APL, RAM, nearswap, the slerps):
// dispatch on the input dtype and registration. The kernels are merge_kernel.h, compiled one input
// dtype per translation unit (merge_from_<dtype>.cpp).
#include <torch/library.h>

#include "merge_kernel.h"

namespace mk::cpu {
namespace merge_detail {
// Compiled in merge_from_<dtype>.cpp, one input dtype per translation unit.
extern template void merge_from<double>(const MergeConfig&, const Inputs&, at::Tensor&);
extern template void merge_from<float>(const MergeConfig&, const Inputs&, at::Tensor&);
extern template void merge_from<at::Half>(const MergeConfig&, const Inputs&, at::Tensor&);
extern template void merge_from<at::BFloat16>(const MergeConfig&, const Inputs&, at::Tensor&);
}  // namespace merge_detail

namespace {

void run_merge(const MergeConfig& c, const Inputs& in, at::Tensor& out) {
  MK_DISPATCH_FLOAT(in.base.scalar_type(), "fused_merge", [&] { merge_detail::merge_from<scalar_t>(c, in, out); });
}

}  // namespace

TORCH_LIBRARY_IMPL(mergekernels, CPU, m) {
  m.impl("fused_merge", &fused_merge_op<run_merge>);
  m.impl("fused_merge.out", &fused_merge_out_op<run_merge>);
}

}  // namespace mk::cpu
