// The student sweeps of the sparse-teacher ops for one instruction set: the dense part of SKL / SRKL against a
// teacher given by k token ids and a tail (docs/design.md, "Sparse teachers"; the spec and float64 oracle is
// distillm2_kernels/backends/torch_sparse.py, whose docstring has the math). Only the student row is read; the
// caller handles the k support entries. Per row r, with x = z · (1/T) (one float32 multiply), log q = x − lse,
// α = alpha_rows[r] and c = exp(log_tail[r]):
//   logsumexp   lse = log Σ exp(x), blockwise online: the block max, the running sum rescaled (one double exp per
//               block) when it grows, then exp(x − max) summed; each entry staged once in L1, one exp per entry.
//   tail sums   (Σ f, Σ q·g) over all V entries:
//               SKL   f = c·(log c − log m),   m = αc + (1−α)q,   q·g = −c·(1−α)q/m
//               SRKL  f = q·d,  d = log q − log r,  r = αq + (1−α)c,  g = d + e (e = (1−α)c/r), detached g = d + 1
//   grad        grad = row_scale · q · (g − row_shift), g = 0 without a tail (SKL: row_scale·(q·g − q·row_shift)).
// Per entry: logsumexp 1 exp; grad without a tail 1 exp and 1 multiply by a row constant; tail sums 1 exp + 1 log +
// 1 division (SRKL detached: no division); grad with a tail 1 exp + 1 division (SKL) or 1 exp + 1 log + 1
// division (SRKL; detached: no division). Vectors whose mixture is below kLinearMixtureMin take the log-space form
// (mixture(), from log q and log c, exact where q underflows) and add ATen's exp.
//
// Special values (as the spec; docs/design.md §2.2):
// - ignored rows (label == ignore_index): lse 0, sums 0, gradient exactly 0, no vocabulary work;
// - a row holding NaN or +inf gets lse NaN; a row with lse NaN or ±inf (a row of −inf only), log c NaN or α NaN
//   gets NaN sums and a NaN gradient row (the spec's q > 0 guards let some of these through as 0);
// - q = 0: a −inf logit (log q = −inf) contributes exactly 0 to Σ q·g and the gradient (SKL's f is then
//   −c·log α, +inf at α = 0, as in the spec); SRKL also zeroes entries whose float32 q underflows to 0;
// - α = 1: SKL's f and g, SRKL's f and d are exactly 0 (a row branch: no log is formed; SRKL detached g = 1), so
//   SKL's sums are 0 and the gradient row is q · (scale · (g − shift)) exactly;
// - SKL with c below the smallest normal float (c = 0 included): no tail (f = g = 0; the spec's values are below
//   V·c·|log c|, under 1e-30);
// - the padding of a row's last vector (−inf logits) is masked out of the sums.
// Each row is computed by one thread in a fixed order, so results do not depend on the thread count.
//
// Included by sparse_teacher_kernel.cpp (portable) and sparse_teacher_kernel_{avx2,avx512}.cpp, each of which
// defines CPU_CAPABILITY and is compiled with its instruction-set flags; the vector helpers are vector_math.h's.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "sparse_teacher.h"
#include "vector_math.h"

namespace distillm2::CPU_CAPABILITY {
namespace {

constexpr int64_t kSparseBlock = 1024;                 // vocabulary entries staged per block (L1)
constexpr int64_t kSparseGrainEntries = 32768;         // at least this many entries per parallel task
constexpr float kSmallestNormal = std::numeric_limits<float>::min();

// block[0, count) = float32(src[0, count)) · inv_temperature, then −inf up to a whole number of vectors (a zero
// probability). Returns the padded length.
template <typename scalar_t>
int64_t stage_scaled(const scalar_t* src, int64_t count, float inv_temperature, float* block) {
  const fVec scale(inv_temperature);
  int64_t i = 0;
  for (; i + fVec::size() <= count; i += fVec::size()) {
    fVec x;
    if constexpr (std::is_same_v<scalar_t, float>) {
      x = fVec::loadu(src + i);
    } else {
      at::vec::load_to_float(src + i, x);
    }
    (x * scale).store(block + i);
  }
  for (; i < count; ++i) {
    block[i] = static_cast<float>(src[i]) * inv_temperature;
  }
  const int64_t padded = padded_length(count);
  for (; i < padded; ++i) {
    block[i] = kNegInf;
  }
  return padded;
}

template <typename scalar_t>
const scalar_t* logits_row(const SparseStudentProblem& problem, int64_t row) {
  return static_cast<const scalar_t*>(problem.student) + (row / problem.inner_rows) * problem.outer_stride +
         (row % problem.inner_rows) * problem.inner_stride;
}

bool ignored(const SparseStudentProblem& problem, int64_t row) {
  return problem.labels != nullptr && problem.labels[row] == problem.ignore_index;
}

int64_t grain(const SparseStudentProblem& problem) {
  return std::max<int64_t>(1, kSparseGrainEntries / std::max<int64_t>(1, problem.vocab_size));
}

template <typename scalar_t>
void fill(scalar_t* row, int64_t vocab, float value) {
  std::fill(row, row + vocab, scalar_t(value));
}

// Staging and output blocks of one thread.
struct SparseBlocks {
  alignas(64) float x[kSparseBlock];
  alignas(64) float out[kSparseBlock];
};

// log Σ exp(z · (1/T)) over a row: NaN when the row holds NaN or +inf, −inf when it is −inf only.
template <typename scalar_t>
float row_logsumexp(const scalar_t* row, int64_t vocab, float inv_temperature, float* block) {
  float max = kNegInf;
  double sum = 0.0;
  for (int64_t start = 0; start < vocab; start += kSparseBlock) {
    const int64_t length = stage_scaled(row + start, std::min(kSparseBlock, vocab - start), inv_temperature, block);
    fVec max_vec(kNegInf);
    for (int64_t i = 0; i < length; i += fVec::size()) {
      max_vec = at::vec::maximum(max_vec, fVec::loadu(block + i));
    }
    const float block_max = lane_max(max_vec);
    if (std::isnan(block_max) || block_max == std::numeric_limits<float>::infinity()) {
      return kNaN;
    }
    if (block_max > max) {
      sum *= std::exp(static_cast<double>(max) - static_cast<double>(block_max));
      max = block_max;
    }
    if (max == kNegInf) {
      continue;
    }
    const fVec shift(max);
    fVec exp_sum(0.0f);
    for (int64_t i = 0; i < length; i += fVec::size()) {
      exp_sum += exp_poly(fVec::loadu(block + i) - shift);
    }
    sum += lane_sum(exp_sum);
  }
  if (max == kNegInf) {
    return kNegInf;
  }
  return static_cast<float>(static_cast<double>(max) + std::log(sum));
}

// A row's constants of the tail formulas (see the top of the file).
struct TailConstants {
  fVec lse;
  fVec alpha, one_minus_alpha, log_alpha, log_one_minus_alpha;
  fVec c, log_c;
  fVec alpha_c, log_alpha_c;              // SKL's constant mixture term α·c and its log
  fVec tail_weight, log_tail_weight;      // SRKL's constant mixture term (1−α)·c and its log
};

TailConstants tail_constants(float lse, double alpha, float log_c) {
  const double c = std::exp(static_cast<double>(log_c));
  const double log_alpha = std::log(alpha), log_one_minus_alpha = std::log1p(-alpha);
  return {fVec(lse),
          fVec(static_cast<float>(alpha)),
          fVec(static_cast<float>(1.0 - alpha)),
          fVec(static_cast<float>(log_alpha)),
          fVec(static_cast<float>(log_one_minus_alpha)),
          fVec(static_cast<float>(c)),
          fVec(log_c),
          fVec(static_cast<float>(alpha * c)),
          fVec(static_cast<float>(log_alpha + log_c)),
          fVec(static_cast<float>((1.0 - alpha) * c)),
          fVec(static_cast<float>(log_one_minus_alpha + log_c))};
}

// The terms of a vector of entries: q, f (when NEED_F) and q·g (SKL) or g (SRKL, 0 where q = 0).
struct TailTerms {
  fVec q, f, g_or_qg;
};

// SKL: f = c·(log c − log m) and q·g = −c·share, share = (1−α)q/m (0 where log q = −inf).
template <bool NEED_F>
inline TailTerms skl_terms(const fVec& log_q, const TailConstants& k) {
  const fVec zero(0.0f);
  const fVec q = exp_poly(log_q);
  const fVec other = k.one_minus_alpha * q;
  const fVec m = k.alpha_c + other;
  fVec share, log_m = zero;
  if (all_at_least(m, kLinearMixtureMin)) {
    share = other / m;
    if constexpr (NEED_F) {
      log_m = log_poly(m);
    }
  } else {
    const Mixture mix = mixture<NEED_F>(k.log_alpha_c, k.log_one_minus_alpha + log_q);
    share = fVec::blendv(mix.other_share, zero, log_q == fVec(kNegInf));
    log_m = mix.log_mix;
  }
  return {q, NEED_F ? k.c * (k.log_c - log_m) : zero, zero - k.c * share};
}

// SRKL: f = q·d and g = d + e (detached: d + 1), both 0 where q = 0.
template <bool DETACH>
inline TailTerms srkl_terms(const fVec& log_q, const TailConstants& k) {
  const fVec zero(0.0f);
  const fVec q = exp_poly(log_q);
  const fVec r = at::vec::fmadd(k.alpha, q, k.tail_weight);
  fVec log_r, e = zero;
  if (all_at_least(r, kLinearMixtureMin)) {
    log_r = log_poly(r);
    if constexpr (!DETACH) {
      e = k.tail_weight / r;
    }
  } else {
    const Mixture mix = mixture<true>(k.log_alpha + log_q, k.log_tail_weight);
    log_r = mix.log_mix;
    e = mix.other_share;
  }
  const fVec q_is_zero = q == zero;
  const fVec d = fVec::blendv(log_q - log_r, zero, q_is_zero);
  const fVec g = fVec::blendv(DETACH ? d + fVec(1.0f) : d + e, zero, q_is_zero);
  return {q, q * d, g};
}

// Calls f(std::bool_constant<REVERSE>{}, std::bool_constant<DETACH>{}) for the problem's loss.
template <typename F>
void with_tail_loss(const SparseStudentProblem& problem, F&& f) {
  if (!problem.reverse) {
    f(std::false_type{}, std::false_type{});
  } else if (problem.detach) {
    f(std::true_type{}, std::true_type{});
  } else {
    f(std::true_type{}, std::false_type{});
  }
}

// How a row's tail enters: no vocabulary terms beyond q (g a row constant), or the per-entry formulas.
struct RowTail {
  bool nan;             // the row's sums and gradient are NaN
  bool constant_g;      // g is the constant g_constant for every entry (and f = 0)
  float g_constant;
};

template <bool REVERSE, bool DETACH>
RowTail row_tail(const SparseStudentProblem& problem, int64_t row, float lse) {
  if (!std::isfinite(lse)) {
    return {true, false, 0.0f};
  }
  if (problem.log_tail == nullptr) {
    return {false, true, 0.0f};
  }
  const float log_c = problem.log_tail[row];
  const float alpha = problem.alpha_rows[row];
  if (std::isnan(log_c) || std::isnan(alpha)) {
    return {true, false, 0.0f};
  }
  if (alpha == 1.0f) {
    return {false, true, REVERSE && DETACH ? 1.0f : 0.0f};
  }
  if (!REVERSE && !(std::exp(static_cast<double>(log_c)) >= kSmallestNormal)) {
    return {false, true, 0.0f};
  }
  return {false, false, 0.0f};
}

template <typename scalar_t>
void logsumexp_rows(const SparseStudentProblem& problem, float* lse) {
  at::parallel_for(0, problem.num_rows, grain(problem), [&](int64_t begin, int64_t end) {
    SparseBlocks blocks;
    for (int64_t row = begin; row < end; ++row) {
      lse[row] = ignored(problem, row) ? 0.0f
                                       : row_logsumexp(logits_row<scalar_t>(problem, row), problem.vocab_size,
                                                       problem.inv_temperature, blocks.x);
    }
  });
}

// (Σ f, Σ q·g) of one row whose tail has per-entry terms; the last vector's padding is masked out.
template <bool REVERSE, bool DETACH, typename scalar_t>
void row_tail_sums(const SparseStudentProblem& problem, int64_t row, const TailConstants& k, float* block,
                   float* sums) {
  const scalar_t* logits = logits_row<scalar_t>(problem, row);
  const int64_t vocab = problem.vocab_size;
  const fVec zero(0.0f);
  double f_total = 0.0, qg_total = 0.0;
  for (int64_t start = 0; start < vocab; start += kSparseBlock) {
    const int64_t count = std::min(kSparseBlock, vocab - start);
    const int64_t length = stage_scaled(logits + start, count, problem.inv_temperature, block);
    fVec f_acc(0.0f), qg_acc(0.0f);
    for (int64_t i = 0; i < length; i += fVec::size()) {
      const fVec log_q = fVec::loadu(block + i) - k.lse;
      const TailTerms terms = REVERSE ? srkl_terms<DETACH>(log_q, k) : skl_terms<true>(log_q, k);
      fVec f = terms.f, qg = REVERSE ? terms.q * terms.g_or_qg : terms.g_or_qg;
      if (i + fVec::size() > count) {
        f = fVec::set(zero, f, count - i);
        qg = fVec::set(zero, qg, count - i);
      }
      f_acc += f;
      qg_acc += qg;
    }
    f_total += lane_sum(f_acc);
    qg_total += lane_sum(qg_acc);
  }
  sums[0] = static_cast<float>(f_total);
  sums[1] = static_cast<float>(qg_total);
}

// Σ q over one row (SRKL detached at α = 1: g = 1).
template <typename scalar_t>
float row_q_sum(const SparseStudentProblem& problem, int64_t row, const fVec& lse, float* block) {
  const scalar_t* logits = logits_row<scalar_t>(problem, row);
  double total = 0.0;
  for (int64_t start = 0; start < problem.vocab_size; start += kSparseBlock) {
    const int64_t length =
        stage_scaled(logits + start, std::min(kSparseBlock, problem.vocab_size - start), problem.inv_temperature,
                     block);
    fVec acc(0.0f);
    for (int64_t i = 0; i < length; i += fVec::size()) {
      acc += exp_poly(fVec::loadu(block + i) - lse);
    }
    total += lane_sum(acc);
  }
  return static_cast<float>(total);
}

template <typename scalar_t>
void tail_sums_rows(const SparseStudentProblem& problem, float* sums) {
  with_tail_loss(problem, [&](auto reverse, auto detach) {
    constexpr bool REVERSE = decltype(reverse)::value, DETACH = decltype(detach)::value;
    at::parallel_for(0, problem.num_rows, grain(problem), [&](int64_t begin, int64_t end) {
      SparseBlocks blocks;
      for (int64_t row = begin; row < end; ++row) {
        float* row_sums = sums + 2 * row;
        row_sums[0] = row_sums[1] = 0.0f;
        if (ignored(problem, row)) {
          continue;
        }
        const float lse = problem.lse[row];
        const RowTail tail = row_tail<REVERSE, DETACH>(problem, row, lse);
        if (tail.nan) {
          row_sums[0] = row_sums[1] = kNaN;
        } else if (!tail.constant_g) {
          const TailConstants k = tail_constants(lse, problem.alpha_rows[row], problem.log_tail[row]);
          row_tail_sums<REVERSE, DETACH, scalar_t>(problem, row, k, blocks.x, row_sums);
        } else if (tail.g_constant != 0.0f) {
          row_sums[1] = tail.g_constant * row_q_sum<scalar_t>(problem, row, fVec(lse), blocks.x);
        }
      }
    });
  });
}

// grad = q · K over one row, K = scale · (g − shift) (g a row constant); exactly 0 where q = 0.
template <typename scalar_t>
void constant_g_grad_row(const scalar_t* logits, int64_t vocab, float inv_temperature, const fVec& lse, float k_row,
                         SparseBlocks& blocks, scalar_t* grad_row) {
  const fVec zero(0.0f), k(k_row);
  for (int64_t start = 0; start < vocab; start += kSparseBlock) {
    const int64_t count = std::min(kSparseBlock, vocab - start);
    const int64_t length = stage_scaled(logits + start, count, inv_temperature, blocks.x);
    for (int64_t i = 0; i < length; i += fVec::size()) {
      const fVec q = exp_poly(fVec::loadu(blocks.x + i) - lse);
      fVec::blendv(q * k, zero, q == zero).store(blocks.out + i);
    }
    write_block(blocks.out, count, grad_row + start);
  }
}

// The gradient row with per-entry tail terms: SKL scale·(q·g − q·shift), exactly 0 where log q = −inf; SRKL
// scale·q·(g − shift), exactly 0 where q = 0.
template <bool REVERSE, bool DETACH, typename scalar_t>
void tail_grad_row(const scalar_t* logits, int64_t vocab, float inv_temperature, const TailConstants& k,
                   float scale_row, float shift_row, SparseBlocks& blocks, scalar_t* grad_row) {
  const fVec zero(0.0f), scale(scale_row), shift(shift_row), neg_inf(kNegInf);
  for (int64_t start = 0; start < vocab; start += kSparseBlock) {
    const int64_t count = std::min(kSparseBlock, vocab - start);
    const int64_t length = stage_scaled(logits + start, count, inv_temperature, blocks.x);
    for (int64_t i = 0; i < length; i += fVec::size()) {
      const fVec log_q = fVec::loadu(blocks.x + i) - k.lse;
      fVec grad;
      if constexpr (REVERSE) {
        const TailTerms terms = srkl_terms<DETACH>(log_q, k);
        grad = fVec::blendv(scale * terms.q * (terms.g_or_qg - shift), zero, terms.q == zero);
      } else {
        const TailTerms terms = skl_terms<false>(log_q, k);
        grad = fVec::blendv(scale * (terms.g_or_qg - terms.q * shift), zero, log_q == neg_inf);
      }
      grad.store(blocks.out + i);
    }
    write_block(blocks.out, count, grad_row + start);
  }
}

template <typename scalar_t>
void grad_rows(const SparseStudentProblem& problem, const float* row_scale, const float* row_shift, scalar_t* grad) {
  const int64_t vocab = problem.vocab_size;
  with_tail_loss(problem, [&](auto reverse, auto detach) {
    constexpr bool REVERSE = decltype(reverse)::value, DETACH = decltype(detach)::value;
    at::parallel_for(0, problem.num_rows, grain(problem), [&](int64_t begin, int64_t end) {
      SparseBlocks blocks;
      for (int64_t row = begin; row < end; ++row) {
        scalar_t* grad_row = grad + row * vocab;
        if (ignored(problem, row)) {
          fill(grad_row, vocab, 0.0f);
          continue;
        }
        const float lse = problem.lse[row];
        const RowTail tail = row_tail<REVERSE, DETACH>(problem, row, lse);
        if (tail.nan) {
          fill(grad_row, vocab, kNaN);
          continue;
        }
        const scalar_t* logits = logits_row<scalar_t>(problem, row);
        if (tail.constant_g) {
          constant_g_grad_row(logits, vocab, problem.inv_temperature, fVec(lse),
                              row_scale[row] * (tail.g_constant - row_shift[row]), blocks, grad_row);
        } else {
          const TailConstants k = tail_constants(lse, problem.alpha_rows[row], problem.log_tail[row]);
          tail_grad_row<REVERSE, DETACH>(logits, vocab, problem.inv_temperature, k, row_scale[row], row_shift[row],
                                         blocks, grad_row);
        }
      }
    });
  });
}

}  // namespace

void sparse_logsumexp_rows(const SparseStudentProblem& problem, float* lse) {
  with_logits_type(problem.student_dtype, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    logsumexp_rows<scalar_t>(problem, lse);
  });
}

void sparse_tail_sums_rows(const SparseStudentProblem& problem, float* sums) {
  with_logits_type(problem.student_dtype, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    tail_sums_rows<scalar_t>(problem, sums);
  });
}

void sparse_grad_rows(const SparseStudentProblem& problem, const float* row_scale, const float* row_shift,
                      void* grad) {
  with_logits_type(problem.student_dtype, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    grad_rows<scalar_t>(problem, row_scale, row_shift, static_cast<scalar_t*>(grad));
  });
}

}  // namespace distillm2::CPU_CAPABILITY
