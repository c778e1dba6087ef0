// CPU fused merges: one read of every input, one write of the output. Loops run task-outer over an
// L1-sized block with structure-of-arrays accumulators so the compiler vectorises them; the
// arithmetic per element is the shared csrc/common/merge_element.h, in the same order as on the
// GPU, so results match bit for bit.
//
// The kernels are templates here. Each merge_from_<dtype>.cpp instantiates them for one
// input dtype (every output dtype), so the 16 dtype pairs x 35 kernel variants compile in parallel
// instead of in one translation unit that takes minutes; merge.cpp dispatches and registers.
#pragma once

#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../host_args.h"
#include "cpu_common.h"

namespace mk::cpu::merge_detail {

// Accumulator fields live in structure-of-arrays form over the block; each variant loads and
// stores only the fields accumulate_as<kTies, kWeights> touches. (Without consensus the weight sum
// is the same for every element and is computed once per block instead.)
struct BlockAccumulators {
  alignas(64) float elect[kBlock], pos[kBlock], neg[kBlock], cpos[kBlock], cneg[kBlock];
  alignas(64) float wpos[kBlock], wneg[kBlock], all[kBlock], plain[kBlock], cnt[kBlock];

  template <bool kTies, bool kWeights, bool kActive = false>
  ElementAccumulator load(int64_t j) const {
    ElementAccumulator a;
    if constexpr (kActive) {
      a.all = all[j], a.plain = plain[j], a.count_all = cnt[j];
    } else if constexpr (kTies) {
      a.elect = elect[j], a.pos = pos[j], a.neg = neg[j], a.count_pos = cpos[j], a.count_neg = cneg[j];
      if constexpr (kWeights) a.weight_pos = wpos[j], a.weight_neg = wneg[j];
    } else {
      a.all = all[j];
    }
    return a;
  }

  template <bool kTies, bool kWeights, bool kActive = false>
  void store(int64_t j, const ElementAccumulator& a) {
    if constexpr (kActive) {
      all[j] = a.all, plain[j] = a.plain, cnt[j] = a.count_all;
    } else if constexpr (kTies) {
      elect[j] = a.elect, pos[j] = a.pos, neg[j] = a.neg, cpos[j] = a.count_pos, cneg[j] = a.count_neg;
      if constexpr (kWeights) wpos[j] = a.weight_pos, wneg[j] = a.weight_neg;
    } else {
      all[j] = a.all;
    }
  }
};

// kActive: RAM's active-mean reduction (no consensus, no weight sums).
template <int kMode, int kSource, bool kTies, bool kWeights, bool kActive, typename in_t, typename out_t>
void merge_kernel(const MergeConfig& c, const in_t* base, const std::vector<const in_t*>& ft, out_t* out,
                  int64_t n) {
  const int64_t offset = c.element_offset;
  for_each_block(offset, n, [&](int64_t g0, int64_t lo, int64_t hi) {
    // A block-local copy of the config: a local the stores below provably do not alias, so the
    // inner loops vectorise without runtime alias checks.
    const MergeConfig cl = c;
    alignas(64) uint32_t words[kBlock];
    alignas(64) float sparse[kBlock];
    BlockAccumulators acc;
    const int64_t len = hi - lo, local0 = lo - offset, w0 = lo - g0;
    const ElementAccumulator zero;
    alignas(64) float base_buf[kBlock], x_buf[kBlock];
    const float* __restrict__ base_f = as_float(base + local0, base_buf, len);
    if (cl.nonfinite != nullptr && any_nonfinite(base_f, len)) raise_flag(cl.nonfinite, 0);
    for (int64_t j = 0; j < len; ++j) acc.store<kTies, kWeights && kTies, kActive>(j, zero);
    for (int t = 0; t < cl.num_experts; ++t) {
      if constexpr (kMode == kSparsifyDrop) fill_words(words, cl.key, g0, cl.expert_offset + t);
      const float* __restrict__ x = as_float(ft[t] + local0, x_buf, len);
      if (cl.nonfinite != nullptr && any_nonfinite(x, len)) raise_flag(cl.nonfinite, 1 + t);
      // Three simple loops rather than one fused loop: gcc vectorises each of them, not their union.
      if constexpr (kMode == kSparsifyDrop && kSource == kKeepPerRow) {
        // Per-row keep rates: spell out the block's rates row segment by row segment, so the drop
        // loop needs no 64-bit division per element (3x faster; the same rates, the same bits).
        alignas(64) float rate[kBlock];
        for (int64_t j = 0; j < len;) {
          const int64_t row = (lo + j) / cl.row_len;
          const int64_t seg = std::min<int64_t>(len - j, (row + 1) * cl.row_len - (lo + j));
          const float q = cl.row_keep[static_cast<int64_t>(t) * cl.num_rows + row];
          for (int64_t k = 0; k < seg; ++k) rate[j + k] = q;
          j += seg;
        }
        for (int64_t j = 0; j < len; ++j) {
          sparse[j] = drop_with(cl, t, task_value(cl, x[j], base_f[j]), rate[j], words[w0 + j]);
        }
      } else {
        for (int64_t j = 0; j < len; ++j) {
          const float tau = task_value(cl, x[j], base_f[j]);
          sparse[j] = sparsify_as<kMode, kSource>(cl, t, lo + j, local0 + j, tau, words[w0 + j]);
        }
      }
      for (int64_t j = 0; j < len; ++j) {
        ElementAccumulator a = acc.load<kTies, false, kActive>(j);
        accumulate_as<kTies, false, kActive>(cl, a, t, sparse[j]);
        acc.store<kTies, false, kActive>(j, a);
      }
      if constexpr (kWeights && kTies) {
        for (int64_t j = 0; j < len; ++j) {
          ElementAccumulator a = acc.load<kTies, true>(j);
          accumulate_weights<kTies>(cl, a, t, sparse[j]);
          acc.store<kTies, true>(j, a);
        }
      }
    }
    // Without consensus every element's weight sum is the same: sum it once, in the same order.
    float weight_all = 0.0f;
    for (int t = 0; t < cl.num_experts; ++t) weight_all = fadd(weight_all, cl.weight[t]);
    out_t* __restrict__ o = out + local0;
    for (int64_t j = 0; j < len; ++j) {
      ElementAccumulator a = acc.load<kTies, kWeights && kTies, kActive>(j);
      if constexpr (kWeights && !kTies) a.weight_all = weight_all;
      o[j] = static_cast<out_t>(merged_output(cl, base_f[j], a));
    }
  });
}

template <int kMode, int kSource, typename in_t, typename out_t>
void merge_variant(const MergeConfig& c, const in_t* base, const std::vector<const in_t*>& ft, out_t* out,
                   int64_t n) {
  const bool weights = c.reduce == kReduceWeighted;
  if (c.reduce == kReduceActive) return merge_kernel<kMode, kSource, false, false, true>(c, base, ft, out, n);
  if (c.ties) {
    if (weights) return merge_kernel<kMode, kSource, true, true, false>(c, base, ft, out, n);
    return merge_kernel<kMode, kSource, true, false, false>(c, base, ft, out, n);
  }
  if (weights) return merge_kernel<kMode, kSource, false, true, false>(c, base, ft, out, n);
  return merge_kernel<kMode, kSource, false, false, false>(c, base, ft, out, n);
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
      return merge_variant<kSparsifyTrim, kKeepConstant>(c, base, ft, o, n);
    case kSparsifyBand:
      return merge_variant<kSparsifyBand, kKeepConstant>(c, base, ft, o, n);
    case kSparsifyClip:
      return merge_variant<kSparsifyClip, kKeepConstant>(c, base, ft, o, n);
    case kSparsifyDrop:
      if (c.keep_source == kKeepPerRow) return merge_variant<kSparsifyDrop, kKeepPerRow>(c, base, ft, o, n);
      if (c.keep_source == kKeepRank) return merge_variant<kSparsifyDrop, kKeepRank>(c, base, ft, o, n);
      return merge_variant<kSparsifyDrop, kKeepConstant>(c, base, ft, o, n);
    default:
      return merge_variant<kSparsifyNone, kKeepConstant>(c, base, ft, o, n);
  }
}

// Every output dtype for one input dtype: instantiated in merge_from_<dtype>.cpp.
template <typename in_t>
void merge_from(const MergeConfig& c, const Inputs& in, at::Tensor& out) {
  MK_DISPATCH_FLOAT(out.scalar_type(), "fused_merge_out", [&] { merge_dispatch_mode<in_t, scalar_t>(c, in, out); });
}

}  // namespace mk::cpu::merge_detail
