"""fused_skl / fused_srkl against a sparse teacher (docs/design.md §8) on every sparse backend, against the float64
oracle: the teacher densified (`reference.densify_sparse_teacher`) through the dense reference, by the tolerance
rule of docs/design.md §6 (tests/oracle.py).

The backends: "torch" (`backends/torch_sparse.py`), and "cpu" / "triton" where `backends.sparse_backend_module`
serves them with a module of their own (Triton under the interpreter without a GPU, tests/conftest.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import kernel_device
from hypothesis import given
from hypothesis import strategies as st
from oracle import assert_matches_oracle, logit_magnitude, oracle_loss_and_grad

from distillm2_kernels import (
    DistiLLM2Loss,
    SkewKLLoss,
    SkewReverseKLLoss,
    SparseTeacher,
    distillm2_loss,
    fused_skl,
    fused_srkl,
    token_statistics,
)
from distillm2_kernels.backends import SPARSE_BACKEND_MODULES, available_backends, torch_sparse
from distillm2_kernels.reference import densify_sparse_teacher
from distillm2_kernels.skew_divergence import skew_divergence
from distillm2_kernels.sparse_teacher import TEACHER_TAILS, as_sparse_teacher

DEVICE = kernel_device()
BACKENDS = ["torch"] + [
    name for name in ("cpu", "triton")
    if SPARSE_BACKEND_MODULES[name] is not torch_sparse and name in available_backends(DEVICE)
]
OPS = ["skl", "srkl", "srkl_detach"]


def run_fused(op, student, teacher, alpha, backend, **kwargs):
    if op == "skl":
        return fused_skl(student, teacher, alpha, backend=backend, **kwargs)
    return fused_srkl(student, teacher, alpha, backend=backend, detach_mixture=op == "srkl_detach", **kwargs)


def make_case(shape, k, dtype=torch.float32, *, seed=0, scale=3.0, tail_given=False, device=DEVICE):
    """(student logits, SparseTeacher): the teacher's k ids are the top-k of a noisy copy of a dense teacher (so
    mostly, not only, its largest entries), with that teacher's T = 1 log-probabilities, and its true tail
    log-mass when `tail_given`."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(shape, generator=gen) * scale
    teacher = torch.randn(shape, generator=gen) * scale + 0.5 * student
    log_p = torch.log_softmax(teacher.double(), dim=-1)
    ids = (log_p + torch.rand(shape, generator=gen, dtype=torch.float64)).topk(k, dim=-1).indices
    logprobs = log_p.gather(-1, ids)
    tail = None
    if tail_given:
        tail = log_p.scatter(-1, ids, float("-inf")).logsumexp(-1).float().to(device)
    return student.to(dtype).to(device), SparseTeacher(ids.to(device), logprobs.float().to(device), tail)


def densified(student: torch.Tensor, teacher: SparseTeacher, tail: str) -> torch.Tensor:
    return densify_sparse_teacher(teacher.ids, teacher.logprobs, student.shape[-1], tail, teacher.tail_logprob)


def check_against_oracle(op, student, teacher, tail, alpha, backend, *, labels=None, temperature=1.0, what=""):
    """Per-token loss and the student gradient of Σ loss·upstream (a random incoming gradient of both signs),
    held to the tolerance rule against the densified teacher through the dense reference."""
    student = student.detach().requires_grad_(True)
    loss = run_fused(
        op, student, teacher, alpha, backend, labels=labels, temperature=temperature, reduction="none",
        teacher_tail=tail,
    )
    upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1)).to(loss.device)
    (grad,) = torch.autograd.grad((loss * upstream).sum(), student)
    dense = densified(student, teacher, tail)
    kw = dict(labels=labels, temperature=temperature, upstream=upstream)
    loss64, grad64 = oracle_loss_and_grad(op, student, dense, alpha, **kw)
    loss_lo, grad_lo = oracle_loss_and_grad(op, student, dense, alpha, dtype=student.dtype, **kw)
    magnitude = logit_magnitude(student, dense, temperature=temperature)
    vocab = student.shape[-1]
    assert loss.dtype == torch.float32 and grad.dtype == student.dtype
    finite = torch.isfinite(loss64)
    loss_scale = (loss64[finite].abs().max().item() if finite.any() else 0.0) + math.log(vocab + 1)
    assert_matches_oracle(
        loss, loss64, loss_lo, out_dtype=torch.float32, magnitude=magnitude, scale=loss_scale, what=f"{what} loss"
    )
    # as tests/test_skew_divergence.py: the gradient's scale is at least that of its terms, |upstream|/T · (q + p)
    q64 = torch.softmax(student.double() / temperature, -1)
    p64 = torch.softmax(dense / temperature, -1).nan_to_num(0.0)
    terms = (upstream.double().abs().unsqueeze(-1) * (q64 + p64)).max().item() / temperature
    grad_scale = max(grad64[torch.isfinite(grad64)].abs().max().item(), terms)
    assert_matches_oracle(
        grad, grad64, grad_lo, out_dtype=student.dtype, magnitude=magnitude, scale=grad_scale, what=f"{what} grad"
    )
    return loss, grad


def labels_for(shape, vocab, seed=2):
    labels = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))
    labels.view(-1)[:: 3] = -100
    return labels.to(DEVICE)


def alpha_value(kind, leading, op, tail):
    if kind == "tensor":  # per row, with both ends (0 only where it is finite: not SRKL renormalized)
        alpha = torch.rand(leading, generator=torch.Generator().manual_seed(3))
        alpha.view(-1)[0] = 1.0
        if not (op != "skl" and tail == "renormalize"):
            alpha.view(-1)[1] = 0.0
        return alpha.to(DEVICE)
    return kind


# --- against the oracle ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("tail", TEACHER_TAILS)
@pytest.mark.parametrize("alpha", [0.0, 0.1, 1.0, "tensor"])
def test_matches_oracle(backend, op, tail, alpha):
    student, teacher = make_case((3, 4, 37), 5, seed=11)
    labels = labels_for((3, 4), 37)
    if alpha == 0.0 and op != "skl" and tail == "renormalize":  # +inf by definition
        with pytest.raises(ValueError, match=r"\+inf"):
            run_fused(op, student, teacher, alpha, backend, labels=labels, teacher_tail=tail)
        return
    alpha = alpha_value(alpha, (3, 4), op, tail)
    check_against_oracle(op, student, teacher, tail, alpha, backend, labels=labels, temperature=1.7,
                         what=f"{backend}/{op}/{tail}/α={alpha}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("tail", TEACHER_TAILS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_low_precision_and_given_tail(backend, op, tail, dtype, temperature):
    student, teacher = make_case((2, 3, 300), 16, dtype, seed=12, tail_given=True)
    check_against_oracle(op, student, teacher, tail, 0.2, backend, labels=labels_for((2, 3), 300),
                         temperature=temperature, what=f"{backend}/{op}/{tail}/{dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("tail", TEACHER_TAILS)
def test_sliced_rows_and_large_vocab(backend, op, tail):
    """A `[B, T−1, V]` slice of `[B, T, V]` logits (two strided levels), V above a block."""
    student, teacher = make_case((2, 4, 16384 + 37), 64, seed=13)
    sliced = student[:, :-1]
    teacher = SparseTeacher(teacher.ids[:, :-1], teacher.logprobs[:, :-1])
    check_against_oracle(op, sliced, teacher, tail, 0.1, backend, what=f"{backend}/{op}/{tail}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("tail", TEACHER_TAILS)
def test_negative_infinity_entries(backend, op, tail):
    """−inf teacher log-probabilities in the top-k and −inf student logits, on and off the support: exact
    zeros, never NaN."""
    student, teacher = make_case((4, 50), 6, seed=14)
    logprobs = teacher.logprobs.clone()
    logprobs[0, :2] = -math.inf
    logprobs[1, :] = torch.where(torch.arange(6, device=DEVICE) < 5, -math.inf, 0.0)  # one token holds the mass
    teacher = SparseTeacher(teacher.ids, logprobs)
    student[:, :10] = -math.inf
    student[2].scatter_(0, teacher.ids[2, :3], -math.inf)  # masked where the teacher has mass
    loss, grad = check_against_oracle(op, student, teacher, tail, 0.25, backend, what=f"{backend}/{op}/{tail}")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert torch.equal(grad[:, :10], torch.zeros_like(grad[:, :10]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("tail", TEACHER_TAILS)
@pytest.mark.parametrize("reduction", ["sum", "mean", "seqmean"])
def test_reductions_match_oracle(backend, op, tail, reduction):
    student, teacher = make_case((3, 5, 41), 4, seed=15)
    labels = labels_for((3, 5), 41)
    labels[1] = -100  # a sequence without tokens
    student.requires_grad_(True)
    loss = run_fused(op, student, teacher, 0.3, backend, labels=labels, reduction=reduction, teacher_tail=tail)
    loss.backward()
    s64 = student.detach().double().requires_grad_(True)
    dense = densified(student, teacher, tail)
    per_token, _ = oracle_loss_and_grad(op, s64, dense, 0.3, labels=labels)
    valid = labels != -100
    if reduction == "sum":
        weights = valid.double()
    elif reduction == "mean":
        weights = valid.double() / valid.sum()
    else:
        counts = valid.sum(-1, keepdim=True)
        weights = valid.double() / counts.clamp(min=1) / (counts > 0).sum()
    expected, grad64 = oracle_loss_and_grad(op, s64, dense, 0.3, labels=labels, upstream=weights)
    magnitude = logit_magnitude(student, dense)
    reduced = (expected * weights).sum()
    assert_matches_oracle(loss.reshape(1), reduced.reshape(1), reduced.reshape(1).float(), out_dtype=torch.float32,
                          magnitude=magnitude, scale=reduced.abs().item() + math.log(42), what=f"{reduction} loss")
    terms = weights.abs().max().item() * 2
    assert_matches_oracle(student.grad, grad64, grad64.float(), out_dtype=torch.float32, magnitude=magnitude,
                          scale=max(grad64.abs().max().item(), terms), what=f"{reduction} grad")
    assert torch.equal(student.grad[1], torch.zeros_like(student.grad[1]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("tail", TEACHER_TAILS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "seqmean"])
def test_all_rows_ignored(backend, op, tail, reduction):
    student, teacher = make_case((2, 3, 60), 5, torch.bfloat16, seed=16)
    student.requires_grad_(True)
    labels = torch.full((2, 3), -100, device=DEVICE)
    loss = run_fused(op, student, teacher, 0.1, backend, labels=labels, reduction=reduction, teacher_tail=tail)
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(student.grad, torch.zeros_like(student.grad))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("tail", TEACHER_TAILS)
def test_alpha_one_is_exactly_zero(backend, op, tail):
    student, teacher = make_case((3, 40), 7, seed=17)
    student.requires_grad_(True)
    loss = run_fused(op, student, teacher, 1.0, backend, reduction="none", teacher_tail=tail)
    (grad,) = torch.autograd.grad(loss.sum(), student)
    if tail == "renormalize" or op == "skl":  # the uniform SRKL's tail sweep forms log r = log(exp(log q))
        assert torch.equal(loss, torch.zeros_like(loss))
        assert torch.equal(grad, torch.zeros_like(grad))
    else:
        assert loss.abs().max() <= 1e-6 and grad.abs().max() <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("tail", TEACHER_TAILS)
def test_nan_stays_in_its_row(backend, op, tail):
    """A NaN or +inf student logit makes its row's loss NaN, and NaN in its gradient row (at the support and at
    the NaN / +inf entry), and leaves the other rows alone (every `torch.empty` is NaN-poisoned,
    tests/conftest.py, so an unwritten output would show too)."""
    student, teacher = make_case((4, 30), 3, seed=18)
    student[1, 5] = math.nan
    student[2, 7] = math.inf
    student.requires_grad_(True)
    loss = run_fused(op, student, teacher, 0.1, backend, reduction="none", teacher_tail=tail)
    (grad,) = torch.autograd.grad(loss.sum(), student)
    assert torch.isnan(loss[1:3]).all()
    assert torch.isnan(grad[1, 5]) and torch.isnan(grad[2, 7])
    assert torch.isnan(grad[1:3].gather(-1, teacher.ids[1:3])).all()
    assert torch.isfinite(loss[[0, 3]]).all() and torch.isfinite(grad[[0, 3]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_alpha_zero_renormalized_srkl_is_infinite(backend):
    """A tensor α is not checked for zeros (a host sync): SRKL renormalized is +inf at those rows, as the dense op
    with −inf teacher logits off the support."""
    student, teacher = make_case((3, 20), 4, seed=19)
    alpha = torch.tensor([0.0, 0.5, 0.1], device=DEVICE)
    loss = fused_srkl(student, teacher, alpha, reduction="none", backend=backend)
    dense = fused_srkl(student, densified(student, teacher, "renormalize").float(), alpha, reduction="none")
    assert loss[0] == math.inf and torch.isfinite(loss[1:]).all()
    torch.testing.assert_close(loss[1:], dense[1:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_uniform_tail_of_zero_mass_at_alpha_zero_is_infinite(backend):
    """SRKL at α = 0 with the uniform tail and no tail mass (a cache whose k tokens hold all of it) is +inf where
    the student has mass off the support, as on the densified teacher: not inf − inf = NaN."""
    student, teacher = make_case((3, 20), 4, seed=23)
    no_tail = SparseTeacher(teacher.ids, teacher.logprobs.log_softmax(-1), torch.full((3,), -math.inf, device=DEVICE))
    loss = fused_srkl(student, no_tail, 0.0, reduction="none", teacher_tail="uniform", backend=backend)
    dense = fused_srkl(student, densified(student, no_tail, "uniform").float(), 0.0, reduction="none")
    assert (dense == math.inf).all()
    assert (loss == math.inf).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_statistics_are_refused_by_dense_ops(backend):
    """Statistics of a sparse-teacher call hold the student's columns only: a dense-teacher op refuses them
    (they would give a wrong loss), a sparse one takes them and gives the same result as without them."""
    student, teacher = make_case((2, 3, 20), 4, seed=29)
    labels = labels_for((2, 3), 20)
    stats = token_statistics(student, teacher, labels, backend=backend)
    assert stats.sparse_teacher
    with pytest.raises(ValueError, match="computed against a sparse teacher"):
        skew_divergence(student, torch.randn_like(student), 0.1, labels, reverse=False, statistics=stats,
                        backend=backend)
    with_stats = skew_divergence(student, teacher, 0.1, labels, reverse=True, statistics=stats, backend=backend)
    without = skew_divergence(student, teacher, 0.1, labels, reverse=True, backend=backend)
    torch.testing.assert_close(with_stats, without, rtol=0, atol=0)
    dense_stats = token_statistics(student, torch.randn_like(student), labels, backend=backend)
    assert not dense_stats.sparse_teacher


# --- properties ----------------------------------------------------------------------------------------------


@st.composite
def rows_and_k(draw, full=False):
    rows = draw(st.integers(1, 4))
    vocab = draw(st.integers(1, 70))
    k = vocab if full else draw(st.integers(1, vocab))
    return rows, vocab, k, draw(st.integers(0, 2**16)), draw(st.sampled_from(OPS))


def _dense_case(rows, vocab, seed):
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(rows, vocab, generator=gen) * 4).to(DEVICE)
    teacher = (torch.randn(rows, vocab, generator=gen) * 4).to(DEVICE)
    return student, teacher


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=rows_and_k(full=True), tail=st.sampled_from(TEACHER_TAILS), alpha=st.sampled_from([0.0, 0.3, 1.0]),
       temperature=st.sampled_from([0.7, 1.0, 2.0]))
def test_full_support_equals_dense_op(backend, case, tail, alpha, temperature):
    """k = V (ids in any order) is the dense op on the teacher's logits, in both tail modes."""
    rows, vocab, _, seed, op = case
    student, teacher = _dense_case(rows, vocab, seed)
    ids = torch.stack([torch.randperm(vocab, generator=torch.Generator().manual_seed(seed + r)) for r in range(rows)])
    ids = ids.to(DEVICE)
    sparse = SparseTeacher(ids, torch.log_softmax(teacher, -1).gather(-1, ids))
    check_against_oracle(op, student, sparse, tail, alpha, backend, temperature=temperature, what=f"{op}/{tail}")
    expected = run_fused(op, student, teacher, alpha, "torch", temperature=temperature, reduction="none")
    actual = run_fused(op, student, sparse, alpha, backend, temperature=temperature, reduction="none",
                       teacher_tail=tail)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * (1 + expected.abs().max().item()))


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=rows_and_k(), alpha=st.sampled_from([0.05, 0.3, 1.0]), temperature=st.sampled_from([0.7, 1.0, 2.0]))
def test_exactly_sparse_teacher_equals_dense_op(backend, case, alpha, temperature):
    """A teacher that is exactly top-k sparse (−inf logits off its k ids), renormalized: the dense op on those
    logits (SRKL with α > 0), value and gradient."""
    rows, vocab, k, seed, op = case
    student, teacher = _dense_case(rows, vocab, seed)
    ids = teacher.topk(k, dim=-1).indices
    teacher = torch.full_like(teacher, -math.inf).scatter(-1, ids, teacher.gather(-1, ids))
    sparse = SparseTeacher(ids, torch.log_softmax(teacher, -1).gather(-1, ids))
    check_against_oracle(op, student, sparse, "renormalize", alpha, backend, temperature=temperature, what=op)
    s1, s2 = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    expected = run_fused(op, s1, teacher, alpha, "torch", temperature=temperature, reduction="none")
    actual = run_fused(op, s2, sparse, alpha, backend, temperature=temperature, reduction="none")
    atol = 1e-5 * (1 + expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=atol)
    expected.sum().backward()
    actual.sum().backward()
    torch.testing.assert_close(s2.grad, s1.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=rows_and_k(), alpha=st.sampled_from([0.0, 0.1, 1.0]), tail_given=st.booleans(),
       temperature=st.sampled_from([0.7, 1.0, 2.0]))
def test_uniform_tail_equals_dense_op_on_densified_teacher(backend, case, alpha, tail_given, temperature):
    rows, vocab, k, seed, op = case
    student, teacher = make_case((rows, vocab), k, seed=seed, tail_given=tail_given)
    check_against_oracle(op, student, teacher, "uniform", alpha, backend, temperature=temperature,
                         what=f"{op}/tail given={tail_given}")


# --- statistics, the objective, the modules ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", TEACHER_TAILS)
def test_token_statistics(backend, tail):
    """The label log-probabilities at T: log p(y) of a label outside the ids is log c (uniform) or −inf; the loss
    op reuses the statistics (the same loss, no second log-sum-exp sweep needed)."""
    student, teacher = make_case((2, 5, 33), 4, seed=20)
    labels = labels_for((2, 5), 33)
    labels[0, 1] = teacher.ids[0, 1, 2]  # one label on the support
    stats = token_statistics(student, teacher, labels, temperature=1.5, backend=backend, teacher_tail=tail)
    dense = densified(student, teacher, tail)
    valid = labels != -100
    safe = labels.clamp(min=0).unsqueeze(-1)
    log_q = torch.log_softmax(student.double() / 1.5, -1).gather(-1, safe).squeeze(-1)
    log_p = torch.log_softmax(dense / 1.5, -1).gather(-1, safe).squeeze(-1)
    expected = torch.where(valid.unsqueeze(-1), torch.stack([log_q, log_p], -1), 0.0)
    torch.testing.assert_close(stats.label_logprobs.double(), expected, rtol=1e-6, atol=1e-6)
    if tail == "renormalize":
        assert (stats.teacher_label_logprobs[valid] == -math.inf).any()
    for op in OPS:
        alone = run_fused(op, student, teacher, 0.2, backend, labels=labels, temperature=1.5, reduction="none",
                          teacher_tail=tail)
        reused = skew_divergence(student, teacher, 0.2, labels, reverse=op != "skl", detach_mixture=op == "srkl_detach",
                                 temperature=1.5, backend=backend, teacher_tail=tail, statistics=stats)
        torch.testing.assert_close(reused, alone, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("tail", TEACHER_TAILS)
@pytest.mark.parametrize("preset", ["distillm2", "paper", "distillm"])
def test_objective_with_sparse_teachers_equals_densified(tail, preset):
    """distillm2_loss / DistiLLM2Loss with a sparse teacher on each half: the objective on the densified teachers
    as logits (loss, metrics, gradients), and one half may stay dense."""
    student_t, teacher_t = make_case((2, 5, 29), 6, seed=21)
    student_s, teacher_s = make_case((2, 4, 29), 6, seed=22)
    labels_t, labels_s = labels_for((2, 5), 29, seed=3), labels_for((2, 4), 29, seed=4)
    dense_t = densified(student_t, teacher_t, tail).float()
    dense_s = densified(student_s, teacher_s, tail).float()
    overrides = dict(temperature=1.3, alpha=0.2) if preset != "distillm" else dict(alpha=0.2)
    results = []
    for teachers, tails in (((teacher_t, teacher_s), tail), ((dense_t, dense_s), "renormalize"),
                            ((teacher_t, dense_s), tail)):
        s_t, s_s = student_t.clone().requires_grad_(True), student_s.clone().requires_grad_(True)
        objective = DistiLLM2Loss(preset, num_epochs=2, total_steps=4, teacher_tail=tails, **overrides)
        objective.set_epoch(1)
        loss, metrics = objective(s_t, teachers[0], labels_t, s_s, teachers[1], labels_s)
        loss.backward()
        results.append((loss.detach(), metrics, s_t.grad, s_s.grad))
    for loss, metrics, grad_t, grad_s in (results[0], results[2]):
        torch.testing.assert_close(loss, results[1][0], rtol=1e-5, atol=1e-6)
        for key in metrics:
            torch.testing.assert_close(metrics[key], results[1][1][key], rtol=1e-5, atol=1e-6, msg=key)
        torch.testing.assert_close(grad_t, results[1][2], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad_s, results[1][3], rtol=1e-5, atol=1e-6)
    loss, _ = distillm2_loss(student_t, teacher_t, labels_t, student_s, teacher_s, labels_s, teacher_tail=tail)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("tail", TEACHER_TAILS)
def test_modules_and_tuples(tail):
    student, teacher = make_case((2, 3, 25), 5, seed=23, tail_given=True)
    labels = labels_for((2, 3), 25)
    as_tuple = (teacher.ids, teacher.logprobs, teacher.tail_logprob)
    assert as_sparse_teacher(as_tuple) == teacher and as_sparse_teacher(student) is None
    expected = fused_skl(student, teacher, 0.3, labels=labels, reduction="sum", teacher_tail=tail)
    module = SkewKLLoss(0.3, reduction="sum", teacher_tail=tail)
    torch.testing.assert_close(module(student, as_tuple, labels), expected, rtol=0, atol=0)
    assert f"teacher_tail='{tail}'" in repr(module)
    expected = fused_srkl(student, SparseTeacher(teacher.ids, teacher.logprobs), 0.3, labels=labels,
                          teacher_tail=tail, detach_mixture=True)
    module = SkewReverseKLLoss(0.3, detach_mixture=True, teacher_tail=tail)
    torch.testing.assert_close(module(student, (teacher.ids, teacher.logprobs), labels), expected, rtol=0, atol=0)


# --- errors ----------------------------------------------------------------------------------------------------


def test_srkl_renormalize_alpha_zero_is_an_error():
    student, teacher = make_case((2, 20), 4, seed=24)
    with pytest.raises(ValueError, match=r"\+inf"):
        fused_srkl(student, teacher, 0.0)
    fused_srkl(student, teacher, 0.0, teacher_tail="uniform")  # a tail: finite
    full = SparseTeacher(*(t.expand(2, 20) for t in (torch.arange(20, device=DEVICE), torch.full((20,), -math.log(20)))))
    assert torch.isfinite(fused_srkl(student, full, 0.0))  # k = V: no tail, the dense op


def test_teacher_tail_with_dense_teacher_is_an_error():
    student, teacher = make_case((2, 20), 4, seed=25)
    dense = densified(student, teacher, "uniform").float()
    for call in (
        lambda: fused_skl(student, dense, teacher_tail="uniform"),
        lambda: fused_srkl(student, dense, teacher_tail="uniform"),
        lambda: token_statistics(student, dense, torch.zeros(2, dtype=torch.long), teacher_tail="uniform"),
        lambda: SkewKLLoss(teacher_tail="uniform")(student, dense),
    ):
        with pytest.raises(ValueError, match="sparse teacher"):
            call()
    with pytest.raises(ValueError, match="teacher_tail must be one of"):
        fused_skl(student, teacher, teacher_tail="top")
    with pytest.raises(ValueError, match="teacher_tail must be one of"):
        DistiLLM2Loss(teacher_tail="top")


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda t: SparseTeacher(torch.cat([t.ids[..., :1], t.ids[..., :3]], -1), t.logprobs), ValueError, "distinct"),
        (lambda t: SparseTeacher(t.ids + 20, t.logprobs), ValueError, r"in \[0, 20\)"),
        (lambda t: SparseTeacher(t.ids - 30, t.logprobs), ValueError, r"in \[0, 20\)"),
        (lambda t: SparseTeacher(t.ids[:1], t.logprobs[:1]), ValueError, "leading shape"),
        (lambda t: SparseTeacher(t.ids, t.logprobs[..., :3]), ValueError, "shape of its ids"),
        (lambda t: SparseTeacher(t.ids, t.logprobs, torch.zeros(3)), ValueError, "tail_logprob"),
        (lambda t: SparseTeacher(t.ids.float(), t.logprobs), TypeError, "integer"),
        (lambda t: SparseTeacher(t.ids, t.ids), TypeError, "floating"),
        (lambda t: SparseTeacher(t.ids[..., :0], t.logprobs[..., :0]), ValueError, "1 <= k"),
        (lambda t: SparseTeacher(t.ids, t.logprobs.requires_grad_(True)), ValueError, "require grad"),
        (lambda t: (t.ids,), TypeError, "tuple"),
    ],
)
def test_sparse_teacher_errors(change, error, match):
    student, teacher = make_case((2, 20), 4, seed=26)
    with pytest.raises(error, match=match):
        fused_skl(student, change(SparseTeacher(teacher.ids.cpu(), teacher.logprobs.cpu().clone())))


def test_sparse_custom_ops_pass_opcheck():
    """The three sweeps' custom-op schemas and fake implementations (shapes, dtypes)."""
    student = torch.randn(2, 3, 11)[:, :2]
    labels = torch.tensor([1, -100, 4, 5])
    lse = torch.ops.distillm2.sparse_student_logsumexp(student, labels, -100, 0.5, "torch")
    rows = (torch.randn(4), torch.rand(4))
    torch.library.opcheck(torch.ops.distillm2.sparse_student_logsumexp.default, (student, labels, -100, 0.5, "torch"))
    for reverse, detach in ((False, False), (True, False), (True, True)):
        torch.library.opcheck(
            torch.ops.distillm2.sparse_tail_sums.default,
            (student, labels, -100, 0.5, lse, rows[0] - 4, rows[1], reverse, detach, "torch"),
        )
        for log_tail in (rows[0] - 4, None):
            torch.library.opcheck(
                torch.ops.distillm2.sparse_student_grad.default,
                (student, labels, -100, 0.5, lse, rows[1], rows[0], log_tail, rows[1], reverse, detach, "torch"),
            )
