// Python bindings of the sparse-teacher student sweeps (registered into the extension module by
// skew_divergence.cpp): argument checks and the instruction set chosen at run time (bindings_common.h).
//
//   sparse_student_logsumexp(student, labels, ignore_index, inv_temperature, lse)
//       writes lse [N] float32: log Σ exp(z/T) per row, 0 for ignored rows
//   sparse_tail_sums(student, labels, ignore_index, inv_temperature, lse, log_tail, alpha_rows, reverse, detach, sums)
//       writes sums [N, 2] float32: (Σ f, Σ q·g) over all V entries of each row, 0 for ignored rows
//   sparse_student_grad(student, labels, ignore_index, inv_temperature, lse, row_scale, row_shift, log_tail,
//                       alpha_rows, reverse, detach, grad)
//       writes grad [N, V] contiguous in the student dtype: row_scale · q · (g − row_shift), g = 0 without log_tail
//
// student: a CPU tensor [N, V] or [outer, inner, V] (N = outer · inner rows, each level with its own stride), unit
// column stride, float32 / bfloat16 / float16. labels: optional int64 [N]. lse, log_tail, alpha_rows, row_scale,
// row_shift: contiguous float32 [N] (log_tail optional in the gradient: None means no tail). The caller allocates
// the outputs and every element is written. The math is in sparse_teacher_kernel.h.
#include <torch/extension.h>

#include <optional>

#include "bindings_common.h"
#include "sparse_teacher.h"

namespace distillm2 {

namespace DEFAULT {
DISTILLM2_DECLARE_SPARSE_KERNELS
}
#ifdef DISTILLM2_X86_KERNELS
namespace AVX2 {
DISTILLM2_DECLARE_SPARSE_KERNELS
}
namespace AVX512 {
DISTILLM2_DECLARE_SPARSE_KERNELS
}
#endif

namespace {

void check_per_row(const char* name, const at::Tensor& tensor, int64_t num_rows) {
  check_row_vector(name, tensor, at::kFloat, num_rows);
  TORCH_CHECK(tensor.is_contiguous(), name, " must be contiguous");
}

SparseStudentProblem make_sparse_problem(const at::Tensor& student, const std::optional<at::Tensor>& labels,
                                         int64_t ignore_index, double inv_temperature) {
  check_logits("student", student);
  const int64_t vocab_size = student.size(-1);
  const int64_t inner_rows = student.dim() == 2 ? student.size(0) : student.size(1);
  const int64_t num_rows = student.dim() == 2 ? student.size(0) : student.size(0) * student.size(1);
  TORCH_CHECK(vocab_size > 0, "empty vocabulary (V = 0)");
  TORCH_CHECK(inv_temperature > 0.0, "inv_temperature must be > 0, got ", inv_temperature);
  if (labels.has_value()) {
    check_row_vector("labels", *labels, at::kLong, num_rows);
    TORCH_CHECK(labels->is_contiguous(), "labels must be contiguous");
  }
  const auto [outer_stride, inner_stride] = level_strides(student);
  SparseStudentProblem problem{};
  problem.student = student.data_ptr();
  problem.student_dtype = student.scalar_type();
  problem.outer_stride = outer_stride;
  problem.inner_stride = inner_stride;
  problem.inner_rows = std::max<int64_t>(1, inner_rows);
  problem.num_rows = num_rows;
  problem.vocab_size = vocab_size;
  problem.labels = labels.has_value() ? labels->data_ptr<int64_t>() : nullptr;
  problem.ignore_index = ignore_index;
  problem.inv_temperature = static_cast<float>(inv_temperature);
  return problem;
}

// The tail's per-row inputs of a problem: lse, log_tail (optional), alpha_rows, and the loss.
void set_tail(SparseStudentProblem& problem, const at::Tensor& lse, const std::optional<at::Tensor>& log_tail,
              const at::Tensor& alpha_rows, bool reverse, bool detach) {
  check_per_row("lse", lse, problem.num_rows);
  check_per_row("alpha_rows", alpha_rows, problem.num_rows);
  if (log_tail.has_value()) {
    check_per_row("log_tail", *log_tail, problem.num_rows);
  }
  problem.lse = lse.data_ptr<float>();
  problem.log_tail = log_tail.has_value() ? log_tail->data_ptr<float>() : nullptr;
  problem.alpha_rows = alpha_rows.data_ptr<float>();
  problem.reverse = reverse;
  problem.detach = reverse && detach;
}

void sparse_student_logsumexp(const at::Tensor& student, const std::optional<at::Tensor>& labels,
                              int64_t ignore_index, double inv_temperature, at::Tensor& lse) {
  const SparseStudentProblem problem = make_sparse_problem(student, labels, ignore_index, inv_temperature);
  check_output("lse", lse, at::kFloat, {problem.num_rows});
  float* lse_ptr = lse.data_ptr<float>();
  switch (selected_isa()) {
#ifdef DISTILLM2_X86_KERNELS
    case Isa::Avx512:
      return AVX512::sparse_logsumexp_rows(problem, lse_ptr);
    case Isa::Avx2:
      return AVX2::sparse_logsumexp_rows(problem, lse_ptr);
#endif
    default:
      return DEFAULT::sparse_logsumexp_rows(problem, lse_ptr);
  }
}

void sparse_tail_sums(const at::Tensor& student, const std::optional<at::Tensor>& labels, int64_t ignore_index,
                      double inv_temperature, const at::Tensor& lse, const at::Tensor& log_tail,
                      const at::Tensor& alpha_rows, bool reverse, bool detach, at::Tensor& sums) {
  SparseStudentProblem problem = make_sparse_problem(student, labels, ignore_index, inv_temperature);
  set_tail(problem, lse, log_tail, alpha_rows, reverse, detach);
  check_output("sums", sums, at::kFloat, {problem.num_rows, 2});
  float* sums_ptr = sums.data_ptr<float>();
  switch (selected_isa()) {
#ifdef DISTILLM2_X86_KERNELS
    case Isa::Avx512:
      return AVX512::sparse_tail_sums_rows(problem, sums_ptr);
    case Isa::Avx2:
      return AVX2::sparse_tail_sums_rows(problem, sums_ptr);
#endif
    default:
      return DEFAULT::sparse_tail_sums_rows(problem, sums_ptr);
  }
}

void sparse_student_grad(const at::Tensor& student, const std::optional<at::Tensor>& labels, int64_t ignore_index,
                         double inv_temperature, const at::Tensor& lse, const at::Tensor& row_scale,
                         const at::Tensor& row_shift, const std::optional<at::Tensor>& log_tail,
                         const at::Tensor& alpha_rows, bool reverse, bool detach, at::Tensor& grad) {
  SparseStudentProblem problem = make_sparse_problem(student, labels, ignore_index, inv_temperature);
  set_tail(problem, lse, log_tail, alpha_rows, reverse, detach);
  check_per_row("row_scale", row_scale, problem.num_rows);
  check_per_row("row_shift", row_shift, problem.num_rows);
  check_output("grad", grad, student.scalar_type(), {problem.num_rows, problem.vocab_size});
  const float* scale_ptr = row_scale.data_ptr<float>();
  const float* shift_ptr = row_shift.data_ptr<float>();
  void* grad_ptr = grad.data_ptr();
  switch (selected_isa()) {
#ifdef DISTILLM2_X86_KERNELS
    case Isa::Avx512:
      return AVX512::sparse_grad_rows(problem, scale_ptr, shift_ptr, grad_ptr);
    case Isa::Avx2:
      return AVX2::sparse_grad_rows(problem, scale_ptr, shift_ptr, grad_ptr);
#endif
    default:
      return DEFAULT::sparse_grad_rows(problem, scale_ptr, shift_ptr, grad_ptr);
  }
}

}  // namespace

void register_sparse_teacher_ops(pybind11::module_& m) {
  m.def("sparse_student_logsumexp", &sparse_student_logsumexp, pybind11::call_guard<pybind11::gil_scoped_release>(),
        "Writes lse [N] = log sum exp(z/T) per student row (0 for ignored rows)", pybind11::arg("student"),
        pybind11::arg("labels"), pybind11::arg("ignore_index"), pybind11::arg("inv_temperature"),
        pybind11::arg("lse"));
  m.def("sparse_tail_sums", &sparse_tail_sums, pybind11::call_guard<pybind11::gil_scoped_release>(),
        "Writes sums [N, 2] = (sum f, sum q*g) of the sparse teacher's tail formulas over all V entries",
        pybind11::arg("student"), pybind11::arg("labels"), pybind11::arg("ignore_index"),
        pybind11::arg("inv_temperature"), pybind11::arg("lse"), pybind11::arg("log_tail"),
        pybind11::arg("alpha_rows"), pybind11::arg("reverse"), pybind11::arg("detach"), pybind11::arg("sums"));
  m.def("sparse_student_grad", &sparse_student_grad, pybind11::call_guard<pybind11::gil_scoped_release>(),
        "Writes grad [N, V] = row_scale * q * (g - row_shift), contiguous in the student dtype",
        pybind11::arg("student"), pybind11::arg("labels"), pybind11::arg("ignore_index"),
        pybind11::arg("inv_temperature"), pybind11::arg("lse"), pybind11::arg("row_scale"),
        pybind11::arg("row_shift"), pybind11::arg("log_tail"), pybind11::arg("alpha_rows"),
        pybind11::arg("reverse"), pybind11::arg("detach"), pybind11::arg("grad"));
}

}  // namespace distillm2
