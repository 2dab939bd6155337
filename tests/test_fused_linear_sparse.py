"""The fused-linear ops against a sparse teacher (`teacher_hidden=SparseTeacher`, `teacher_weight=None`).

Oracle: the student's logits z = softcap(h Wᵀ + b) in float64 on the very input values, the teacher densified
in float64 (`reference.densify_sparse_teacher`: the stored T = 1 log-probabilities on the support, the tail's
per-token log-mass or −inf elsewhere), then the dense `reference.skl_reference` / `srkl_reference` on them,
gradients by autograd. Tolerance: the rule of tests/test_fused_linear.py (docs/design.md §6), its
`error_bounds` with the teacher's logits replaced by the exact densified log-probabilities (error 0: the
teacher is not computed, only read).

The teachers are the top-k of a random dense teacher (k < V, and k = V), with the label among the ids in some
rows (as `distillm2 score` stores it) and not in others, the ids in no particular order, with and without a
stored tail log-mass.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from test_fused_linear import (
    B,
    H_S,
    H_T,
    T,
    V,
    Case,
    _Logits,
    _softcaps,
    assert_within_bound,
    error_bounds,
    make_inputs,
)

import distillm2_kernels as dk
from distillm2_kernels import reference
from distillm2_kernels.fused_linear import LIVE_ROW_TENSORS, chunk_rows, fused_linear_skl_plus_srkl
from distillm2_kernels.objective import DistiLLM2Loss, distillm2_loss, distillm2_loss_from_hidden
from distillm2_kernels.sparse_teacher import SparseTeacher


@dataclasses.dataclass(frozen=True)
class SparseCase(Case):
    tail: str = "renormalize"
    k: int = 7
    stored_tail: bool = True  # the teacher carries tail_logprob (else it is 1 − Σ exp(logprobs))


def make_sparse_teacher(
    tensors, labels, k: int, stored_tail: bool, seed: int = 0, label_in_support: str = "first"
) -> SparseTeacher:
    """The top-k of the dense teacher `softmax(h_t W_tᵀ)`, ids shuffled within each row; the label is put
    into the support (in place of the k-th id) in the first counted row of each sequence
    (`label_in_support="first"`), or in every row ("all", as `distillm2 score` stores it)."""
    g = torch.Generator().manual_seed(seed + 1)
    log_p = torch.log_softmax(tensors["teacher_hidden"].double() @ tensors["teacher_weight"].double().T, -1)
    ids = log_p.topk(k, dim=-1).indices
    if labels is not None and k < V:
        for b in range(B):
            counted = (labels[b] != -100).nonzero()[:, 0].tolist()
            for t in counted[:1] if label_in_support == "first" else counted:
                if not (ids[b, t] == labels[b, t]).any():
                    ids[b, t, -1] = labels[b, t]
    order = torch.rand(ids.shape, generator=g).argsort(-1)
    ids = ids.gather(-1, order)
    logprobs = log_p.gather(-1, ids)
    tail = None
    if stored_tail:
        off_support = log_p.scatter(-1, ids, float("-inf"))
        tail = torch.logsumexp(off_support, -1).float()  # −inf for k = V
    return SparseTeacher(ids, logprobs.float(), tail)


def densified(teacher: SparseTeacher, tail: str) -> torch.Tensor:
    """The float64 T = 1 teacher log-probabilities `[B, T, V]` the oracle runs on."""
    return reference.densify_sparse_teacher(teacher.ids, teacher.logprobs, V, tail, teacher.tail_logprob)


def sparse_budget(rows: int, dtype: torch.dtype) -> int:
    """The memory budget that makes the op take `rows` rows per GEMM chunk (the torch sparse sweeps declare no
    per-row temporaries)."""
    element = 8 if dtype == torch.float64 else 4
    budget = rows * LIVE_ROW_TENSORS * element * V
    assert chunk_rows(V, budget, element, 0)[0] == rows
    return budget


def oracle_result(case: SparseCase, tensors, teacher: SparseTeacher, labels, alpha, grad_out):
    """Loss and student gradients, float64, from the materialised student logits and the densified teacher."""
    student = {k: tensors[k].double().clone().requires_grad_() for k in ("student_hidden", "student_weight")}
    if case.bias:
        student["student_bias"] = tensors["student_bias"].double().clone().requires_grad_()
    cap_s, _ = _softcaps(case.softcap)
    z = student["student_hidden"] @ student["student_weight"].T
    if case.bias:
        z = z + student["student_bias"]
    if cap_s is not None:
        z = cap_s * torch.tanh(z / cap_s)
    alpha = alpha.double() if isinstance(alpha, torch.Tensor) else alpha
    options = dict(labels=labels, temperature=case.temperature, reduction=case.reduction)
    dense = densified(teacher, case.tail)
    if case.kind == "skl":
        loss = reference.skl_reference(z, dense, alpha, **options)
    else:
        loss = reference.srkl_reference(z, dense, alpha, detach_mixture=case.kind == "srkl_detached", **options)
    loss.backward(grad_out.double())
    return loss.detach(), {k: v.grad for k, v in student.items()}


def fused_result(case: SparseCase, tensors, teacher: SparseTeacher, labels, alpha, grad_out, **extra):
    inputs = {k: (None if v is None else v.to(case.dtype, copy=True)) for k, v in tensors.items()}
    trainable = ["student_hidden"] + ([] if case.frozen_weight else ["student_weight"])
    trainable += ["student_bias"] if case.bias else []
    for k in trainable:
        inputs[k].requires_grad_()
    kwargs = dict(
        student_bias=inputs["student_bias"], labels=labels, temperature=case.temperature, softcap=case.softcap,
        reduction=case.reduction, backend=case.backend, teacher_tail=case.tail,
        memory_budget_bytes=sparse_budget(case.chunk_rows, case.dtype), **extra,
    )
    args = (inputs["student_hidden"], inputs["student_weight"], teacher, None)
    if case.kind == "skl":
        loss = dk.fused_linear_skl(*args, alpha, **kwargs)
    else:
        loss = dk.fused_linear_srkl(*args, alpha, detach_mixture=case.kind == "srkl_detached", **kwargs)
    loss.backward(grad_out)
    return loss.detach(), {k: inputs[k].grad for k in trainable}


def sparse_error_bounds(case: SparseCase, tensors, teacher: SparseTeacher, labels, alpha, grad_out):
    """`test_fused_linear.error_bounds` with the exact densified teacher in place of the teacher's logits."""
    dense = densified(teacher, case.tail).reshape(B * T, V)
    return error_bounds(case, tensors, labels, alpha, grad_out, teacher=_Logits(dense, torch.zeros_like(dense)))


def case_inputs(case: SparseCase, seed: int = 0, label_in_support: str = "first"):
    tensors, labels, alpha, grad_out = make_inputs(case, seed)
    if case.kind != "skl" and case.tail == "renormalize" and isinstance(alpha, torch.Tensor):
        alpha = alpha.clamp(min=0.01)  # a zero α makes SRKL +inf off the support (tested on its own)
    teacher = make_sparse_teacher(tensors, labels, case.k, case.stored_tail, seed, label_in_support)
    return tensors, teacher, labels, alpha, grad_out


def check_case(case: SparseCase):
    tensors, teacher, labels, alpha, grad_out = case_inputs(case)
    loss, grads = fused_result(case, tensors, teacher, labels, alpha, grad_out)
    oracle_loss, oracle_grads = oracle_result(case, tensors, teacher, labels, alpha, grad_out)
    bounds = sparse_error_bounds(case, tensors, teacher, labels, alpha, grad_out)
    assert loss.dtype == torch.float32
    assert_within_bound("loss", loss, oracle_loss, bounds.loss)
    if case.frozen_weight:
        assert "student_weight" not in grads
    for name, grad in grads.items():
        assert grad.dtype == case.dtype, f"{name} grad dtype {grad.dtype}"
        assert_within_bound(f"grad {name}", grad, oracle_grads[name], bounds.grads[name])
    if labels is not None:  # ignored tokens get exactly zero hidden gradient
        assert (grads["student_hidden"][labels == -100] == 0).all()


def _cases(dtypes=(torch.float32, torch.bfloat16), alphas=(0.1, "per_sequence", "per_token", 0.0, 0.9, 1.0)):
    """Every loss × reduction × tail, the other options cycling so each value meets several others."""
    softcaps = [None, 4.0, (3.0, None)]
    cases = []
    i = 0
    for dtype in dtypes:
        for kind in ("skl", "srkl", "srkl_detached"):
            for reduction in ("none", "sum", "mean", "seqmean"):
                for tail in ("renormalize", "uniform"):
                    alpha = alphas[i % len(alphas)]
                    if alpha == 0.0 and kind != "skl" and tail == "renormalize":
                        alpha = 0.05
                    cases.append(SparseCase(
                        kind, reduction, dtype, alpha=alpha, labels=i % 3 != 2, temperature=(1.0, 2.0, 0.7)[i % 3],
                        softcap=softcaps[(i // 2) % 3], bias=i % 4 == 1, chunk_rows=(3, 4, 64)[(i // 3) % 3],
                        frozen_weight=i % 7 == 3, tail=tail, k=(7, 1, V)[(i // 5) % 3] if i % 5 == 0 else 7,
                        stored_tail=i % 4 != 2,
                    ))
                    i += 1
    return cases[::2] if dtypes == (torch.bfloat16,) else cases


@pytest.mark.parametrize("case", _cases((torch.float32,)) + _cases((torch.bfloat16,)), ids=str)
def test_matches_float64_oracle(case):
    check_case(case)


@pytest.mark.parametrize("case", _cases((torch.float64,), (0.1, "per_sequence", "per_token", 0.0, 1.0))[::3], ids=str)
def test_float64_inputs_match_oracle_tightly(case):
    """float64 inputs are computed in float64 (the torch sparse sweeps): the op's arithmetic (chunking, the
    support and tail terms, the soft-cap, the reductions) agrees with the oracle to ~1e-12."""
    tensors, teacher, labels, alpha, grad_out = case_inputs(case)
    loss, grads = fused_result(case, tensors, teacher, labels, alpha, grad_out)
    oracle_loss, oracle_grads = oracle_result(case, tensors, teacher, labels, alpha, grad_out)
    assert (loss.double() - oracle_loss).abs().max() <= 1e-12 * max(1.0, oracle_loss.abs().max().item())
    for name, grad in grads.items():
        assert grad.dtype == torch.float64, name
        error = (grad - oracle_grads[name]).abs().max().item()
        assert error <= 1e-12 * max(1.0, oracle_grads[name].abs().max().item()), (name, error)


def test_k_equal_to_vocabulary_is_the_dense_op():
    """k = V: no tail; both tail modes give the dense op on the teacher's log-probabilities as logits."""
    case = SparseCase("srkl", "mean", torch.float64, alpha=0.3, temperature=0.7, k=V)
    tensors, teacher, labels, alpha, grad_out = case_inputs(case)
    dense_teacher = densified(teacher, "renormalize")
    expected = dk.fused_srkl(
        tensors["student_hidden"].double() @ tensors["student_weight"].double().T, dense_teacher, 0.3,
        labels=labels, temperature=0.7, backend="torch",
    )
    for tail in ("renormalize", "uniform"):
        loss, _ = fused_result(dataclasses.replace(case, tail=tail), tensors, teacher, labels, alpha, grad_out)
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "seqmean"])
@pytest.mark.parametrize("tail", ["renormalize", "uniform"])
def test_every_token_ignored(reduction, tail):
    case = SparseCase("srkl", reduction, torch.float32, bias=True, tail=tail)
    tensors, teacher, _, alpha, grad_out = case_inputs(case)
    labels = torch.full((B, T), -100)
    loss, grads = fused_result(case, tensors, teacher, labels, alpha, grad_out)
    assert torch.equal(loss, torch.zeros_like(loss))
    for name, grad in grads.items():
        assert torch.equal(grad, torch.zeros_like(grad)), name


@pytest.mark.parametrize("reduction", ["none", "seqmean"])
def test_chunking_does_not_change_the_result(reduction, monkeypatch):
    """One row per chunk, three, or all of them, and a backend with per-row temporaries of its own (called on
    sub-blocks of a chunk): the same loss and gradients (float64, to rounding)."""
    from distillm2_kernels.backends import torch_sparse

    case = SparseCase("skl", reduction, torch.float64, alpha="per_token", softcap=4.0, bias=True, tail="uniform")
    tensors, teacher, labels, alpha, grad_out = case_inputs(case)
    results = [
        fused_result(dataclasses.replace(case, chunk_rows=rows), tensors, teacher, labels, alpha, grad_out)
        for rows in (1, 3, 64)
    ]
    monkeypatch.setattr(torch_sparse, "ROW_TEMPORARIES", 6, raising=False)
    element = 8
    assert chunk_rows(V, sparse_budget(4, torch.float64), element, 6) == (2, 1)  # chunks of 2, blocks of 1
    results.append(fused_result(dataclasses.replace(case, chunk_rows=4), tensors, teacher, labels, alpha, grad_out))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-13, atol=1e-14)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, results[0][1][name], rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_never_builds_a_vocabulary_sized_block_beyond_a_chunk(reduction):
    from test_fused_linear import _LargestLogitsBlock

    n_tokens, vocab, chunk, k = 40, 53, 7, 5
    hidden, weight = torch.randn(n_tokens, 4, requires_grad=True), torch.randn(vocab, 4, requires_grad=True)
    ids = torch.rand(n_tokens, vocab).argsort(-1)[:, :k]
    logprobs = torch.log_softmax(torch.randn(n_tokens, k), -1) - 0.5
    element = 4
    budget = chunk * LIVE_ROW_TENSORS * element * vocab
    with _LargestLogitsBlock(vocab) as spy:
        loss = dk.fused_linear_skl(
            hidden, weight, SparseTeacher(ids, logprobs), None, softcap=5.0, reduction=reduction, backend="torch",
            memory_budget_bytes=budget, teacher_tail="uniform",
        )
        loss.sum().backward()
    assert 0 < spy.rows <= chunk


def test_no_gradient_wanted():
    case = SparseCase("srkl", "mean", torch.float32, softcap=4.0, tail="uniform")
    tensors, teacher, labels, alpha, _ = case_inputs(case)
    ones = torch.ones(())
    oracle_loss, _ = oracle_result(case, tensors, teacher, labels, alpha, ones)
    with torch.no_grad():
        loss = dk.fused_linear_srkl(
            tensors["student_hidden"], tensors["student_weight"].requires_grad_(), teacher, None, alpha, labels=labels,
            softcap=4.0, teacher_tail="uniform",
        )
    assert not loss.requires_grad
    bound = sparse_error_bounds(case, tensors, teacher, labels, alpha, ones).loss
    assert_within_bound("loss", loss, oracle_loss, bound)


def test_tuple_teacher_and_alpha_zero_rows():
    """An (ids, logprobs[, tail]) tuple is a sparse teacher; a tensor α with zeros makes renormalized SRKL +inf
    in those rows only (the dense op's behaviour with −inf teacher logits), the others as with α elsewhere."""
    case = SparseCase("srkl", "none", torch.float32)
    tensors, teacher, labels, _, _ = case_inputs(case)
    args = (tensors["student_hidden"], tensors["student_weight"])
    as_tuple = dk.fused_linear_srkl(*args, (teacher.ids, teacher.logprobs), None, 0.2, reduction="none")
    as_object = dk.fused_linear_srkl(*args, SparseTeacher(teacher.ids, teacher.logprobs), None, 0.2, reduction="none")
    assert torch.equal(as_tuple, as_object)
    alpha = torch.full((B, T), 0.2)
    alpha[1, 3] = 0.0
    loss = dk.fused_linear_srkl(*args, teacher, None, alpha, reduction="none")
    assert loss[1, 3] == math.inf
    finite = torch.ones(B, T, dtype=torch.bool)
    finite[1, 3] = False
    plain = dk.fused_linear_srkl(*args, teacher, None, 0.2, reduction="none")
    assert torch.equal(loss[finite], plain[finite])


# ----------------------------------------------------------------------------------------------------
# By-products: per-token losses, label log-probabilities, the statistics-only pass, the pair
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tail", ["renormalize", "uniform"])
@pytest.mark.parametrize("reduction", ["none", "seqmean"])
def test_token_outputs_and_statistics(tail, reduction):
    """Label log-probabilities (the loss's by-product and the statistics-only pass) and per-token losses against
    the float64 oracle, a label outside the support included (log c uniform, −inf renormalize); statistics
    passed back (skipping the log-sum-exp sweep) leave the loss and gradients as they are."""
    dtype = torch.float64
    case = SparseCase("srkl_detached", reduction, dtype, softcap=5.0, bias=True, temperature=0.7, tail=tail)
    tensors, teacher, labels, alpha, grad_out = case_inputs(case)
    inputs = {k: v.to(dtype) for k, v in tensors.items()}
    student = {k: inputs[k].clone().requires_grad_() for k in ("student_hidden", "student_weight")}
    args = (student["student_hidden"], student["student_weight"], teacher, None)
    options = dict(
        student_bias=inputs["student_bias"], labels=labels, temperature=0.7, softcap=5.0, backend="torch",
        memory_budget_bytes=sparse_budget(3, dtype), teacher_tail=tail,
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
    raw = tensors["student_hidden"].double() @ tensors["student_weight"].double().T + tensors["student_bias"].double()
    z_s = 5.0 * torch.tanh(raw / 5.0)
    dense = densified(teacher, tail)
    valid = labels != -100
    index = labels.clamp(min=0).unsqueeze(-1)
    expected_logprobs = torch.stack(
        [torch.log_softmax(z / 0.7, -1).gather(-1, index).squeeze(-1) for z in (z_s, dense)], dim=-1
    )
    expected_logprobs = torch.where(valid.unsqueeze(-1), expected_logprobs, 0.0)
    in_support = (teacher.ids == index).any(-1)
    assert (valid & ~in_support).any() and (valid & in_support).any()  # both kinds of label are exercised
    if tail == "renormalize":
        assert (expected_logprobs[..., 1][valid & ~in_support] == -math.inf).all()
    expected_losses = reference.srkl_reference(z_s, dense, alpha, labels=labels, temperature=0.7, reduction="none")

    def close(actual, expected):
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)

    close(statistics.label_logprobs, expected_logprobs)
    plain_grads = torch.autograd.grad(plain, tuple(student.values()), grad_out.to(plain.dtype))
    for loss, outputs in results:
        assert not outputs.losses.requires_grad and not outputs.label_logprobs.requires_grad
        close(outputs.label_logprobs, expected_logprobs)
        close(outputs.losses, expected_losses)
        close(loss, plain)
        grads = torch.autograd.grad(loss, tuple(student.values()), grad_out.to(loss.dtype))
        for ours, theirs in zip(grads, plain_grads):
            close(ours, theirs)


@pytest.mark.parametrize("coefficients", [(1.0, 1.0), (0.0, 0.7)])
def test_skl_plus_srkl_equals_the_two_ops(coefficients):
    """The pair op against sparse teachers equals the two ops on their halves (float64, ~1e-12): loss,
    by-products, gradients of both hidden states, the shared weight and bias."""
    dtype = torch.float64
    halves = []
    for seed in (0, 1):
        case = SparseCase("skl", "seqmean", dtype, bias=True, tail="uniform")
        tensors, teacher, labels, _, _ = case_inputs(case, seed)
        halves.append(({k: v.to(dtype) for k, v in tensors.items()}, teacher, labels))
    (t_half, teacher_t, labels_t), (s_half, teacher_s, labels_s) = halves
    weight = t_half["student_weight"].clone().requires_grad_()
    bias = t_half["student_bias"].clone().requires_grad_()
    hidden_t = t_half["student_hidden"].clone().requires_grad_()
    hidden_s = s_half["student_hidden"].clone().requires_grad_()
    alpha_t, alpha_s = torch.tensor([0.05, 0.1]), torch.tensor([0.1, 0.01])
    common = dict(
        student_bias=bias, softcap=(5.0, None), temperature=0.7, reduction="seqmean", backend="torch",
        memory_budget_bytes=sparse_budget(3, dtype), teacher_tail="uniform",
    )
    skl, skl_outputs = dk.fused_linear_skl(
        hidden_t, weight, teacher_t, None, alpha_t, labels=labels_t, return_token_outputs=True, **common
    )
    srkl, srkl_outputs = dk.fused_linear_srkl(
        hidden_s, weight, teacher_s, None, alpha_s, labels=labels_s, detach_mixture=True, return_token_outputs=True,
        **common,
    )
    two_ops = coefficients[0] * skl + coefficients[1] * srkl
    expected_grads = torch.autograd.grad(two_ops, (hidden_t, hidden_s, weight, bias))
    pair = fused_linear_skl_plus_srkl(
        hidden_t, teacher_t, labels_t, hidden_s, teacher_s, labels_s, student_weight=weight, alpha_t=alpha_t,
        alpha_s=alpha_s, coefficients=coefficients, detach_mixture=True, **common,
    )
    grads = torch.autograd.grad(pair.loss, (hidden_t, hidden_s, weight, bias), materialize_grads=True)
    torch.testing.assert_close(pair.loss, two_ops, rtol=1e-12, atol=1e-12)
    for ours, theirs in zip((*pair.skl, *pair.srkl), (*skl_outputs, *srkl_outputs)):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    for ours, theirs in zip(grads, expected_grads):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12 * max(1.0, theirs.abs().max().item()))
    if coefficients[0] == 0:
        assert torch.equal(grads[0], torch.zeros_like(grads[0]))


# ----------------------------------------------------------------------------------------------------
# The objective from hidden states with sparse teachers
# ----------------------------------------------------------------------------------------------------


def _objective_halves(tail: str):
    """Two halves (student hidden states, sparse teacher, labels) in float64 and the shared student lm_head."""
    halves = []
    for seed in (0, 1):
        case = SparseCase("skl", "seqmean", torch.float64, tail=tail)
        tensors, teacher, labels, _, _ = case_inputs(case, seed, label_in_support="all")
        halves.append((tensors["student_hidden"].double().requires_grad_(), teacher, labels))
    gen = torch.Generator().manual_seed(5)
    weight = (torch.randn(V, H_S, generator=gen, dtype=torch.float64) * 3 / math.sqrt(H_S)).requires_grad_()
    return halves, weight


@pytest.mark.parametrize("tail", ["renormalize", "uniform"])
@pytest.mark.parametrize("preset", ["distillm2", "paper", "distillm"])
def test_objective_from_hidden_equals_the_logits_objective(preset, tail):
    """`DistiLLM2Loss.from_hidden` with sparse teachers equals `DistiLLM2Loss` on the student's logits h Wᵀ and
    the densified teachers' log-probabilities as dense teacher logits, over three epochs (the paper preset's
    adaptive α from the second, read from the sparse statistics): loss, every metric, gradients."""
    halves, weight = _objective_halves(tail)
    (base_t, teacher_t, labels_t), (base_s, teacher_s, labels_s) = halves
    dense_t, dense_s = densified(teacher_t, tail), densified(teacher_s, tail)
    kwargs = dict(num_epochs=3, total_steps=6, backend="torch", temperature=0.8)
    from_hidden, from_logits = DistiLLM2Loss(preset, teacher_tail=tail, **kwargs), DistiLLM2Loss(preset, **kwargs)
    for epoch in range(3):
        from_hidden.set_epoch(epoch)
        from_logits.set_epoch(epoch)
        # the student moves between epochs, so that the adaptive α leaves α₀
        h_t, h_s = ((h * (1 + 0.5 * epoch)).detach().requires_grad_() for h in (base_t, base_s))
        loss, metrics = from_hidden.from_hidden(
            h_t, teacher_t, labels_t, h_s, teacher_s, labels_s, student_weight=weight, teacher_weight=None,
            memory_budget_bytes=sparse_budget(3, torch.float64),
        )
        grads = torch.autograd.grad(loss, (h_t, h_s, weight), materialize_grads=True)  # β = 1: SKL weighs 0
        expected, expected_metrics = from_logits(h_t @ weight.T, dense_t, labels_t, h_s @ weight.T, dense_s, labels_s)
        expected_grads = torch.autograd.grad(expected, (h_t, h_s, weight), materialize_grads=True)
        torch.testing.assert_close(loss, expected, rtol=1e-11, atol=1e-12)
        assert metrics.keys() == expected_metrics.keys()
        for name in metrics:
            torch.testing.assert_close(metrics[name].double(), expected_metrics[name].double(), rtol=1e-10, atol=1e-12, msg=name)
        for ours, theirs in zip(grads, expected_grads):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-11 * max(1.0, theirs.abs().max().item()))
        from_hidden.step()
        from_logits.step()
    if preset == "paper":
        assert not torch.equal(metrics["alpha_t"], torch.full_like(metrics["alpha_t"], 0.1))


def test_objective_function_form_and_dense_teacher_tail_error():
    halves, weight = _objective_halves("uniform")
    (h_t, teacher_t, labels_t), (h_s, teacher_s, labels_s) = halves
    loss, _ = distillm2_loss_from_hidden(
        h_t, teacher_t, labels_t, h_s, teacher_s, labels_s, student_weight=weight, teacher_tail="uniform",
        backend="torch",
    )
    expected, _ = distillm2_loss(
        h_t @ weight.T, densified(teacher_t, "uniform"), labels_t, h_s @ weight.T, densified(teacher_s, "uniform"),
        labels_s, backend="torch",
    )
    torch.testing.assert_close(loss, expected, rtol=1e-11, atol=1e-12)
    with pytest.raises(ValueError, match="must both be sparse teachers or both hidden states"):
        distillm2_loss_from_hidden(
            h_t, teacher_t, labels_t, h_s, torch.randn(B, T, H_T, dtype=torch.float64), labels_s,
            student_weight=weight, teacher_weight=torch.randn(V, H_T, dtype=torch.float64),
        )


# ----------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------


def _valid_args():
    ids = torch.stack([torch.randperm(11)[:4] for _ in range(6)]).view(2, 3, 4)
    return dict(
        student_hidden=torch.randn(2, 3, 8),
        student_weight=torch.randn(11, 8),
        teacher_hidden=SparseTeacher(ids, torch.log_softmax(torch.randn(2, 3, 4), -1) - 1.0),
        teacher_weight=None,
    )


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(teacher_weight=torch.randn(11, 6)), ValueError, "teacher_weight must be None with a sparse teacher"),
        (dict(teacher_bias=torch.randn(11)), ValueError, "teacher_bias must be None with a sparse teacher"),
        (dict(softcap=(4.0, 3.0)), ValueError, "a sparse teacher gives log-probabilities, not logits"),
        (dict(teacher_tail="spread"), ValueError, "teacher_tail must be one of"),
        (dict(teacher_hidden=SparseTeacher(torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(2, 4, 4))), ValueError,
         "with the hidden states' leading shape (2, 3)"),
        (dict(teacher_hidden=SparseTeacher(torch.full((2, 3, 1), 11), torch.zeros(2, 3, 1))), ValueError,
         "ids must lie in [0, 11)"),
        (dict(teacher_hidden=SparseTeacher(torch.zeros(2, 3, 2, dtype=torch.long), torch.zeros(2, 3, 2))), ValueError,
         "distinct"),
        (dict(teacher_hidden=SparseTeacher(torch.zeros(2, 3, 1, dtype=torch.long), torch.zeros(2, 3, 1, requires_grad=True))),
         ValueError, "require grad"),
        (dict(student_weight=torch.randn(11, 7)), ValueError, "student_hidden has H = 8"),
    ],
)
def test_validation_messages(change, error, message):
    kwargs = {**_valid_args(), **change}
    with pytest.raises(error) as info:
        dk.fused_linear_skl(**kwargs)
    assert message in str(info.value)


def test_srkl_renormalize_alpha_zero_and_dense_teacher_tail():
    args = _valid_args()
    with pytest.raises(ValueError, match=r"SRKL with teacher_tail='renormalize' and alpha = 0 is \+inf"):
        dk.fused_linear_srkl(**args, alpha=0.0)
    assert torch.isfinite(dk.fused_linear_srkl(**args, alpha=0.0, teacher_tail="uniform"))
    assert torch.isfinite(dk.fused_linear_skl(**args, alpha=0.0))  # SKL at α = 0 is KL(p ‖ q): finite
    dense = dict(args, teacher_hidden=torch.randn(2, 3, 6), teacher_weight=torch.randn(11, 6))
    with pytest.raises(ValueError, match="applies to a sparse teacher"):
        dk.fused_linear_skl(**dense, teacher_tail="uniform")
    with pytest.raises(ValueError, match="applies to a sparse teacher"):
        dk.fused_linear_token_statistics(**dense, labels=torch.zeros(2, 3, dtype=torch.long), teacher_tail="uniform")
    with pytest.raises(ValueError, match="a sparse teacher gives log-probabilities"):
        dk.fused_linear_token_statistics(**args, labels=torch.zeros(2, 3, dtype=torch.long), softcap=(None, 2.0))


def test_sparse_statistics_are_refused_by_the_dense_op():
    """fused_linear_token_statistics of a sparse teacher fill the student's columns only: the dense op refuses
    them rather than read zeros as the teacher's statistics."""
    args = _valid_args()
    labels = torch.zeros(2, 3, dtype=torch.long)
    stats = dk.fused_linear_token_statistics(**args, labels=labels)
    assert stats.sparse_teacher
    dense = dict(args, teacher_hidden=torch.randn(2, 3, 6), teacher_weight=torch.randn(11, 6))
    with pytest.raises(ValueError, match="computed against a sparse teacher"):
        dk.fused_linear_skl(**dense, labels=labels, statistics=stats)
    torch.testing.assert_close(dk.fused_linear_skl(**args, labels=labels, statistics=stats),
                               dk.fused_linear_skl(**args, labels=labels), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------
# The trainer's objective with a sparse teacher
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tail", ["renormalize", "uniform"])
@pytest.mark.parametrize("loss_name", ["distillm2", "skl", "kd", "srkl"])
def test_training_objective_with_a_sparse_teacher(loss_name, tail):
    """`TrainingObjective` with a SparseTeacher `[R, T, K]` (unshifted, no teacher lm_head) equals it with a
    dense teacher whose lm_head gives the densified teacher's log-probabilities as logits (hidden states = the
    densified log-probabilities, lm_head = the identity; −inf as −1e4, whose probability is exactly 0 in
    float64): loss, metrics, the student's gradients."""
    from distillm2_kernels.trainer.models import LMHead
    from distillm2_kernels.trainer.objectives import TrainingObjective

    num_pairs, length, k = 2, 6, 7
    rows = 2 * num_pairs
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(rows, length, H_S, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(V, H_S, generator=gen, dtype=torch.float64) / math.sqrt(H_S)).requires_grad_()
    labels = torch.randint(0, V, (rows, length), generator=gen)
    labels[:, :2] = -100  # the prompt
    labels[1, -1] = -100  # padding
    teacher_log_p = torch.log_softmax(torch.randn(rows, length, V, generator=gen, dtype=torch.float64) * 2, -1)
    ids = teacher_log_p.topk(k, -1).indices
    # position j predicts label j + 1: the cache stores that label among the ids
    next_labels = torch.cat([labels[:, 1:], torch.full((rows, 1), -100)], 1)
    missing = (next_labels != -100) & ~(ids == next_labels.unsqueeze(-1)).any(-1)
    ids[..., -1] = torch.where(missing, next_labels, ids[..., -1])
    tail_logprob = torch.logsumexp(teacher_log_p.scatter(-1, ids, float("-inf")), -1)
    teacher = SparseTeacher(ids, teacher_log_p.gather(-1, ids), tail_logprob)
    dense = reference.densify_sparse_teacher(ids, teacher.logprobs, V, tail, tail_logprob).clamp(min=-1e4)
    student_head = LMHead(weight, None, 3.0)

    results = []
    for teacher_input, teacher_head in ((teacher, None), (dense, LMHead(torch.eye(V, dtype=torch.float64), None, None))):
        objective = TrainingObjective(loss_name, "distillm2", backend="torch", teacher_tail=tail)
        loss, metrics = objective(hidden, teacher_input, labels, num_pairs, student_head, teacher_head)
        grads = torch.autograd.grad(loss, (hidden, weight))
        results.append((loss, metrics, grads))
    (loss, metrics, grads), (expected, expected_metrics, expected_grads) = results
    torch.testing.assert_close(loss, expected, rtol=1e-11, atol=1e-12)
    assert metrics.keys() == expected_metrics.keys()
    for name in metrics:
        torch.testing.assert_close(metrics[name].double(), expected_metrics[name].double(), rtol=1e-10, atol=1e-12, msg=name)
    for ours, theirs in zip(grads, expected_grads):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-11 * max(1.0, theirs.abs().max().item()))


def test_training_objective_checks_the_teacher_head():
    from distillm2_kernels.trainer.models import LMHead
    from distillm2_kernels.trainer.objectives import TrainingObjective

    hidden, labels = torch.randn(2, 4, H_S), torch.randint(0, V, (2, 4))
    head = LMHead(torch.randn(V, H_S), None, None)
    teacher = SparseTeacher(torch.arange(3).expand(2, 4, 3), torch.full((2, 4, 3), -2.0))
    with pytest.raises(ValueError, match="pass teacher_head=None"):
        TrainingObjective("skl")(hidden, teacher, labels, 1, head, head)
    with pytest.raises(ValueError, match="pass the teacher's lm_head"):
        TrainingObjective("skl")(hidden, torch.randn(2, 4, H_T), labels, 1, head, None)
