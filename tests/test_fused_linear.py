"""fused_linear_skl / fused_linear_srkl against a float64 oracle that materialises the logits.

Oracle: z = h Wᵀ + b (then c·tanh(z/c)) in float64 on the very input values (`make_inputs` rounds them
through the case's dtype first), then `reference.skl_reference` / `srkl_reference`, gradients by autograd.

Tolerance rule: every output entry's error against the oracle must lie within a bound derived from the
op's error sources (`error_bounds`), in float32 unit roundoffs u = 2⁻²⁴ (the op computes in float32 for
float32 and bfloat16 inputs alike; γ_n = n·u/(1 − n·u)):

1. Logits GEMM: z = Σ_k h_k w_k (+ b) is a sum of K = H (+1) float32 products (bfloat16 products are
   exact in float32), so |ẑ − z| ≤ δ = γ_K (Σ_k |h_k||w_k| + |b|) per logit, both models.
2. Soft-cap c·tanh(z/c): the division and the product with c round once each (u), tanh is 1-Lipschitz
   and its float32 implementations are accurate to TANH_ULPS ulps; δ grows by these.
3. Loss: to first order, |Δℓ| ≤ Σ_v |∂ℓ/∂z_s,v| δ_s,v + |∂ℓ/∂z_t,v| δ_t,v with the float64 derivatives of
   the loss's value (for SRKL the undetached one: detaching changes the gradient, not the value); the
   second-order rest is ~‖δ‖∞/T of that. Plus the loss's own evaluation on the rounded logits, held to the
   logits API's cap (tests/oracle.py, `evaluation_bound`: 2·eps(float32)·scale + the float32 log-space
   allowance, scale = max|ℓ| + log(V+1) as in test_skew_divergence), and for a scalar reduction its sum
   and divisions, γ_{N+1} Σ w_r |ℓ_r|.
4. Logits gradient G = ∂loss/∂z_s: its perturbation by the logits' errors, Σ_v |∂G_u/∂z_v| δ_v for both
   models, with the Jacobian of the float64 gradient taken by central differences (autograd's second
   derivative would miss SRKL's detached mixture, whose q still moves with z; the difference step
   DIFFERENCE_STEP leaves an O(step²) ≈ 1e-9 relative error in a coefficient of the bound).
5. Its evaluation by the backend: the logits API's cap per entry, at the entry's own scale
   max(|G_v|, |upstream|·(q_v + p_v)/T) (the logits API states it for the row's largest entry: the
   rounding of an entry is that of its own terms); the mean/seqmean row weights' rounding to float32 (u|G|);
   the soft-cap's derivative 1 − tanh² from the computed tanh (steps 1-2) and the product's rounding.
6. Gradient GEMMs, with the summands' magnitudes: ∂h = G W over V terms, ∂W = Gᵀ H and ∂b = Σ G over the
   kept rows: |error| ≤ |ΔG| |W| + γ_V (|G| + |ΔG|) |W| (and likewise for W and b).
7. Roundings to the parameter's dtype (none for float32) and, for a scalar reduction, of the product by
   the incoming gradient: u_dtype (|g| + bound) each.

The bound is CPU-independent by construction: γ_n bounds a sum of n terms in every order, blocked or
pairwise, with or without FMA, so no vector width (ATEN_CPU_CAPABILITY) or thread split of the GEMMs and
sums changes it; tanh's bound is the worst of its implementations; the one modelled step, the backend's
own evaluation (5), is the logits API's rule, which that API's tests hold every backend and instruction
set to, and it depends on the values only, not on how they were computed. No baseline evaluated in the input
dtype enters it (a bfloat16 baseline that does its GEMM in bfloat16 would hide a wrong gradient in that
GEMM's slack). What it resolves: in bfloat16 a gradient's bound is one or two bfloat16 roundings of the
entry, so a wrong term of a few bfloat16 ulps fails; in float32 it is dominated by the logits API's
log-space allowance carried through the gradient GEMMs, a few hundred float32 ulps of the summands' scale
(`test_rule_rejects_small_wrong_terms`). The float64 test checks the op's arithmetic to 1e-12.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import pytest
import torch
from oracle import EPS, evaluation_bound
from torch.utils._python_dispatch import TorchDispatchMode

import distillm2_kernels as dk
from distillm2_kernels import reference
from distillm2_kernels.backends import cpu_backend, triton_backend
from distillm2_kernels.backends import resolve_backend
from distillm2_kernels.fused_linear import (
    LIVE_ROW_TENSORS,
    UNDECLARED_BACKEND_TEMPORARIES,
    chunk_rows,
    fused_linear_skl_plus_srkl,
)

B, T, H_S, H_T, V = 2, 5, 16, 24, 61  # N = 10 rows; V odd; the two hidden sizes differ

TRITON_ON_CPU = triton_backend.unavailable_reason(torch.device("cpu")) is None
needs_interpreter = pytest.mark.skipif(not TRITON_ON_CPU, reason="needs triton with TRITON_INTERPRET=1")


@dataclasses.dataclass(frozen=True)
class Case:
    kind: str  # "skl", "srkl", "srkl_detached"
    reduction: str
    dtype: torch.dtype
    alpha: object = 0.1  # a float, "per_sequence" or "per_token"
    labels: bool = True  # some tokens ignored
    temperature: float = 1.0
    softcap: object = None
    bias: bool = False
    chunk_rows: int = 3
    frozen_weight: bool = False
    backend: str = "torch"

    def __str__(self):
        fields = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)]
        return ",".join(fields).replace("torch.", "")


def make_inputs(case: Case, seed: int = 0):
    """float32 master tensors (rounded through the case's dtype) and the per-call options."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(case.dtype).float()

    tensors = {
        "student_hidden": randn(B, T, H_S),
        "student_weight": randn(V, H_S, scale=3.0 / math.sqrt(H_S)),
        "teacher_hidden": randn(B, T, H_T),
        "teacher_weight": randn(V, H_T, scale=3.0 / math.sqrt(H_T)),
        "student_bias": randn(V, scale=0.5) if case.bias else None,
        "teacher_bias": randn(V, scale=0.5) if case.bias else None,
    }
    labels = None
    if case.labels:
        labels = torch.randint(0, V, (B, T), generator=g)
        labels[0, 1] = labels[0, 4] = labels[1, 0] = -100
    if case.alpha == "per_sequence":
        alpha = torch.tensor([0.05, 0.6])
    elif case.alpha == "per_token":
        alpha = torch.rand(B, T, generator=g)
        alpha[0, 0], alpha[1, 3] = 0.0, 1.0
    else:
        alpha = case.alpha
    grad_out = torch.randn(B, T, generator=g) if case.reduction == "none" else torch.tensor(1.7)
    return tensors, labels, alpha, grad_out


def _softcaps(softcap):
    return tuple(softcap) if isinstance(softcap, tuple) else (softcap, softcap)


def _materialised_result(case: Case, tensors, labels, alpha, grad_out, dtype: torch.dtype, loss_fn):
    """Loss and student gradients from materialised logits `softcap(h Wᵀ + b)`, all in `dtype`, with the
    per-token loss `loss_fn(z_s, z_t, alpha, **options)`; gradients by autograd."""
    student = {k: tensors[k].to(dtype, copy=True).requires_grad_() for k in ("student_hidden", "student_weight")}
    if case.bias:
        student["student_bias"] = tensors["student_bias"].to(dtype, copy=True).requires_grad_()
    cap_s, cap_t = _softcaps(case.softcap)

    def logits(hidden, weight, bias, cap):
        z = hidden @ weight.T
        if bias is not None:
            z = z + bias
        return z if cap is None else cap * torch.tanh(z / cap)

    z_s = logits(student["student_hidden"], student["student_weight"], student.get("student_bias"), cap_s)
    with torch.no_grad():
        t_bias = None if tensors["teacher_bias"] is None else tensors["teacher_bias"].to(dtype)
        z_t = logits(tensors["teacher_hidden"].to(dtype), tensors["teacher_weight"].to(dtype), t_bias, cap_t)
    alpha = alpha.to(dtype) if isinstance(alpha, torch.Tensor) else alpha
    options = dict(labels=labels, temperature=case.temperature, reduction=case.reduction)
    if case.kind != "skl":
        options["detach_mixture"] = case.kind == "srkl_detached"
    z_s.retain_grad()
    loss = loss_fn(z_s, z_t, alpha, **options)
    loss.backward(grad_out.to(loss.dtype))
    grads = {k: v.grad for k, v in student.items()}
    grads["logits"] = z_s.grad
    return loss.detach(), grads


def reference_result(case: Case, tensors, labels, alpha, grad_out, dtype: torch.dtype):
    """The naive reference (`reference.skl_reference` / `srkl_reference`) on materialised logits."""
    loss_fn = reference.skl_reference if case.kind == "skl" else reference.srkl_reference
    return _materialised_result(case, tensors, labels, alpha, grad_out, dtype, loss_fn)


def _budget_for_rows(rows: int, vocab: int, backend: str, dtype: torch.dtype) -> int:
    """The memory budget that makes the op take `rows` rows per GEMM chunk (the backend may be called on
    fewer at a time)."""
    impl = resolve_backend(backend, torch.device("cpu"))
    temporaries = getattr(impl, "ROW_TEMPORARIES", UNDECLARED_BACKEND_TEMPORARIES)
    element = 8 if dtype == torch.float64 else 4
    budget = rows * LIVE_ROW_TENSORS * element * vocab * (2 if temporaries else 1)
    assert chunk_rows(vocab, budget, element, temporaries)[0] == rows
    return budget


def fused_result(case: Case, tensors, labels, alpha, grad_out):
    inputs = {k: (None if v is None else v.to(case.dtype, copy=True)) for k, v in tensors.items()}
    trainable = ["student_hidden"] + ([] if case.frozen_weight else ["student_weight"])
    trainable += ["student_bias"] if case.bias else []
    for k in trainable:
        inputs[k].requires_grad_()
    kwargs = dict(
        student_bias=inputs["student_bias"],
        teacher_bias=inputs["teacher_bias"],
        labels=labels,
        temperature=case.temperature,
        softcap=case.softcap,
        reduction=case.reduction,
        backend=case.backend,
        memory_budget_bytes=_budget_for_rows(case.chunk_rows, V, case.backend, case.dtype),
    )
    args = (inputs["student_hidden"], inputs["student_weight"], inputs["teacher_hidden"], inputs["teacher_weight"])
    if case.kind == "skl":
        loss = dk.fused_linear_skl(*args, alpha, **kwargs)
    else:
        loss = dk.fused_linear_srkl(*args, alpha, detach_mixture=case.kind == "srkl_detached", **kwargs)
    loss.backward(grad_out)
    grads = {k: inputs[k].grad for k in trainable}
    return loss.detach(), grads


# ----------------------------------------------------------------------------------------------------
# The tolerance rule (module docstring): a bound on each output entry's error, from the error sources
# ----------------------------------------------------------------------------------------------------

U = EPS[torch.float32]  # float32's unit roundoff: the op's GEMMs, soft-cap, loss and gradients run in float32
TANH_ULPS = 2  # the largest error of float32 tanh in glibc (2 ulps), SLEEF's u10 (1 ulp) and CUDA (2 ulps)
DIFFERENCE_STEP = 2.0**-14  # central differences of the float64 logits gradient (module docstring, step 4)


def gamma(n: int) -> float:
    """γ_n = n·u / (1 − n·u): |fl(Σᵢ xᵢ yᵢ) − Σᵢ xᵢ yᵢ| ≤ γ_n Σᵢ |xᵢ yᵢ| for n terms in float32, in any
    order of summation, blocked or not, with or without fused multiply-adds."""
    return n * U / (1 - n * U)


@dataclasses.dataclass
class _Logits:
    """One model's float64 logits `[N, V]` and the bound on the float32 op's error in them."""

    capped: torch.Tensor  # softcap(h Wᵀ + b), exact
    error: torch.Tensor  # δ ≥ |computed − exact| of `capped`
    tanh: Optional[torch.Tensor] = None  # tanh(z_raw / c) when capped
    tanh_error: Optional[torch.Tensor] = None  # ≥ |computed − exact| of `tanh`


def logits_and_error_bound(hidden, weight, bias, cap) -> _Logits:
    """Steps 1-2 of the module docstring: the GEMM's forward error γ_K Σ|h||w| (the bias one more term),
    then the soft-cap's roundings."""
    h = hidden.double().reshape(-1, hidden.shape[-1])
    w = weight.double()
    raw, summands, terms = h @ w.T, h.abs() @ w.abs().T, h.shape[1]
    if bias is not None:
        raw, summands, terms = raw + bias.double(), summands + bias.double().abs(), terms + 1
    raw_error = gamma(terms) * summands
    if cap is None:
        return _Logits(raw, raw_error)
    tanh = torch.tanh(raw / cap)
    # fl(ẑ/c) is within (δ + u|ẑ|)/c of z/c; tanh is 1-Lipschitz and evaluated within TANH_ULPS ulps;
    # the product with c rounds once more
    argument_error = (raw_error + U * (raw.abs() + raw_error)) / cap
    tanh_error = argument_error + 2 * TANH_ULPS * U * (tanh.abs() + argument_error)
    capped_error = cap * tanh_error + U * cap * (tanh.abs() + tanh_error)
    return _Logits(cap * tanh, capped_error, tanh, tanh_error)


def _row_alphas(alpha, n_rows: int) -> torch.Tensor:
    """α per flattened row `[N]`, float64."""
    if not isinstance(alpha, torch.Tensor):
        return torch.full((n_rows,), float(alpha), dtype=torch.float64)
    alpha = alpha.double()
    return (alpha.unsqueeze(1).expand(-1, n_rows // alpha.numel()) if alpha.dim() == 1 else alpha).reshape(-1)


def _row_losses(kind: str, z_s, z_t, alpha_rows, temperature, detach: bool) -> torch.Tensor:
    """Per-row losses of `[..., N, V]` logits (not masked), α per row."""
    alpha = alpha_rows.expand(z_s.shape[:-1])
    if kind == "skl":
        return reference.skew_kl_rows(z_s, z_t, alpha, temperature)
    return reference.skew_reverse_kl_rows(z_s, z_t, alpha, temperature, detach_mixture=detach)


def _row_weights(case: Case, labels, n_rows: int) -> torch.Tensor:
    """∂(the op's output, summed)/∂(row loss) `[N]`: the reduction's weights, 0 at ignored rows."""
    per_token = torch.ones(B, T, dtype=torch.float64, requires_grad=True)
    (weights,) = torch.autograd.grad(reference._reduce(per_token, labels, -100, case.reduction).sum(), per_token)
    return weights.reshape(n_rows)


@dataclasses.dataclass
class ErrorBounds:
    loss: torch.Tensor  # the op's output shape
    grads: dict  # per student gradient, its shape


def error_bounds(
    case: Case, tensors, labels, alpha, grad_out, *, rounds_logits_gradient: bool = False,
    teacher: Optional[_Logits] = None,
) -> ErrorBounds:
    """The bound on |op − float64 oracle| of every output entry (module docstring, steps 1-7).

    `rounds_logits_gradient`: the op rounds the logits gradient to the input dtype before the gradient
    GEMMs (its CUDA path for float16/bfloat16 inputs). `teacher`: the teacher's float64 logits `[N, V]`
    and their error when they do not come from `tensors` (a sparse teacher: its exact, densified
    log-probabilities, error 0, −inf allowed)."""
    cap_s, cap_t = _softcaps(case.softcap)
    student = logits_and_error_bound(tensors["student_hidden"], tensors["student_weight"], tensors["student_bias"], cap_s)
    if teacher is None:
        teacher = logits_and_error_bound(tensors["teacher_hidden"], tensors["teacher_weight"], tensors["teacher_bias"], cap_t)
    n_rows = student.capped.shape[0]
    temperature, detach = case.temperature, case.kind == "srkl_detached"
    alpha_rows = _row_alphas(alpha, n_rows)
    kept = torch.ones(n_rows, dtype=torch.bool) if labels is None else labels.reshape(-1) != -100
    weights = _row_weights(case, labels, n_rows)
    upstream = weights * grad_out.double().expand(B, T).reshape(-1)  # ∂(Σ output · grad_out)/∂(row loss)
    finite_teacher = teacher.capped[torch.isfinite(teacher.capped)]
    magnitude = max(student.capped.abs().max().item(), finite_teacher.abs().max().item()) / temperature

    # step 3: the loss, to first order in the logits' errors (the loss's value is the undetached loss's)
    z_s = student.capped.clone().requires_grad_()
    z_t = teacher.capped.clone().requires_grad_()
    row_losses = _row_losses(case.kind, z_s, z_t, alpha_rows, temperature, detach=False)
    sensitivity_s, sensitivity_t = torch.autograd.grad((row_losses * kept).sum(), (z_s, z_t))
    propagated = (sensitivity_s.abs() * student.error + sensitivity_t.abs() * teacher.error).sum(-1)
    row_losses = row_losses.detach() * kept
    evaluation = evaluation_bound(torch.float32, magnitude, row_losses.abs().max().item() + math.log(V + 1))
    per_row = (propagated + evaluation) * kept
    if case.reduction == "none":
        loss_bound = per_row.reshape(B, T)
    else:  # the reduction: at most N − 1 additions and two divisions per term
        loss_bound = (weights * per_row).sum() + gamma(n_rows + 1) * (weights * (row_losses.abs() + per_row)).sum()

    # step 4: the logits gradient G (capped logits) and its error from the logits' errors
    def logits_gradient(z_s, z_t):
        z_s, z_t = torch.broadcast_tensors(z_s, z_t)
        z_s = z_s.clone().requires_grad_()
        losses = _row_losses(case.kind, z_s, z_t, alpha_rows, temperature, detach)
        (grad,) = torch.autograd.grad((losses * upstream).sum(), z_s)
        return grad

    grad = logits_gradient(student.capped, teacher.capped)
    steps = DIFFERENCE_STEP * torch.eye(V, dtype=torch.float64).unsqueeze(1)  # [V (direction), 1, V]
    jacobian_s = (logits_gradient(student.capped + steps, teacher.capped) - logits_gradient(student.capped - steps, teacher.capped))
    # [direction v, row, entry u] = ∂G[row, u] / ∂z[row, v]
    jacobian_s = jacobian_s / (2 * DIFFERENCE_STEP)
    grad_error = torch.einsum("vru,rv->ru", jacobian_s.abs(), student.error)
    if teacher.error.any():
        jacobian_t = (logits_gradient(student.capped, teacher.capped + steps) - logits_gradient(student.capped, teacher.capped - steps))
        grad_error += torch.einsum("vru,rv->ru", (jacobian_t / (2 * DIFFERENCE_STEP)).abs(), teacher.error)
    # step 5: the backend's own evaluation (the logits API's rule), the row weights' rounding to float32
    probabilities = torch.softmax(student.capped / temperature, -1) + torch.softmax(teacher.capped / temperature, -1)
    terms = upstream.abs().unsqueeze(-1) * probabilities / temperature
    grad_error += evaluation_bound(torch.float32, magnitude, torch.maximum(grad.abs(), terms))
    if case.reduction in ("mean", "seqmean"):
        grad_error += U * grad.abs()
    if student.tanh is not None:  # G ⊙ (1 − tanh²), with the computed tanh
        slope = 1 - student.tanh.square()
        slope_error = (2 * student.tanh.abs() + student.tanh_error) * student.tanh_error + 2 * U
        raw_grad = grad * slope
        grad_error = grad_error * (slope + slope_error) + grad.abs() * slope_error
        grad_error += U * (raw_grad.abs() + grad_error)
        grad = raw_grad
    grad_error = grad_error * kept.unsqueeze(-1)
    if rounds_logits_gradient:
        grad_error += EPS[case.dtype] * (grad.abs() + grad_error)

    # step 6: the gradient GEMMs (V terms for the hidden states, the kept rows for the weight and bias)
    magnitudes = grad.abs() + grad_error
    hidden = tensors["student_hidden"].double().reshape(n_rows, -1).abs()
    weight = tensors["student_weight"].double().abs()
    n_kept = int(kept.sum())
    bounds = {
        "student_hidden": grad_error @ weight + gamma(V) * magnitudes @ weight,
        "student_weight": grad_error.T @ hidden + gamma(n_kept) * magnitudes.T @ hidden,
        "student_bias": grad_error.sum(0) + gamma(n_kept) * magnitudes.sum(0),
    }
    exact = {
        "student_hidden": grad @ tensors["student_weight"].double(),
        "student_weight": grad.T @ tensors["student_hidden"].double().reshape(n_rows, -1),
        "student_bias": grad.sum(0),
    }
    # step 7: the roundings to the parameter's dtype (none in float32) and by the incoming scalar
    roundings = (case.dtype != torch.float32) + (case.reduction != "none")
    for name in bounds:
        for _ in range(roundings):
            bounds[name] = bounds[name] + EPS[case.dtype] * (exact[name].abs() + bounds[name])
    bounds["student_hidden"] = bounds["student_hidden"].reshape(B, T, -1)
    return ErrorBounds(loss_bound, bounds)


def assert_within_bound(name: str, actual, oracle, bound):
    """Every entry: |actual − oracle| ≤ bound."""
    actual, oracle = actual.double(), oracle.double()
    assert actual.shape == oracle.shape == bound.shape, f"{name}: shapes {actual.shape}, {oracle.shape}, {bound.shape}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    error = (actual - oracle).abs()
    if error.numel() == 0:
        return
    ratio = error / bound
    worst = int(ratio.argmax())
    assert (error <= bound).all(), (
        f"{name}: error {error.view(-1)[worst].item():.3e} > bound {bound.view(-1)[worst].item():.3e} at flat "
        f"index {worst} (largest error {error.max().item():.3e})"
    )


def check_case(case: Case):
    tensors, labels, alpha, grad_out = make_inputs(case)
    loss, grads = fused_result(case, tensors, labels, alpha, grad_out)
    oracle_loss, oracle_grads = reference_result(case, tensors, labels, alpha, grad_out, torch.float64)
    bounds = error_bounds(case, tensors, labels, alpha, grad_out)
    assert loss.dtype == torch.float32

    assert_within_bound("loss", loss, oracle_loss, bounds.loss)
    if case.frozen_weight:
        assert "student_weight" not in grads
    for name, grad in grads.items():
        assert grad.dtype == case.dtype, f"{name} grad dtype {grad.dtype}"
        assert_within_bound(f"grad {name}", grad, oracle_grads[name], bounds.grads[name])
    if case.labels:  # ignored tokens get exactly zero hidden gradient
        ignored = labels == -100
        assert (grads["student_hidden"][ignored] == 0).all()


def _torch_cases(dtypes=(torch.float32, torch.bfloat16), alphas=(0.1, "per_sequence", "per_token", 0.0, 0.9, 1.0)):
    """Every loss × reduction × dtype, the other options cycling so each value meets several others."""
    softcaps = [None, 4.0, (None, 3.0), (5.0, 2.5)]
    cases = []
    i = 0
    for dtype in dtypes:
        for kind in ("skl", "srkl", "srkl_detached"):
            for reduction in ("none", "sum", "mean", "seqmean"):
                cases.append(
                    Case(
                        kind,
                        reduction,
                        dtype,
                        alpha=alphas[i % 5],
                        labels=i % 3 != 2,
                        temperature=(1.0, 2.0, 0.7)[i % 3],
                        softcap=softcaps[(i // 2) % 4],
                        bias=i % 2 == 1,
                        chunk_rows=(3, 4, 64)[(i // 3) % 3],
                        frozen_weight=i % 7 == 3,
                    )
                )
                i += 1
    return cases


@pytest.mark.parametrize("case", _torch_cases(), ids=str)
def test_matches_float64_oracle_torch_backend(case):
    check_case(case)


@pytest.mark.parametrize("case", _torch_cases((torch.float64,), (0.1, "per_sequence", "per_token", 0.0, 1.0)), ids=str)
def test_float64_inputs_match_oracle_tightly(case):
    """With float64 inputs the op computes in float64: every option's arithmetic (chunking, soft-cap and
    its derivative, reductions, row weights) must agree with the oracle to ~1e-12, not just within the
    rounding noise of float32."""
    tensors, labels, alpha, grad_out = make_inputs(case)
    loss, grads = fused_result(case, tensors, labels, alpha, grad_out)
    oracle_loss, oracle_grads = reference_result(case, tensors, labels, alpha, grad_out, torch.float64)
    assert (loss.double() - oracle_loss).abs().max() <= 1e-12 * max(1.0, oracle_loss.abs().max().item())
    for name, grad in grads.items():
        assert grad.dtype == torch.float64, name
        error = (grad - oracle_grads[name]).abs().max().item()
        assert error <= 1e-12 * max(1.0, oracle_grads[name].abs().max().item()), (name, error)


def _triton_cases():
    return [
        Case("skl", "mean", torch.float32, softcap=4.0, bias=True, backend="triton"),
        Case("srkl", "none", torch.float32, alpha="per_token", temperature=2.0, backend="triton"),
        Case("srkl_detached", "seqmean", torch.bfloat16, alpha="per_sequence", softcap=(None, 3.0), backend="triton"),
        Case("skl", "sum", torch.bfloat16, labels=False, chunk_rows=4, frozen_weight=True, backend="triton"),
    ]


@needs_interpreter
@pytest.mark.parametrize("case", _triton_cases(), ids=str)
def test_matches_float64_oracle_triton_backend(case):
    check_case(case)


# The size of the wrong term, in units of the op's own evaluation bound at the summands' scale (step 5):
# about twice the smallest the rule detects in these cases (there, 1/4 unit in bfloat16, 4-8 in float32)
WRONG_TERM_SIZE = {torch.bfloat16: 1, torch.float32: 8}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("wrong", ["missing_alpha", "undetached_mixture"])
def test_rule_rejects_small_wrong_terms(wrong, dtype):
    """The rule must catch a hidden-state gradient that carries a small wrong term: SKL's α term missing
    (plain KL's gradient), or SRKL's gradient through the mixture added in a detached case, scaled to
    WRONG_TERM_SIZE units of `evaluation_bound` at the summands' scale S = max Σ_v |G_v||W_v|: 2 bfloat16
    ulps of S, or 8·(2 + ALLOWANCE_ULPS·(1 + max|z/T|)) ≈ 900 float32 ulps of S (~2e-4 of the largest
    entry; float32's resolution is the logits API's log-space allowance, module docstring)."""
    kind, wrong_case = {
        "missing_alpha": ("skl", dict(alpha=0.0)),
        "undetached_mixture": ("srkl_detached", dict(kind="srkl")),
    }[wrong]
    case = Case(kind, "mean", dtype, alpha=0.3, temperature=0.7, softcap=4.0, bias=True)
    tensors, labels, alpha, grad_out = make_inputs(case)
    _, grads = fused_result(case, tensors, labels, alpha, grad_out)
    _, oracle_grads = reference_result(case, tensors, labels, alpha, grad_out, torch.float64)
    wrong_case = dataclasses.replace(case, **wrong_case)
    _, wrong_grads = reference_result(wrong_case, tensors, labels, wrong_case.alpha, grad_out, torch.float64)
    bound = error_bounds(case, tensors, labels, alpha, grad_out).grads["student_hidden"]
    assert_within_bound("grad student_hidden", grads["student_hidden"], oracle_grads["student_hidden"], bound)

    direction = wrong_grads["student_hidden"] - oracle_grads["student_hidden"]
    logits_grad = oracle_grads["logits"].abs().reshape(-1, V)
    summands = (logits_grad @ tensors["student_weight"].double().abs()).max().item()
    cap_s, cap_t = _softcaps(case.softcap)
    magnitude = max(cap_s, cap_t) / case.temperature
    size = WRONG_TERM_SIZE[dtype] * evaluation_bound(dtype, magnitude, summands)
    wrong_grad = (grads["student_hidden"].double() + direction * (size / direction.abs().max())).to(dtype)
    with pytest.raises(AssertionError, match="grad student_hidden: error"):
        assert_within_bound("grad student_hidden", wrong_grad, oracle_grads["student_hidden"], bound)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "seqmean"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interpreter)])
def test_every_token_ignored(reduction, backend):
    case = Case("srkl", reduction, torch.float32, bias=True, backend=backend)
    tensors, _, alpha, grad_out = make_inputs(case)
    labels = torch.full((B, T), -100)
    loss, grads = fused_result(case, tensors, labels, alpha, grad_out)
    assert torch.equal(loss, torch.zeros_like(loss))
    for name, grad in grads.items():
        assert torch.equal(grad, torch.zeros_like(grad)), name


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_no_gradient_wanted(reduction):
    """Under no_grad (or with nothing requiring grad) the op only computes the loss."""
    case = Case("skl", reduction, torch.float32, softcap=4.0)
    tensors, labels, alpha, _ = make_inputs(case)
    ones = torch.ones(B, T) if reduction == "none" else torch.ones(())
    oracle_loss, _ = reference_result(case, tensors, labels, alpha, ones, torch.float64)
    with torch.no_grad():
        loss = dk.fused_linear_skl(
            tensors["student_hidden"], tensors["student_weight"].requires_grad_(), tensors["teacher_hidden"],
            tensors["teacher_weight"], alpha, labels=labels, softcap=4.0, reduction=reduction,
        )
    assert not loss.requires_grad
    assert_within_bound("loss", loss, oracle_loss, error_bounds(case, tensors, labels, alpha, ones).loss)


def test_only_weight_requires_grad():
    case = Case("srkl", "mean", torch.float32, bias=True)
    tensors, labels, alpha, grad_out = make_inputs(case)
    _, oracle_grads = reference_result(case, tensors, labels, alpha, grad_out, torch.float64)
    weight = tensors["student_weight"].clone().requires_grad_()
    loss = dk.fused_linear_srkl(
        tensors["student_hidden"], weight, tensors["teacher_hidden"], tensors["teacher_weight"], alpha,
        student_bias=tensors["student_bias"], teacher_bias=tensors["teacher_bias"], labels=labels,
    )
    loss.backward(grad_out)
    bound = error_bounds(case, tensors, labels, alpha, grad_out).grads["student_weight"]
    assert_within_bound("grad student_weight", weight.grad, oracle_grads["student_weight"], bound)


class _LargestLogitsBlock(TorchDispatchMode):
    """Records the most rows of any 2-D `[rows, V]` tensor an op produces."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[1] == self.vocab:
                self.rows = max(self.rows, t.shape[0])
        return out


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_never_builds_full_logits(reduction):
    n_tokens, vocab, chunk = 40, 53, 7
    # hidden sizes below the chunk, so the weights' transposed views [H, V] never look like logits blocks
    hidden, weight = torch.randn(n_tokens, 5, requires_grad=True), torch.randn(vocab, 5, requires_grad=True)
    teacher_hidden, teacher_weight = torch.randn(n_tokens, 6), torch.randn(vocab, 6)
    budget = _budget_for_rows(chunk, vocab, "torch", torch.float32)
    with _LargestLogitsBlock(vocab) as spy:
        loss = dk.fused_linear_skl(
            hidden, weight, teacher_hidden, teacher_weight, softcap=5.0, reduction=reduction,
            backend="torch", memory_budget_bytes=budget,
        )
        loss.sum().backward()
    assert 0 < spy.rows <= chunk


def test_alpha_and_labels_on_all_leading_shapes():
    """1-D hidden states (one token) and 3-D leading shapes go through like the logits API."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 3, 4, 8), torch.randn(11, 8)
    teacher_hidden, teacher_weight = torch.randn(2, 3, 4, 6), torch.randn(11, 6)
    per_token = dk.fused_linear_skl(hidden, weight, teacher_hidden, teacher_weight, reduction="none")
    logits_api = dk.fused_skl(hidden @ weight.T, teacher_hidden @ teacher_weight.T, reduction="none")
    assert per_token.shape == (2, 3, 4)
    assert torch.allclose(per_token, logits_api, atol=1e-6)
    one = dk.fused_linear_skl(hidden[0, 0, 0], weight, teacher_hidden[0, 0, 0], teacher_weight, reduction="none")
    assert one.shape == () and torch.allclose(one, per_token[0, 0, 0], atol=1e-6)


FUSED_BACKENDS = [
    "torch",
    pytest.param("cpu", marks=pytest.mark.skipif(cpu_backend.unavailable_reason() is not None, reason="no C++ backend")),
    pytest.param("triton", marks=needs_interpreter),
]


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("kind", ["skl", "srkl", "srkl_detached"])
@pytest.mark.parametrize("poison", ["student_hidden", "teacher_hidden", "teacher_weight"])
def test_nan_inputs_give_nan_rows(backend, kind, poison):
    """NaN in a counted row's hidden state gives that row a NaN loss and a NaN hidden gradient, the other
    rows unchanged; NaN in a vocabulary row of a weight makes every counted row NaN; NaN in an ignored row's
    hidden state changes nothing (the row stays exactly 0)."""
    case = Case(kind, "none", torch.float32, softcap=(None, 3.0), backend=backend)
    tensors, labels, alpha, grad_out = make_inputs(case)  # labels[0, 1] is ignored
    loss_clean, grads_clean = fused_result(case, tensors, labels, alpha, grad_out)
    poisoned = dict(tensors)
    poisoned[poison] = tensors[poison].clone()
    if poison == "teacher_weight":
        poisoned[poison][7, 3] = math.nan
        bad = labels != -100
    else:
        poisoned[poison][1, 2, 5] = math.nan  # a counted row
        poisoned[poison][0, 1, 0] = math.nan  # an ignored row
        bad = torch.zeros(B, T, dtype=torch.bool)
        bad[1, 2] = True
    loss, grads = fused_result(case, poisoned, labels, alpha, grad_out)
    assert loss[bad].isnan().all()
    assert torch.equal(loss[~bad], loss_clean[~bad])
    assert grads["student_hidden"][bad].isnan().all()
    assert torch.equal(grads["student_hidden"][~bad], grads_clean["student_hidden"][~bad])
    ignored_only = dict(tensors)
    ignored_only["student_hidden"] = tensors["student_hidden"].clone()
    ignored_only["student_hidden"][0, 1] = math.nan
    ignored_only["teacher_hidden"] = tensors["teacher_hidden"].clone()
    ignored_only["teacher_hidden"][0, 1] = math.inf
    loss, grads = fused_result(case, ignored_only, labels, alpha, grad_out)
    assert torch.equal(loss, loss_clean)
    for name, grad in grads.items():
        assert torch.equal(grad, grads_clean[name]), name


# ----------------------------------------------------------------------------------------------------
# By-products for the objective: per-token losses, label log-probabilities, the statistics-only pass
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["none", "seqmean"])
@pytest.mark.parametrize(
    "backend, dtype", [("torch", torch.float64), ("torch", torch.float32), pytest.param("triton", torch.float32, marks=needs_interpreter)]
)
def test_token_outputs_and_statistics(backend, dtype, reduction):
    """The label log-probabilities (from sweep 1, with and without the statistics-only pass) and the
    per-token losses against the float64 oracle; statistics passed back leave the loss and gradients as
    they are; nothing of it carries a gradient."""
    case = Case("srkl_detached", reduction, dtype, softcap=(5.0, 2.5), bias=True, temperature=0.7, backend=backend)
    tensors, labels, alpha, grad_out = make_inputs(case)
    inputs = {k: v.to(dtype) for k, v in tensors.items()}
    student = {k: inputs[k].clone().requires_grad_() for k in ("student_hidden", "student_weight")}
    args = (student["student_hidden"], student["student_weight"], inputs["teacher_hidden"], inputs["teacher_weight"])
    options = dict(
        student_bias=inputs["student_bias"], teacher_bias=inputs["teacher_bias"], labels=labels, temperature=0.7,
        softcap=(5.0, 2.5), backend=backend, memory_budget_bytes=_budget_for_rows(3, V, backend, dtype),
    )
    statistics = dk.fused_linear_token_statistics(*args, **options)
    plain = dk.fused_linear_srkl(*args, alpha, reduction=reduction, detach_mixture=True, **options)
    results = [
        dk.fused_linear_srkl(*args, alpha, reduction=reduction, detach_mixture=True, return_token_outputs=True, **options),
        dk.fused_linear_srkl(
            *args, alpha, reduction=reduction, detach_mixture=True, return_token_outputs=True, statistics=statistics,
            **options,
        ),
    ]

    z = {}
    for side, cap in (("student", 5.0), ("teacher", 2.5)):
        raw = tensors[f"{side}_hidden"].double() @ tensors[f"{side}_weight"].double().T + tensors[f"{side}_bias"].double()
        z[side] = cap * torch.tanh(raw / cap)
    valid = labels != -100
    expected_logprobs = torch.stack(
        [torch.log_softmax(z[side] / 0.7, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) for side in z],
        dim=-1,
    ) * valid.unsqueeze(-1)
    expected_losses = reference.srkl_reference(z["student"], z["teacher"], alpha, labels=labels, temperature=0.7, reduction="none")
    # float rounding in log space grows with the logits' magnitude (oracle.py's allowance)
    tolerance = 16 * torch.finfo(dtype).eps * (1 + max(z["student"].abs().max(), z["teacher"].abs().max()).item() / 0.7)
    assert statistics.label_logprobs.shape == (B, T, 2)
    assert (statistics.label_logprobs.double() - expected_logprobs).abs().max() <= tolerance
    torch.testing.assert_close(statistics.student_label_logprobs, statistics.label_logprobs[..., 0])
    plain_grads = torch.autograd.grad(plain, tuple(student.values()), grad_out.to(plain.dtype))
    for loss, outputs in results:
        assert not outputs.losses.requires_grad and not outputs.label_logprobs.requires_grad
        assert (outputs.label_logprobs.double() - expected_logprobs).abs().max() <= tolerance
        assert (outputs.losses.double() - expected_losses).abs().max() <= tolerance
        assert torch.equal(outputs.label_logprobs[~valid], torch.zeros_like(outputs.label_logprobs[~valid]))
        torch.testing.assert_close(loss, plain, rtol=4 * torch.finfo(dtype).eps, atol=0)
        grads = torch.autograd.grad(loss, tuple(student.values()), grad_out.to(loss.dtype))
        for ours, theirs in zip(grads, plain_grads):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=4 * torch.finfo(dtype).eps * theirs.abs().max().item())


@pytest.mark.parametrize("coefficients", [(1.0, 1.0), (0.0, 0.7)])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interpreter)])
def test_skl_plus_srkl_equals_the_two_ops(backend, coefficients):
    """c_t · SKL(_t) + c_s · SRKL(_s) in one op equals the two ops on their halves (float64 on the torch
    backend, to ~1e-12; float32 on triton) — loss, by-products, gradients of both hidden states, the shared
    weight and bias; a term weighted 0 still reports its losses."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    halves = []
    for seed in (0, 1):
        tensors, labels, _, _ = make_inputs(Case("skl", "seqmean", dtype, bias=True), seed=seed)
        halves.append(({k: v.to(dtype) for k, v in tensors.items()}, labels))
    (t_half, labels_t), (s_half, labels_s) = halves
    weight = t_half["student_weight"].clone().requires_grad_()
    bias = t_half["student_bias"].clone().requires_grad_()
    hidden_t = t_half["student_hidden"].clone().requires_grad_()
    hidden_s = s_half["student_hidden"].clone().requires_grad_()
    alpha_t, alpha_s = torch.tensor([0.05, 0.1]), torch.tensor([0.1, 0.01])
    common = dict(
        student_bias=bias, teacher_bias=t_half["teacher_bias"], softcap=(5.0, 2.5), temperature=0.7,
        reduction="seqmean", backend=backend, memory_budget_bytes=_budget_for_rows(3, V, backend, dtype),
        return_token_outputs=True,
    )
    skl, skl_outputs = dk.fused_linear_skl(
        hidden_t, weight, t_half["teacher_hidden"], t_half["teacher_weight"], alpha_t, labels=labels_t, **common
    )
    srkl, srkl_outputs = dk.fused_linear_srkl(
        hidden_s, weight, s_half["teacher_hidden"], t_half["teacher_weight"], alpha_s, labels=labels_s,
        detach_mixture=True, **common,
    )
    two_ops = coefficients[0] * skl + coefficients[1] * srkl
    expected_grads = torch.autograd.grad(two_ops, (hidden_t, hidden_s, weight, bias))
    common.pop("return_token_outputs")
    pair = fused_linear_skl_plus_srkl(
        hidden_t, t_half["teacher_hidden"], labels_t, hidden_s, s_half["teacher_hidden"], labels_s,
        student_weight=weight, teacher_weight=t_half["teacher_weight"], alpha_t=alpha_t, alpha_s=alpha_s,
        coefficients=coefficients, detach_mixture=True, **common,
    )
    # a term weighted 0 gives no gradient (None, materialised here as zeros)
    grads = torch.autograd.grad(pair.loss, (hidden_t, hidden_s, weight, bias), materialize_grads=True)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(pair.loss, two_ops, rtol=tolerance, atol=tolerance)
    for ours, theirs in zip((*pair.skl, *pair.srkl), (*skl_outputs, *srkl_outputs)):
        torch.testing.assert_close(ours, theirs, rtol=tolerance, atol=tolerance)
    for ours, theirs in zip(grads, expected_grads):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=tolerance * max(1.0, theirs.abs().max().item()))
    if coefficients[0] == 0:
        assert torch.equal(grads[0], torch.zeros_like(grads[0]))


def test_token_outputs_without_labels_and_bad_labels():
    args = _valid_args()
    loss, outputs = dk.fused_linear_skl(**args, reduction="sum", return_token_outputs=True)
    assert outputs.label_logprobs is None and outputs.losses.shape == (2, 3)
    torch.testing.assert_close(loss, outputs.losses.sum())
    with pytest.raises(ValueError, match="needs labels"):
        dk.fused_linear_token_statistics(**args, labels=None)
    with pytest.raises(ValueError, match=r"labels must be token ids in \[0, 11\)"):
        dk.fused_linear_token_statistics(**args, labels=torch.full((2, 3), 11))
    with pytest.raises(ValueError, match="statistics were computed for hidden states of leading shape"):
        statistics = dk.fused_linear_token_statistics(**args, labels=torch.zeros(2, 3, dtype=torch.long))
        dk.fused_linear_skl(**{**args, "student_hidden": torch.randn(3, 2, 8), "teacher_hidden": torch.randn(3, 2, 6)}, statistics=statistics)


# ----------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------


def _valid_args():
    return dict(
        student_hidden=torch.randn(2, 3, 8),
        student_weight=torch.randn(11, 8),
        teacher_hidden=torch.randn(2, 3, 6),
        teacher_weight=torch.randn(11, 6),
    )


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(student_hidden=torch.randn(2, 3, 7)), ValueError, "student_hidden has H = 7"),
        (dict(teacher_weight=torch.randn(11, 5)), ValueError, "teacher_hidden has H = 6"),
        (dict(teacher_weight=torch.randn(13, 6)), ValueError, "slice the larger one, e.g. teacher_weight[:11]"),
        (dict(student_weight=torch.randn(12, 8)), ValueError, "slice the larger one, e.g. student_weight[:11]"),
        (dict(student_weight=torch.randn(11, 8, 1)), ValueError, "lm_head weight of shape [V, H]"),
        (dict(teacher_hidden=torch.randn(2, 4, 6)), ValueError, "differ in their leading (token) dimensions"),
        (dict(student_hidden=torch.ones(2, 3, 8, dtype=torch.long)), TypeError, "student_hidden must be a floating"),
        (dict(teacher_weight=torch.randn(11, 6, requires_grad=True)), ValueError, "teacher_weight requires grad"),
        (dict(teacher_hidden=torch.randn(2, 3, 6, requires_grad=True)), ValueError, "teacher_hidden requires grad"),
        (dict(teacher_weight=torch.randn(11, 6, device="meta")), ValueError, "teacher_weight is on meta"),
        (dict(student_bias=torch.randn(12)), ValueError, "student_bias must have shape [V] = (11,)"),
        (dict(labels=torch.zeros(2, 4, dtype=torch.long)), ValueError, "the hidden states' leading shape (2, 3)"),
        (dict(alpha=torch.tensor([0.1, 0.2, 0.3])), ValueError, "a 1-D alpha is per sequence and needs length 2"),
        (dict(alpha=1.5), ValueError, "alpha must lie in [0, 1]"),
        (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
        (dict(softcap=-1.0), ValueError, "softcap must be a finite number > 0"),
        (dict(softcap=(1.0, 2.0, 3.0)), ValueError, "(student, teacher) pair"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(memory_budget_bytes=0), ValueError, "memory_budget_bytes must be > 0"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
    ],
)
def test_validation_messages(change, error, message):
    kwargs = {**_valid_args(), **change}
    with pytest.raises(error) as info:
        dk.fused_linear_skl(**kwargs)
    assert message in str(info.value)


def test_seqmean_needs_batch_and_time():
    args = {k: (v[0] if "hidden" in k else v) for k, v in _valid_args().items()}
    with pytest.raises(ValueError, match=r"needs hidden states of shape \[B, T, H\]"):
        dk.fused_linear_srkl(**args, reduction="seqmean")


# ----------------------------------------------------------------------------------------------------
# CUDA (runs only where a GPU is present)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_cuda_triton_matches_cpu(dtype, reduction):
    case = Case("srkl", reduction, dtype, softcap=4.0, bias=True, alpha="per_token")
    tensors, labels, alpha, grad_out = make_inputs(case)
    cuda = {k: (None if v is None else v.cuda()) for k, v in tensors.items()}
    on_cuda = dataclasses.replace(case, backend="triton")
    loss, grads = fused_result(on_cuda, cuda, labels.cuda(), alpha.cuda(), grad_out.cuda())
    oracle_loss, oracle_grads = reference_result(case, tensors, labels, alpha, grad_out, torch.float64)
    bounds = error_bounds(case, tensors, labels, alpha, grad_out, rounds_logits_gradient=dtype != torch.float32)
    assert_within_bound("loss", loss.cpu(), oracle_loss, bounds.loss)
    for name, grad in grads.items():
        assert_within_bound(f"grad {name}", grad.cpu(), oracle_grads[name], bounds.grads[name])
