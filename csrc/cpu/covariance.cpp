// CPU covariance kernels (csrc/covariance.h): the moments pass and the system assembly.
// Work items are (expert, layer, 256-column strip); each strip walks its rows twice (column sums,
// then centring), so both passes stream rows of contiguous memory. Energies are summed per column
// in float64 (vectorisable) and the per-strip partials in a fixed order: results do not depend on
// the thread count.
#include <torch/library.h>

#include <vector>

#include "../host_args.h"
#include "cpu_common.h"

namespace mk::cpu {
namespace {

constexpr int64_t kStrip = 256;

void run_moments(const Inputs& in, MomentsOutputs& o) {
  const int64_t k = in.num_experts(), layers = in.base.size(0), m = in.base.size(1), n = in.base.size(2);
  const int64_t strips = (n + kStrip - 1) / kStrip, items = k * layers * strips;
  std::vector<double> e_part(items), s_part(items);
  float* centred = o.centred.data_ptr<float>();
  float* colmean = o.colmean.data_ptr<float>();
  MK_DISPATCH_FLOAT(in.base.scalar_type(), "covariance_moments", [&] {
    at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
      float bbuf[kStrip], xbuf[kStrip], mu[kStrip];
      double colsum[kStrip], sq[kStrip];
      for (int64_t item = begin; item < end; ++item) {
        const int64_t strip = item % strips, tl = item / strips, t = tl / layers, l = tl % layers;
        const int64_t c0 = strip * kStrip, w = std::min(kStrip, n - c0);
        const scalar_t* b = in.base.data_ptr<scalar_t>() + l * m * n + c0;
        const scalar_t* x = in.finetuned[t].data_ptr<scalar_t>() + l * m * n + c0;
        float* out = centred + (l * k + t) * m * n + c0;  // [layers, k, m, n]
        std::fill(colsum, colsum + w, 0.0);
        std::fill(sq, sq + w, 0.0);
        for (int64_t i = 0; i < m; ++i) {
          const float* bf = as_float(b + i * n, bbuf, w);
          const float* xf = as_float(x + i * n, xbuf, w);
          for (int64_t j = 0; j < w; ++j) {
            const double d = fsub(xf[j], bf[j]);
            colsum[j] += d;
            sq[j] += d * d;
          }
        }
        double e = 0.0;
        for (int64_t j = 0; j < w; ++j) {
          e += sq[j];
          mu[j] = static_cast<float>(colsum[j] / static_cast<double>(m));
          colmean[tl * n + c0 + j] = mu[j];
          sq[j] = 0.0;
        }
        for (int64_t i = 0; i < m; ++i) {
          const float* bf = as_float(b + i * n, bbuf, w);
          const float* xf = as_float(x + i * n, xbuf, w);
          float* row = out + i * n;
          for (int64_t j = 0; j < w; ++j) {
            const float c = fsub(fsub(xf[j], bf[j]), mu[j]);
            row[j] = c;
            sq[j] += static_cast<double>(c) * c;
          }
        }
        double s = 0.0;
        for (int64_t j = 0; j < w; ++j) s += sq[j];
        e_part[item] = e;
        s_part[item] = s;
      }
    });
  });
  double* energy = o.energy.data_ptr<double>();
  double* centred_energy = o.centred_energy.data_ptr<double>();
  for (int64_t tl = 0; tl < k * layers; ++tl) {
    double e = 0.0, s = 0.0;
    for (int64_t strip = 0; strip < strips; ++strip) {
      e += e_part[tl * strips + strip];
      s += s_part[tl * strips + strip];
    }
    energy[tl] = e;
    centred_energy[tl] = s;
  }
}

// One row per work item: the row in float64 plus the ridge on its diagonal, and its sum, which is
// also the column sum because gram_sum is exactly symmetric.
void run_assemble(const at::Tensor& gram_sum, const at::Tensor& ridge, const at::Tensor& prior_scale,
                  at::Tensor& system, at::Tensor& prior) {
  const int64_t layers = gram_sum.size(0), n = gram_sum.size(1);
  const float* g = gram_sum.data_ptr<float>();
  const double* rd = ridge.data_ptr<double>();
  const double* ps = prior_scale.data_ptr<double>();
  double* sys = system.data_ptr<double>();
  double* c = prior.data_ptr<double>();
  at::parallel_for(0, layers * n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t l = row / n, i = row % n;
      const float* src = g + row * n;
      double* dst = sys + row * n;
      double sum = 0.0;
      for (int64_t j = 0; j < n; ++j) {
        dst[j] = src[j];
        sum += src[j];
      }
      dst[i] += rd[l];
      c[row] = sum / static_cast<double>(n) / ps[l];
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(mergekernels, CPU, m) {
  m.impl("covariance_moments", &covariance_moments_op<run_moments>);
  m.impl("covariance_assemble", &covariance_assemble_op<run_assemble>);
}

}  // namespace mk::cpu
