"""The float64 oracle and the tolerance rule shared by the tests.

Tolerance rule (docs/design.md section 6, after Cut Cross-Entropy): a fused result passes when its max error
against the float64 oracle is no worse than that of the same reference evaluated in the input dtype, plus
an allowance for float32 arithmetic. The allowance models float32 rounding in log space, which grows with
the logits' magnitude: `ALLOWANCE_ULPS · eps32 · (1 + max|z/T|) · scale`. A second, tighter cap keeps
low-precision baselines from hiding a wrong result: the error may not exceed twice the rounding of the
output dtype plus the same allowance. `test_tolerance_rejects_wrong_gradients` checks that these bounds
catch a gradient that is off by a missing α term.
"""

from __future__ import annotations

from typing import Optional

import torch

from distillm2_kernels import reference

EPS = {
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
    torch.float32: 2.0**-24,
    torch.float64: 2.0**-53,
}
ALLOWANCE_ULPS = 16


def oracle_loss_and_grad(
    op: str,
    student: torch.Tensor,
    teacher: torch.Tensor,
    alpha,
    *,
    dtype: torch.dtype = torch.float64,
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    upstream: Optional[torch.Tensor] = None,
):
    """Per-token loss (ignored tokens 0) and the gradient of Σ loss·upstream w.r.t. the student logits,
    from `reference` evaluated in `dtype` on the given input values. op: "skl", "srkl", "srkl_detach"."""
    s = student.detach().to(dtype).requires_grad_(True)
    t = teacher.detach().to(dtype)
    a = alpha.to(dtype) if isinstance(alpha, torch.Tensor) else alpha
    if op == "skl":
        per_token = reference.skew_kl_rows(s, t, a, temperature)
    else:
        per_token = reference.skew_reverse_kl_rows(s, t, a, temperature, detach_mixture=op == "srkl_detach")
    if labels is not None:
        per_token = torch.where(labels != ignore_index, per_token, torch.zeros_like(per_token))
    weights = torch.ones_like(per_token) if upstream is None else upstream.to(dtype)
    (grad,) = torch.autograd.grad((per_token * weights).sum(), s)
    return per_token.detach(), grad


def logit_magnitude(*logits: torch.Tensor, temperature: float = 1.0) -> float:
    """max |z / T| over the finite entries."""
    finite = [z.detach().double()[torch.isfinite(z)].abs().max() for z in logits if torch.isfinite(z).any()]
    return (max(finite).item() if finite else 0.0) / temperature


def evaluation_bound(out_dtype: torch.dtype, magnitude: float, scale: float) -> float:
    """The bound of the rule below on an op's own error (its cap): twice the output dtype's unit roundoff
    of the scale, plus the float32 log-space allowance `ALLOWANCE_ULPS · eps32 · (1 + magnitude) · scale`."""
    return 2 * EPS[out_dtype] * scale + ALLOWANCE_ULPS * EPS[torch.float32] * (1.0 + magnitude) * scale


def assert_matches_oracle(
    actual: torch.Tensor,
    oracle: torch.Tensor,
    baseline: torch.Tensor,
    *,
    out_dtype: torch.dtype,
    magnitude: float,
    scale: Optional[float] = None,
    what: str = "",
) -> None:
    """The tolerance rule: error(actual) ≤ error(baseline) + allowance and ≤ 2·eps(out_dtype)·scale + allowance."""
    assert actual.shape == oracle.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(oracle.shape)}"
    actual64 = actual.detach().double()
    assert not torch.isnan(actual64).any(), f"{what}: NaN in the result"
    oracle64 = oracle.double()
    finite = torch.isfinite(oracle64)
    assert torch.equal(torch.isfinite(actual64), finite), f"{what}: infinities differ from the oracle"
    assert torch.equal(actual64[~finite], oracle64[~finite]), f"{what}: infinities differ from the oracle"
    if scale is None:
        scale = oracle64[finite].abs().max().item() if finite.any() else 0.0
    err = (actual64 - oracle64)[finite].abs().max().item() if finite.any() else 0.0
    base = (baseline.detach().double() - oracle64)[finite].abs().nan_to_num(float("inf")).max().item() if finite.any() else 0.0
    allowance = ALLOWANCE_ULPS * EPS[torch.float32] * (1.0 + magnitude) * scale
    assert err <= base + allowance, f"{what}: error {err:.3g} > reference-in-dtype error {base:.3g} + {allowance:.3g}"
    cap = evaluation_bound(out_dtype, magnitude, scale)
    assert err <= cap, f"{what}: error {err:.3g} > 2·eps({out_dtype})·scale + allowance = {cap:.3g}"
