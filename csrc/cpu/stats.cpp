// CPU task-vector statistics (and the per-element variance of the task vectors): one pass over base and the K fine-tuned tensors. Each block's task
// vectors live only in a per-thread [K, kBlock] scratch; the Gram matrix is summed in float64 with
// eight independent partial sums per pair (exact float products, vectorisable), per chunk, and
// the chunks are summed in order, so the result does not depend on the thread count.
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../host_args.h"
#include "cpu_common.h"

namespace mk::cpu {
namespace {

// Dot product of two float64 rows with eight independent partial sums (vectorisable; the products
// of float32 values are exact in float64).
double dot_f64(const double* a, const double* b, int64_t len) {
  double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= len; j += 8)
    for (int u = 0; u < 8; ++u) lane[u] += a[j + u] * b[j + u];
  for (; j < len; ++j) lane[0] += a[j] * b[j];
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

struct StatsPartial {
  std::vector<double> gram;     // [K, K], upper triangle filled
  std::vector<float> absmax;    // [K]
  std::vector<int64_t> nnz;     // [K]
  int64_t agree = 0, any = 0;   // sign agreement counts
  std::vector<int64_t> hist;    // [K, 256] or empty
};

void run_stats(const Inputs& in, bool histogram, StatsOutputs& out) {
  const int k = in.num_experts();
  const int64_t n = in.numel(), chunks = num_chunks(0, n);
  std::vector<StatsPartial> parts(static_cast<size_t>(chunks));
  for (auto& p : parts) {
    p.gram.assign(static_cast<size_t>(k) * k, 0.0);
    p.absmax.assign(k, 0.0f);
    p.nnz.assign(k, 0);
    if (histogram) p.hist.assign(static_cast<size_t>(k) * kExponentBins, 0);
  }
  MK_DISPATCH_FLOAT(in.reference().scalar_type(), "tv_stats", [&] {
    const scalar_t* b = in.base.defined() ? in.base.data_ptr<scalar_t>() : nullptr;  // none: the origin
    std::vector<const scalar_t*> ft;
    for (const auto& x : in.finetuned) ft.push_back(x.data_ptr<scalar_t>());
    for_each_block_chunked(0, n, [&](int64_t ch, int64_t, int64_t lo, int64_t hi) {
      thread_local std::vector<float> scratch;
      thread_local std::vector<double> wide;  // the block's task vectors in float64, for the Gram
      scratch.resize(static_cast<size_t>(k + 1) * kBlock);
      wide.resize(static_cast<size_t>(k) * kBlock);
      float* base_buf = scratch.data() + static_cast<size_t>(k) * kBlock;
      alignas(64) uint8_t has_pos[kBlock], has_neg[kBlock];
      StatsPartial& p = parts[ch];
      const int64_t len = hi - lo;
      alignas(64) float x_buf[kBlock];
      if (b == nullptr)
        for (int64_t j = 0; j < len; ++j) base_buf[j] = 0.0f;
      const float* __restrict__ base_f = b ? as_float(b + lo, base_buf, len) : base_buf;
      for (int64_t j = 0; j < len; ++j) has_pos[j] = has_neg[j] = 0;
      for (int t = 0; t < k; ++t) {
        float* tau = scratch.data() + static_cast<size_t>(t) * kBlock;
        const float* __restrict__ x = as_float(ft[t] + lo, x_buf, len);
        // Separate simple loops so each vectorises; max |tau| is taken on the bit patterns, which
        // order like the values for non-negative floats (an integer max reduction vectorises).
        for (int64_t j = 0; j < len; ++j) tau[j] = fsub(x[j], base_f[j]);
        uint32_t amax_bits = float_bits(p.absmax[t]);
        int64_t nz = 0;
        for (int64_t j = 0; j < len; ++j) {
          const uint32_t key = abs_key(tau[j]);
          amax_bits = std::max(amax_bits, key);
          nz += key != 0;
        }
        for (int64_t j = 0; j < len; ++j) {
          has_pos[j] |= tau[j] > 0.0f;
          has_neg[j] |= tau[j] < 0.0f;
        }
        const float amax = bits_float(amax_bits);
        p.absmax[t] = amax;
        p.nnz[t] += nz;
        double* tw = wide.data() + static_cast<size_t>(t) * kBlock;
        for (int64_t j = 0; j < len; ++j) tw[j] = tau[j];
        if (histogram) {
          int64_t* h = p.hist.data() + static_cast<size_t>(t) * kExponentBins;
          for (int64_t j = 0; j < len; ++j) ++h[abs_key(tau[j]) >> 23];
        }
      }
      for (int64_t j = 0; j < len; ++j) {
        p.any += has_pos[j] | has_neg[j];
        p.agree += has_pos[j] ^ has_neg[j];
      }
      for (int i = 0; i < k; ++i)
        for (int jj = i; jj < k; ++jj)
          p.gram[static_cast<size_t>(i) * k + jj] +=
              dot_f64(wide.data() + static_cast<size_t>(i) * kBlock, wide.data() + static_cast<size_t>(jj) * kBlock, len);
    });
  });
  double* g = out.gram.data_ptr<double>();
  float* am = out.absmax.data_ptr<float>();
  int64_t* nz = out.nnz.data_ptr<int64_t>();
  int64_t* sg = out.signs.data_ptr<int64_t>();
  int64_t* hs = out.hist.data_ptr<int64_t>();
  for (const auto& p : parts) {
    for (int i = 0; i < k; ++i) {
      for (int jj = i; jj < k; ++jj) g[i * k + jj] += p.gram[static_cast<size_t>(i) * k + jj];
      am[i] = std::max(am[i], p.absmax[i]);
      nz[i] += p.nnz[i];
    }
    sg[0] += p.agree;
    sg[1] += p.any;
    for (size_t i = 0; i < p.hist.size(); ++i) hs[i] += p.hist[i];
  }
}

// Welford over the tasks, block by block; each element's recurrence runs in task order.
void run_variance(const Inputs& in, at::Tensor& out) {
  const int k = in.num_experts();
  MK_DISPATCH_FLOAT(in.base.scalar_type(), "element_variance", [&] {
    const scalar_t* b = in.base.data_ptr<scalar_t>();
    std::vector<const scalar_t*> ft;
    for (const auto& x : in.finetuned) ft.push_back(x.data_ptr<scalar_t>());
    float* o = out.data_ptr<float>();
    for_each_block(0, in.numel(), [&](int64_t, int64_t lo, int64_t hi) {
      const int64_t len = hi - lo;
      alignas(64) float base_buf[kBlock], x_buf[kBlock];
      alignas(64) double mean[kBlock], m2[kBlock];
      const float* __restrict__ base_f = as_float(b + lo, base_buf, len);
      for (int64_t j = 0; j < len; ++j) mean[j] = m2[j] = 0.0;
      for (int t = 0; t < k; ++t) {
        const float* __restrict__ x = as_float(ft[t] + lo, x_buf, len);
        for (int64_t j = 0; j < len; ++j) welford_add(mean[j], m2[j], t + 1, fsub(x[j], base_f[j]));
      }
      for (int64_t j = 0; j < len; ++j) o[lo + j] = static_cast<float>(m2[j] / static_cast<double>(k));
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(mergekernels, CPU, m) {
  m.impl("tv_stats", &tv_stats_op<run_stats>);
  m.impl("element_variance", &element_variance_op<run_variance>);
}

}  // namespace mk::cpu
