// The problem one call of the CPU kernels solves, and the entry points each instruction-set build provides.
//
// Rows are N = outer · inner rows of V logits with unit column stride, row r at
// (r / inner_rows) · outer_stride + (r % inner_rows) · inner_stride elements (strides of their own for student and
// teacher; [N, V] logits are one outer index); see skew_divergence_kernel.h for the math.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace distillm2 {

struct SkewProblem {
  const void* student;  // [N, V] student logits (float, bfloat16 or half)
  const void* teacher;  // [N, V] teacher logits (float, bfloat16 or half)
  c10::ScalarType student_dtype;
  c10::ScalarType teacher_dtype;
  int64_t student_outer_stride;  // elements between student rows r and r + inner_rows
  int64_t student_inner_stride;  // elements between consecutive student rows of one outer index
  int64_t teacher_outer_stride;  // elements between teacher rows r and r + inner_rows
  int64_t teacher_inner_stride;  // elements between consecutive teacher rows of one outer index
  int64_t inner_rows;            // rows per outer index (N for [N, V] logits; at least 1)
  int64_t num_rows;              // N
  int64_t vocab_size;          // V
  const int64_t* labels;       // [N], or nullptr when every row counts
  int64_t ignore_index;        // rows whose label equals this are skipped (loss, stats and gradient 0)
  const float* alpha_rows;     // [N] per-row α, or nullptr to use `alpha`
  float alpha;                 // the scalar α
  float temperature;           // T: the logits are divided by it
  float inv_temperature;       // 1 / T: scales the gradient
  bool reverse;                // false: SKL, true: SRKL
  bool detach;                 // SRKL only: the q inside the mixture r is a constant
};

// Per-row statistics (the columns of RowStat in skew_divergence_kernel.h): max z_s, log Σ exp((z_s − max)/T),
// the same for z_t, the row constant C, and the label tokens' log q(label), log p(label).
constexpr int64_t kStats = 7;

// Each instruction-set build (namespaces DEFAULT, AVX2, AVX512) defines:
//   void skew_statistics_rows(const SkewProblem&, float* stats /*[N, kStats] out, C = 0*/);
//   void skew_forward_rows(const SkewProblem&, bool compute_statistics, float* loss /*[N]*/,
//                          float* stats /*[N, kStats]: written when compute_statistics, else read; C written*/);
//   void skew_forward_and_grad_rows(const SkewProblem&, const float* grad_scale /*[N]: d(reduced loss)/d(loss_r)*/,
//                                   float* loss /*[N]*/, float* stats /*[N, kStats] out*/,
//                                   void* grad /*[N, V] contiguous, student dtype: grad_scale[r]/T · ∂loss_r/∂s*/);
//   void skew_backward_rows(const SkewProblem&, const float* stats /*[N, kStats]*/, const float* grad_loss,
//                           int64_t grad_loss_stride, void* grad /*[N, V] contiguous, student dtype*/);
#define DISTILLM2_DECLARE_KERNELS                                                                        \
  void skew_statistics_rows(const SkewProblem& problem, float* stats);                                   \
  void skew_forward_rows(const SkewProblem& problem, bool compute_statistics, float* loss, float* stats); \
  void skew_forward_and_grad_rows(                                                                       \
      const SkewProblem& problem, const float* grad_scale, float* loss, float* stats, void* grad);       \
  void skew_backward_rows(                                                                               \
      const SkewProblem& problem, const float* stats, const float* grad_loss, int64_t grad_loss_stride, \
      void* grad);

}  // namespace distillm2
