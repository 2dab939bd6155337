// Python bindings of the CPU skew-divergence kernels: argument checks and the choice of instruction set at run
// time (ATen's own choice, `torch.backends.cpu.get_cpu_capability()`, which honours the ATEN_CPU_CAPABILITY
// environment variable; both in bindings_common.h). The module also holds the sparse-teacher student sweeps,
// registered by sparse_teacher.cpp.
//
//   skew_statistics(student, teacher, labels, ignore_index, inv_temperature, stats)
//       sweep 1: writes stats [N, 7] float32 (C = 0; see RowStat in skew_divergence_kernel.h)
//   skew_forward(student, teacher, labels, alpha_rows, alpha, ignore_index, inv_temperature, reverse, detach,
//                compute_statistics, loss, stats)
//       writes loss [N] float32; with compute_statistics runs sweep 1 into stats first, otherwise reads the
//       statistics in stats (from skew_statistics on the same rows); writes C into stats[:, 4] either way
//   skew_forward_and_grad(student, teacher, labels, alpha_rows, alpha, ignore_index, inv_temperature, reverse, detach,
//                         grad_scale, loss, stats, grad)
//       the forward with its statistics, and the gradient of Σ_r grad_scale[r]·loss_r (grad_scale float32 [N], the
//       gradient a scalar reduction gives each row) in the same pass over the rows: writes loss, stats and grad
//       (what skew_backward writes for grad_loss = grad_scale)
//   skew_backward(student, teacher, labels, alpha_rows, alpha, ignore_index, inv_temperature, reverse, detach,
//                 stats, grad_loss, grad)
//       sweep 3: writes grad [N, V] contiguous, student dtype
//
// The caller allocates the outputs (so that tests can poison them) and every element is written.
// student and teacher are CPU tensors of one shape, [N, V] or [outer, inner, V] (N = outer · inner rows, each level
// with its own stride, not necessarily the same for both), with unit column stride; labels is an optional int64
// [N] tensor,
// alpha_rows an optional float32 [N] tensor (per-row α, replacing `alpha`). The math is in
// skew_divergence_kernel.h.
#include <ATen/Context.h>
#include <torch/extension.h>

#include <algorithm>
#include <optional>
#include <string>
#include <utility>

#include "bindings_common.h"
#include "skew_divergence.h"

namespace distillm2 {

namespace DEFAULT {
DISTILLM2_DECLARE_KERNELS
}
#ifdef DISTILLM2_X86_KERNELS
namespace AVX2 {
DISTILLM2_DECLARE_KERNELS
}
namespace AVX512 {
DISTILLM2_DECLARE_KERNELS
}
#endif

namespace {

SkewProblem make_problem(const at::Tensor& student, const at::Tensor& teacher,
                         const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& alpha_rows,
                         double alpha, int64_t ignore_index, double inv_temperature, bool reverse, bool detach) {
  check_logits("student", student);
  check_logits("teacher", teacher);
  TORCH_CHECK(student.sizes() == teacher.sizes(), "student ", student.sizes(), " and teacher ", teacher.sizes(),
              " differ in shape");
  const int64_t vocab_size = student.size(-1);
  const int64_t inner_rows = student.dim() == 2 ? student.size(0) : student.size(1);
  const int64_t num_rows = student.dim() == 2 ? student.size(0) : student.size(0) * student.size(1);
  TORCH_CHECK(vocab_size > 0, "empty vocabulary (V = 0)");
  const auto [student_outer_stride, student_inner_stride] = level_strides(student);
  const auto [teacher_outer_stride, teacher_inner_stride] = level_strides(teacher);
  if (labels.has_value()) {
    check_row_vector("labels", *labels, at::kLong, num_rows);
    TORCH_CHECK(labels->is_contiguous(), "labels must be contiguous");
  }
  if (alpha_rows.has_value()) {
    check_row_vector("alpha_rows", *alpha_rows, at::kFloat, num_rows);
    TORCH_CHECK(alpha_rows->is_contiguous(), "alpha_rows must be contiguous");
  }
  TORCH_CHECK(alpha >= 0.0 && alpha <= 1.0, "alpha must lie in [0, 1], got ", alpha);
  TORCH_CHECK(inv_temperature > 0.0, "inv_temperature must be > 0, got ", inv_temperature);
  return SkewProblem{
      student.data_ptr(),
      teacher.data_ptr(),
      student.scalar_type(),
      teacher.scalar_type(),
      student_outer_stride,
      student_inner_stride,
      teacher_outer_stride,
      teacher_inner_stride,
      std::max<int64_t>(1, inner_rows),
      num_rows,
      vocab_size,
      labels.has_value() ? labels->data_ptr<int64_t>() : nullptr,
      ignore_index,
      alpha_rows.has_value() ? alpha_rows->data_ptr<float>() : nullptr,
      static_cast<float>(alpha),
      static_cast<float>(1.0 / inv_temperature),
      static_cast<float>(inv_temperature),
      reverse,
      reverse && detach,
  };
}

void skew_statistics(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
                     int64_t ignore_index, double inv_temperature, at::Tensor& stats) {
  const SkewProblem problem = make_problem(student, teacher, labels, std::nullopt, /*alpha=*/0.0, ignore_index,
                                           inv_temperature, /*reverse=*/false, /*detach=*/false);
  check_output("stats", stats, at::kFloat, {problem.num_rows, kStats});
  float* stats_ptr = stats.data_ptr<float>();
  switch (selected_isa()) {
#ifdef DISTILLM2_X86_KERNELS
    case Isa::Avx512:
      return AVX512::skew_statistics_rows(problem, stats_ptr);
    case Isa::Avx2:
      return AVX2::skew_statistics_rows(problem, stats_ptr);
#endif
    default:
      return DEFAULT::skew_statistics_rows(problem, stats_ptr);
  }
}

void skew_forward(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
                  const std::optional<at::Tensor>& alpha_rows, double alpha, int64_t ignore_index,
                  double inv_temperature, bool reverse, bool detach, bool compute_statistics, at::Tensor& loss,
                  at::Tensor& stats) {
  const SkewProblem problem =
      make_problem(student, teacher, labels, alpha_rows, alpha, ignore_index, inv_temperature, reverse, detach);
  check_output("loss", loss, at::kFloat, {problem.num_rows});
  check_output("stats", stats, at::kFloat, {problem.num_rows, kStats});
  float* loss_ptr = loss.data_ptr<float>();
  float* stats_ptr = stats.data_ptr<float>();
  switch (selected_isa()) {
#ifdef DISTILLM2_X86_KERNELS
    case Isa::Avx512:
      return AVX512::skew_forward_rows(problem, compute_statistics, loss_ptr, stats_ptr);
    case Isa::Avx2:
      return AVX2::skew_forward_rows(problem, compute_statistics, loss_ptr, stats_ptr);
#endif
    default:
      return DEFAULT::skew_forward_rows(problem, compute_statistics, loss_ptr, stats_ptr);
  }
}

void skew_forward_and_grad(const at::Tensor& student, const at::Tensor& teacher,
                           const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& alpha_rows,
                           double alpha, int64_t ignore_index, double inv_temperature, bool reverse, bool detach,
                           const at::Tensor& grad_scale, at::Tensor& loss, at::Tensor& stats, at::Tensor& grad) {
  const SkewProblem problem =
      make_problem(student, teacher, labels, alpha_rows, alpha, ignore_index, inv_temperature, reverse, detach);
  check_row_vector("grad_scale", grad_scale, at::kFloat, problem.num_rows);
  TORCH_CHECK(grad_scale.is_contiguous(), "grad_scale must be contiguous");
  check_output("loss", loss, at::kFloat, {problem.num_rows});
  check_output("stats", stats, at::kFloat, {problem.num_rows, kStats});
  check_output("grad", grad, student.scalar_type(), {problem.num_rows, problem.vocab_size});
  const float* grad_scale_ptr = grad_scale.data_ptr<float>();
  float* loss_ptr = loss.data_ptr<float>();
  float* stats_ptr = stats.data_ptr<float>();
  void* grad_ptr = grad.data_ptr();
  switch (selected_isa()) {
#ifdef DISTILLM2_X86_KERNELS
    case Isa::Avx512:
      return AVX512::skew_forward_and_grad_rows(problem, grad_scale_ptr, loss_ptr, stats_ptr, grad_ptr);
    case Isa::Avx2:
      return AVX2::skew_forward_and_grad_rows(problem, grad_scale_ptr, loss_ptr, stats_ptr, grad_ptr);
#endif
    default:
      return DEFAULT::skew_forward_and_grad_rows(problem, grad_scale_ptr, loss_ptr, stats_ptr, grad_ptr);
  }
}

void skew_backward(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
                   const std::optional<at::Tensor>& alpha_rows, double alpha, int64_t ignore_index,
                   double inv_temperature, bool reverse, bool detach, const at::Tensor& stats,
                   const at::Tensor& grad_loss, at::Tensor& grad) {
  const SkewProblem problem =
      make_problem(student, teacher, labels, alpha_rows, alpha, ignore_index, inv_temperature, reverse, detach);
  check_output("stats", stats, at::kFloat, {problem.num_rows, kStats});
  check_row_vector("grad_loss", grad_loss, at::kFloat, problem.num_rows);
  check_output("grad", grad, student.scalar_type(), {problem.num_rows, problem.vocab_size});
  const float* stats_ptr = stats.data_ptr<float>();
  const float* grad_loss_ptr = grad_loss.data_ptr<float>();
  const int64_t grad_loss_stride = grad_loss.stride(0);
  void* grad_ptr = grad.data_ptr();
  switch (selected_isa()) {
#ifdef DISTILLM2_X86_KERNELS
    case Isa::Avx512:
      return AVX512::skew_backward_rows(problem, stats_ptr, grad_loss_ptr, grad_loss_stride, grad_ptr);
    case Isa::Avx2:
      return AVX2::skew_backward_rows(problem, stats_ptr, grad_loss_ptr, grad_loss_stride, grad_ptr);
#endif
    default:
      return DEFAULT::skew_backward_rows(problem, stats_ptr, grad_loss_ptr, grad_loss_stride, grad_ptr);
  }
}

}  // namespace

void register_sparse_teacher_ops(pybind11::module_& m);  // sparse_teacher.cpp

}  // namespace distillm2

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "distillm2_kernels CPU kernels: skew KL / skew reverse KL over [N, V] logits, and the sparse-teacher student sweeps";
  m.def("skew_statistics", &distillm2::skew_statistics, py::call_guard<py::gil_scoped_release>(),
        "Sweep 1: writes the per-row statistics [N, num_stats] (C = 0)", py::arg("student"), py::arg("teacher"),
        py::arg("labels"), py::arg("ignore_index"), py::arg("inv_temperature"), py::arg("stats"));
  m.def("skew_forward", &distillm2::skew_forward, py::call_guard<py::gil_scoped_release>(),
        "Writes the per-row loss [N] and C into stats [N, num_stats]; computes the rest of stats first when "
        "compute_statistics, else reads it",
        py::arg("student"), py::arg("teacher"), py::arg("labels"), py::arg("alpha_rows"), py::arg("alpha"),
        py::arg("ignore_index"), py::arg("inv_temperature"), py::arg("reverse"), py::arg("detach"),
        py::arg("compute_statistics"), py::arg("loss"), py::arg("stats"));
  m.def("skew_forward_and_grad", &distillm2::skew_forward_and_grad, py::call_guard<py::gil_scoped_release>(),
        "Writes the per-row loss [N], the statistics [N, num_stats] and the gradient of sum(grad_scale * loss) "
        "w.r.t. the student logits, [N, V] contiguous in the student dtype",
        py::arg("student"), py::arg("teacher"), py::arg("labels"), py::arg("alpha_rows"), py::arg("alpha"),
        py::arg("ignore_index"), py::arg("inv_temperature"), py::arg("reverse"), py::arg("detach"),
        py::arg("grad_scale"), py::arg("loss"), py::arg("stats"), py::arg("grad"));
  m.def("skew_backward", &distillm2::skew_backward, py::call_guard<py::gil_scoped_release>(),
        "Writes the gradient w.r.t. the student logits, [N, V] contiguous in the student dtype",
        py::arg("student"), py::arg("teacher"), py::arg("labels"), py::arg("alpha_rows"), py::arg("alpha"),
        py::arg("ignore_index"), py::arg("inv_temperature"), py::arg("reverse"), py::arg("detach"),
        py::arg("stats"), py::arg("grad_loss"), py::arg("grad"));
  distillm2::register_sparse_teacher_ops(m);
  m.def("kernel_isa", &distillm2::isa_name, "The instruction set the kernels run with: AVX512, AVX2 or DEFAULT");
  m.attr("built_with_torch") = DISTILLM2_TORCH_VERSION;
#ifdef DISTILLM2_SOURCE_DIGEST
  m.attr("built_from_sources") = DISTILLM2_SOURCE_DIGEST;
#endif
  m.attr("num_stats") = distillm2::kStats;
}
