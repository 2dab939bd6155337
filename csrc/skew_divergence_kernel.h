// SKL and SRKL row kernels for one instruction set; three sweeps per row over the vocabulary.
//
// Per row, with s = z_s / T, t = z_t / T, log q = s − lse(s), log p = t − lse(t) (see triton_backend.py):
//   SKL:   loss = Σ p (log p − log m),   m = α p + (1−α) q,   C = Σ p·a,        a = α p / m
//          ∂loss/∂s = q (1 − C) − p (1 − a)
//   SRKL:  loss = Σ q d,  d = log q − log r,   r = (1−α) p + α q,   C = L − Σ q·b,   b = α q / r
//          ∂loss/∂s = q (d − b − C);   detached mixture: b = 0, C = L
// Both mixtures are "α·self + (1−α)·other" (self = p for SKL, q for SRKL), formed in log space; a and b are
// the share of α·self in the mixture, in [0, 1]. A zero probability contributes exactly 0.
//
// Sweep 1 (forward): online log-sum-exp of both rows, kept as max + log Σ exp(x − max) in two floats so that
// log q = (s − max) − log Σ is as accurate as a log_softmax (one float lse near 100 would carry an absolute error
// of ~1e-5 into every log q, and L·1e-5 into the loss). Sweep 2 (forward): loss and C. Sweep 3 (backward): the
// gradient times (incoming gradient)/T. Each row is computed by one thread in a fixed order, so the result does
// not depend on the thread count. Logits are staged in float32 blocks of kBlock entries (L1-resident).
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
      TORCH_CHECK(false, "distillm2 cpu kernels take float32, bfloat16 or float16 logits, got ", dtype);
  }
}

int64_t padded_length(int64_t count) {
  return (count + fVec::size() - 1) / fVec::size() * fVec::size();
}

// block[0, count) = float32(src[0, count)) / temperature, then −inf up to a whole number of vectors
// (a −inf logit is a zero probability, so the padding contributes nothing). Returns the padded length.
// Dividing (rather than multiplying by 1/T) rounds each entry once, like the reference's z / T: a product with
// a rounded 1/T scales every logit by the same (1 + ε), which shifts the distribution.
template <typename scalar_t>
int64_t stage_block(const scalar_t* src, int64_t count, float temperature, float* block) {
  const bool scaled = temperature != 1.0f;
  const fVec temperature_vec(temperature);
  int64_t i = 0;
  for (; i + fVec::size() <= count; i += fVec::size()) {
    fVec x;
    if constexpr (std::is_same_v<scalar_t, float>) {
      x = fVec::loadu(src + i);
    } else {
      at::vec::load_to_float(src + i, x);
    }
    (scaled ? x / temperature_vec : x).store(block + i);
  }
  for (; i < count; ++i) {
    block[i] = scaled ? static_cast<float>(src[i]) / temperature : static_cast<float>(src[i]);
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

// Online log-sum-exp over blocks: one exp per entry, a rescale per block. lse = shift() + log_sum().
struct OnlineLogSumExp {
  float max = kNegInf;
  double sum = 0.0;

  void add(const float* block, int64_t length) {
    fVec block_max(kNegInf);
    for (int64_t i = 0; i < length; i += fVec::size()) {
      block_max = at::vec::maximum(block_max, fVec::loadu(block + i));
    }
    const float new_max = std::max(max, lane_max(block_max));
    const float shift = new_max == kNegInf ? 0.0f : new_max;
    const fVec shift_vec(shift);
    fVec exp_sum(0.0f);
    for (int64_t i = 0; i < length; i += fVec::size()) {
      exp_sum += (fVec::loadu(block + i) - shift_vec).exp();
    }
    sum = sum * std::exp(static_cast<double>(max) - shift) + lane_sum(exp_sum);
    max = new_max;
  }

  float shift() const {  // the row max (0 for a row of −inf)
    return max == kNegInf ? 0.0f : max;
  }

  float log_sum() const {  // log Σ exp(x − shift), in [0, log V] (−inf for a row of −inf)
    return static_cast<float>(std::log(sum));
  }
};

// Per-row statistics kept between forward and backward (kStats floats).
enum RowStat { kShiftS = 0, kLogSumS = 1, kShiftT = 2, kLogSumT = 3, kC = 4 };

struct RowConstants {
  fVec shift_s, log_sum_s, shift_t, log_sum_t, log_alpha, log_one_minus_alpha;
};

// log(1 + e) for e ∈ [0, 1], as 2·atanh(u) with u = e / (2 + e) ∈ [0, 1/3]: the odd series
// 2u·Σ_k u^{2k}/(2k+1) to k = 6 (the first omitted term is below 2^-26 relative); the float32 result is within
// 1.5e-7 of the exact value, about one ulp of 1. No range reduction is needed, so this is a few fused
// multiply-adds and one division instead of a general-purpose log.
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
// α·self in it (0 where the mixture is 0). With e = exp(−|x − y|) ∈ [0, 1]: log mix = max(x, y) + log(1 + e)
// and share = (x ≥ y ? 1 : e) / (1 + e), so one exp per entry (and log(1 + e) when the log is needed).
struct Mixture {
  fVec log_mix;
  fVec share;
};

template <bool NEED_LOG>
inline Mixture mixture(const fVec& x, const fVec& y) {
  const fVec zero(0.0f), one(1.0f), neg_inf(kNegInf);
  const fVec hi = at::vec::maximum(x, y);
  const fVec lo = at::vec::minimum(x, y);
  const fVec empty = hi == neg_inf;  // both terms are 0
  const fVec e = (lo - fVec::blendv(hi, zero, empty)).exp();
  const fVec share = fVec::blendv(fVec::blendv(e, one, x >= y) / (one + e), zero, empty);
  return {NEED_LOG ? hi + log_one_plus_unit(e) : zero, share};
}

// Sweep 2 over one block: adds the loss terms and the C terms (SKL: p·a; SRKL: −q·b) to the accumulators.
template <bool REVERSE, bool DETACH>
void loss_block(const float* s, const float* t, int64_t length, const RowConstants& k, fVec& loss_acc,
                fVec& c_acc) {
  const fVec zero(0.0f);
  for (int64_t i = 0; i < length; i += fVec::size()) {
    const fVec log_q = (fVec::loadu(s + i) - k.shift_s) - k.log_sum_s;
    const fVec log_p = (fVec::loadu(t + i) - k.shift_t) - k.log_sum_t;
    if constexpr (REVERSE) {
      const Mixture r = mixture<true>(k.log_alpha + log_q, k.log_one_minus_alpha + log_p);
      const fVec q = log_q.exp();
      const fVec d = fVec::blendv(zero, log_q - r.log_mix, q > zero);
      loss_acc += q * d;
      if constexpr (!DETACH) {
        c_acc -= q * r.share;
      }
    } else {
      const Mixture m = mixture<true>(k.log_alpha + log_p, k.log_one_minus_alpha + log_q);
      const fVec p = log_p.exp();
      loss_acc += fVec::blendv(zero, p * (log_p - m.log_mix), p > zero);
      c_acc += p * m.share;
    }
  }
}

// Sweep 3 over one block: grad[i] = scale · ∂loss/∂s_i.
template <bool REVERSE, bool DETACH>
void grad_block(const float* s, const float* t, int64_t length, const RowConstants& k, float c, float scale,
                float* grad) {
  const fVec zero(0.0f), one(1.0f), c_vec(c), scale_vec(scale);
  for (int64_t i = 0; i < length; i += fVec::size()) {
    const fVec log_q = (fVec::loadu(s + i) - k.shift_s) - k.log_sum_s;
    const fVec log_p = (fVec::loadu(t + i) - k.shift_t) - k.log_sum_t;
    const fVec q = log_q.exp();
    fVec g;
    if constexpr (REVERSE) {
      const Mixture r = mixture<true>(k.log_alpha + log_q, k.log_one_minus_alpha + log_p);
      const fVec d = log_q - r.log_mix;
      g = DETACH ? q * (d - c_vec) : q * (d - r.share - c_vec);
      g = fVec::blendv(zero, g, q > zero);
    } else {
      const Mixture m = mixture<false>(k.log_alpha + log_p, k.log_one_minus_alpha + log_q);
      const fVec p = log_p.exp();
      g = q * (one - c_vec) - p * (one - m.share);
    }
    (g * scale_vec).store(grad + i);
  }
}

bool row_ignored(const SkewProblem& problem, int64_t row) {
  return problem.labels != nullptr && problem.labels[row] == problem.ignore_index;
}

RowConstants row_constants(const SkewProblem& problem, int64_t row, const float* row_stats) {
  const double alpha = problem.alpha_rows != nullptr ? problem.alpha_rows[row] : problem.alpha;
  return {fVec(row_stats[kShiftS]),
          fVec(row_stats[kLogSumS]),
          fVec(row_stats[kShiftT]),
          fVec(row_stats[kLogSumT]),
          fVec(static_cast<float>(std::log(alpha))),
          fVec(static_cast<float>(std::log1p(-alpha)))};
}

int64_t grain_rows(const SkewProblem& problem) {
  return std::max<int64_t>(1, kParallelGrainEntries / std::max<int64_t>(1, problem.vocab_size));
}

template <typename student_t, typename teacher_t>
void forward_rows(const SkewProblem& problem, float* loss, float* stats) {
  const auto* student = static_cast<const student_t*>(problem.student);
  const auto* teacher = static_cast<const teacher_t*>(problem.teacher);
  const int64_t vocab = problem.vocab_size;
  at::parallel_for(0, problem.num_rows, grain_rows(problem), [&](int64_t begin, int64_t end) {
    alignas(64) float s_block[kBlock];
    alignas(64) float t_block[kBlock];
    for (int64_t row = begin; row < end; ++row) {
      float* row_stats = stats + row * kStats;
      if (row_ignored(problem, row)) {
        loss[row] = 0.0f;
        std::fill(row_stats, row_stats + kStats, 0.0f);
        continue;
      }
      const student_t* s_row = student + row * problem.student_row_stride;
      const teacher_t* t_row = teacher + row * problem.teacher_row_stride;

      OnlineLogSumExp lse_s, lse_t;  // sweep 1
      for (int64_t start = 0; start < vocab; start += kBlock) {
        const int64_t count = std::min(kBlock, vocab - start);
        lse_s.add(s_block, stage_block(s_row + start, count, problem.temperature, s_block));
        lse_t.add(t_block, stage_block(t_row + start, count, problem.temperature, t_block));
      }
      row_stats[kShiftS] = lse_s.shift();
      row_stats[kLogSumS] = lse_s.log_sum();
      row_stats[kShiftT] = lse_t.shift();
      row_stats[kLogSumT] = lse_t.log_sum();
      const RowConstants k = row_constants(problem, row, row_stats);

      double loss_total = 0.0, c_total = 0.0;  // sweep 2
      for (int64_t start = 0; start < vocab; start += kBlock) {
        const int64_t count = std::min(kBlock, vocab - start);
        const int64_t length = stage_block(s_row + start, count, problem.temperature, s_block);
        stage_block(t_row + start, count, problem.temperature, t_block);
        fVec loss_acc(0.0f), c_acc(0.0f);
        if (!problem.reverse) {
          loss_block<false, false>(s_block, t_block, length, k, loss_acc, c_acc);
        } else if (problem.detach) {
          loss_block<true, true>(s_block, t_block, length, k, loss_acc, c_acc);
        } else {
          loss_block<true, false>(s_block, t_block, length, k, loss_acc, c_acc);
        }
        loss_total += lane_sum(loss_acc);
        c_total += lane_sum(c_acc);
      }
      loss[row] = static_cast<float>(loss_total);
      row_stats[kC] = static_cast<float>(problem.reverse ? loss_total + c_total : c_total);
    }
  });
}

template <typename student_t, typename teacher_t>
void backward_rows(const SkewProblem& problem, const float* stats, const float* grad_loss,
                   int64_t grad_loss_stride, student_t* grad) {
  const auto* student = static_cast<const student_t*>(problem.student);
  const auto* teacher = static_cast<const teacher_t*>(problem.teacher);
  const int64_t vocab = problem.vocab_size;
  at::parallel_for(0, problem.num_rows, grain_rows(problem), [&](int64_t begin, int64_t end) {
    alignas(64) float s_block[kBlock];
    alignas(64) float t_block[kBlock];
    alignas(64) float g_block[kBlock];
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
      const student_t* s_row = student + row * problem.student_row_stride;
      const teacher_t* t_row = teacher + row * problem.teacher_row_stride;
      for (int64_t start = 0; start < vocab; start += kBlock) {  // sweep 3
        const int64_t count = std::min(kBlock, vocab - start);
        const int64_t length = stage_block(s_row + start, count, problem.temperature, s_block);
        stage_block(t_row + start, count, problem.temperature, t_block);
        if (!problem.reverse) {
          grad_block<false, false>(s_block, t_block, length, k, c, scale, g_block);
        } else if (problem.detach) {
          grad_block<true, true>(s_block, t_block, length, k, c, scale, g_block);
        } else {
          grad_block<true, false>(s_block, t_block, length, k, c, scale, g_block);
        }
        write_block(g_block, count, grad_row + start);
      }
    }
  });
}

}  // namespace

void skew_forward_rows(const SkewProblem& problem, float* loss, float* stats) {
  with_logits_type(problem.student_dtype, [&](auto student_tag) {
    with_logits_type(problem.teacher_dtype, [&](auto teacher_tag) {
      using student_t = typename decltype(student_tag)::type;
      using teacher_t = typename decltype(teacher_tag)::type;
      forward_rows<student_t, teacher_t>(problem, loss, stats);
    });
  });
}

void skew_backward_rows(const SkewProblem& problem, const float* stats, const float* grad_loss,
                        int64_t grad_loss_stride, void* grad) {
  with_logits_type(problem.student_dtype, [&](auto student_tag) {
    with_logits_type(problem.teacher_dtype, [&](auto teacher_tag) {
      using student_t = typename decltype(student_tag)::type;
      using teacher_t = typename decltype(teacher_tag)::type;
      backward_rows<student_t, teacher_t>(problem, stats, grad_loss, grad_loss_stride,
                                          static_cast<student_t*>(grad));
    });
  });
}

}  // namespace distillm2::CPU_CAPABILITY
