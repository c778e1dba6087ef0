// CPU fused merges (task arithmetic, TIES, DARE, Breadcrumbs, DELLA, APL): one read of every input,
// one write of the output. Loops run task-outer over an L1-sized block with structure-of-arrays
// accumulators so the compiler vectorises them; the arithmetic per element is the shared
// csrc/common/merge_element.h, in the same order as on the GPU, so results match bit for bit.
#include <torch/library.h>

#include <vector>

#include "../host_args.h"
#include "cpu_common.h"

namespace mk::cpu {
namespace {

template <int kMode, typename in_t, typename out_t>
void merge_kernel(const MergeConfig& c, const in_t* base, const std::vector<const in_t*>& ft, out_t* out,
                  int64_t n) {
  const int64_t offset = c.element_offset;
  for_each_block(offset, n, [&](int64_t g0, int64_t lo, int64_t hi) {
    alignas(64) float base_f[kBlock];
    alignas(64) float elect[kBlock], pos[kBlock], neg[kBlock], cpos[kBlock], cneg[kBlock];
    alignas(64) float wpos[kBlock], wneg[kBlock], all[kBlock], wall[kBlock];
    alignas(64) uint32_t words[kBlock];
    const int64_t len = hi - lo, local0 = lo - offset, w0 = lo - g0;
    for (int64_t j = 0; j < len; ++j) {
      base_f[j] = static_cast<float>(base[local0 + j]);
      elect[j] = pos[j] = neg[j] = cpos[j] = cneg[j] = wpos[j] = wneg[j] = all[j] = wall[j] = 0.0f;
    }
    for (int t = 0; t < c.num_experts; ++t) {
      if constexpr (kMode == kSparsifyDrop) fill_words(words, c.key, g0, c.expert_offset + t);
      const in_t* x = ft[t] + local0;
      for (int64_t j = 0; j < len; ++j) {
        const float tau = fsub(static_cast<float>(x[j]), base_f[j]);
        const float v = sparsify_as<kMode>(c, t, lo + j, local0 + j, tau, words[w0 + j]);
        ElementAccumulator a{elect[j], pos[j], neg[j], cpos[j], cneg[j], wpos[j], wneg[j], all[j], wall[j]};
        accumulate(c, a, t, v);
        elect[j] = a.elect;
        pos[j] = a.pos;
        neg[j] = a.neg;
        cpos[j] = a.count_pos;
        cneg[j] = a.count_neg;
        wpos[j] = a.weight_pos;
        wneg[j] = a.weight_neg;
        all[j] = a.all;
        wall[j] = a.weight_all;
      }
    }
    out_t* o = out + local0;
    for (int64_t j = 0; j < len; ++j) {
      const ElementAccumulator a{elect[j], pos[j], neg[j], cpos[j], cneg[j], wpos[j], wneg[j], all[j], wall[j]};
      o[j] = static_cast<out_t>(merged_output(c, base_f[j], a));
    }
  });
}

template <typename in_t, typename out_t>
void merge_dispatch_mode(const MergeConfig& c, const Inputs& in, at::Tensor& out) {
  std::vector<const in_t*> ft;
  for (const auto& x : in.finetuned) ft.push_back(x.data_ptr<in_t>());
  const in_t* base = in.base.data_ptr<in_t>();
  out_t* o = out.data_ptr<out_t>();
  const int64_t n = in.numel();
  switch (c.sparsify) {
    case kSparsifyTrim:
      return merge_kernel<kSparsifyTrim>(c, base, ft, o, n);
    case kSparsifyBand:
      return merge_kernel<kSparsifyBand>(c, base, ft, o, n);
    case kSparsifyDrop:
      return merge_kernel<kSparsifyDrop>(c, base, ft, o, n);
    default:
      return merge_kernel<kSparsifyNone>(c, base, ft, o, n);
  }
}

void run_merge(const MergeConfig& c, const Inputs& in, at::Tensor& out) {
  MK_DISPATCH_FLOAT(in.base.scalar_type(), "fused_merge", [&] {
    using in_t = scalar_t;
    MK_DISPATCH_FLOAT(out.scalar_type(), "fused_merge_out", [&] { merge_dispatch_mode<in_t, scalar_t>(c, in, out); });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(mergekernels, CPU, m) { m.impl("fused_merge", &fused_merge_op<run_merge>); }

}  // namespace mk::cpu
