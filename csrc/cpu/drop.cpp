// CPU masked dropping: the sparsified task vector of one expert, and the L1 norms that mergekit's
// L1-matching DARE rescale needs. Masks come from csrc/common/philox.h, keyed by
// (seed, tensor key, expert, global element index), as on the GPU.
#include <torch/library.h>

#include <vector>

#include "../host_args.h"
#include "cpu_common.h"

namespace mk::cpu {
namespace {

template <int kMode, int kSource, typename in_t>
void drop_kernel(const MergeConfig& c, const in_t* base, const in_t* x, float* out, int64_t n) {
  const int64_t offset = c.element_offset;
  for_each_block(offset, n, [&, c](int64_t g0, int64_t lo, int64_t hi) {
    alignas(64) uint32_t words[kBlock];
    if constexpr (kMode == kSparsifyDrop) fill_words(words, c.key, g0, c.expert_offset);
    const int64_t len = hi - lo, local0 = lo - offset, w0 = lo - g0;
    alignas(64) float base_buf[kBlock], x_buf[kBlock];
    const float* __restrict__ base_f = as_float(base + local0, base_buf, len);
    const float* __restrict__ x_f = as_float(x + local0, x_buf, len);
    for (int64_t j = 0; j < len; ++j) {
      const float tau = fsub(x_f[j], base_f[j]);
      out[local0 + j] = canonical_nan(sparsify_as<kMode, kSource>(c, 0, lo + j, local0 + j, tau, words[w0 + j]));
    }
  });
}

void run_drop(const MergeConfig& c, const Inputs& in, at::Tensor& out) {
  MK_DISPATCH_FLOAT(in.base.scalar_type(), "masked_drop", [&] {
    const scalar_t* b = in.base.data_ptr<scalar_t>();
    const scalar_t* x = in.finetuned[0].data_ptr<scalar_t>();
    float* o = out.data_ptr<float>();
    switch (c.sparsify) {
      case kSparsifyTrim:
        return drop_kernel<kSparsifyTrim, kKeepConstant>(c, b, x, o, in.numel());
      case kSparsifyBand:
        return drop_kernel<kSparsifyBand, kKeepConstant>(c, b, x, o, in.numel());
      case kSparsifyDrop:
        if (c.keep_source == kKeepPerRow) return drop_kernel<kSparsifyDrop, kKeepPerRow>(c, b, x, o, in.numel());
        if (c.keep_source == kKeepRank) return drop_kernel<kSparsifyDrop, kKeepRank>(c, b, x, o, in.numel());
        return drop_kernel<kSparsifyDrop, kKeepConstant>(c, b, x, o, in.numel());
      default:
        return drop_kernel<kSparsifyNone, kKeepConstant>(c, b, x, o, in.numel());
    }
  });
}

void run_drop_l1(const MergeConfig& c, const Inputs& in, at::Tensor& out) {
  const int64_t element_offset = c.element_offset;
  const int k = in.num_experts();
  const int64_t n = in.numel(), chunks = num_chunks(element_offset, n);
  std::vector<double> partial(static_cast<size_t>(chunks) * 2 * k, 0.0);
  MK_DISPATCH_FLOAT(in.base.scalar_type(), "drop_l1", [&] {
    const scalar_t* b = in.base.data_ptr<scalar_t>();
    for_each_block_chunked(element_offset, n, [&](int64_t ch, int64_t g0, int64_t lo, int64_t hi) {
      alignas(64) uint32_t words[kBlock];
      const int64_t len = hi - lo, local0 = lo - element_offset, w0 = lo - g0;
      double* acc = partial.data() + ch * 2 * k;
      alignas(64) float base_buf[kBlock], x_buf[kBlock];
      const float* __restrict__ base_f = as_float(b + local0, base_buf, len);
      for (int t = 0; t < k; ++t) {
        fill_words(words, c.key, g0, c.expert_offset + t);
        const float* __restrict__ x = as_float(in.finetuned[t].data_ptr<scalar_t>() + local0, x_buf, len);
        double full = 0.0, kept = 0.0;
        for (int64_t j = 0; j < len; ++j) {
          const float tau = fsub(x[j], base_f[j]);
          full += abs_f(tau);
          kept += abs_f(sparsify_as<kSparsifyDrop>(c, t, lo + j, local0 + j, tau, words[w0 + j]));
        }
        acc[t] += full;
        acc[k + t] += kept;
      }
    });
  });
  double* o = out.data_ptr<double>();
  for (int64_t ch = 0; ch < chunks; ++ch)
    for (int i = 0; i < 2 * k; ++i) o[i] += partial[ch * 2 * k + i];
}

}  // namespace

TORCH_LIBRARY_IMPL(mergekernels, CPU, m) {
  m.impl("masked_drop", &masked_drop_op<run_drop>);
  m.impl("drop_l1", &drop_l1_op<run_drop_l1>);
}

}  // namespace mk::cpu
