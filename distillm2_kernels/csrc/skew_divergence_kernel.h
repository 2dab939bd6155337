// SKL and SRKL row kernels for one instruction set: each row's exponentials are evaluated once per call, kept in a
// per-thread scratch the size of a row (L2-resident), and the mixture is formed in linear space where that is exact
// enough, in log space where it is not.
//
// Per row, with log q = (z_s − max z_s)/T − log Σ exp((z_s − max z_s)/T) and log p likewise from z_t
// (the same as triton_backend.py and torch_backend.py):
//   SKL:   loss = Σ p (log p − log m),   m = α p + (1−α) q
//          ∂loss/∂s = q·C − p·ā,          ā = (1−α) q / m ∈ [0, 1],   C = Σ p·ā
//   SRKL:  loss = L = Σ q d,   d = log q − log r (0 where q = 0),   r = (1−α) p + α q
//          ∂loss/∂s = q·(d + e − C),      e = (1−α) p / r ∈ [0, 1],   C = L + Σ q·e
//          detached mixture (q inside r constant): ∂loss/∂s = q·(d − C),   C = L
// Both mixtures are "α·self + (1−α)·other" (self = p for SKL, q for SRKL); ā and e are the share of (1−α)·other
// in the mixture (1 where the mixture is 0).
//
// Probabilities: q = exp((z_s − max)/T) · exp(−log-sum), with the exponential a polynomial (exp_poly, about one
// ulp) and exp(−log-sum) one double-precision scalar per row, so the forward (from its cached exponentials) and the
// backward (which evaluates them again) see bit-identical q and p. The log-probabilities stay in log space,
// (z − max)/T − log-sum, as accurate as a log_softmax.
// Mixtures: a vector of 16 (AVX-512) or 8 entries whose mixtures are all at least kLinearMixtureMin = 2^-100 takes
// the linear form, m = α·p + (1−α)·q, log m by a polynomial log (log_poly, about one ulp), ā = (1−α)·q / m: every
// term is then a normal float and exp's underflow or a denormal changes m by less than 2^-26 relative. Any other
// vector (a mixture that underflows, a zero mixture, −inf entries, the padding) takes the log-space form of
// docs/design.md §2.1 (mixture()), so a zero probability contributes exactly 0 and an underflowing q at α = 0
// still gives the finite log q. Exact zeros: a −inf logit gives exp_poly(−inf) = 0 exactly, the guards test
// p == 0 and q == 0, and a row with α = 1 is exactly 0 (loss, C and gradient times the incoming gradient) without
// vocabulary work beyond its statistics.
// Non-finite rows: a row holding NaN or +inf (and not ignored) gets max z NaN or +inf in the max sweep, log-sum
// NaN, and its loss, C and whole gradient row are NaN, its label log-probabilities NaN (docs/design.md §2.2); the
// row's vocabulary work stops there. A row of −inf only (log-sum −inf) is NaN likewise, as torch.softmax gives.
//
// Sweeps over a row (kBlock entries at a time, staged in float32 in L1 as (z − max z)/T: the difference is exact
// or rounded once, then divided, not multiplied by a rounded 1/T):
//   max      P0: max z of both rows (no transcendental). Reads both rows from memory.
//   exp      P1: E = exp((z − max)/T) of both rows, their sums (per block in float32 lanes, across blocks in
//                double), and, in the forward, E into the row scratch (2 floats per entry). Reads the rows from
//                cache (P0 just read them).
//   loss     P2: from the cached E and the re-staged log-probabilities: loss and C; with the gradient in the
//                forward it stores the gradient's two per-entry pieces (q, and p·ā or d + e) over E.
//   grad     P3: gradient = (q·C − p·ā) or q·(d + e − C), times (incoming gradient)/T, in the student dtype.
// Each row is computed by one thread in a fixed order, so the result does not depend on the thread count.
//
// Budget per vocabulary entry of a row pair (transcendentals: exp_poly, log_poly; divisions: vector divides; traffic
// in units of one [N, V] input, i.e. N·V·(element size) bytes, from memory; the row scratch and re-reads of a row
// just read stay in L2 for V ≤ 32768 and in L3 above):
//   kernel                    exp  log  div (T ≠ 1: +2 per staging)   memory read / written
//   skew_statistics_rows      2    0    0   (P0, P1: 2 stagings)        2 / 0
//   skew_forward_rows         2    1    1   (P0, P1, P2: 3 stagings)    2 / 0   (P0 skipped with given statistics)
//   skew_forward_and_grad_rows 2   1    1   (P0, P1, P2: 3 stagings)    2 / 1   (the gradient)
//   skew_backward_rows        2    0/1  1   (1 staging)                 2 / 1   (log for SRKL only)
// So a scalar reduction's forward and backward (forward_and_grad, then a scale by the incoming gradient outside) costs
// 2 exp + 1 log + 1 division per entry and 3 units of traffic; forward then backward costs 4 exp + 1 log (SKL) or
// 2 log (SRKL) + 2 divisions and 5 units. The vectors that take the log-space mixture add 1 exp and 2 divisions
// (the library's exp, ATen's Sleef one) and, in the forward, the atanh series of log(1 + e).
//
// Row statistics, kStats floats per row (RowStat): max z_s (0 for a row of −inf), log-sum_s, max z_t, log-sum_t,
// C, log q(label), log p(label). The label columns are 0 without labels and NaN for a label outside [0, V);
// an ignored row (label == ignore_index) gets all zeros, loss 0 and a zero gradient, with no vocabulary work.
//
// Included by skew_divergence_kernel.cpp (portable) and skew_divergence_kernel_{avx2,avx512}.cpp, each of which
// defines CPU_CAPABILITY (ATen's vector width) and is compiled with its instruction-set flags. The vector helpers
// (exp_poly, log_poly, mixture, the lane reductions) are in vector_math.h, shared with sparse_teacher_kernel.h.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>

#include "skew_divergence.h"
#include "vector_math.h"

namespace distillm2::CPU_CAPABILITY {
namespace {

constexpr int64_t kBlock = 1024;                // vocabulary entries staged per block
constexpr int64_t kParallelGrainEntries = 32768;  // at least this many entries per parallel task

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
  float max_s, max_t;               // the shifts the blocks are staged with
  fVec log_sum_s, log_sum_t;        // log Σ exp((z − max)/T)
  fVec inv_sum_s, inv_sum_t;        // exp(−log-sum): q = exp((z_s − max)/T) · inv_sum_s
  fVec alpha, one_minus_alpha;      // the linear mixture's weights
  fVec log_alpha, log_one_minus_alpha;  // the log-space mixture's
};

// The terms of a vector of entries: the loss terms, the C terms (SKL: p·ā; SRKL: q·e, 0 when detached) and the
// gradient's per-entry pieces q and `other` (SKL: p·ā; SRKL: d + e, or d when detached; 0 where q = 0), so that
// grad = SKL: q·C − other, SRKL: q·(other − C). The forward and the backward compute the pieces with this one
// function, so forward_and_grad's gradient is bit for bit skew_backward's.
struct EntryTerms {
  fVec loss, c, q, other;
};

template <bool REVERSE, bool DETACH, bool NEED_LOSS>
inline EntryTerms entry_terms(const fVec& log_q, const fVec& log_p, const fVec& q, const fVec& p,
                              const RowConstants& k) {
  const fVec zero(0.0f);
  EntryTerms terms{zero, zero, q, zero};
  if constexpr (REVERSE) {
    const fVec self_part = k.alpha * q;
    const fVec other_part = k.one_minus_alpha * p;
    const fVec r = self_part + other_part;
    fVec log_r, e;
    if (all_at_least(r, kLinearMixtureMin)) {
      log_r = log_poly(r);
      e = other_part / r;
    } else {
      const Mixture mix = mixture<true>(k.log_alpha + log_q, k.log_one_minus_alpha + log_p);
      log_r = mix.log_mix;
      e = mix.other_share;
    }
    const fVec q_is_zero = q == zero;
    const fVec d = fVec::blendv(log_q - log_r, zero, q_is_zero);
    if constexpr (NEED_LOSS) {
      terms.loss = q * d;
      if constexpr (!DETACH) {
        terms.c = q * e;
      }
    }
    terms.other = DETACH ? d : fVec::blendv(d + e, zero, q_is_zero);
  } else {
    const fVec self_part = k.alpha * p;
    const fVec other_part = k.one_minus_alpha * q;
    const fVec m = self_part + other_part;
    fVec share;
    if (all_at_least(m, kLinearMixtureMin)) {
      share = other_part / m;
      if constexpr (NEED_LOSS) {
        terms.loss = fVec::blendv(p * (log_p - log_poly(m)), zero, p == zero);
      }
    } else {
      const Mixture mix = mixture<NEED_LOSS>(k.log_alpha + log_p, k.log_one_minus_alpha + log_q);
      share = mix.other_share;
      if constexpr (NEED_LOSS) {
        terms.loss = fVec::blendv(p * (log_p - mix.log_mix), zero, p == zero);
      }
    }
    terms.other = p * share;
    terms.c = terms.other;
  }
  return terms;
}

// grad[i] = scale · ∂loss/∂s_i from the pieces of entry_terms (stored in memory, so that the same rounded pieces
// give the same gradient in every caller).
template <bool REVERSE>
void combine_block(const float* q, const float* other, int64_t length, float c, float scale, float* grad) {
  const fVec c_vec(c), scale_vec(scale);
  for (int64_t i = 0; i < length; i += fVec::size()) {
    const fVec q_i = fVec::loadu(q + i);
    const fVec other_i = fVec::loadu(other + i);
    const fVec g = REVERSE ? q_i * (other_i - c_vec) : q_i * c_vec - other_i;
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

double row_alpha(const SkewProblem& problem, int64_t row) {
  return problem.alpha_rows != nullptr ? problem.alpha_rows[row] : problem.alpha;
}

// Whether a row's statistics describe two distributions (false for a row holding NaN or +inf, log-sum NaN, or a
// row of −inf only, log-sum −inf).
bool has_distributions(const float* row_stats) {
  return std::isfinite(row_stats[kLogSumS]) && std::isfinite(row_stats[kLogSumT]);
}

RowConstants row_constants(const SkewProblem& problem, int64_t row, const float* row_stats) {
  const double alpha = row_alpha(problem, row);
  return {row_stats[kMaxS],
          row_stats[kMaxT],
          fVec(row_stats[kLogSumS]),
          fVec(row_stats[kLogSumT]),
          fVec(static_cast<float>(std::exp(-static_cast<double>(row_stats[kLogSumS])))),
          fVec(static_cast<float>(std::exp(-static_cast<double>(row_stats[kLogSumT])))),
          fVec(static_cast<float>(alpha)),
          fVec(static_cast<float>(1.0 - alpha)),
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

// Staging blocks of one thread (L1).
struct Blocks {
  alignas(64) float student[kBlock];
  alignas(64) float teacher[kBlock];
  alignas(64) float q[kBlock];
  alignas(64) float other[kBlock];
  alignas(64) float grad[kBlock];
};

// A row's exponentials exp((z − max)/T), then the gradient's pieces, for both rows (one thread's, reused row after
// row; 8 bytes per vocabulary entry).
struct RowScratch {
  std::unique_ptr<float[]> student, teacher;
  explicit RowScratch(int64_t vocab)
      : student(new float[padded_length(vocab)]), teacher(new float[padded_length(vocab)]) {}
};

// P0: max z over a row, NaN when the row holds a NaN.
template <typename scalar_t>
float row_max(const scalar_t* row, int64_t vocab, float* block) {
  fVec max_vec(kNegInf);
  for (int64_t start = 0; start < vocab; start += kBlock) {
    const int64_t length = stage_block(row + start, std::min(kBlock, vocab - start), 0.0f, 1.0f, block);
    for (int64_t i = 0; i < length; i += fVec::size()) {
      max_vec = at::vec::maximum(max_vec, fVec::loadu(block + i));
    }
  }
  return lane_max(max_vec);
}

// P1: Σ exp((z − shift)/T) over a row (in float32 lanes per block, in double across blocks), storing the
// exponentials into `exps` unless it is null.
template <typename scalar_t>
double row_exp_sum(const scalar_t* row, int64_t vocab, float shift, float temperature, float* block, float* exps) {
  double sum = 0.0;
  for (int64_t start = 0; start < vocab; start += kBlock) {
    const int64_t length = stage_block(row + start, std::min(kBlock, vocab - start), shift, temperature, block);
    fVec exp_sum(0.0f);
    for (int64_t i = 0; i < length; i += fVec::size()) {
      const fVec e = exp_poly(fVec::loadu(block + i));
      if (exps != nullptr) {
        e.store(exps + start + i);
      }
      exp_sum += e;
    }
    sum += lane_sum(exp_sum);
  }
  return sum;
}

// The statistics columns of one side of a row from its max (P0): the shift and the log-sum (P1, which also stores
// the exponentials into `exps` unless it is null).
template <typename scalar_t>
void side_statistics(const scalar_t* row, int64_t vocab, float max, float temperature, float* block, float* exps,
                     float& shift, float& log_sum) {
  shift = max == kNegInf ? 0.0f : max;
  if (std::isnan(max) || max == std::numeric_limits<float>::infinity()) {
    log_sum = kNaN;
    return;
  }
  log_sum = static_cast<float>(std::log(row_exp_sum(row, vocab, shift, temperature, block, exps)));
}

// P0 and P1 over a row that is not ignored: fills every column of row_stats, with C = 0. With a scratch, and when
// the row has distributions and α < 1, the exponentials are stored in it for P2 (returns whether they were).
template <typename student_t, typename teacher_t>
bool row_statistics(const SkewProblem& problem, int64_t row, const student_t* s_row, const teacher_t* t_row,
                    Blocks& blocks, RowScratch* scratch, float* row_stats) {
  const int64_t vocab = problem.vocab_size;
  const float max_s = row_max(s_row, vocab, blocks.student);
  const float max_t = row_max(t_row, vocab, blocks.teacher);
  const auto finite = [](float max) { return !std::isnan(max) && max != std::numeric_limits<float>::infinity(); };
  const bool store = scratch != nullptr && finite(max_s) && finite(max_t) && row_alpha(problem, row) != 1.0;
  side_statistics(s_row, vocab, max_s, problem.temperature, blocks.student, store ? scratch->student.get() : nullptr,
                  row_stats[kMaxS], row_stats[kLogSumS]);
  side_statistics(t_row, vocab, max_t, problem.temperature, blocks.teacher, store ? scratch->teacher.get() : nullptr,
                  row_stats[kMaxT], row_stats[kLogSumT]);
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
  return store && has_distributions(row_stats);
}

// P2 over one block: staged log-probabilities and cached exponentials; adds the loss and C terms, and with
// STORE_PIECES writes the gradient's pieces over the exponentials.
template <bool REVERSE, bool DETACH, bool STORE_PIECES>
void loss_block(const float* s, const float* t, float* exps_s, float* exps_t, int64_t length, const RowConstants& k,
                fVec& loss_acc, fVec& c_acc) {
  for (int64_t i = 0; i < length; i += fVec::size()) {
    const fVec log_q = fVec::loadu(s + i) - k.log_sum_s;
    const fVec log_p = fVec::loadu(t + i) - k.log_sum_t;
    const fVec q = fVec::loadu(exps_s + i) * k.inv_sum_s;
    const fVec p = fVec::loadu(exps_t + i) * k.inv_sum_t;
    const EntryTerms terms = entry_terms<REVERSE, DETACH, true>(log_q, log_p, q, p, k);
    loss_acc += terms.loss;
    c_acc += terms.c;
    if constexpr (STORE_PIECES) {
      terms.q.store(exps_s + i);
      terms.other.store(exps_t + i);
    }
  }
}

// P2 over a row with distributions and α < 1 whose exponentials are in the scratch: returns the loss and writes C
// into row_stats; with STORE_PIECES leaves the gradient's pieces in the scratch.
template <bool REVERSE, bool DETACH, bool STORE_PIECES, typename student_t, typename teacher_t>
float row_loss(const SkewProblem& problem, int64_t row, const student_t* s_row, const teacher_t* t_row,
               Blocks& blocks, RowScratch& scratch, float* row_stats) {
  const RowConstants k = row_constants(problem, row, row_stats);
  const int64_t vocab = problem.vocab_size;
  double loss_total = 0.0, c_total = 0.0;
  for (int64_t start = 0; start < vocab; start += kBlock) {
    const int64_t count = std::min(kBlock, vocab - start);
    const int64_t length = stage_block(s_row + start, count, k.max_s, problem.temperature, blocks.student);
    stage_block(t_row + start, count, k.max_t, problem.temperature, blocks.teacher);
    fVec loss_acc(0.0f), c_acc(0.0f);
    loss_block<REVERSE, DETACH, STORE_PIECES>(blocks.student, blocks.teacher, scratch.student.get() + start,
                                              scratch.teacher.get() + start, length, k, loss_acc, c_acc);
    loss_total += lane_sum(loss_acc);
    c_total += lane_sum(c_acc);
  }
  row_stats[kC] = static_cast<float>(REVERSE ? loss_total + c_total : c_total);
  return static_cast<float>(loss_total);
}

template <typename scalar_t>
void fill_row(scalar_t* row, int64_t vocab, float value) {
  std::fill(row, row + vocab, scalar_t(value));
}

// P3: the gradient row from the pieces in the scratch.
template <bool REVERSE, typename student_t>
void grad_from_pieces(const RowScratch& scratch, int64_t vocab, float c, float scale, Blocks& blocks,
                      student_t* grad_row) {
  for (int64_t start = 0; start < vocab; start += kBlock) {
    const int64_t count = std::min(kBlock, vocab - start);
    combine_block<REVERSE>(scratch.student.get() + start, scratch.teacher.get() + start, padded_length(count), c,
                           scale, blocks.grad);
    write_block(blocks.grad, count, grad_row + start);
  }
}

// The forward of one row (statistics computed here, or read from row_stats), and with GRAD the gradient row
// (grad_row, scaled by `scale`).
template <bool REVERSE, bool DETACH, bool GRAD, typename student_t, typename teacher_t>
float forward_row(const SkewProblem& problem, int64_t row, bool compute_statistics, Blocks& blocks,
                  RowScratch& scratch, float* row_stats, float scale, student_t* grad_row) {
  const int64_t vocab = problem.vocab_size;
  const student_t* s_row = student_row<student_t>(problem, row);
  const teacher_t* t_row = teacher_row<teacher_t>(problem, row);
  bool cached = false;
  if (compute_statistics) {
    cached = row_statistics(problem, row, s_row, t_row, blocks, &scratch, row_stats);
  } else if (has_distributions(row_stats) && row_alpha(problem, row) != 1.0) {
    row_exp_sum(s_row, vocab, row_stats[kMaxS], problem.temperature, blocks.student, scratch.student.get());
    row_exp_sum(t_row, vocab, row_stats[kMaxT], problem.temperature, blocks.teacher, scratch.teacher.get());
    cached = true;
  }
  if (!has_distributions(row_stats)) {
    row_stats[kC] = kNaN;
    if constexpr (GRAD) {
      fill_row(grad_row, vocab, kNaN);
    }
    return kNaN;
  }
  if (!cached) {  // α = 1: the mixture is the distribution itself
    row_stats[kC] = 0.0f;
    if constexpr (GRAD) {
      fill_row(grad_row, vocab, 0.0f * scale);
    }
    return 0.0f;
  }
  const float loss = row_loss<REVERSE, DETACH, GRAD>(problem, row, s_row, t_row, blocks, scratch, row_stats);
  if constexpr (GRAD) {
    grad_from_pieces<REVERSE>(scratch, vocab, row_stats[kC], scale, blocks, grad_row);
  }
  return loss;
}

// Calls f(std::bool_constant<REVERSE>{}, std::bool_constant<DETACH>{}) for the problem's loss.
template <typename F>
void with_loss(const SkewProblem& problem, F&& f) {
  if (!problem.reverse) {
    f(std::false_type{}, std::false_type{});
  } else if (problem.detach) {
    f(std::true_type{}, std::true_type{});
  } else {
    f(std::true_type{}, std::false_type{});
  }
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
                     nullptr, row_stats);
    }
  });
}

// The forward over every row; with grad_scale (else null) also the gradient, row r scaled by grad_scale[r] / T.
template <typename student_t, typename teacher_t>
void forward_rows(const SkewProblem& problem, bool compute_statistics, float* loss, float* stats,
                  const float* grad_scale, student_t* grad) {
  const int64_t vocab = problem.vocab_size;
  with_loss(problem, [&](auto reverse, auto detach) {
    constexpr bool REVERSE = decltype(reverse)::value, DETACH = decltype(detach)::value;
    at::parallel_for(0, problem.num_rows, grain_rows(problem), [&](int64_t begin, int64_t end) {
      Blocks blocks;
      RowScratch scratch(vocab);
      for (int64_t row = begin; row < end; ++row) {
        float* row_stats = stats + row * kStats;
        student_t* grad_row = grad == nullptr ? nullptr : grad + row * vocab;
        if (row_ignored(problem, row)) {
          loss[row] = 0.0f;
          if (compute_statistics) {
            std::fill(row_stats, row_stats + kStats, 0.0f);
          } else {
            row_stats[kC] = 0.0f;
          }
          if (grad_row != nullptr) {
            fill_row(grad_row, vocab, 0.0f);
          }
          continue;
        }
        if (grad_row != nullptr) {
          const float scale = grad_scale[row] * problem.inv_temperature;
          loss[row] = forward_row<REVERSE, DETACH, true, student_t, teacher_t>(problem, row, compute_statistics, blocks, scratch,
                                                         row_stats, scale, grad_row);
        } else {
          loss[row] = forward_row<REVERSE, DETACH, false, student_t, teacher_t>(
              problem, row, compute_statistics, blocks, scratch, row_stats, 0.0f, nullptr);
        }
      }
    });
  });
}

// The gradient over every row from its statistics: one sweep (P3 with the exponentials evaluated again).
template <typename student_t, typename teacher_t>
void backward_rows(const SkewProblem& problem, const float* stats, const float* grad_loss,
                   int64_t grad_loss_stride, student_t* grad) {
  const int64_t vocab = problem.vocab_size;
  with_loss(problem, [&](auto reverse, auto detach) {
    constexpr bool REVERSE = decltype(reverse)::value, DETACH = decltype(detach)::value;
    at::parallel_for(0, problem.num_rows, grain_rows(problem), [&](int64_t begin, int64_t end) {
      Blocks blocks;
      for (int64_t row = begin; row < end; ++row) {
        student_t* grad_row = grad + row * vocab;
        if (row_ignored(problem, row)) {
          fill_row(grad_row, vocab, 0.0f);
          continue;
        }
        const float* row_stats = stats + row * kStats;
        const float c = row_stats[kC];
        const float scale = grad_loss[row * grad_loss_stride] * problem.inv_temperature;
        if (!has_distributions(row_stats) || std::isnan(c)) {
          fill_row(grad_row, vocab, kNaN);
          continue;
        }
        if (row_alpha(problem, row) == 1.0) {
          fill_row(grad_row, vocab, 0.0f * scale);
          continue;
        }
        const RowConstants k = row_constants(problem, row, row_stats);
        const student_t* s_row = student_row<student_t>(problem, row);
        const teacher_t* t_row = teacher_row<teacher_t>(problem, row);
        for (int64_t start = 0; start < vocab; start += kBlock) {
          const int64_t count = std::min(kBlock, vocab - start);
          const int64_t length = stage_block(s_row + start, count, k.max_s, problem.temperature, blocks.student);
          stage_block(t_row + start, count, k.max_t, problem.temperature, blocks.teacher);
          for (int64_t i = 0; i < length; i += fVec::size()) {
            const fVec x_s = fVec::loadu(blocks.student + i);
            const fVec x_t = fVec::loadu(blocks.teacher + i);
            const fVec q = exp_poly(x_s) * k.inv_sum_s;
            const fVec p = exp_poly(x_t) * k.inv_sum_t;
            const EntryTerms terms = entry_terms<REVERSE, DETACH, REVERSE>(x_s - k.log_sum_s, x_t - k.log_sum_t, q,
                                                                           p, k);
            terms.q.store(blocks.q + i);
            terms.other.store(blocks.other + i);
          }
          combine_block<REVERSE>(blocks.q, blocks.other, length, c, scale, blocks.grad);
          write_block(blocks.grad, count, grad_row + start);
        }
      }
    });
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
    forward_rows<student_t, teacher_t>(problem, compute_statistics, loss, stats, nullptr, nullptr);
  });
}

void skew_forward_and_grad_rows(const SkewProblem& problem, const float* grad_scale, float* loss, float* stats,
                                void* grad) {
  with_problem_types(problem, [&](auto student_tag, auto teacher_tag) {
    using student_t = typename decltype(student_tag)::type;
    using teacher_t = typename decltype(teacher_tag)::type;
    forward_rows<student_t, teacher_t>(problem, /*compute_statistics=*/true, loss, stats, grad_scale,
                                       static_cast<student_t*>(grad));
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
