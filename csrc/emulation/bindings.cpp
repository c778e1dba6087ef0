// torch.ops.mergekernels_emu: the CUDA kernels' launch_* entry points, compiled as host C++ against
// csrc/cuda/emulation.h and run on CPU tensors. The ops have the package's schemas (op_schemas.h) and
// go through the same front-ends (host_args.h) and runners (cuda/runners.h) as the real CUDA
// bindings; only the device policy differs. Test-only: tests/cuda_emulation.py builds it.
//
// Every tensor a kernel touches is staged into a buffer with margins: inputs between NaN margins
// (a read out of bounds poisons the result), outputs between canary margins that must be intact
// after the launch (a write out of bounds fails the op).
#include <torch/library.h>

#include <ATen/ops/from_blob.h>
#include <ATen/ops/full.h>

#include <cstring>
#include <vector>

#include "../cuda/runners.h"
#include "../op_schemas.h"
#include "runtime.h"

namespace mk::emu {
namespace {

struct EmulatedDevice {
  struct Guard {
    explicit Guard(c10::Device) {}
  };
  static cudaStream_t stream() { return nullptr; }
  static void check_launch() {
    const std::string error = take_last_error();
    TORCH_CHECK(error.empty(), "emulated CUDA launch failed: ", error);
  }
};

constexpr int64_t kMarginBytes = 4096;
constexpr uint8_t kInputMargin = 0xFF;  // NaN in every float dtype
constexpr uint8_t kOutputMargin = 0xA5;

// Copies of the tensors of one op call inside margins; finish() checks the output margins and
// copies the outputs back.
class Staging {
 public:
  at::Tensor input(const at::Tensor& x) { return stage(x, kInputMargin, false); }
  at::Tensor output(const at::Tensor& x) { return stage(x, kOutputMargin, true); }
  // A raw input array of `count` elements of `dtype` (the aux tensors a MergeConfig points into).
  template <typename T>
  const T* input(const T* data, int64_t count, at::ScalarType dtype) {
    if (data == nullptr) return nullptr;
    const at::Tensor view = at::from_blob(const_cast<T*>(data), {count}, at::TensorOptions().dtype(dtype));
    return input(view).template data_ptr<T>();
  }

  Inputs inputs(const Inputs& in) {
    Inputs staged{in.base.defined() ? input(in.base) : at::Tensor(), {}};
    for (const auto& x : in.finetuned) staged.finetuned.push_back(input(x));
    return staged;
  }

  // Points the config's aux arrays (thresholds, per-row keep rates, ranks) at staged copies.
  MergeConfig config(const MergeConfig& c, int64_t n) {
    MergeConfig s = c;
    s.thresholds = input(c.thresholds, 2 * static_cast<int64_t>(c.num_experts), at::kFloat);
    if (c.row_keep) s.row_keep = input(c.row_keep, c.num_experts * c.num_rows, at::kFloat);
    for (int t = 0; t < c.num_experts; ++t) s.ranks[t] = input(c.ranks[t], n, at::kInt);
    if (c.nonfinite) {  // an output: the flags come back through finish()
      const at::Tensor flags = at::from_blob(c.nonfinite, {c.num_experts + 1}, at::TensorOptions().dtype(at::kInt));
      s.nonfinite = output(flags).data_ptr<int32_t>();
    }
    return s;
  }

  void finish() {
    for (auto& o : outputs_) {
      const auto* bytes = o.buffer.data_ptr<uint8_t>();
      const int64_t size = o.buffer.numel() - 2 * kMarginBytes;
      for (int64_t b = 0; b < kMarginBytes; ++b) {
        TORCH_CHECK(bytes[kMarginBytes - 1 - b] == kOutputMargin, "emulated CUDA kernel wrote before the start of ",
                    "an output (byte ", b + 1, " before it changed) of shape ", o.original.sizes(), " and dtype ",
                    o.original.scalar_type());
        TORCH_CHECK(bytes[kMarginBytes + size + b] == kOutputMargin, "emulated CUDA kernel wrote past the end of ",
                    "an output (byte ", b + 1, " after it changed) of shape ", o.original.sizes(), " and dtype ",
                    o.original.scalar_type());
      }
      o.original.copy_(o.staged);
    }
    outputs_.clear();
  }

 private:
  struct Output {
    at::Tensor original, staged, buffer;
  };

  at::Tensor stage(const at::Tensor& x, uint8_t margin, bool is_output) {
    const int64_t bytes = x.numel() * static_cast<int64_t>(x.element_size());
    at::Tensor buffer = at::full({bytes + 2 * kMarginBytes}, margin, at::TensorOptions().dtype(at::kByte));
    at::Tensor staged = buffer.narrow(0, kMarginBytes, bytes).view(x.scalar_type()).view(x.sizes());
    if (x.numel()) staged.copy_(x);
    keep_alive_.push_back(buffer);
    if (is_output) outputs_.push_back({x, staged, buffer});
    return staged;
  }

  std::vector<at::Tensor> keep_alive_;
  std::vector<Output> outputs_;
};

using cuda::run_assemble;
using cuda::run_drop;
using cuda::run_drop_l1;
using cuda::run_histogram;
using cuda::run_merge;
using cuda::run_moments;
using cuda::run_stats;

// Runners for the front-ends: stage, run the shared runner with the emulated device, check.
template <MergeRunner run>
void staged_pipeline(const MergeConfig& c, const Inputs& in, at::Tensor& out) {
  Staging s;
  const Inputs staged = s.inputs(in);
  at::Tensor staged_out = s.output(out);
  run(s.config(c, in.numel()), staged, staged_out);
  s.finish();
}

void staged_stats(const Inputs& in, bool histogram, StatsOutputs& out) {
  Staging s;
  StatsOutputs staged{s.output(out.gram), s.output(out.absmax), s.output(out.nnz), s.output(out.signs),
                      s.output(out.hist)};
  run_stats<EmulatedDevice>(s.inputs(in), histogram, staged);
  s.finish();
}

void staged_variance(const Inputs& in, at::Tensor& out) {
  Staging s;
  at::Tensor staged = s.output(out);
  cuda::run_variance<EmulatedDevice>(s.inputs(in), staged);
  s.finish();
}

void staged_histogram(const Inputs& in, int level, const at::Tensor& prefix, at::Tensor& hist) {
  Staging s;
  at::Tensor staged_hist = s.output(hist);
  run_histogram<EmulatedDevice>(s.inputs(in), level, prefix.defined() ? s.input(prefix) : prefix, staged_hist);
  s.finish();
}

void staged_moments(const Inputs& in, MomentsOutputs& out) {
  Staging s;
  MomentsOutputs staged{s.output(out.centred), s.output(out.colmean), s.output(out.energy),
                        s.output(out.centred_energy)};
  run_moments<EmulatedDevice>(s.inputs(in), staged);
  s.finish();
}

void staged_assemble(const at::Tensor& gram_sum, const at::Tensor& ridge, const at::Tensor& prior_scale,
                     at::Tensor& system, at::Tensor& prior) {
  Staging s;
  at::Tensor staged_system = s.output(system), staged_prior = s.output(prior);
  run_assemble<EmulatedDevice>(s.input(gram_sum), s.input(ridge), s.input(prior_scale), staged_system,
                               staged_prior);
  s.finish();
}

// ---- Controls for the tests ----------------------------------------------------------------------
Schedule parse_schedule(c10::string_view name) {
  if (name == "forward") return Schedule::kForward;
  if (name == "reverse") return Schedule::kReverse;
  TORCH_CHECK(name == "random", "emulation schedule must be forward, reverse or random, got ", name);
  return Schedule::kRandom;
}

void configure(int64_t multiprocessors, c10::string_view schedule, int64_t seed, int64_t grid_override,
               int64_t max_grid_y, int64_t max_shared_optin) {
  TORCH_CHECK(multiprocessors >= 1, "multiprocessors must be >= 1, got ", multiprocessors);
  TORCH_CHECK(grid_override >= 0, "grid_override must be >= 0, got ", grid_override);
  TORCH_CHECK(max_grid_y >= 1 && max_grid_y <= 65535, "max_grid_y must be in [1, 65535], got ", max_grid_y);
  TORCH_CHECK(max_shared_optin >= 0, "max_shared_optin must be >= 0, got ", max_shared_optin);
  Settings& s = settings();
  s.multiprocessors = static_cast<int>(multiprocessors);
  s.schedule = parse_schedule(schedule);
  s.seed = static_cast<uint64_t>(seed);
  s.grid_override = grid_override;
  s.max_grid_y = max_grid_y;
  s.max_shared_optin = max_shared_optin;
}

// [launches, blocks, threads, barriers, shuffles] since the last call.
std::vector<int64_t> take_counters() {
  Counters& c = counters();
  std::vector<int64_t> out{c.launches, c.blocks, c.threads, c.barriers, c.shuffles};
  c = Counters{};
  return out;
}

// Float32 -> float16 / bfloat16 bit patterns (int16) by the emulated conversions, and back.
at::Tensor narrow_bits(const at::Tensor& x, bool bfloat16) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(), "narrow_bits: x must be a CPU float32 tensor");
  const at::Tensor in = x.contiguous();
  at::Tensor out = at::empty(in.sizes(), in.options().dtype(at::kShort));
  const float* src = in.data_ptr<float>();
  auto* dst = reinterpret_cast<uint16_t*>(out.data_ptr<int16_t>());
  for (int64_t i = 0; i < in.numel(); ++i) dst[i] = bfloat16 ? bfloat16_from_float(src[i]) : half_from_float(src[i]);
  return out;
}

at::Tensor widen_bits(const at::Tensor& bits, bool bfloat16) {
  TORCH_CHECK(bits.scalar_type() == at::kShort && bits.device().is_cpu(), "widen_bits: bits must be CPU int16");
  const at::Tensor in = bits.contiguous();
  at::Tensor out = at::empty(in.sizes(), in.options().dtype(at::kFloat));
  const auto* src = reinterpret_cast<const uint16_t*>(in.data_ptr<int16_t>());
  float* dst = out.data_ptr<float>();
  for (int64_t i = 0; i < in.numel(); ++i) dst[i] = bfloat16 ? bfloat16_to_float(src[i]) : half_to_float(src[i]);
  return out;
}

}  // namespace
}  // namespace mk::emu

TORCH_LIBRARY(mergekernels_emu, m) {
  mk::define_ops(m);
  m.def(
      "configure(int multiprocessors, str schedule, int seed, int grid_override, int max_grid_y=65535, "
      "int max_shared_optin=232448) -> ()",
      &mk::emu::configure);
  m.def("take_counters() -> int[]", &mk::emu::take_counters);
  m.def("narrow_bits(Tensor x, bool bfloat16) -> Tensor", &mk::emu::narrow_bits);
  m.def("widen_bits(Tensor bits, bool bfloat16) -> Tensor", &mk::emu::widen_bits);
}

TORCH_LIBRARY_IMPL(mergekernels_emu, CPU, m) {
  using mk::emu::EmulatedDevice;
  m.impl("fused_merge", &mk::fused_merge_op<mk::emu::staged_pipeline<mk::cuda::run_merge<EmulatedDevice>>>);
  m.impl("fused_merge.out",
         &mk::fused_merge_out_op<mk::emu::staged_pipeline<mk::cuda::run_merge<EmulatedDevice>>>);
  m.impl("masked_drop", &mk::masked_drop_op<mk::emu::staged_pipeline<mk::cuda::run_drop<EmulatedDevice>>>);
  m.impl("drop_l1", &mk::drop_l1_op<mk::emu::staged_pipeline<mk::cuda::run_drop_l1<EmulatedDevice>>>);
  m.impl("tv_stats", &mk::tv_stats_op<mk::emu::staged_stats>);
  m.impl("element_variance", &mk::element_variance_op<mk::emu::staged_variance>);
  m.impl("magnitude_histogram_", &mk::magnitude_histogram_op<mk::emu::staged_histogram>);
  m.impl("covariance_moments", &mk::covariance_moments_op<mk::emu::staged_moments>);
  m.impl("covariance_assemble", &mk::covariance_assemble_op<mk::emu::staged_assemble>);
  m.impl("row_ranks", &mk::row_ranks_op<mk::cuda::run_row_ranks<EmulatedDevice>>);
}
