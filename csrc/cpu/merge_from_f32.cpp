// CPU fused merges from float inputs, to every output dtype (see merge_kernel.h).
#include "merge_kernel.h"

namespace mk::cpu::merge_detail {
template void merge_from<float>(const MergeConfig&, const Inputs&, at::Tensor&);
}  // namespace mk::cpu::merge_detail
