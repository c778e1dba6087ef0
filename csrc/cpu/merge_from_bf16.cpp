// CPU fused merges from at::BFloat16 inputs, to every output dtype (see merge_kernel.h).
#include "merge_kernel.h"

namespace mk::cpu::merge_detail {
template void merge_from<at::BFloat16>(const MergeConfig&, const Inputs&, at::Tensor&);
}  // namespace mk::cpu::merge_detail
