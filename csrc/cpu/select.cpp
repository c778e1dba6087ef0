// CPU radix-select histograms for the exact k-th largest |tau| (see csrc/common/mk_common.h for the
// digit layout). Each thread counts into a private uint32 histogram, task by task over an L1-sized
// block so one task's bins stay in cache, and the private histograms are added into `hist`. At level
// 0 a thread keeps two copies of each task's histogram and counts alternate elements into them:
// neighbouring elements mostly fall in the same few bins, and one copy would make every increment
// wait for the previous one's store.
#include <torch/library.h>

#include <mutex>
#include <vector>

#include "../host_args.h"
#include "cpu_common.h"

namespace mk::cpu {
namespace {

// Elements per private histogram: below it, counting straight into `hist` is cheaper than zeroing
// and adding a private copy.
constexpr int64_t kPrivateMin = 1 << 16;

template <typename scalar_t>
void count_block(int level, int k, int64_t bins, const scalar_t* b, const std::vector<const scalar_t*>& ft,
                 const int64_t* prefix, int64_t lo, int64_t hi, uint32_t* h) {
  alignas(64) float base_buf[kBlock], x_buf[kBlock];
  alignas(64) uint32_t keys[kBlock];
  const int64_t len = hi - lo;
  const float* __restrict__ base_f = as_float(b + lo, base_buf, len);
  for (int t = 0; t < k; ++t) {
    const float* __restrict__ x = as_float(ft[t] + lo, x_buf, len);
    // Keys first, in a vectorised loop; the scattered increments follow in a loop of their own.
    for (int64_t j = 0; j < len; ++j) keys[j] = abs_key(fsub(x[j], base_f[j]));
    uint32_t* ht = h + t * bins;
    if (level == 0) {
      uint32_t* ht2 = h + (k + t) * bins;  // the second copy (see above)
      int64_t j = 0;
      for (; j + 1 < len; j += 2) {
        ++ht[keys[j] >> kLevel1Bits];
        ++ht2[keys[j + 1] >> kLevel1Bits];
      }
      if (j < len) ++ht[keys[j] >> kLevel1Bits];
    } else {
      // Few entries match the prefix: test 64 at a time with a vectorised OR and only walk the
      // groups that hold a match.
      const uint32_t want = static_cast<uint32_t>(prefix[t]);
      for (int64_t s = 0; s < len; s += 64) {
        const int64_t e = std::min<int64_t>(len, s + 64);
        uint32_t any = 0;
        for (int64_t j = s; j < e; ++j) any |= (keys[j] >> kLevel1Bits) == want;
        if (!any) continue;
        for (int64_t j = s; j < e; ++j)
          if ((keys[j] >> kLevel1Bits) == want) ++ht[keys[j] & (kLevel1Bins - 1)];
      }
    }
  }
}

void run_histogram(const Inputs& in, int level, const at::Tensor& pre, at::Tensor& hist) {
  const int k = in.num_experts();
  const int64_t bins = level == 0 ? kLevel0Bins : kLevel1Bins;
  const int64_t n = in.numel();
  int64_t* out = hist.data_ptr<int64_t>();
  std::mutex merge_lock;
  MK_DISPATCH_FLOAT(in.base.scalar_type(), "magnitude_histogram_", [&] {
    const scalar_t* b = in.base.data_ptr<scalar_t>();
    std::vector<const scalar_t*> ft;
    for (const auto& x : in.finetuned) ft.push_back(x.data_ptr<scalar_t>());
    const int64_t* p = level == 1 ? pre.data_ptr<int64_t>() : nullptr;
    const int64_t grain = std::max<int64_t>(kPrivateMin, (n + at::get_num_threads() - 1) / at::get_num_threads());
    const size_t copies = level == 0 ? 2 : 1;
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      const size_t size = static_cast<size_t>(k) * bins;
      std::vector<uint32_t> local(copies * size, 0);
      for (int64_t lo = begin; lo < end; lo += kBlock)
        count_block<scalar_t>(level, k, bins, b, ft, p, lo, std::min(lo + kBlock, end), local.data());
      std::lock_guard<std::mutex> guard(merge_lock);
      for (size_t i = 0; i < size; ++i)
        out[i] += static_cast<int64_t>(local[i]) + (copies == 2 ? static_cast<int64_t>(local[size + i]) : 0);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(mergekernels, CPU, m) { m.impl("magnitude_histogram_", &magnitude_histogram_op<run_histogram>); }

}  // namespace mk::cpu
