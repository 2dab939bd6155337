// The problem one call of the sparse-teacher student sweeps solves, and the entry points each instruction-set build
// provides (the math is in sparse_teacher_kernel.h; the spec is distillm2_kernels/backends/torch_sparse.py).
//
// Rows are N = outer · inner rows of V student logits with unit column stride, row r at
// (r / inner_rows) · outer_stride + (r % inner_rows) · inner_stride elements ([N, V] logits are one outer index).
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace distillm2 {

struct SparseStudentProblem {
  const void* student;  // [N, V] student logits (float, bfloat16 or half)
  c10::ScalarType student_dtype;
  int64_t outer_stride;   // elements between rows r and r + inner_rows
  int64_t inner_stride;   // elements between consecutive rows of one outer index
  int64_t inner_rows;     // rows per outer index (N for [N, V] logits; at least 1)
  int64_t num_rows;       // N
  int64_t vocab_size;     // V
  const int64_t* labels;  // [N], or nullptr when every row counts
  int64_t ignore_index;   // rows whose label equals this are skipped (lse 0, sums 0, gradient 0)
  float inv_temperature;  // 1 / T: log q = z · (1/T) − lse
  const float* lse;       // [N] log Σ exp(z/T) (tail sums and gradient; nullptr for the log-sum-exp itself)
  const float* log_tail;  // [N] log c, the tail token's tempered teacher log-probability; nullptr: no tail
  const float* alpha_rows;  // [N] α per row (with a tail)
  bool reverse;             // false: SKL, true: SRKL
  bool detach;              // SRKL only: the q inside the mixture r is a constant
};

// Each instruction-set build (namespaces DEFAULT, AVX2, AVX512) defines:
//   void sparse_logsumexp_rows(const SparseStudentProblem&, float* lse /*[N] out*/);
//   void sparse_tail_sums_rows(const SparseStudentProblem&, float* sums /*[N, 2] out: Σ f, Σ q·g*/);
//   void sparse_grad_rows(const SparseStudentProblem&, const float* row_scale /*[N]*/, const float* row_shift /*[N]*/,
//                         void* grad /*[N, V] contiguous, student dtype*/);
#define DISTILLM2_DECLARE_SPARSE_KERNELS                                                     \
  void sparse_logsumexp_rows(const SparseStudentProblem& problem, float* lse);               \
  void sparse_tail_sums_rows(const SparseStudentProblem& problem, float* sums);              \
  void sparse_grad_rows(const SparseStudentProblem& problem, const float* row_scale, const float* row_shift, \
                        void* grad);

}  // namespace distillm2
