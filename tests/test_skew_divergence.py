"""fused_skl / fused_srkl on every backend against the float64 oracle (tests/oracle.py)."""

from __future__ import annotations

import math

import pytest
import torch
from allocations import NewStorages
from conftest import kernel_device
from hypothesis import given
from hypothesis import strategies as st
from oracle import assert_matches_oracle, logit_magnitude, oracle_loss_and_grad

from distillm2_kernels import (
    FusedSKLFunction,
    FusedSRKLFunction,
    SkewKLLoss,
    SkewReverseKLLoss,
    fused_skl,
    fused_srkl,
    token_statistics,
)
from distillm2_kernels.backends import available_backends, torch_backend

DEVICE = kernel_device()
BACKENDS = available_backends(DEVICE)
OPS = ["skl", "srkl", "srkl_detach"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def run_fused(op, student, teacher, alpha, backend, **kwargs):
    if op == "skl":
        return fused_skl(student, teacher, alpha, backend=backend, **kwargs)
    return fused_srkl(student, teacher, alpha, backend=backend, detach_mixture=op == "srkl_detach", **kwargs)


def make_logits(shape, dtype, *, scale=3.0, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(shape, generator=gen) * scale).to(dtype)
    teacher = (torch.randn(shape, generator=gen) * scale + 0.5 * student.float()).to(dtype)
    return student.to(device), teacher.to(device)


def check_against_oracle(
    op, student, teacher, alpha, backend, *, labels=None, temperature=1.0, upstream=None, what=""
):
    """Per-token loss and the student gradient of Σ loss·upstream, both held to the tolerance rule."""
    student = student.detach().requires_grad_(True)
    loss = run_fused(op, student, teacher, alpha, backend, labels=labels, temperature=temperature, reduction="none")
    if upstream is None:
        upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1)).to(loss.device)
    (grad,) = torch.autograd.grad((loss * upstream).sum(), student)
    kw = dict(labels=labels, temperature=temperature, upstream=upstream)
    loss64, grad64 = oracle_loss_and_grad(op, student, teacher, alpha, **kw)
    loss_lo, grad_lo = oracle_loss_and_grad(op, student, teacher, alpha, dtype=student.dtype, **kw)
    magnitude = logit_magnitude(student, teacher, temperature=temperature)
    vocab = student.shape[-1]
    assert loss.dtype == torch.float32 and grad.dtype == student.dtype
    finite = torch.isfinite(loss64)
    loss_scale = (loss64[finite].abs().max().item() if finite.any() else 0.0) + math.log(vocab + 1)
    assert_matches_oracle(
        loss, loss64, loss_lo, out_dtype=torch.float32, magnitude=magnitude, scale=loss_scale, what=f"{what} loss"
    )
    # The gradient's scale is its own size, but at least that of its terms, |upstream|/T · (q + p): the
    # result can cancel to ~0 (α = 1, or student ≈ teacher) while float32 rounding stays the terms' size.
    q64 = torch.softmax(student.double() / temperature, -1)
    p64 = torch.softmax(teacher.double() / temperature, -1)
    terms = (upstream.double().abs().unsqueeze(-1) * (q64 + p64)).max().item() / temperature
    grad_scale = max(grad64[torch.isfinite(grad64)].abs().max().item(), terms)
    assert_matches_oracle(
        grad, grad64, grad_lo, out_dtype=student.dtype, magnitude=magnitude, scale=grad_scale, what=f"{what} grad"
    )
    return loss, grad


# --- the core comparison ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [7, 1000, 32001])
def test_matches_oracle(backend, op, dtype, vocab):
    rows = (2, 3) if vocab < 32001 else (1, 2)
    student, teacher = make_logits((*rows, vocab), dtype, seed=vocab)
    labels = torch.arange(math.prod(rows), device=DEVICE).reshape(rows) % vocab
    labels[0, 0] = -100
    check_against_oracle(op, student, teacher, 0.1, backend, labels=labels, what=f"{backend}/{op}/{dtype}/V={vocab}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_vocab_above_block(backend, op):
    """Rows longer than the largest block (16384 under the interpreter, 4096 compiled) take several blocks."""
    student, teacher = make_logits((2, 16384 + 37), torch.float32, seed=3)
    check_against_oracle(op, student, teacher, 0.3, backend, what=f"{backend}/{op}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_alpha_endpoints(backend, op, alpha):
    student, teacher = make_logits((3, 257), torch.float32, seed=4)
    loss, grad = check_against_oracle(op, student, teacher, alpha, backend, what=f"{backend}/{op}/α={alpha}")
    if alpha == 1.0:  # the mixture is the distribution itself: zero loss, zero gradient
        assert torch.equal(loss, torch.zeros_like(loss))
        assert grad.abs().max() <= 1e-6
    else:  # plain KL(p‖q) / KL(q‖p), checked against torch's kl_div
        log_q = torch.log_softmax(student.double(), -1)
        log_p = torch.log_softmax(teacher.double(), -1)
        if op == "skl":
            expected = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
        else:
            expected = torch.nn.functional.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)
        torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("alpha_shape", ["scalar_tensor", "per_sequence", "per_sequence_2d", "per_token"])
def test_alpha_tensor(backend, op, alpha_shape):
    student, teacher = make_logits((3, 4, 300), torch.float32, seed=5)
    gen = torch.Generator().manual_seed(6)
    shape = {"scalar_tensor": (), "per_sequence": (3,), "per_sequence_2d": (3, 1), "per_token": (3, 4)}[alpha_shape]
    alpha = torch.rand(shape, generator=gen).to(DEVICE)
    if alpha_shape == "per_token":
        alpha[0, 0], alpha[0, 1] = 0.0, 1.0
    loss, _ = check_against_oracle(op, student, teacher, alpha, backend, what=f"{backend}/{op}/{alpha_shape}")
    # Each sequence's α is its own: the same rows with that α as a float give the same loss.
    if alpha_shape == "per_sequence":
        for b in range(3):
            row = run_fused(op, student[b], teacher[b], float(alpha[b]), backend, reduction="none")
            torch.testing.assert_close(loss[b], row, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature(backend, op, temperature):
    student, teacher = make_logits((4, 500), torch.bfloat16, seed=7)
    check_against_oracle(op, student, teacher, 0.2, backend, temperature=temperature, what=f"{backend}/{op}/T")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_logits(backend, op, dtype):
    """±1e4 logits: near one-hot distributions, no overflow, no NaN."""
    student, teacher = make_logits((4, 300), torch.float32, seed=8)
    student = (student.sign() * 1e4).to(dtype) if dtype != torch.float16 else (student * 3e3).to(dtype)
    teacher[:, :150] = 1e4
    teacher = teacher.to(dtype)
    check_against_oracle(op, student, teacher, 0.1, backend, what=f"{backend}/{op}/{dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_negative_infinity_entries(backend, op, dtype):
    """−inf logits (masked vocabulary) are probabilities of exactly 0: they add 0, never NaN."""
    student, teacher = make_logits((4, 200), torch.float32, seed=9)
    student[:, :50] = -math.inf  # masked in both
    teacher[:, :50] = -math.inf
    student[0, 60:80] = -math.inf  # masked only in the student
    teacher[1, 90:120] = -math.inf  # masked only in the teacher
    alpha = 0.25
    loss, grad = check_against_oracle(op, student.to(dtype), teacher.to(dtype), alpha, backend, what=f"{backend}/{op}")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert torch.equal(grad[:, :50], torch.zeros_like(grad[:, :50]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "seqmean"])
def test_all_rows_ignored(backend, op, reduction):
    student, teacher = make_logits((2, 3, 100), torch.bfloat16, seed=10)
    student.requires_grad_(True)
    labels = torch.full((2, 3), -100, device=DEVICE)
    loss = run_fused(op, student, teacher, 0.1, backend, labels=labels, reduction=reduction)
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(student.grad, torch.zeros_like(student.grad))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_custom_ignore_index(backend, op):
    student, teacher = make_logits((5, 64), torch.float32, seed=11)
    labels = torch.tensor([3, 7, 7, 1, 2], device=DEVICE)
    student.requires_grad_(True)
    loss = run_fused(op, student, teacher, 0.1, backend, labels=labels, ignore_index=7, reduction="none")
    loss.sum().backward()
    assert torch.equal(loss[1:3], torch.zeros(2, device=DEVICE))
    assert torch.equal(student.grad[1:3], torch.zeros_like(student.grad[1:3]))
    assert (loss[[0, 3, 4]] > 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_sliced_rows_are_not_copied(backend, op):
    """A view with a row stride other than V (logits[..., :V]) is read in place."""
    wide_student, wide_teacher = make_logits((2, 3, 700), torch.bfloat16, seed=12)
    student, teacher = wide_student[..., :651], wide_teacher[..., 20:671]
    assert student.stride(-2) == 700 and not student.is_contiguous()
    check_against_oracle(op, student, teacher, 0.1, backend, what=f"{backend}/{op}/sliced")


def test_rows_stay_views():
    from distillm2_kernels._inputs import prepare_rows

    big = torch.randn(2, 3, 50)
    rows = prepare_rows(big[..., :40], big[..., 5:45], 0.1, None, -100, 1.0)
    assert rows.student.data_ptr() == big.data_ptr() and rows.student.stride() == (50, 1)
    assert rows.teacher.data_ptr() == big[..., 5:].data_ptr()


# --- leading dims with strides of their own: [B, T−1, V] slices of [B, T, V] logits are read in place ------

STRIDED_LAYOUTS = ["shifted", "shifted_pair", "contiguous_teacher", "vocab_slice", "four_dims", "expanded_teacher"]


def strided_logits(layout, dtype=torch.float32, seed=21):
    """(student, teacher, full student) for leading dims that need two strided levels (rows V apart within a
    sequence, T·V apart across sequences): no single row stride, so a reshape to [N, V] would copy."""
    shape = (2, 2, 6, 130) if layout == "four_dims" else (3, 6, 130)
    full_student, full_teacher = make_logits(shape, dtype, seed=seed)
    student, teacher = full_student[..., :-1, :], full_teacher[..., :-1, :]
    if layout == "shifted_pair":
        teacher = full_teacher[..., 1:, :]
    elif layout == "contiguous_teacher":
        teacher = teacher.contiguous()
    elif layout == "expanded_teacher":  # one sequence for all: outer stride 0
        teacher = teacher[:1].expand(student.shape)
    elif layout == "vocab_slice":
        student, teacher = full_student[:, :-1, :100], full_teacher[:, 1:, 30:]
    return student, teacher, full_student


@pytest.mark.parametrize("layout", STRIDED_LAYOUTS)
def test_strided_leading_dims_stay_views(layout):
    from distillm2_kernels._inputs import prepare_rows

    student, teacher, _ = strided_logits(layout)
    rows = prepare_rows(student, teacher, 0.1, None, -100, 1.0)
    for original, seen in ((student, rows.student), (teacher, rows.teacher)):
        assert seen.data_ptr() == original.data_ptr()
        assert seen.untyped_storage().data_ptr() == original.untyped_storage().data_ptr()
    assert rows.student.dim() == 3 and rows.student.shape == rows.teacher.shape
    assert rows.num_rows == math.prod(student.shape[:-1]) and rows.vocab_size == student.shape[-1]


def test_leading_dims_that_need_copies():
    """Three strided levels, a vocabulary stride other than 1, or different splits for student and teacher
    (the teacher is then copied): documented copies, still correct (checked against the oracle)."""
    from distillm2_kernels._inputs import prepare_rows

    full_student, full_teacher = make_logits((2, 4, 6, 50), torch.float32, seed=22)
    other_student, other_teacher = make_logits((2, 3, 7, 50), torch.float32, seed=24)
    cases = {  # student, teacher, (student copied, teacher copied)
        "three levels": (full_student[:, :-1, :-1], full_teacher[:, :-1, :-1], (True, True)),
        "different splits": (full_student[:, :-1, :], other_teacher[:, :, 1:], (False, True)),
        "vocabulary stride": (other_student[..., :6, :6].transpose(-1, -2), full_teacher[:, 1:, :, :6], (True, False)),
    }
    for name, (student, teacher, copied) in cases.items():
        rows = prepare_rows(student, teacher, 0.1, None, -100, 1.0)
        for original, seen, was_copied in zip((student, teacher), (rows.student, rows.teacher), copied):
            same = seen.untyped_storage().data_ptr() == original.untyped_storage().data_ptr()
            assert same != was_copied, name
        check_against_oracle("srkl", student, teacher, 0.3, "torch", what=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layout", STRIDED_LAYOUTS)
def test_strided_leading_dims_match_oracle(backend, op, layout):
    """Loss and gradient on the views against the float64 oracle, and the gradient of the full tensor:
    the view's gradient in place, zeros at the positions the slice leaves out."""
    student, teacher, full_student = strided_logits(layout, torch.bfloat16)
    leading = student.shape[:-1]
    labels = torch.arange(math.prod(leading)).reshape(leading) % 97
    labels.view(-1)[[0, 4]] = -100
    alpha = torch.rand(leading, generator=torch.Generator().manual_seed(23))
    _, view_grad = check_against_oracle(
        op, student, teacher, alpha, backend, labels=labels, temperature=0.8, what=f"{backend}/{op}/{layout}"
    )
    full = full_student.detach().requires_grad_(True)
    sliced = full[..., :-1, :] if layout != "vocab_slice" else full[:, :-1, :100]
    upstream = torch.rand(leading, generator=torch.Generator().manual_seed(1))
    loss = run_fused(op, sliced, teacher, alpha, backend, labels=labels, temperature=0.8, reduction="none")
    (full_grad,) = torch.autograd.grad((loss * upstream).sum(), full)
    in_view = torch.zeros_like(full, dtype=torch.bool)
    in_view[..., :-1, :] = True
    if layout == "vocab_slice":
        in_view[..., 100:] = False
    assert torch.equal(full_grad[..., :-1, :][..., : student.shape[-1]].reshape(view_grad.shape), view_grad)
    assert torch.equal(full_grad[~in_view], torch.zeros_like(full_grad[~in_view]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layout", ["shifted", "contiguous_teacher", "four_dims", "expanded_teacher"])
@pytest.mark.parametrize("chunk_rows", [2, 10])
def test_strided_leading_dims_are_not_copied(backend, op, layout, chunk_rows, monkeypatch):
    """The backend gets the caller's storage (by data pointer), and the forward allocates nothing of the
    logits' size (the allocator spy); the backward only the [N, V] gradient. `chunk_rows`: the torch
    backend's rows per chunk, below one sequence (blocks within a sequence) or above (whole sequences)."""
    from distillm2_kernels.backends import BACKEND_MODULES

    student, teacher, _ = strided_logits(layout, torch.bfloat16)
    student = student.detach().requires_grad_(True)  # a leaf view: its gradient is the op's own output
    n, vocab = math.prod(student.shape[:-1]), student.shape[-1]
    monkeypatch.setattr(torch_backend, "CHUNK_BYTES", chunk_rows * vocab * 4)
    module = BACKEND_MODULES[backend]
    seen = []
    fused = hasattr(module, "skew_forward_and_grad")  # a scalar reduction's gradient comes out of the forward
    for name in ("skew_forward_and_grad",) if fused else ("skew_forward", "skew_backward"):
        def spy(rows, *args, _real=getattr(module, name)):
            seen.append((rows.student.data_ptr(), rows.teacher.data_ptr()))
            return _real(rows, *args)

        monkeypatch.setattr(module, name, spy)
    with NewStorages() as forward:
        loss = run_fused(op, student, teacher, 0.2, backend, reduction="sum")
    with NewStorages() as backward:
        loss.backward()
    assert seen == [(student.data_ptr(), teacher.data_ptr())] * (1 if fused else 2)
    forward_full = [op_name for size, op_name in forward.sizes if size >= n * vocab]
    backward_full = [op_name for size, op_name in backward.sizes if size >= n * vocab]
    # the gradient itself, the only allocation of the logits' size: in the forward where it is computed there
    assert (len(forward_full), len(backward_full)) == ((1, 0) if fused else (0, 1)), (forward_full, backward_full)
    assert student.grad.shape == student.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_reductions(backend, op):
    """mean: over non-ignored tokens; seqmean: token mean per sequence, then mean over non-empty sequences."""
    student, teacher = make_logits((3, 4, 90), torch.float32, seed=13)
    labels = torch.ones(3, 4, dtype=torch.long, device=DEVICE)
    labels[0, :3] = -100
    labels[2] = -100  # an empty sequence: left out of the seqmean
    per_token = run_fused(op, student, teacher, 0.1, backend, labels=labels, reduction="none").double()
    valid = (labels != -100).double()
    expected = {
        "sum": per_token.sum(),
        "mean": per_token.sum() / valid.sum(),
        "seqmean": ((per_token.sum(-1) / valid.sum(-1).clamp(min=1))[:2]).mean(),
    }
    for reduction, value in expected.items():
        got = run_fused(op, student, teacher, 0.1, backend, labels=labels, reduction=reduction)
        assert got.shape == () and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), value, rtol=1e-6, atol=1e-7)
    # each reduction's gradient is the per-token gradient with the reduction's weights
    weights = {
        "sum": valid.new_ones(valid.shape),
        "mean": valid.new_ones(valid.shape) / valid.sum(),
        "seqmean": valid.new_ones(valid.shape) / valid.sum(-1, keepdim=True).clamp(min=1) / 2,
    }
    for reduction, upstream in weights.items():
        s = student.detach().requires_grad_(True)
        run_fused(op, s, teacher, 0.1, backend, labels=labels, reduction=reduction).backward()
        kw = dict(labels=labels, upstream=upstream)
        _, grad64 = oracle_loss_and_grad(op, student, teacher, 0.1, **kw)
        _, grad32 = oracle_loss_and_grad(op, student, teacher, 0.1, dtype=torch.float32, **kw)
        assert_matches_oracle(
            s.grad, grad64, grad32, out_dtype=torch.float32, magnitude=logit_magnitude(student, teacher), what=reduction
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_gradient_needed(backend):
    student, teacher = make_logits((4, 33), torch.float32, seed=14)
    with torch.no_grad():
        loss = fused_skl(student, teacher, backend=backend)
    assert not loss.requires_grad and torch.isfinite(loss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_dimensional_input(backend):
    student, teacher = make_logits((50,), torch.float32, seed=15)
    loss = fused_srkl(student, teacher, 0.1, backend=backend, reduction="none")
    assert loss.shape == ()
    per_row = fused_srkl(student[None], teacher[None], 0.1, backend=backend, reduction="none")
    torch.testing.assert_close(loss, per_row[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_detach_changes_gradient_not_value(backend):
    student, teacher = make_logits((3, 80), torch.float32, seed=16)
    s1, s2 = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    full = fused_srkl(s1, teacher, 0.3, backend=backend)
    detached = fused_srkl(s2, teacher, 0.3, backend=backend, detach_mixture=True)
    torch.testing.assert_close(full, detached)
    full.backward()
    detached.backward()
    assert (s1.grad - s2.grad).abs().max() > 1e-4


# --- property tests -----------------------------------------------------------------------------------------


@st.composite
def skew_cases(draw):
    batch = draw(st.integers(1, 3))
    seq = draw(st.integers(1, 3))
    vocab = draw(st.integers(1, 1500))
    dtype = draw(st.sampled_from(DTYPES))
    # α as the kernels see it: a float32 (below float32's normal range it acts as 0, see fused_skl)
    alpha = draw(st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0, width=32, allow_subnormal=False)))
    temperature = draw(st.sampled_from([0.7, 1.0, 1.9]))
    scale = draw(st.sampled_from([0.1, 3.0, 30.0]))
    ignored = draw(st.lists(st.booleans(), min_size=batch * seq, max_size=batch * seq))
    seed = draw(st.integers(0, 2**16))
    return batch, seq, vocab, dtype, alpha, temperature, scale, ignored, seed


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@given(case=skew_cases())
def test_property_matches_oracle(backend, op, case):
    batch, seq, vocab, dtype, alpha, temperature, scale, ignored, seed = case
    student, teacher = make_logits((batch, seq, vocab), dtype, scale=scale, seed=seed)
    labels = torch.zeros(batch, seq, dtype=torch.long)
    labels.view(-1)[torch.tensor(ignored)] = -100
    check_against_oracle(
        op, student, teacher, alpha, backend, labels=labels.to(DEVICE), temperature=temperature, what=str(case)
    )


# --- non-finite inputs: NaN and +inf logits are never hidden --------------------------------------------

POISONS = {"nan": math.nan, "inf": math.inf}


def run_with_gradient(op, student, teacher, alpha, backend, labels, temperature):
    """Per-token loss (reduction "none") and the gradient of its sum w.r.t. the student logits."""
    leaf = student.detach().requires_grad_(True)
    loss = run_fused(op, leaf, teacher, alpha, backend, labels=labels, temperature=temperature, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), leaf)
    return loss.detach(), grad


def check_non_finite_rows(op, student, teacher, poisoned, alpha, backend, *, labels=None, temperature=1.0):
    """`poisoned` [N] marks the rows whose logits hold NaN or +inf. A counted poisoned row: NaN loss, a
    gradient row of NaN only, NaN label log-probabilities. An ignored row: exactly 0, also when poisoned. The
    other rows: bit for bit what the same call gives with the poisoned rows made finite, and finite."""
    vocab = student.shape[-1]
    loss, grad = run_with_gradient(op, student, teacher, alpha, backend, labels, temperature)
    loss, grad = loss.reshape(-1), grad.reshape(-1, vocab)
    poisoned = poisoned.to(loss.device)
    counted = torch.ones_like(poisoned) if labels is None else (labels != -100).reshape(-1)
    bad, clean = poisoned & counted, ~poisoned & counted
    assert loss[bad].isnan().all(), f"{backend}/{op}: a poisoned row's loss is not NaN: {loss[bad]}"
    assert grad[bad].isnan().all(), f"{backend}/{op}: a poisoned row's gradient is not all NaN"
    assert torch.equal(loss[~counted], torch.zeros_like(loss[~counted]))
    assert torch.equal(grad[~counted], torch.zeros_like(grad[~counted]))
    finite_student = student.reshape(-1, vocab).clone()
    finite_teacher = teacher.reshape(-1, vocab).clone()
    for logits in (finite_student, finite_teacher):
        logits[poisoned] = logits[poisoned].nan_to_num(0.0, 0.0, -math.inf)
    expected_loss, expected_grad = run_with_gradient(
        op, finite_student.view(student.shape), finite_teacher.view(teacher.shape), alpha, backend, labels, temperature
    )
    expected_loss, expected_grad = expected_loss.reshape(-1), expected_grad.reshape(-1, vocab)
    assert torch.isfinite(loss[clean]).all() and torch.isfinite(grad[clean]).all()
    assert torch.equal(loss[clean], expected_loss[clean]), f"{backend}/{op}: a finite row changed"
    assert torch.equal(grad[clean], expected_grad[clean]), f"{backend}/{op}: a finite row's gradient changed"
    if labels is not None:
        stats = token_statistics(student, teacher, labels, temperature=temperature, backend=backend)
        log_probs = stats.label_logprobs.reshape(-1, 2)
        for column, logits in enumerate((student, teacher)):  # the poisoned model's log-probability is NaN
            rows = logits.reshape(-1, vocab)
            holds_nan_or_inf = (rows.isnan() | (rows == math.inf)).any(-1) & counted
            assert log_probs[holds_nan_or_inf, column].isnan().all(), f"{backend}: a label log-probability is not NaN"
        assert torch.equal(log_probs[~counted], torch.zeros_like(log_probs[~counted]))
        assert not log_probs[clean].isnan().any()  # −inf for a label at a masked entry


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("poison", ["nan", "inf"])
@pytest.mark.parametrize("side", ["student", "teacher"])
def test_non_finite_logits_give_nan_rows(backend, op, poison, side):
    """The cases of the issue (a NaN or +inf teacher logit gave SKL loss 0; a +inf student logit gave SRKL
    a zero gradient), with masked (−inf) entries, an ignored poisoned row, and α scalar, 0, 1 or per row."""
    student, teacher = make_logits((2, 3, 300), torch.float32, seed=20)
    student[..., :40] = -math.inf  # masked in both: zero probabilities stay exact zeros in the clean rows
    teacher[..., :40] = -math.inf
    target = student if side == "student" else teacher
    target[0, 1, 7] = POISONS[poison]  # counted
    target[1, 2, 299] = POISONS[poison]  # counted, the last entry
    target[1, 0, 100] = POISONS[poison]  # ignored
    poisoned = torch.zeros(6, dtype=torch.bool)
    poisoned[[1, 5, 3]] = True
    labels = torch.tensor([[41, 42, 3], [-100, 44, 45]], device=DEVICE)
    per_row = torch.tensor([[0.0, 1.0, 0.5], [0.3, 1.0, 0.0]], device=DEVICE)
    for alpha in (0.2, 0.0, 1.0, per_row):
        for temperature in (1.0, 0.7):
            check_non_finite_rows(op, student, teacher, poisoned, alpha, backend, labels=labels, temperature=temperature)
    check_non_finite_rows(op, student, teacher, poisoned, 0.2, backend)  # without labels every row counts


@st.composite
def non_finite_cases(draw):
    rows = draw(st.integers(1, 6))
    vocab = draw(st.integers(1, 700))
    dtype = draw(st.sampled_from(DTYPES))
    alpha = draw(st.one_of(st.sampled_from([0.0, 1.0, "per_row"]), st.floats(0.0, 1.0, width=32, allow_subnormal=False)))
    temperature = draw(st.sampled_from([0.7, 1.0, 1.9]))
    # per row: None (finite) or (which logits, value, column)
    poison = st.one_of(
        st.none(),
        st.tuples(st.sampled_from(["student", "teacher", "both"]), st.sampled_from(["nan", "inf"]), st.integers(0, vocab - 1)),
    )
    poisons = draw(st.lists(poison, min_size=rows, max_size=rows))
    use_labels = draw(st.booleans())
    ignored = draw(st.lists(st.booleans(), min_size=rows, max_size=rows))
    masked = draw(st.integers(0, vocab - 1))  # leading entries masked (−inf) in both logits
    seed = draw(st.integers(0, 2**16))
    return rows, vocab, dtype, alpha, temperature, poisons, use_labels, ignored, masked, seed


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@given(case=non_finite_cases())
def test_property_non_finite_rows(backend, op, case):
    rows, vocab, dtype, alpha, temperature, poisons, use_labels, ignored, masked, seed = case
    student, teacher = make_logits((rows, vocab), torch.float32, seed=seed)
    student[:, :masked], teacher[:, :masked] = -math.inf, -math.inf
    poisoned = torch.zeros(rows, dtype=torch.bool)
    for row, poison in enumerate(poisons):
        if poison is not None:
            side, value, column = poison
            for name, logits in (("student", student), ("teacher", teacher)):
                if side in (name, "both"):
                    logits[row, column] = POISONS[value]
            poisoned[row] = True
    if alpha == "per_row":
        alpha = torch.rand(rows, 1, generator=torch.Generator().manual_seed(seed)).squeeze(1).to(DEVICE)
    labels = None
    if use_labels:
        labels = torch.zeros(rows, dtype=torch.long)
        labels[torch.tensor(ignored)] = -100
        labels = labels.to(DEVICE)
    check_non_finite_rows(
        op, student.to(dtype), teacher.to(dtype), poisoned, alpha, backend, labels=labels, temperature=temperature
    )


# --- the tolerance itself ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_tolerance_rejects_wrong_gradients(dtype):
    """The tolerance rule must catch an SKL gradient that lacks its α term (i.e. plain KL's)."""
    student, teacher = make_logits((4, 500), dtype, seed=17)
    magnitude = logit_magnitude(student, teacher)
    _, grad64 = oracle_loss_and_grad("skl", student, teacher, 0.1)
    _, grad_lo = oracle_loss_and_grad("skl", student, teacher, 0.1, dtype=dtype)
    _, wrong = oracle_loss_and_grad("skl", student, teacher, 0.0)
    assert_matches_oracle(grad64.to(dtype), grad64, grad_lo, out_dtype=dtype, magnitude=magnitude)
    with pytest.raises(AssertionError, match=r": error \S+ > "):  # the rule's bound, not a NaN or shape check
        assert_matches_oracle(wrong.to(dtype), grad64, grad_lo, out_dtype=dtype, magnitude=magnitude)


# --- modules and the Function API ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_modules_match_functional(backend):
    student, teacher = make_logits((2, 3, 40), torch.float32, seed=18)
    labels = torch.ones(2, 3, dtype=torch.long, device=DEVICE)
    labels[1, 2] = -100
    skl = SkewKLLoss(0.2, temperature=1.5, reduction="seqmean", backend=backend)
    srkl = SkewReverseKLLoss(0.2, detach_mixture=True, reduction="sum", backend=backend)
    torch.testing.assert_close(
        skl(student, teacher, labels),
        fused_skl(student, teacher, 0.2, labels=labels, temperature=1.5, reduction="seqmean", backend=backend),
    )
    torch.testing.assert_close(
        srkl(student, teacher, labels, alpha=0.4),
        fused_srkl(student, teacher, 0.4, labels=labels, reduction="sum", detach_mixture=True, backend=backend),
    )
    assert "alpha=0.2" in repr(skl) and "detach_mixture=True" in repr(srkl)
    with pytest.raises(ValueError, match="alpha"):
        SkewKLLoss(1.5)
    with pytest.raises(ValueError, match="reduction"):
        SkewReverseKLLoss(reduction="avg")


@pytest.mark.parametrize("backend", BACKENDS)
def test_function_apply(backend):
    student, teacher = make_logits((2, 3, 40), torch.float32, seed=19)
    student.requires_grad_(True)
    per_token = FusedSKLFunction.apply(student, teacher, 0.1, None, -100, 1.0, backend)
    assert per_token.shape == (2, 3)
    per_token.sum().backward()
    assert student.grad.shape == student.shape
    per_token = FusedSRKLFunction.apply(student, teacher, 0.1, None, -100, 1.0, backend, True)
    torch.testing.assert_close(per_token, fused_srkl(student, teacher, 0.1, reduction="none", backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_backward_of_a_forward_computed_gradient_is_refused(backend):
    """Where the backend computes a scalar reduction's gradient in the forward, the backward scales it in place
    (the op's only [N, V] tensor): a second backward through the same graph says so instead of returning a
    gradient scaled twice. Elsewhere the second backward gives the first one's gradient again."""
    from distillm2_kernels.backends import BACKEND_MODULES

    student, teacher = make_logits((6, 50), torch.float32, seed=3)
    student = student.requires_grad_(True)
    loss = run_fused("skl", student, teacher, 0.2, backend)
    (first,) = torch.autograd.grad(3.0 * loss, student, retain_graph=True)
    first = first.clone()
    if hasattr(BACKEND_MODULES[backend], "skew_forward_and_grad"):
        with pytest.raises(RuntimeError, match="second backward"):
            torch.autograd.grad(loss, student)
    else:
        (second,) = torch.autograd.grad(3.0 * loss, student)
        assert torch.equal(first, second)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("upstream", [0.5, -2.0, float("nan")])
def test_forward_computed_gradient_takes_the_upstream_gradient_exactly(backend, upstream):
    """The backward of a forward-computed gradient skips its scale where the upstream gradient is the CPU
    scalar 1 (`loss.backward()`): that gradient is the multiplied one's bit for bit (an upstream 1 that requires
    grad takes the multiply), and every other value, NaN included, still scales it. Scaling bf16 by a power of 2
    is exact, so the scaled gradients are compared bit for bit too."""
    student, teacher = make_logits((6, 50), torch.bfloat16, seed=5)

    def gradient(upstream_value, requires_grad=False):
        leaf = student.clone().requires_grad_(True)
        loss = run_fused("srkl", leaf, teacher, 0.2, backend)
        incoming = torch.tensor(upstream_value, device=loss.device, requires_grad=requires_grad)
        return torch.autograd.grad(loss, leaf, grad_outputs=incoming)[0]

    unit = gradient(1.0)
    assert torch.equal(unit, gradient(1.0, requires_grad=True))
    scaled = gradient(upstream)
    if math.isnan(upstream):
        assert bool(scaled.isnan().all())
    else:
        assert torch.equal(scaled.float(), unit.float() * upstream)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", [0.0, 1.1754944e-38, 1e-30, 0.1])
def test_an_underflowing_student_probability_under_a_large_teacher_one(backend, alpha):
    """An entry whose q is below float32's normal range (about e^-100: subnormal, or flushed to 0 by a GPU's
    ex2.ftz) where p is about 0.98. At α = 0 the mixture there is q itself, ā = (1−α)q/m = 1 and the SKL
    gradient is q − p ≈ −p; for a tiny α > 0 the mixture is below 2^-126 too. (A mixture whose reciprocal was
    clamped at 2^-125 gave ā ≈ 0 there, a gradient of ≈ 0 in the place of −0.98.)"""
    student = torch.zeros(3, 64)
    teacher = torch.zeros(3, 64)
    student[:, 1] = torch.tensor([-95.0, -100.0, -120.0])
    teacher[:, 1] = 8.0
    check_against_oracle("skl", student.to(DEVICE), teacher.to(DEVICE), alpha, backend, what=f"alpha={alpha}")
