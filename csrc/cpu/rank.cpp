// CPU per-row magnitude ranks (DELLA): a stable LSD radix sort of each row's |tau| bit patterns
// (31 significant bits in digits of 11, 11 and 9 bits) carrying the column index, then
// rank[column] = position. O(row length) per row, rows in parallel.
#include <torch/library.h>

#include <vector>

#include "../host_args.h"
#include "cpu_common.h"

namespace mk::cpu {
namespace {

constexpr int kDigitBits = 11;
constexpr int kDigitBins = 1 << kDigitBits;

void run_row_ranks(const Inputs& in, int64_t row_len, at::Tensor& ranks) {
  const int64_t rows = row_len > 0 ? in.numel() / row_len : 0;
  int32_t* out = ranks.data_ptr<int32_t>();
  MK_DISPATCH_FLOAT(in.base.scalar_type(), "row_ranks", [&] {
    const scalar_t* b = in.base.data_ptr<scalar_t>();
    const scalar_t* x = in.finetuned[0].data_ptr<scalar_t>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      std::vector<uint32_t> key(row_len), key_tmp(row_len), col(row_len), col_tmp(row_len);
      std::vector<int64_t> count(kDigitBins);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t off = r * row_len;
        for (int64_t j = 0; j < row_len; ++j) {
          key[j] = abs_key(fsub(static_cast<float>(x[off + j]), static_cast<float>(b[off + j])));
          col[j] = static_cast<uint32_t>(j);
        }
        for (int shift = 0; shift < 31; shift += kDigitBits) {
          std::fill(count.begin(), count.end(), 0);
          for (int64_t j = 0; j < row_len; ++j) ++count[(key[j] >> shift) & (kDigitBins - 1)];
          if (count[(key[0] >> shift) & (kDigitBins - 1)] == row_len) continue;  // one digit: order kept
          int64_t sum = 0;
          for (auto& c : count) {
            const int64_t n = c;
            c = sum;
            sum += n;
          }
          for (int64_t j = 0; j < row_len; ++j) {
            const int64_t pos = count[(key[j] >> shift) & (kDigitBins - 1)]++;
            key_tmp[pos] = key[j];
            col_tmp[pos] = col[j];
          }
          key.swap(key_tmp);
          col.swap(col_tmp);
        }
        for (int64_t pos = 0; pos < row_len; ++pos) out[off + col[pos]] = static_cast<int32_t>(pos);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(mergekernels, CPU, m) { m.impl("row_ranks", &row_ranks_op<run_row_ranks>); }

}  // namespace mk::cpu
