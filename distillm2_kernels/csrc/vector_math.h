// The vector helpers every row kernel shares, for one instruction set: the polynomial exp and log (exp_poly,
// log_poly, about one ulp), the log-space mixture of docs/design.md §2.1 (mixture()), NaN-propagating lane
// reductions in a fixed order, and the logits dtypes (float32, bfloat16, float16).
//
// Included by the kernel headers (skew_divergence_kernel.h, sparse_teacher_kernel.h) inside translation units
// that define CPU_CAPABILITY (ATen's vector width) and are compiled with that instruction set's flags. Everything
// here lives in an anonymous namespace inside distillm2::CPU_CAPABILITY, so each build keeps its own copy and no
// AVX code is shared by name with the portable build (tests/test_cpu_build.py checks the built module).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace distillm2::CPU_CAPABILITY {
namespace {

using fVec = at::vec::Vectorized<float>;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
// The smallest mixture of the linear form: at or above it every term of a linear mixture is a normal float, so
// exp's underflow or a denormal changes the mixture by less than 2^-26 relative (below it, mixture()).
constexpr float kLinearMixtureMin = 0x1p-100f;

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


// NaN-propagating max of two floats (std::max drops a NaN in its second argument).
inline float nan_max(float a, float b) {
  return (std::isnan(a) || std::isnan(b)) ? kNaN : std::max(a, b);
}

// The largest lane, NaN when a lane is NaN.
float lane_max(const fVec& v) {
  alignas(64) float lanes[fVec::size()];
  v.store(lanes);
  float result = lanes[0];
  for (int64_t i = 1; i < fVec::size(); ++i) {
    result = nan_max(result, lanes[i]);
  }
  return result;
}

// Whether every lane of v is at least `bound` (false for a NaN lane).
inline bool all_at_least(const fVec& v, float bound) {
  return (v < fVec(bound)).zero_mask() == (1 << fVec::size()) - 1;
}

// exp(x) as 2^n · P(r), n = round(x · log2 e), r = x − n·ln 2 (ln 2 in two parts, n·ln2_hi exact), P the degree-7
// Taylor-like minimax polynomial of e^r on |r| ≤ ln2/2 (Cephes' expf coefficients): within about one ulp of
// exp(x) on the normal range. exp(−inf) = 0 exactly, exp(0) = 1 exactly; a NaN stays NaN. The AVX-512 form
// scales with vscalef (denormal results kept); the AVX2 form builds 2^n in the exponent bits and returns 0 below
// exp's normal range (x < −87.34, results under 1.2e-38). The portable build uses the library's exp.
inline fVec exp_poly(const fVec& x_in) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#if defined(CPU_CAPABILITY_AVX512)
  using reg = __m512;
#define DISTILLM2_V(op) _mm512_##op
#else
  using reg = __m256;
#define DISTILLM2_V(op) _mm256_##op
#endif
  const reg x_raw = x_in;
#if defined(CPU_CAPABILITY_AVX512)
  const reg x = DISTILLM2_V(max_ps)(DISTILLM2_V(set1_ps)(-110.0f), x_raw);  // a NaN x is kept (second operand)
#else
  const reg x = DISTILLM2_V(max_ps)(DISTILLM2_V(set1_ps)(-87.33654f), x_raw);
#endif
  const reg scaled_x = DISTILLM2_V(mul_ps)(x, DISTILLM2_V(set1_ps)(1.44269504088896341f));
#if defined(CPU_CAPABILITY_AVX512)
  const reg n = _mm512_roundscale_ps(scaled_x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  const reg n = _mm256_round_ps(scaled_x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#endif
  reg r = DISTILLM2_V(fnmadd_ps)(n, DISTILLM2_V(set1_ps)(0.693359375f), x);
  r = DISTILLM2_V(fnmadd_ps)(n, DISTILLM2_V(set1_ps)(-2.12194440e-4f), r);
  reg y = DISTILLM2_V(set1_ps)(1.9875691500e-4f);
  y = DISTILLM2_V(fmadd_ps)(y, r, DISTILLM2_V(set1_ps)(1.3981999507e-3f));
  y = DISTILLM2_V(fmadd_ps)(y, r, DISTILLM2_V(set1_ps)(8.3334519073e-3f));
  y = DISTILLM2_V(fmadd_ps)(y, r, DISTILLM2_V(set1_ps)(4.1665795894e-2f));
  y = DISTILLM2_V(fmadd_ps)(y, r, DISTILLM2_V(set1_ps)(1.6666665459e-1f));
  y = DISTILLM2_V(fmadd_ps)(y, r, DISTILLM2_V(set1_ps)(5.0000001201e-1f));
  y = DISTILLM2_V(fmadd_ps)(y, DISTILLM2_V(mul_ps)(r, r), r);
  y = DISTILLM2_V(add_ps)(y, DISTILLM2_V(set1_ps)(1.0f));
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_scalef_ps(y, n);
#else
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const reg scaled = _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
  const reg underflow = _mm256_cmp_ps(x_raw, _mm256_set1_ps(-87.33654f), _CMP_LT_OQ);
  return _mm256_andnot_ps(underflow, scaled);
#endif
#undef DISTILLM2_V
#else
  return x_in.exp();
#endif
}

// log(x) for x ≥ kLinearMixtureMin (a normal float): x = m·2^k with m ∈ [√½, √2), log x = k·ln 2 + log(1 + f),
// f = m − 1, by Cephes' logf polynomial (about one ulp). The portable build uses the library's log.
inline fVec log_poly(const fVec& x_in) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#if defined(CPU_CAPABILITY_AVX512)
  using reg = __m512;
#define DISTILLM2_V(op) _mm512_##op
  const reg x = x_in;
  reg m = _mm512_getmant_ps(x, _MM_MANT_NORM_p5_1, _MM_MANT_SIGN_src);  // [0.5, 1)
  reg k = _mm512_add_ps(_mm512_getexp_ps(x), _mm512_set1_ps(1.0f));
  const __mmask16 low = _mm512_cmp_ps_mask(m, _mm512_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  m = _mm512_mask_add_ps(m, low, m, m);
  k = _mm512_mask_sub_ps(k, low, k, _mm512_set1_ps(1.0f));
#else
  using reg = __m256;
#define DISTILLM2_V(op) _mm256_##op
  const __m256i bits = _mm256_castps_si256(x_in);
  reg m = _mm256_castsi256_ps(
      _mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x3f000000)));
  reg k = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(126)));
  const reg low = _mm256_cmp_ps(m, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  m = _mm256_add_ps(m, _mm256_and_ps(low, m));
  k = _mm256_sub_ps(k, _mm256_and_ps(low, _mm256_set1_ps(1.0f)));
#endif
  const reg f = DISTILLM2_V(sub_ps)(m, DISTILLM2_V(set1_ps)(1.0f));
  const reg f2 = DISTILLM2_V(mul_ps)(f, f);
  reg y = DISTILLM2_V(set1_ps)(7.0376836292e-2f);
  y = DISTILLM2_V(fmadd_ps)(y, f, DISTILLM2_V(set1_ps)(-1.1514610310e-1f));
  y = DISTILLM2_V(fmadd_ps)(y, f, DISTILLM2_V(set1_ps)(1.1676998740e-1f));
  y = DISTILLM2_V(fmadd_ps)(y, f, DISTILLM2_V(set1_ps)(-1.2420140846e-1f));
  y = DISTILLM2_V(fmadd_ps)(y, f, DISTILLM2_V(set1_ps)(1.4249322787e-1f));
  y = DISTILLM2_V(fmadd_ps)(y, f, DISTILLM2_V(set1_ps)(-1.6668057665e-1f));
  y = DISTILLM2_V(fmadd_ps)(y, f, DISTILLM2_V(set1_ps)(2.0000714765e-1f));
  y = DISTILLM2_V(fmadd_ps)(y, f, DISTILLM2_V(set1_ps)(-2.4999993993e-1f));
  y = DISTILLM2_V(fmadd_ps)(y, f, DISTILLM2_V(set1_ps)(3.3333331174e-1f));
  y = DISTILLM2_V(mul_ps)(DISTILLM2_V(mul_ps)(y, f), f2);
  y = DISTILLM2_V(fmadd_ps)(k, DISTILLM2_V(set1_ps)(-2.12194440e-4f), y);
  y = DISTILLM2_V(fnmadd_ps)(f2, DISTILLM2_V(set1_ps)(0.5f), y);
  return DISTILLM2_V(fmadd_ps)(k, DISTILLM2_V(set1_ps)(0.693359375f), DISTILLM2_V(add_ps)(f, y));
#undef DISTILLM2_V
#else
  return x_in.log();
#endif
}

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

}  // namespace
}  // namespace distillm2::CPU_CAPABILITY
