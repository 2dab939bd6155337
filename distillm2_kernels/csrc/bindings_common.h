// What the binding files (skew_divergence.cpp, sparse_teacher.cpp) share: the instruction set chosen at run time
// (ATen's own choice, `torch.backends.cpu.get_cpu_capability()`, which honours the ATEN_CPU_CAPABILITY environment
// variable) and the checks of tensor arguments. Baseline code only: never included by a per-instruction-set file.
#pragma once

#include <ATen/Context.h>
#include <torch/extension.h>

#include <cstdint>
#include <string>
#include <utility>

namespace distillm2 {

enum class Isa { Default, Avx2, Avx512 };

inline Isa selected_isa() {
  static const Isa isa = [] {
#ifdef DISTILLM2_X86_KERNELS
    const std::string capability = at::get_cpu_capability();
    if (capability == "AVX512") {
      return Isa::Avx512;
    }
    if (capability == "AVX2") {
      return Isa::Avx2;
    }
#endif
    return Isa::Default;
  }();
  return isa;
}

inline const char* isa_name() {
  switch (selected_isa()) {
    case Isa::Avx512:
      return "AVX512";
    case Isa::Avx2:
      return "AVX2";
    default:
      return "DEFAULT";
  }
}

inline bool is_logits_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
}

inline void check_logits(const char* name, const at::Tensor& logits) {
  TORCH_CHECK(logits.device().is_cpu(), name, " must be a CPU tensor, got one on ", logits.device());
  TORCH_CHECK(logits.dim() == 2 || logits.dim() == 3, name, " must be [N, V] or [outer, inner, V], got ",
              logits.sizes());
  TORCH_CHECK(is_logits_dtype(logits.scalar_type()), name, " must be float32, bfloat16 or float16, got ",
              logits.scalar_type());
  TORCH_CHECK(logits.size(-1) <= 1 || logits.stride(-1) == 1, name, " must have unit column stride, got strides ",
              logits.strides());
}

// (outer stride, inner stride) of [N, V] (one outer index) or [outer, inner, V] logits.
inline std::pair<int64_t, int64_t> level_strides(const at::Tensor& logits) {
  if (logits.dim() == 2) {
    return {0, logits.stride(0)};
  }
  return {logits.stride(0), logits.stride(1)};
}

inline void check_row_vector(const char* name, const at::Tensor& tensor, at::ScalarType dtype, int64_t num_rows) {
  TORCH_CHECK(tensor.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(tensor.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", tensor.scalar_type());
  TORCH_CHECK(tensor.dim() == 1 && tensor.size(0) == num_rows, name, " must have shape [", num_rows, "], got ",
              tensor.sizes());
}

inline void check_output(const char* name, const at::Tensor& out, at::ScalarType dtype, at::IntArrayRef shape) {
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == dtype && out.sizes() == shape && out.is_contiguous(),
              name, " must be a contiguous ", dtype, " CPU tensor of shape ", shape, ", got ", out.scalar_type(),
              " ", out.sizes());
}

}  // namespace distillm2
