// Torch-side helpers shared by the CPU and CUDA registrations: input validation and the
// translation of op arguments into the plain-data configs of csrc/common.
#pragma once

#include <limits>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <vector>

#include "common/merge_element.h"

namespace mk {

// The inputs of one op call, validated and made contiguous.
// `base` is undefined for the statistics of the points themselves (tv_stats without a base: the
// origin is the base); `reference()` is then the first point.
struct Inputs {
  at::Tensor base;
  std::vector<at::Tensor> finetuned;
  const at::Tensor& reference() const { return base.defined() ? base : finetuned.front(); }
  int64_t numel() const { return reference().numel(); }
  int num_experts() const { return static_cast<int>(finetuned.size()); }
};

inline Inputs check_inputs(const at::Tensor& base, at::TensorList finetuned, const char* op) {
  TORCH_CHECK(!finetuned.empty(), op, ": expected at least one fine-tuned tensor, got an empty list");
  TORCH_CHECK(static_cast<int>(finetuned.size()) <= kMaxExperts, op, ": at most ", kMaxExperts,
              " fine-tuned tensors per call, got ", finetuned.size());
  const auto dtype = base.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": base must be float32, float16 or bfloat16, got ", dtype);
  Inputs in{base.contiguous(), {}};
  in.finetuned.reserve(finetuned.size());
  for (size_t t = 0; t < finetuned.size(); ++t) {
    const auto& x = finetuned[t];
    TORCH_CHECK(x.sizes() == base.sizes(), op, ": finetuned[", t, "] has shape ", x.sizes(),
                " but base has shape ", base.sizes());
    TORCH_CHECK(x.scalar_type() == dtype, op, ": finetuned[", t, "] is ", x.scalar_type(),
                " but base is ", dtype, " (cast them to one dtype first)");
    TORCH_CHECK(x.device() == base.device(), op, ": finetuned[", t, "] is on ", x.device(),
                " but base is on ", base.device());
    in.finetuned.push_back(x.contiguous());
  }
  return in;
}

inline void check_aux(const at::Tensor& aux, const at::Tensor& base, at::ScalarType dtype, const char* op,
                      const char* name) {
  TORCH_CHECK(aux.device() == base.device(), op, ": ", name, " is on ", aux.device(), " but base is on ",
              base.device());
  TORCH_CHECK(aux.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", aux.scalar_type());
  TORCH_CHECK(aux.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline void fill_per_task(float* dst, c10::ArrayRef<double> src, int k, float fallback, const char* op,
                          const char* name) {
  TORCH_CHECK(src.empty() || static_cast<int>(src.size()) == k, op, ": ", name, " has ", src.size(),
              " entries for ", k, " fine-tuned tensors");
  for (int t = 0; t < k; ++t) dst[t] = src.empty() ? fallback : static_cast<float>(src[t]);
}

// Arguments of the fused merge / masked drop ops that shape the per-element pipeline.
struct PipelineArgs {
  int64_t sparsify = kSparsifyNone;
  c10::optional<at::Tensor> thresholds;
  int64_t keep_source = kKeepConstant;
  c10::ArrayRef<double> keep, step, post;
  bool rescale_inverse = true;
  c10::optional<at::Tensor> row_keep;
  std::vector<at::Tensor> ranks;
  int64_t seed = 0, key = 0, element_offset = 0, row_len = 1;
  c10::ArrayRef<int64_t> tie_cuts = {};
};

// Builds the config; the tensors it points into (thresholds, row_keep, ranks) are kept alive
// by `keep_alive`.
inline MergeConfig make_config(const Inputs& in, const PipelineArgs& a, const char* op,
                               std::vector<at::Tensor>& keep_alive) {
  const int k = in.num_experts();
  MergeConfig c{};
  c.num_experts = k;
  c.sparsify = static_cast<int32_t>(a.sparsify);
  c.keep_source = static_cast<int32_t>(a.keep_source);
  c.reduce = kReduceSum;
  c.scale = 1.0f;
  c.points = false;
  c.base_scale = 1.0f;
  c.rescale_inverse = a.rescale_inverse;
  c.key = philox_key(static_cast<uint64_t>(a.seed), static_cast<uint64_t>(a.key));
  TORCH_CHECK(a.element_offset >= 0, op, ": element_offset must be >= 0, got ", a.element_offset);
  c.element_offset = a.element_offset;
  TORCH_CHECK(a.sparsify >= kSparsifyNone && a.sparsify <= kSparsifyClip, op, ": unknown sparsify mode ",
              a.sparsify);
  for (int t = 0; t < k; ++t) c.weight[t] = 1.0f;
  fill_per_task(c.post, a.post, k, 1.0f, op, "post");
  if (a.sparsify == kSparsifyTrim || a.sparsify == kSparsifyBand || a.sparsify == kSparsifyClip) {
    TORCH_CHECK(a.thresholds.has_value(), op, ": trim, band and clip modes need thresholds");
    const auto& thr = *a.thresholds;
    check_aux(thr, in.base, at::kFloat, op, "thresholds");
    TORCH_CHECK(thr.dim() == 2 && thr.size(0) == 2 && thr.size(1) == k, op,
                ": thresholds must have shape [2, ", k, "], got ", thr.sizes());
    keep_alive.push_back(thr);
    c.thresholds = thr.data_ptr<float>();
    for (int t = 0; t < k; ++t) {  // every tie kept (trim) / the lower ones kept, none at the top (band)
      c.tie_lo[t] = a.sparsify == kSparsifyTrim ? std::numeric_limits<int64_t>::max() : 0;
      c.tie_hi[t] = 0;
    }
    if (!a.tie_cuts.empty()) {
      TORCH_CHECK(static_cast<int>(a.tie_cuts.size()) == 2 * k, op, ": tie_cuts needs 2 x ", k,
                  " element indices, got ", a.tie_cuts.size());
      for (int t = 0; t < k; ++t) {
        c.tie_lo[t] = a.tie_cuts[t];
        c.tie_hi[t] = a.tie_cuts[k + t];
      }
    }
    if (thr.is_cpu()) {
      for (int t = 0; t < k; ++t) {
        c.lower[t] = c.thresholds[t];
        c.upper[t] = c.thresholds[k + t];
      }
    }
  }
  if (a.sparsify == kSparsifyDrop) {
    c.row_len = 1;
    c.num_rows = 1;
    switch (a.keep_source) {
      case kKeepConstant:
        TORCH_CHECK(static_cast<int>(a.keep.size()) == k, op, ": keep needs one probability per task");
        fill_per_task(c.keep, a.keep, k, 1.0f, op, "keep");
        break;
      case kKeepPerRow: {
        TORCH_CHECK(a.row_keep.has_value(), op, ": per-row keep rates need row_keep");
        const auto& rk = *a.row_keep;
        check_aux(rk, in.base, at::kFloat, op, "row_keep");
        TORCH_CHECK(a.row_len >= 1, op, ": row_len must be >= 1, got ", a.row_len);
        TORCH_CHECK(rk.dim() == 2 && rk.size(0) == k, op, ": row_keep must have shape [", k,
                    ", rows], got ", rk.sizes());
        const int64_t rows_needed = (a.element_offset + in.numel() + a.row_len - 1) / a.row_len;
        TORCH_CHECK(rk.size(1) >= rows_needed, op, ": row_keep has ", rk.size(1), " rows but elements up to ",
                    a.element_offset + in.numel(), " need ", rows_needed, " rows of ", a.row_len);
        keep_alive.push_back(rk);
        c.row_keep = rk.data_ptr<float>();
        c.row_len = a.row_len;
        c.num_rows = rk.size(1);
        break;
      }
      case kKeepRank:
        TORCH_CHECK(static_cast<int>(a.ranks.size()) == k, op, ": rank mode needs one rank tensor per task, got ",
                    a.ranks.size());
        fill_per_task(c.keep, a.keep, k, 1.0f, op, "keep");
        fill_per_task(c.step, a.step, k, 0.0f, op, "step");
        for (int t = 0; t < k; ++t) {
          const auto& r = a.ranks[t];
          check_aux(r, in.base, at::kInt, op, "ranks");
          TORCH_CHECK(r.numel() == in.numel(), op, ": ranks[", t, "] has ", r.numel(), " elements, base has ",
                      in.numel());
          keep_alive.push_back(r);
          c.ranks[t] = r.data_ptr<int32_t>();
        }
        break;
      default:
        TORCH_CHECK(false, op, ": unknown keep source ", a.keep_source);
    }
  }
  return c;
}

inline at::ScalarType output_dtype(const Inputs& in, c10::optional<at::ScalarType> out_dtype, const char* op) {
  const auto dt = out_dtype.value_or(in.base.scalar_type());
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
              ": out_dtype must be float32, float16 or bfloat16, got ", dt);
  return dt;
}

// Fused merge op arguments -> config (merge-specific fields on top of the pipeline ones).
inline MergeConfig make_merge_config(const Inputs& in, const PipelineArgs& a, c10::ArrayRef<double> weights,
                                     double scale, int64_t reduce, bool ties, bool weighted_election,
                                     c10::optional<double> base_scale, std::vector<at::Tensor>& keep_alive) {
  constexpr const char* op = "fused_merge";
  MergeConfig c = make_config(in, a, op, keep_alive);
  fill_per_task(c.weight, weights, in.num_experts(), 1.0f, op, "weights");
  TORCH_CHECK(reduce >= kReduceSum && reduce <= kReduceActive, op, ": unknown reduce mode ", reduce);
  TORCH_CHECK(!(ties && reduce == kReduceActive), op, ": the active-mean reduction takes no TIES consensus");
  c.points = base_scale.has_value();
  c.base_scale = static_cast<float>(base_scale.value_or(1.0));
  c.reduce = static_cast<int32_t>(reduce);
  c.ties = ties;
  c.weighted_election = weighted_election;
  c.scale = static_cast<float>(scale);
  return c;
}

}  // namespace mk

// ---------------------------------------------------------------------------------------------
// Backend-independent op front-ends. Each backend supplies runners that only launch work on
// validated, contiguous inputs and preallocated outputs; checks, configs and allocation live here
// once for CPU and CUDA.
#include <ATen/ops/empty.h>
#include <ATen/ops/add.h>
#include <ATen/ops/triu.h>
#include <ATen/ops/zeros.h>

#include <tuple>

namespace mk {

using MergeRunner = void (*)(const MergeConfig&, const Inputs&, at::Tensor& out);
using DropL1Runner = void (*)(const MergeConfig&, const Inputs&, at::Tensor& out);
struct StatsOutputs {
  at::Tensor gram, absmax, nnz, signs, hist;
};
using StatsRunner = void (*)(const Inputs&, bool histogram, StatsOutputs& out);
using HistogramRunner = void (*)(const Inputs&, int level, const at::Tensor& prefix, at::Tensor& hist);
using RanksRunner = void (*)(const Inputs&, int64_t row_len, at::Tensor& ranks);
using VarianceRunner = void (*)(const Inputs&, at::Tensor& out);

template <MergeRunner run>
void fused_merge_out_op(const at::Tensor& base, at::TensorList finetuned, c10::ArrayRef<double> weights,
                               double scale, int64_t reduce, bool ties, bool weighted_election, int64_t sparsify,
                               const c10::optional<at::Tensor>& thresholds, int64_t keep_source,
                               c10::ArrayRef<double> keep, c10::ArrayRef<double> step, c10::ArrayRef<double> post,
                               bool rescale_inverse, const c10::optional<at::Tensor>& row_keep, at::TensorList ranks,
                               int64_t seed, int64_t key, int64_t element_offset, int64_t row_len,
                               c10::optional<at::ScalarType> out_dtype, c10::ArrayRef<int64_t> tie_cuts,
                               c10::optional<double> base_scale, const c10::optional<at::Tensor>& nonfinite,
                               at::Tensor& out) {
  const Inputs in = check_inputs(base, finetuned, "fused_merge");
  TORCH_CHECK(out.device() == base.device(), "fused_merge: out is on ", out.device(), " but base is on ",
              base.device());
  TORCH_CHECK(out.sizes() == base.sizes(), "fused_merge: out has shape ", out.sizes(), " but base has ",
              base.sizes());
  TORCH_CHECK(out.is_contiguous(), "fused_merge: out must be contiguous");
  const auto dtype = output_dtype(in, out_dtype.value_or(out.scalar_type()), "fused_merge");
  TORCH_CHECK(out.scalar_type() == dtype, "fused_merge: out is ", out.scalar_type(), " but out_dtype is ", dtype);
  PipelineArgs a{sparsify, thresholds, keep_source, keep, step, post, rescale_inverse, row_keep, ranks.vec(),
                 seed, key, element_offset, row_len, tie_cuts};
  std::vector<at::Tensor> keep_alive;
  MergeConfig c = make_merge_config(in, a, weights, scale, reduce, ties, weighted_election, base_scale, keep_alive);
  if (nonfinite.has_value()) {
    const at::Tensor& flags = *nonfinite;
    check_aux(flags, in.base, at::kInt, "fused_merge", "nonfinite");
    TORCH_CHECK(flags.dim() == 1 && flags.numel() == in.num_experts() + 1, "fused_merge: nonfinite must have shape [",
                in.num_experts() + 1, "] (the base, then each fine-tuned tensor), got ", flags.sizes());
    c.nonfinite = flags.data_ptr<int32_t>();
  }
  run(c, in, out);
}

template <MergeRunner run>
at::Tensor fused_merge_op(const at::Tensor& base, at::TensorList finetuned, c10::ArrayRef<double> weights, double scale,
                          int64_t reduce, bool ties, bool weighted_election, int64_t sparsify,
                          const c10::optional<at::Tensor>& thresholds, int64_t keep_source, c10::ArrayRef<double> keep,
                          c10::ArrayRef<double> step, c10::ArrayRef<double> post, bool rescale_inverse,
                          const c10::optional<at::Tensor>& row_keep, at::TensorList ranks, int64_t seed, int64_t key,
                          int64_t element_offset, int64_t row_len, c10::optional<at::ScalarType> out_dtype,
                          c10::ArrayRef<int64_t> tie_cuts, c10::optional<double> base_scale,
                          const c10::optional<at::Tensor>& nonfinite) {
  at::Tensor out = at::empty(base.sizes(), base.options().dtype(out_dtype.value_or(base.scalar_type())));
  fused_merge_out_op<run>(base, finetuned, weights, scale, reduce, ties, weighted_election, sparsify, thresholds,
                          keep_source, keep, step, post, rescale_inverse, row_keep, ranks, seed, key, element_offset,
                          row_len, out_dtype, tie_cuts, base_scale, nonfinite, out);
  return out;
}

template <MergeRunner run>
at::Tensor masked_drop_op(const at::Tensor& base, const at::Tensor& finetuned, int64_t expert, int64_t sparsify,
                          const c10::optional<at::Tensor>& thresholds, int64_t keep_source, double keep, double step,
                          double post, bool rescale_inverse, const c10::optional<at::Tensor>& row_keep,
                          const c10::optional<at::Tensor>& rank, int64_t seed, int64_t key, int64_t element_offset,
                          int64_t row_len) {
  const Inputs in = check_inputs(base, {finetuned}, "masked_drop");
  TORCH_CHECK(expert >= 0, "masked_drop: expert must be >= 0, got ", expert);
  const double keep1[] = {keep}, step1[] = {step}, post1[] = {post};
  std::vector<at::Tensor> ranks;
  if (rank.has_value()) ranks.push_back(*rank);
  PipelineArgs a{sparsify, thresholds, keep_source, keep1, step1, post1, rescale_inverse, row_keep, ranks,
                 seed, key, element_offset, row_len};
  std::vector<at::Tensor> keep_alive;
  MergeConfig c = make_config(in, a, "masked_drop", keep_alive);
  c.expert_offset = static_cast<int32_t>(expert);
  at::Tensor out = at::empty(base.sizes(), base.options().dtype(at::kFloat));
  run(c, in, out);
  return out;
}

template <DropL1Runner run>
at::Tensor drop_l1_op(const at::Tensor& base, at::TensorList finetuned, c10::ArrayRef<double> keep, int64_t seed,
                      int64_t key, int64_t element_offset) {
  const Inputs in = check_inputs(base, finetuned, "drop_l1");
  PipelineArgs a{kSparsifyDrop, c10::nullopt, kKeepConstant, keep, {}, {}, false, c10::nullopt, {},
                 seed, key, element_offset, 1};
  std::vector<at::Tensor> keep_alive;
  const MergeConfig c = make_config(in, a, "drop_l1", keep_alive);
  at::Tensor out = at::zeros({2, in.num_experts()}, base.options().dtype(at::kDouble));
  run(c, in, out);
  return out;
}

template <StatsRunner run>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> tv_stats_op(
    const c10::optional<at::Tensor>& base, at::TensorList finetuned, bool histogram) {
  TORCH_CHECK(base.has_value() || !finetuned.empty(), "tv_stats: expected at least one tensor, got an empty list");
  // Without a base the statistics are those of the points themselves (the origin is the base).
  Inputs in = check_inputs(base.has_value() ? *base : finetuned[0], finetuned, "tv_stats");
  if (!base.has_value()) in.base = at::Tensor();
  const int64_t k = in.num_experts();
  const auto opt = in.reference().options();
  StatsOutputs o{at::zeros({k, k}, opt.dtype(at::kDouble)), at::zeros({k}, opt.dtype(at::kFloat)),
                 at::zeros({k}, opt.dtype(at::kLong)), at::zeros({2}, opt.dtype(at::kLong)),
                 at::zeros({k, histogram ? kExponentBins : 0}, opt.dtype(at::kLong))};
  run(in, histogram, o);
  // Runners fill the upper triangle; mirror it.
  at::Tensor gram = at::add(at::triu(o.gram), at::triu(o.gram, 1).transpose(0, 1));
  return {gram, o.absmax, o.nnz, o.signs, o.hist};
}

template <HistogramRunner run>
void magnitude_histogram_op(at::Tensor& hist, const at::Tensor& base, at::TensorList finetuned, int64_t level,
                            const c10::optional<at::Tensor>& prefix) {
  const Inputs in = check_inputs(base, finetuned, "magnitude_histogram_");
  const int64_t k = in.num_experts();
  TORCH_CHECK(level == 0 || level == 1, "magnitude_histogram_: level must be 0 or 1, got ", level);
  const int64_t bins = level == 0 ? kLevel0Bins : kLevel1Bins;
  TORCH_CHECK(hist.device() == base.device() && hist.scalar_type() == at::kLong && hist.is_contiguous() &&
                  hist.dim() == 2 && hist.size(0) == k && hist.size(1) == bins,
              "magnitude_histogram_: hist must be a contiguous int64 tensor of shape [", k, ", ", bins,
              "] on the base's device, got ", hist.scalar_type(), " ", hist.sizes(), " on ", hist.device());
  at::Tensor pre;
  if (level == 1) {
    TORCH_CHECK(prefix.has_value(), "magnitude_histogram_: level 1 needs the level-0 prefix per task");
    pre = prefix->to(base.device(), at::kLong).contiguous();
    TORCH_CHECK(pre.numel() == k, "magnitude_histogram_: prefix needs ", k, " entries, got ", pre.numel());
  }
  run(in, static_cast<int>(level), pre, hist);
}

template <VarianceRunner run>
at::Tensor element_variance_op(const at::Tensor& base, at::TensorList finetuned) {
  const Inputs in = check_inputs(base, finetuned, "element_variance");
  at::Tensor out = at::empty(base.sizes(), base.options().dtype(at::kFloat));
  if (in.numel() > 0) run(in, out);
  return out;
}

template <RanksRunner run>
at::Tensor row_ranks_op(const at::Tensor& base, const at::Tensor& finetuned, int64_t row_len) {
  const Inputs in = check_inputs(base, {finetuned}, "row_ranks");
  TORCH_CHECK(row_len >= 1 && in.numel() % row_len == 0, "row_ranks: row_len ", row_len,
              " must be positive and divide the ", in.numel(), " elements");
  TORCH_CHECK(row_len <= (int64_t{1} << 31) - 1, "row_ranks: rows longer than 2^31 - 1 elements are not supported");
  at::Tensor ranks = at::empty(base.sizes(), base.options().dtype(at::kInt));
  run(in, row_len, ranks);
  return ranks;
}

// Covariance kernels (csrc/covariance.h). Runners fill the outputs allocated here.
struct MomentsOutputs {
  at::Tensor centred, colmean, energy, centred_energy;
};
using MomentsRunner = void (*)(const Inputs&, MomentsOutputs& out);
using AssembleRunner = void (*)(const at::Tensor& gram_sum, const at::Tensor& ridge, const at::Tensor& prior_scale,
                                at::Tensor& system, at::Tensor& prior);

template <MomentsRunner run>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> covariance_moments_op(const at::Tensor& base,
                                                                                 at::TensorList finetuned) {
  TORCH_CHECK(base.dim() == 3 && base.size(1) > 0 && base.size(2) > 0,
              "covariance_moments: base must be [layers, rows, cols] with rows, cols >= 1, got shape ",
              base.sizes());
  const Inputs in = check_inputs(base, finetuned, "covariance_moments");
  const int64_t k = in.num_experts(), layers = base.size(0), m = base.size(1), n = base.size(2);
  const auto f32 = base.options().dtype(at::kFloat), f64 = base.options().dtype(at::kDouble);
  MomentsOutputs o{at::empty({layers, k, m, n}, f32), at::empty({k, layers, n}, f32), at::empty({k, layers}, f64),
                   at::empty({k, layers}, f64)};
  if (layers > 0) run(in, o);
  return {o.centred, o.colmean, o.energy, o.centred_energy};
}

template <AssembleRunner run>
std::tuple<at::Tensor, at::Tensor> covariance_assemble_op(const at::Tensor& gram_sum, const at::Tensor& ridge,
                                                          const at::Tensor& prior_scale) {
  TORCH_CHECK(gram_sum.dim() == 3 && gram_sum.size(1) == gram_sum.size(2) && gram_sum.scalar_type() == at::kFloat,
              "covariance_assemble: gram_sum must be float32 [layers, n, n], got ", gram_sum.scalar_type(), " ",
              gram_sum.sizes());
  const int64_t layers = gram_sum.size(0), n = gram_sum.size(1);
  for (const auto* t : {&ridge, &prior_scale})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == layers && t->scalar_type() == at::kDouble &&
                    t->device() == gram_sum.device(),
                "covariance_assemble: ridge and prior_scale must be float64 [", layers, "] on ",
                gram_sum.device(), ", got ", t->scalar_type(), " ", t->sizes(), " on ", t->device());
  const auto f64 = gram_sum.options().dtype(at::kDouble);
  at::Tensor system = at::empty({layers, n, n}, f64), prior = at::empty({layers, n}, f64);
  if (layers > 0 && n > 0)
    run(gram_sum.contiguous(), ridge.contiguous(), prior_scale.contiguous(), system, prior);
  return {system, prior};
}

}  // namespace mk
