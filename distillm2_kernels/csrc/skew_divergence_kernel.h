// SKL and SRKL row kernels for one instruction set; three sweeps per row over the vocabulary.
//
// Per row, with log q = (z_s − max z_s)/T − log Σ exp((z_s − max z_s)/T) and log p likewise from z_t
// (the same as triton_backend.py and torch_backend.py):
//   SKL:   loss = Σ p (log p − log m),   m = α p + (1−α) q
//          ∂loss/∂s = q·C − p·ā,          ā = (1−α) q / m ∈ [0, 1],   C = Σ p·ā
//   SRKL:  loss = L = Σ q d,   d = log q − log r (0 where q = 0),   r = (1−α) p + α q
//          ∂loss/∂s = q·(d + e − C),      e = (1−α) p / r ∈ [0, 1],   C = L + Σ q·e
//          detached mixture (q inside r constant): ∂loss/∂s = q·(d − C),   C = L
// Both mixtures are "α·self + (1−α)·other" (self = p for SKL, q for SRKL), formed in log space; ā and e are the
// share of (1−α)·other in the mixture (1 where the mixture is 0). Every term is bounded and α = 1 gives exactly
// zero (ā = e = d = 0). A zero probability contributes exactly 0 (the guards test p == 0, q == 0: false for NaN).
// A row holding a NaN or +inf logit (and not ignored) gets log-sum NaN in sweep 1, so every log-probability of
// the row is NaN and its loss, C, label log-probabilities and whole gradient row are NaN (NaN flows through
// at::vec::maximum/minimum, which propagate it, and through every blend; a zero probability's gradient is NaN
// when C is).
//
// Sweep 1 (statistics): online log-sum-exp of both rows, kept as max z and log Σ exp((z − max z)/T) in two floats
// so that log q is as accurate as a log_softmax (one float lse near 100 would carry an absolute error of ~1e-5
// into every log q), and the label tokens' log q(label), log p(label) (one load each). Sweep 2 (forward): loss and
// C; it runs right after sweep 1 on the same row, or on statistics computed earlier. Sweep 3 (backward): the
// gradient times (incoming gradient)/T. Logits are staged in float32 blocks of kBlock entries (L1-resident) as
// (z − max z)/T: the difference is exact or rounded once, then divided (not multiplied by a rounded 1/T, which
// would scale every entry by the same (1 + ε)). Each row is computed by one thread in a fixed order, so the
// result does not depend on the thread count.
//
// Row statistics, kStats floats per row (RowStat): max z_s (0 for a row of −inf), log-sum_s, max z_t, log-sum_t,
// C, log q(label), log p(label). The label columns are 0 without labels and NaN for a label outside [0, V);
// an ignored row (label == ignore_index) gets all zeros, loss 0 and a zero gradient, with no vocabulary work.
//
// Included by skew_divergence_kernel.cpp (portable) and skew_divergence_kernel_{avx2,avx512}.cpp, each of which
// defines CPU_CAPABILITY (ATen's vector width) and is compiled with its instruction-set flags.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "skew_divergence.h"

namespace distillm2::CPU_CAPABILITY {
namespace {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kBlock = 1024;                // vocabulary entries staged per block
constexpr int64_t kParallelGrainEntries = 32768;  // at least this many entries per parallel task
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<scalar_t>{}) for a logits dtype.
template <typename F>
void with_logits_type(c10::ScalarType dtype, F&& f) {
  switch (dtype) {
    case c10::ScalarType::Float:
      return f(TypeTag<float>{});
    case c10::ScalarType::BFloat16:
      return f(TypeTag<c10::BFloat16>{});
    case c10::ScalarType::Half:
      return f(TypeTag<c10::Half>{});
    default:
      // A message without formatted arguments: formatting would instantiate c10 templates out of line here,
      // shared by name with the other instruction-set builds (the dispatcher has checked the dtype already).
      TORCH_CHECK(false, "distillm2 cpu kernels take float32, bfloat16 or float16 logits");
  }
}

int64_t padded_length(int64_t count) {
  return (count + fVec::size() - 1) / fVec::size() * fVec::size();
}

// (z − shift) / T for one logit, as stage_block computes it for a whole block.
inline float centered_scaled(float z, float shift, float temperature) {
  return (z - shift) / temperature;
}

// block[0, count) = (float32(src[0, count)) − shift) / temperature, then −inf up to a whole number of vectors
// (a −inf logit is a zero probability, so the padding contributes nothing). Returns the padded length.
// With shift 0 and temperature 1 the block holds the raw logits.
template <typename scalar_t>
int64_t stage_block(const scalar_t* src, int64_t count, float shift, float temperature, float* block) {
  const bool scaled = temperature != 1.0f;
  const fVec shift_vec(shift), temperature_vec(temperature);
  int64_t i = 0;
  for (; i + fVec::size() <= count; i += fVec::size()) {
    fVec x;
    if constexpr (std::is_same_v<scalar_t, float>) {
      x = fVec::loadu(src + i);
    } else {
      at::vec::load_to_float(src + i, x);
    }
    x = x - shift_vec;
    (scaled ? x / temperature_vec : x).store(block + i);
  }
  for (; i < count; ++i) {
    block[i] = centered_scaled(static_cast<float>(src[i]), shift, temperature);
  }
  const int64_t padded = padded_length(count);
  for (; i < padded; ++i) {
    block[i] = kNegInf;
  }
  return padded;
}

template <typename scalar_t>
void write_block(const float* block, int64_t count, scalar_t* dst) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    std::memcpy(dst, block, count * sizeof(float));
  } else {
    at::vec::convert(block, dst, count);
  }
}

// Lane sums of v added in lane order (a fixed order).
double lane_sum(const fVec& v) {
  alignas(64) float lanes[fVec::size()];
  v.store(lanes);
  double total = 0.0;
  for (int64_t i = 0; i < fVec::size(); ++i) {
    total += lanes[i];
  }
  return total;
}

float lane_max(const fVec& v) {
  alignas(64) float lanes[fVec::size()];
  v.store(lanes);
  float result = lanes[0];
  for (int64_t i = 1; i < fVec::size(); ++i) {
    result = std::max(result, lanes[i]);
  }
  return result;
}

// Online (max z, log Σ exp((z − max z)/T)) over blocks of raw logits: one exp per entry, a rescale per block.
struct OnlineLogSumExp {
  float temperature;
  float max = kNegInf;
  double sum = 0.0;

  explicit OnlineLogSumExp(float temperature) : temperature(temperature) {}

  void add(const float* block, int64_t length) {
    fVec block_max(kNegInf);
    for (int64_t i = 0; i < length; i += fVec::size()) {
      block_max = at::vec::maximum(block_max, fVec::loadu(block + i));
    }
    const float new_max = std::max(max, lane_max(block_max));
    const float shift = new_max == kNegInf ? 0.0f : new_max;
    const fVec shift_vec(shift), temperature_vec(temperature);
    fVec exp_sum(0.0f);
    if (temperature == 1.0f) {
      for (int64_t i = 0; i < length; i += fVec::size()) {
        exp_sum += (fVec::loadu(block + i) - shift_vec).exp();
      }
    } else {
      for (int64_t i = 0; i < length; i += fVec::size()) {
        exp_sum += ((fVec::loadu(block + i) - shift_vec) / temperature_vec).exp();
      }
    }
    sum = sum * std::exp((static_cast<double>(max) - shift) / temperature) + lane_sum(exp_sum);
    max = new_max;
  }

  float shift() const {  // the row max (0 for a row of −inf)
    return max == kNegInf ? 0.0f : max;
  }

  float log_sum() const {  // log Σ exp((z − shift)/T), in [0, log V] (−inf for a row of −inf, NaN for a row
                           // holding NaN or +inf)
    if (std::isnan(max) || max == std::numeric_limits<float>::infinity()) {
      return kNaN;
    }
    return static_cast<float>(std::log(sum));
  }
};

// Columns of the per-row statistics (kStats floats per row).
enum RowStat {
  kMaxS = 0,
  kLogSumS = 1,
  kMaxT = 2,
  kLogSumT = 3,
  kC = 4,
  kLabelLogQ = 5,
  kLabelLogP = 6,
};
static_assert(kLabelLogP + 1 == kStats, "RowStat must name every statistics column");

struct RowConstants {
  float max_s, max_t;      // the shifts the blocks are staged with
  fVec log_sum_s, log_sum_t, log_alpha, log_one_minus_alpha;
};

// log(1 + e) for e ∈ [0, 1], as 2·atanh(u) with u = e / (2 + e) ∈ [0, 1/3]: the odd series
// 2u·Σ_k u^{2k}/(2k+1) to k = 6 (the first omitted term is below 2^-26 relative); the float32 result is within
// 1.5e-7 of the exact value, about one ulp of 1. No range reduction is needed, so this is a few fused
// multiply-adds and one division instead of a general-purpose log. Exactly 0 at e = 0.
inline fVec log_one_plus_unit(const fVec& e) {
  const fVec u = e / (fVec(2.0f) + e);
  const fVec w = u * u;
  fVec series(1.0f / 13.0f);
  series = fmadd(series, w, fVec(1.0f / 11.0f));
  series = fmadd(series, w, fVec(1.0f / 9.0f));
  series = fmadd(series, w, fVec(1.0f / 7.0f));
  series = fmadd(series, w, fVec(1.0f / 5.0f));
  series = fmadd(series, w, fVec(1.0f / 3.0f));
  series = fmadd(series, w, fVec(1.0f));
  return (u + u) * series;
}

// log(α·self + (1−α)·other) from x = log α + log self and y = log(1−α) + log other, and the share of
// (1−α)·other in it (ā for SKL, e for SRKL; 1 where the mixture is 0). With e = exp(−|x − y|) ∈ [0, 1]:
// log mix = max(x, y) + log(1 + e) and other share = (x ≥ y ? e : 1) / (1 + e), formed directly rather than as
// 1 − (share of self), so it is exactly 0 when (1−α)·other is 0 (α = 1). One exp per entry, and log(1 + e) when
// the log is needed.
struct Mixture {
  fVec log_mix;
  fVec other_share;
};

template <bool NEED_LOG>
inline Mixture mixture(const fVec& x, const fVec& y) {
  const fVec zero(0.0f), one(1.0f), neg_inf(kNegInf);
  const fVec hi = at::vec::maximum(x, y);
  const fVec lo = at::vec::minimum(x, y);
  const fVec empty = hi == neg_inf;  // both terms are 0
  const fVec e = (lo - fVec::blendv(hi, zero, empty)).exp();
  const fVec other_share = fVec::blendv(fVec::blendv(one, e, x >= y) / (one + e), one, empty);
  return {NEED_LOG ? hi + log_one_plus_unit(e) : zero, other_share};
}

// Sweep 2 over one block of staged (z − max)/T: adds the loss terms and the C terms (SKL: p·ā; SRKL: q·e) to
// the accumulators.
template <bool REVERSE, bool DETACH>
void loss_block(const float* s, const float* t, int64_t length, const RowConstants& k, fVec& loss_acc,
                fVec& c_acc) {
  const fVec zero(0.0f);
  for (int64_t i = 0; i < length; i += fVec::size()) {
    const fVec log_q = fVec::loadu(s + i) - k.log_sum_s;
    const fVec log_p = fVec::loadu(t + i) - k.log_sum_t;
    if constexpr (REVERSE) {
      const Mixture r = mixture<true>(k.log_alpha + log_q, k.log_one_minus_alpha + log_p);
      const fVec q = log_q.exp();
      const fVec d = fVec::blendv(log_q - r.log_mix, zero, q == zero);
      loss_acc += q * d;
      if constexpr (!DETACH) {
        c_acc += q * r.other_share;
      }
    } else {
      const Mixture m = mixture<true>(k.log_alpha + log_p, k.log_one_minus_alpha + log_q);
      const fVec p = log_p.exp();
      loss_acc += fVec::blendv(p * (log_p - m.log_mix), zero, p == zero);
      c_acc += p * m.other_share;
    }
  }
}

// Sweep 3 over one block of staged (z − max)/T: grad[i] = scale · ∂loss/∂s_i.
template <bool REVERSE, bool DETACH>
void grad_block(const float* s, const float* t, int64_t length, const RowConstants& k, float c, float scale,
                float* grad) {
  const fVec zero(0.0f), c_vec(c), scale_vec(scale);
  // A zero probability gets a zero gradient, unless the row holds NaN or +inf (then C is NaN): NaN.
  const fVec zero_probability_grad(std::isnan(c) ? kNaN : 0.0f);
  for (int64_t i = 0; i < length; i += fVec::size()) {
    const fVec log_q = fVec::loadu(s + i) - k.log_sum_s;
    const fVec log_p = fVec::loadu(t + i) - k.log_sum_t;
    const fVec q = log_q.exp();
    fVec g;
    if constexpr (REVERSE) {
      const Mixture r = mixture<true>(k.log_alpha + log_q, k.log_one_minus_alpha + log_p);
      const fVec d = log_q - r.log_mix;
      g = DETACH ? q * (d - c_vec) : q * (d + r.other_share - c_vec);
      g = fVec::blendv(g, zero_probability_grad, q == zero);
    } else {
      const Mixture m = mixture<false>(k.log_alpha + log_p, k.log_one_minus_alpha + log_q);
      const fVec p = log_p.exp();
      g = q * c_vec - p * m.other_share;
    }
    (g * scale_vec).store(grad + i);
  }
}

// The first logit of row `row` of `base` (see SkewProblem for the layout).
template <typename scalar_t>
const scalar_t* row_start(const void* base, int64_t row, int64_t inner_rows, int64_t outer_stride,
                          int64_t inner_stride) {
  return static_cast<const scalar_t*>(base) + (row / inner_rows) * outer_stride + (row % inner_rows) * inner_stride;
}

template <typename scalar_t>
const scalar_t* student_row(const SkewProblem& problem, int64_t row) {
  return row_start<scalar_t>(problem.student, row, problem.inner_rows, problem.student_outer_stride,
                             problem.student_inner_stride);
}

template <typename scalar_t>
const scalar_t* teacher_row(const SkewProblem& problem, int64_t row) {
  return row_start<scalar_t>(problem.teacher, row, problem.inner_rows, problem.teacher_outer_stride,
                             problem.teacher_inner_stride);
}

bool row_ignored(const SkewProblem& problem, int64_t row) {
  return problem.labels != nullptr && problem.labels[row] == problem.ignore_index;
}

RowConstants row_constants(const SkewProblem& problem, int64_t row, const float* row_stats) {
  const double alpha = problem.alpha_rows != nullptr ? problem.alpha_rows[row] : problem.alpha;
  return {row_stats[kMaxS],
          row_stats[kMaxT],
          fVec(row_stats[kLogSumS]),
          fVec(row_stats[kLogSumT]),
          fVec(static_cast<float>(std::log(alpha))),
          fVec(static_cast<float>(std::log1p(-alpha)))};
}

int64_t grain_rows(const SkewProblem& problem) {
  return std::max<int64_t>(1, kParallelGrainEntries / std::max<int64_t>(1, problem.vocab_size));
}

// log softmax(z/T) at `label` from the row's max and log-sum (the value sweeps 2 and 3 compute for that entry),
// NaN for a label outside [0, V).
template <typename scalar_t>
float label_log_prob(const scalar_t* row, int64_t label, int64_t vocab, float max, float log_sum,
                     float temperature) {
  if (label < 0 || label >= vocab) {
    return kNaN;
  }
  return centered_scaled(static_cast<float>(row[label]), max, temperature) - log_sum;
}

// Scratch blocks of one thread.
struct Blocks {
  alignas(64) float student[kBlock];
  alignas(64) float teacher[kBlock];
  alignas(64) float grad[kBlock];
};

// Sweep 1 over a row that is not ignored: fills every column of row_stats, with C = 0.
template <typename student_t, typename teacher_t>
void row_statistics(const SkewProblem& problem, int64_t row, const student_t* s_row, const teacher_t* t_row,
                    Blocks& blocks, float* row_stats) {
  const int64_t vocab = problem.vocab_size;
  OnlineLogSumExp lse_s(problem.temperature), lse_t(problem.temperature);
  for (int64_t start = 0; start < vocab; start += kBlock) {
    const int64_t count = std::min(kBlock, vocab - start);
    lse_s.add(blocks.student, stage_block(s_row + start, count, 0.0f, 1.0f, blocks.student));
    lse_t.add(blocks.teacher, stage_block(t_row + start, count, 0.0f, 1.0f, blocks.teacher));
  }
  row_stats[kMaxS] = lse_s.shift();
  row_stats[kLogSumS] = lse_s.log_sum();
  row_stats[kMaxT] = lse_t.shift();
  row_stats[kLogSumT] = lse_t.log_sum();
  row_stats[kC] = 0.0f;
  if (problem.labels == nullptr) {
    row_stats[kLabelLogQ] = 0.0f;
    row_stats[kLabelLogP] = 0.0f;
  } else {
    const int64_t label = problem.labels[row];
    row_stats[kLabelLogQ] =
        label_log_prob(s_row, label, vocab, row_stats[kMaxS], row_stats[kLogSumS], problem.temperature);
    row_stats[kLabelLogP] =
        label_log_prob(t_row, label, vocab, row_stats[kMaxT], row_stats[kLogSumT], problem.temperature);
  }
}

// Sweep 2 over a row that is not ignored, from its statistics: returns the loss and writes C into row_stats.
template <typename student_t, typename teacher_t>
float row_loss(const SkewProblem& problem, int64_t row, const student_t* s_row, const teacher_t* t_row,
               Blocks& blocks, float* row_stats) {
  const RowConstants k = row_constants(problem, row, row_stats);
  const int64_t vocab = problem.vocab_size;
  double loss_total = 0.0, c_total = 0.0;
  for (int64_t start = 0; start < vocab; start += kBlock) {
    const int64_t count = std::min(kBlock, vocab - start);
    const int64_t length = stage_block(s_row + start, count, k.max_s, problem.temperature, blocks.student);
    stage_block(t_row + start, count, k.max_t, problem.temperature, blocks.teacher);
    fVec loss_acc(0.0f), c_acc(0.0f);
    if (!problem.reverse) {
      loss_block<false, false>(blocks.student, blocks.teacher, length, k, loss_acc, c_acc);
    } else if (problem.detach) {
      loss_block<true, true>(blocks.student, blocks.teacher, length, k, loss_acc, c_acc);
    } else {
      loss_block<true, false>(blocks.student, blocks.teacher, length, k, loss_acc, c_acc);
    }
    loss_total += lane_sum(loss_acc);
    c_total += lane_sum(c_acc);
  }
  row_stats[kC] = static_cast<float>(problem.reverse ? loss_total + c_total : c_total);
  return static_cast<float>(loss_total);
}

template <typename student_t, typename teacher_t>
void statistics_rows(const SkewProblem& problem, float* stats) {
  at::parallel_for(0, problem.num_rows, grain_rows(problem), [&](int64_t begin, int64_t end) {
    Blocks blocks;
    for (int64_t row = begin; row < end; ++row) {
      float* row_stats = stats + row * kStats;
      if (row_ignored(problem, row)) {
        std::fill(row_stats, row_stats + kStats, 0.0f);
        continue;
      }
      row_statistics(problem, row, student_row<student_t>(problem, row), teacher_row<teacher_t>(problem, row), blocks,
                     row_stats);
    }
  });
}

template <typename student_t, typename teacher_t>
void forward_rows(const SkewProblem& problem, bool compute_statistics, float* loss, float* stats) {
  at::parallel_for(0, problem.num_rows, grain_rows(problem), [&](int64_t begin, int64_t end) {
    Blocks blocks;
    for (int64_t row = begin; row < end; ++row) {
      float* row_stats = stats + row * kStats;
      if (row_ignored(problem, row)) {
        loss[row] = 0.0f;
        if (compute_statistics) {
          std::fill(row_stats, row_stats + kStats, 0.0f);
        } else {
          row_stats[kC] = 0.0f;
        }
        continue;
      }
      const student_t* s_row = student_row<student_t>(problem, row);
      const teacher_t* t_row = teacher_row<teacher_t>(problem, row);
      if (compute_statistics) {  // sweep 1 on the same thread, while the row is still in cache
        row_statistics(problem, row, s_row, t_row, blocks, row_stats);
      }
      loss[row] = row_loss(problem, row, s_row, t_row, blocks, row_stats);
    }
  });
}

template <typename student_t, typename teacher_t>
void backward_rows(const SkewProblem& problem, const float* stats, const float* grad_loss,
                   int64_t grad_loss_stride, student_t* grad) {
  const int64_t vocab = problem.vocab_size;
  at::parallel_for(0, problem.num_rows, grain_rows(problem), [&](int64_t begin, int64_t end) {
    Blocks blocks;
    for (int64_t row = begin; row < end; ++row) {
      student_t* grad_row = grad + row * vocab;
      if (row_ignored(problem, row)) {
        std::fill(grad_row, grad_row + vocab, student_t(0.0f));
        continue;
      }
      const float* row_stats = stats + row * kStats;
      const RowConstants k = row_constants(problem, row, row_stats);
      const float c = row_stats[kC];
      const float scale = grad_loss[row * grad_loss_stride] * problem.inv_temperature;
      const student_t* s_row = student_row<student_t>(problem, row);
      const teacher_t* t_row = teacher_row<teacher_t>(problem, row);
      for (int64_t start = 0; start < vocab; start += kBlock) {  // sweep 3
        const int64_t count = std::min(kBlock, vocab - start);
        const int64_t length = stage_block(s_row + start, count, k.max_s, problem.temperature, blocks.student);
        stage_block(t_row + start, count, k.max_t, problem.temperature, blocks.teacher);
        if (!problem.reverse) {
          grad_block<false, false>(blocks.student, blocks.teacher, length, k, c, scale, blocks.grad);
        } else if (problem.detach) {
          grad_block<true, true>(blocks.student, blocks.teacher, length, k, c, scale, blocks.grad);
        } else {
          grad_block<true, false>(blocks.student, blocks.teacher, length, k, c, scale, blocks.grad);
        }
        write_block(blocks.grad, count, grad_row + start);
      }
    }
  });
}

// Calls f(TypeTag<student_t>{}, TypeTag<teacher_t>{}) for the problem's logits dtypes.
template <typename F>
void with_problem_types(const SkewProblem& problem, F&& f) {
  with_logits_type(problem.student_dtype, [&](auto student_tag) {
    with_logits_type(problem.teacher_dtype, [&](auto teacher_tag) { f(student_tag, teacher_tag); });
  });
}

}  // namespace

void skew_statistics_rows(const SkewProblem& problem, float* stats) {
  with_problem_types(problem, [&](auto student_tag, auto teacher_tag) {
    using student_t = typename decltype(student_tag)::type;
    using teacher_t = typename decltype(teacher_tag)::type;
    statistics_rows<student_t, teacher_t>(problem, stats);
  });
}

void skew_forward_rows(const SkewProblem& problem, bool compute_statistics, float* loss, float* stats) {
  with_problem_types(problem, [&](auto student_tag, auto teacher_tag) {
    using student_t = typename decltype(student_tag)::type;
    using teacher_t = typename decltype(teacher_tag)::type;
    forward_rows<student_t, teacher_t>(problem, compute_statistics, loss, stats);
  });
}

void skew_backward_rows(const SkewProblem& problem, const float* stats, const float* grad_loss,
                        int64_t grad_loss_stride, void* grad) {
  with_problem_types(problem, [&](auto student_tag, auto teacher_tag) {
    using student_t = typename decltype(student_tag)::type;
    using teacher_t = typename decltype(teacher_tag)::type;
    backward_rows<student_t, teacher_t>(problem, stats, grad_loss, grad_loss_stride,
                                        static_cast<student_t*>(grad));
  });
}

}  // namespace distillm2::CPU_CAPABILITY
