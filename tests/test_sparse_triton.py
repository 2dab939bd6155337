"""The Triton sparse-teacher sweeps (`backends.triton_sparse`) against their spec, `torch_sparse`, as the float64
oracle on the same upcast inputs, by the tolerance rule of docs/design.md §6 (tests/oracle.py): the baseline is
`torch_sparse` run on the student in its own dtype with the same float32 per-row inputs. Under the interpreter
(tests/conftest.py) the kernels run on CPU tensors; `launch_config` is narrowed to small blocks here so that the
vocabulary loop, its last partial block and the online log-sum-exp's rescaling run at small V. The outputs come
from NaN-poisoned allocations (conftest), so an element a kernel does not write fails."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import kernel_device
from hypothesis import given
from hypothesis import strategies as st
from oracle import assert_matches_oracle, logit_magnitude

from distillm2_kernels.backends import sparse_backend_module, torch_sparse, triton_sparse

DEVICE = kernel_device()
pytestmark = pytest.mark.skipif(triton_sparse.unavailable_reason(DEVICE) is not None,
                                reason=str(triton_sparse.unavailable_reason(DEVICE)))
VARIANTS = [(False, False), (True, False), (True, True)]  # (reverse, detach): SKL, SRKL, detached SRKL
IGNORE = -100


@pytest.fixture(params=["small blocks", "launch_config"])
def blocks(request, monkeypatch):
    """BLOCK_V = 64 (many blocks, a partial last one) or the library's own launch configuration."""
    if request.param == "small blocks":
        monkeypatch.setattr(triton_sparse, "launch_config", lambda vocab: (64, 1))
    return request.param


class Rows:
    """A case: student logits and every per-row input, float32 for the kernel, float64 for the oracle."""

    def __init__(self, student, *, labels=None, alpha=None, log_tail=None, temperature=1.0, seed=0):
        gen = torch.Generator().manual_seed(seed)
        n = student.shape[0] if student.dim() == 2 else student.shape[0] * student.shape[1]
        self.student, self.labels, self.inv_t = student, labels, 1.0 / temperature
        self.temperature = temperature
        z64 = student.double().reshape(n, student.shape[-1])
        lse = torch.logsumexp(z64 * self.inv_t, dim=-1)
        if labels is not None:
            lse = torch.where(labels.cpu() != IGNORE, lse, 0.0)
        self.lse = lse.float()
        self.alpha = (torch.tensor([0.0, 0.3, 1.0]).repeat(n)[:n] if alpha is None else alpha).float()
        # c = τ / V: a tail mass τ ∈ [0.01, 0.5] spread over the row (the "uniform" tail's scale)
        tail_mass = torch.rand(n, generator=gen) * 0.49 + 0.01
        self.log_tail = tail_mass.log() - math.log(student.shape[-1]) if log_tail is None else log_tail
        self.row_scale = torch.rand(n, generator=gen) * 2 - 0.5
        self.row_shift = torch.randn(n, generator=gen)
        self.n = n

    def args(self, fn, dtype_of_student=None, float64=False):
        """The positional arguments of `fn` ("lse", "sums", "grad", "grad_no_tail") for one implementation."""
        student = self.student if dtype_of_student is None else self.student.to(dtype_of_student)
        cast = (lambda t: t.double()) if float64 else (lambda t: t.float())
        rows = [cast(t).to(student.device) for t in (self.lse, self.log_tail, self.alpha, self.row_scale, self.row_shift)]
        lse, log_tail, alpha, row_scale, row_shift = rows
        labels = None if self.labels is None else self.labels.to(student.device)
        head = (student, labels, IGNORE, self.inv_t)
        if fn == "lse":
            return head
        if fn == "sums":
            return (*head, lse, log_tail, alpha)
        return (*head, lse, row_scale, row_shift, log_tail if fn == "grad" else None, alpha)

    def magnitude(self):
        return logit_magnitude(self.student, temperature=self.temperature)


def call(module, fn, args, reverse, detach):
    if fn == "lse":
        return module.student_logsumexp(*args)
    if fn == "sums":
        return module.tail_sums(*args, reverse, detach)
    return module.student_grad(*args, reverse, detach)


def check(rows: Rows, fn: str, reverse=False, detach=False, keep=None, what=""):
    """The kernel's result for `fn` against torch_sparse in float64 (oracle) and in the student's dtype
    (baseline), on the rows `keep` (all by default); returns the kernel's result."""
    actual = call(triton_sparse, fn, rows.args(fn), reverse, detach)
    oracle = call(torch_sparse, fn, rows.args(fn, torch.float64, float64=True), reverse, detach)
    baseline = call(torch_sparse, fn, rows.args(fn), reverse, detach)
    assert actual.device == rows.student.device
    if fn == "lse":
        assert actual.dtype == torch.float32 and actual.shape == (rows.n,)
    elif fn == "sums":
        assert actual.dtype == torch.float32 and actual.shape == (rows.n, 2)
    else:
        assert actual.dtype == rows.student.dtype and actual.shape == (rows.n, rows.student.shape[-1])
        assert actual.is_contiguous()
    keep = slice(None) if keep is None else keep
    out_dtype = rows.student.dtype if fn.startswith("grad") else torch.float32
    assert_matches_oracle(actual.cpu()[keep], oracle.cpu()[keep], baseline.cpu()[keep], out_dtype=out_dtype,
                          magnitude=rows.magnitude(), what=f"{what} {fn} reverse={reverse} detach={detach}")
    return actual


def random_student(shape, dtype, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale).to(dtype).to(DEVICE)


@pytest.mark.parametrize("reverse,detach", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1, 17, 1000])
def test_every_sweep_matches_the_float64_spec(reverse, detach, dtype, vocab, blocks):
    student = random_student((7, vocab), dtype, seed=vocab)
    if vocab > 1:
        student[1, : vocab // 2] = -math.inf  # zero probabilities
    labels = torch.tensor([0, 1, IGNORE, 2, 3, IGNORE, 4]) % vocab
    labels[[2, 5]] = IGNORE
    rows = Rows(student, labels=labels, temperature=1.7)
    rows.log_tail[4] = -math.inf  # a row without tail mass (c = 0), α = 0.3
    for fn in ("lse", "sums", "grad", "grad_no_tail"):
        got = check(rows, fn, reverse, detach, what=f"V={vocab} {dtype}")
        ignored = labels == IGNORE
        assert torch.all(got.cpu()[ignored] == 0), fn  # ignored rows: exact zeros
    grad = triton_sparse.student_grad(*rows.args("grad"), reverse, detach).cpu()
    if vocab > 1:
        assert torch.all(grad[1, : vocab // 2] == 0)  # q = 0: exact zeros, with and without a tail
        no_tail = triton_sparse.student_grad(*rows.args("grad_no_tail"), reverse, detach).cpu()
        assert torch.all(no_tail[1, : vocab // 2] == 0)


@pytest.mark.parametrize("reverse,detach", VARIANTS)
def test_alpha_one_gives_exact_zeros(reverse, detach, blocks):
    student = random_student((3, 300), torch.float32, seed=5)
    student[2, :50] = -math.inf
    rows = Rows(student, alpha=torch.ones(3), temperature=0.7)
    rows.log_tail[1] = -1.0  # a large tail probability
    sums = triton_sparse.tail_sums(*rows.args("sums"), reverse, detach).cpu()
    assert torch.all(sums[:, 0] == 0)  # f = 0 exactly
    if not detach:
        assert torch.all(sums[:, 1] == 0)  # q·g = 0 exactly (detached SRKL: g = 1 at α = 1, Σ q·g = Σ q)
    # row_shift = the g of α = 1 (0, or 1 detached): the gradient q·(g − shift) is exactly 0
    rows.row_shift = torch.full((3,), 1.0 if detach else 0.0)
    grad = triton_sparse.student_grad(*rows.args("grad"), reverse, detach).cpu()
    assert torch.all(grad == 0)
    check(rows, "sums", reverse, detach, what="alpha=1")


@pytest.mark.parametrize("reverse,detach", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_of_3d_and_row_strided_logits_are_read_in_place(reverse, detach, dtype, blocks):
    full = random_student((2, 5, 131), dtype, seed=11)
    sliced_3d = full[:, :-1, 3:120]  # [2, 4, 117]: outer stride 5·131, inner stride 131, unaligned start
    assert sliced_3d.dim() == 3 and not sliced_3d.is_contiguous()
    labels = torch.tensor([1, IGNORE, 2, 3, 4, 5, IGNORE, 6])
    rows = Rows(sliced_3d, labels=labels, temperature=1.3, seed=3)
    for fn in ("lse", "sums", "grad", "grad_no_tail"):
        check(rows, fn, reverse, detach, what="3-D")
    sliced_2d = random_student((6, 260), dtype, seed=12)[:, 1:201]  # row stride 260, unaligned start
    rows = Rows(sliced_2d, seed=4)
    for fn in ("lse", "sums", "grad", "grad_no_tail"):
        check(rows, fn, reverse, detach, what="2-D strided")


@pytest.mark.parametrize("reverse,detach", VARIANTS)
def test_extreme_logits(reverse, detach, blocks):
    """±1e4 logits (most q underflow, in float64 too), one −inf entry per row; α = 0.3 (SKL at α = 0 would be
    +inf in float64 where q underflows there, finite here: its log-space mixture keeps log q)."""
    student = random_student((4, 257), torch.float32, seed=21, scale=1.0).sign() * 1e4
    student += random_student((4, 257), torch.float32, seed=22, scale=50.0)
    student[:, 7] = -math.inf
    rows = Rows(student, alpha=torch.tensor([0.3, 0.3, 0.9, 1.0]), seed=6)
    for fn in ("lse", "sums", "grad", "grad_no_tail"):
        check(rows, fn, reverse, detach, what="±1e4")


@pytest.mark.parametrize("reverse,detach", VARIANTS)
def test_a_nan_or_inf_row_is_nan_and_only_that_row(reverse, detach, blocks):
    student = random_student((5, 200), torch.float32, seed=31)
    student[1, 17] = math.nan
    student[3, 150] = math.inf
    rows = Rows(student, seed=7)
    lse = triton_sparse.student_logsumexp(*rows.args("lse")).cpu()
    assert lse[[1, 3]].isnan().all()
    rows.lse[[1, 3]] = lse[[1, 3]]  # what the kernels get from the log-sum-exp sweep
    keep = torch.tensor([True, False, True, False, True])
    for fn in ("sums", "grad", "grad_no_tail"):
        got = triton_sparse.tail_sums(*rows.args(fn), reverse, detach) if fn == "sums" else \
            triton_sparse.student_grad(*rows.args(fn), reverse, detach)
        assert got.cpu()[~keep].isnan().all(), fn
        check(rows, fn, reverse, detach, keep=keep, what="beside NaN rows")
    check(rows, "lse", keep=keep, what="beside NaN rows")


def test_online_logsumexp_across_blocks(monkeypatch):
    """The running shift rises block by block, starts at −inf (leading blocks of −inf) and meets +inf."""
    monkeypatch.setattr(triton_sparse, "launch_config", lambda vocab: (16, 1))
    student = torch.full((5, 100), -math.inf)
    student[0] = torch.linspace(-50, 300, 100)  # the maximum in the last block
    student[1, 70:] = torch.linspace(3, -3, 30)  # −inf for four blocks, then the maximum
    student[2, 99] = 1e4  # one finite entry, far from 0
    student[4] = torch.linspace(200, -200, 100)  # the maximum in the first block
    lse = triton_sparse.student_logsumexp(student.to(DEVICE), None, IGNORE, 1.0).cpu()
    expected = torch.logsumexp(student.double(), dim=-1)
    assert lse[3] == -math.inf  # a row of −inf
    finite = torch.tensor([0, 1, 2, 4])
    assert_matches_oracle(lse[finite], expected[finite], expected[finite].float(), out_dtype=torch.float32,
                          magnitude=1e4, what="online lse")


def test_float64_and_routing():
    student = torch.randn(2, 9, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float64"):
        triton_sparse.student_logsumexp(student, None, IGNORE, 1.0)
    assert sparse_backend_module("triton", torch.float64) is torch_sparse
    assert sparse_backend_module("triton", torch.float32) is triton_sparse
    assert sparse_backend_module("torch", torch.bfloat16) is torch_sparse
    empty = triton_sparse.student_grad(torch.zeros(0, 5, device=DEVICE), None, IGNORE, 1.0, *[torch.zeros(0)] * 3,
                                       None, torch.zeros(0), False, False)
    assert empty.shape == (0, 5)


@given(
    n=st.integers(1, 4),
    vocab=st.integers(1, 90),
    variant=st.sampled_from(VARIANTS),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    temperature=st.sampled_from([0.5, 1.0, 2.0]),
    alphas=st.lists(st.sampled_from([0.0, 0.1, 0.5, 0.999, 1.0]), min_size=4, max_size=4),
    neg_inf=st.integers(0, 5),
    seed=st.integers(0, 2**16),
)
def test_property_random_rows(n, vocab, variant, dtype, temperature, alphas, neg_inf, seed):
    reverse, detach = variant
    student = random_student((n, vocab), dtype, seed=seed)
    if vocab > 1:
        student[0, : min(neg_inf, vocab - 1)] = -math.inf
    labels = torch.arange(n) % vocab
    labels[n // 2] = IGNORE if n > 1 else labels[0]
    rows = Rows(student, labels=labels, alpha=torch.tensor(alphas[:n]), temperature=temperature, seed=seed)
    for fn in ("lse", "sums", "grad", "grad_no_tail"):
        check(rows, fn, reverse, detach, what="property")


@pytest.mark.slow
@pytest.mark.parametrize("reverse,detach", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_vocabulary_with_the_launch_configuration(reverse, detach, dtype):
    """V = 50257 over several of the interpreter's blocks (16384), the last partial."""
    student = random_student((3, 50257), dtype, seed=41, scale=4.0)
    student[0, :1000] = -math.inf
    rows = Rows(student, labels=torch.tensor([5, IGNORE, 7]), temperature=1.1, seed=8)
    for fn in ("lse", "sums", "grad", "grad_no_tail"):
        check(rows, fn, reverse, detach, what="V=50257")
