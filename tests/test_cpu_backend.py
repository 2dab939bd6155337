"""The C++ CPU backend (`backend="cpu"`, distillm2_kernels/csrc/) against the float64 oracle, plus what is specific to it:
the backend interface (row statistics, precomputed statistics, exact zero at α = 1), thread-count determinism, every instruction-set build, large rows, the fallback when the extension is missing,
and the custom ops under torch.compile.

Tolerance rule (docs/design.md §6): a result passes when its max error against the float64 reference is no
worse than that of the same reference evaluated in the input dtype, plus an allowance for float32 rounding in
log space, ALLOWANCE_ULPS · eps32 · (1 + max|z/T|) · scale; and it may not exceed 2 · eps(output dtype) · scale
plus that allowance, so a low-precision baseline cannot hide a wrong result. Loss scale: max|loss| + log(V+1);
gradient scale: max over entries of |upstream|/T · (q + p), the size of the gradient's terms.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from distillm2_kernels import fused_skl, fused_srkl, reference
from distillm2_kernels._inputs import prepare_rows
from distillm2_kernels.backends import available_backends, cpu_backend, torch_backend
from oracle import oracle_loss_and_grad

pytestmark = pytest.mark.skipif(
    cpu_backend.unavailable_reason() is not None,
    reason=f"the C++ CPU backend is unavailable: {cpu_backend.unavailable_reason()}",
)

ROOT = Path(__file__).resolve().parents[1]
OPS = ["skl", "srkl", "srkl_detach"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24, torch.float64: 2.0**-53}
ALLOWANCE_ULPS = 16


@pytest.fixture(autouse=True)
def nan_poisoned_allocations(monkeypatch):
    """`torch.empty` / `torch.empty_like` return NaN-filled memory, so an output element the backend forgets to
    write shows up as NaN (the cpu backend allocates its outputs in Python and the kernels fill them)."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(tensor):
        return tensor.fill_(math.nan) if tensor.is_floating_point() else tensor

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))


def run_fused(op, student, teacher, alpha, backend="cpu", **kwargs):
    if op == "skl":
        return fused_skl(student, teacher, alpha, backend=backend, **kwargs)
    return fused_srkl(student, teacher, alpha, backend=backend, detach_mixture=op == "srkl_detach", **kwargs)


def make_logits(shape, dtype, *, scale=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(shape, generator=gen) * scale).to(dtype)
    teacher = (torch.randn(shape, generator=gen) * scale + 0.5 * student.float()).to(dtype)
    return student, teacher


def assert_matches_oracle(actual, oracle, baseline, *, out_dtype, magnitude, scale, what):
    actual64, oracle64 = actual.detach().double(), oracle.double()
    assert actual.shape == oracle.shape, what
    assert not torch.isnan(actual64).any(), f"{what}: NaN in the result"
    finite = torch.isfinite(oracle64)
    assert torch.equal(torch.isfinite(actual64), finite), f"{what}: infinities differ from the oracle"
    assert torch.equal(actual64[~finite], oracle64[~finite]), f"{what}: infinities differ from the oracle"
    if not finite.any():
        return
    err = (actual64 - oracle64)[finite].abs().max().item()
    base = (baseline.detach().double() - oracle64)[finite].abs().nan_to_num(math.inf).max().item()
    allowance = ALLOWANCE_ULPS * EPS[torch.float32] * (1.0 + magnitude) * scale
    assert err <= base + allowance, f"{what}: error {err:.3g} > reference-in-dtype error {base:.3g} + {allowance:.3g}"
    cap = 2 * EPS[out_dtype] * scale + allowance
    assert err <= cap, f"{what}: error {err:.3g} > 2·eps({out_dtype})·scale + allowance = {cap:.3g}"


def fused_loss_and_grad(op, student, teacher, alpha, *, labels=None, ignore_index=-100, temperature=1.0):
    """backend="cpu": per-token loss, the gradient of Σ loss·upstream w.r.t. the student, and upstream."""
    leaf = student.detach().requires_grad_(True)
    loss = run_fused(op, leaf, teacher, alpha, labels=labels, ignore_index=ignore_index, temperature=temperature,
                     reduction="none")
    upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad((loss * upstream).sum(), leaf)
    assert loss.dtype == torch.float32 and grad.dtype == student.dtype and grad.is_contiguous()
    return loss, grad, upstream


def assert_loss_and_grad_match_oracle(op, loss, grad, student, teacher, alpha, *, upstream, labels=None,
                                      ignore_index=-100, temperature=1.0, what=""):
    """The tolerance rule for a per-token loss and student gradient computed from these inputs."""
    kw = dict(labels=labels, ignore_index=ignore_index, temperature=temperature, upstream=upstream)
    loss64, grad64 = oracle_loss_and_grad(op, student, teacher, alpha, dtype=torch.float64, **kw)
    loss_lo, grad_lo = oracle_loss_and_grad(op, student, teacher, alpha, dtype=student.dtype, **kw)
    finite_values = [z.double()[torch.isfinite(z)].abs().max().item() for z in (student, teacher) if torch.isfinite(z).any()]
    magnitude = max(finite_values, default=0.0) / temperature
    finite = torch.isfinite(loss64)
    loss_scale = (loss64[finite].abs().max().item() if finite.any() else 0.0) + math.log(student.shape[-1] + 1)
    assert_matches_oracle(loss, loss64, loss_lo, out_dtype=torch.float32, magnitude=magnitude, scale=loss_scale,
                          what=f"{what} loss")
    q64 = torch.softmax(student.double() / temperature, -1)
    p64 = torch.softmax(teacher.double() / temperature, -1)
    grad_scale = (upstream.double().abs().unsqueeze(-1) * (q64 + p64)).nan_to_num(0.0).max().item() / temperature
    assert_matches_oracle(grad, grad64, grad_lo, out_dtype=student.dtype, magnitude=magnitude, scale=grad_scale,
                          what=f"{what} grad")


def check_against_oracle(op, student, teacher, alpha, *, labels=None, ignore_index=-100, temperature=1.0, what=""):
    """Runs backend="cpu" and holds its per-token loss and student gradient to the tolerance rule."""
    kw = dict(labels=labels, ignore_index=ignore_index, temperature=temperature)
    loss, grad, upstream = fused_loss_and_grad(op, student, teacher, alpha, **kw)
    assert_loss_and_grad_match_oracle(op, loss, grad, student, teacher, alpha, upstream=upstream, what=what, **kw)
    return loss, grad


# --- against the oracle -----------------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab, temperature", [(7, 1.0), (1000, 2.5), (4099, 0.7)])
def test_matches_oracle(op, dtype, vocab, temperature):
    student, teacher = make_logits((2, 3, vocab), dtype, seed=vocab)
    labels = torch.tensor([[1, -100, 2], [3, 4, 5]])
    check_against_oracle(op, student, teacher, 0.3, labels=labels, temperature=temperature, what=f"{op} {dtype} V={vocab}")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_alpha_at_both_ends(op, dtype, alpha):
    student, teacher = make_logits((5, 333), dtype, seed=3)
    loss, _ = check_against_oracle(op, student, teacher, alpha, what=f"{op} α={alpha}")
    if alpha == 1.0:
        assert torch.equal(loss, torch.zeros_like(loss))  # KL(p ‖ p) is exactly 0 in log space


@pytest.mark.parametrize("op", OPS)
def test_per_row_alpha(op):
    student, teacher = make_logits((3, 4, 257), torch.bfloat16, seed=4)
    per_sequence = torch.tensor([0.0, 0.5, 1.0])
    check_against_oracle(op, student, teacher, per_sequence, what="per-sequence α")
    per_token = torch.rand(3, 4, generator=torch.Generator().manual_seed(5))
    per_token[0, 0], per_token[1, 1] = 0.0, 1.0
    check_against_oracle(op, student, teacher, per_token, what="per-token α")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_all_rows_ignored(op, dtype):
    student, teacher = make_logits((2, 3, 513), dtype)
    student.requires_grad_(True)
    labels = torch.full((2, 3), 7)
    loss = run_fused(op, student, teacher, 0.1, labels=labels, ignore_index=7, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), student)
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(grad, torch.zeros_like(grad))
    mean = run_fused(op, student, teacher, 0.1, labels=labels, ignore_index=7, reduction="mean")
    assert mean.item() == 0.0


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_and_masked_logits(op, dtype):
    student, teacher = make_logits((6, 1031), torch.float32, seed=6)
    student[0, :40], teacher[0, 20:60] = 1e4, -1e4  # ±1e4 logits
    student[1, ::3] = -math.inf  # masked student entries (finite loss: α > 0 keeps the mixture positive)
    teacher[2, 1::2] = -math.inf  # masked teacher entries
    student[3, 5], teacher[3, 5] = -1e4, 1e4  # near one-hot rows
    student[4, 7], teacher[4, 9] = 80.0, 80.0
    check_against_oracle(op, student.to(dtype), teacher.to(dtype), 0.2, what=f"{op} extreme")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_vocabulary_masked_in_both(op, alpha):
    """Entries that are −inf in both rows are zero probabilities: they contribute exactly 0 and get a zero
    gradient, and the rest is the divergence over the unmasked vocabulary. (The float64 reference's autograd
    gives NaN through logaddexp(−inf, −inf), so the oracle is evaluated on the unmasked entries.)"""
    student, teacher = make_logits((4, 1100), torch.float32, seed=7)
    masked = torch.zeros(1100, dtype=torch.bool)
    masked[:500], masked[700:703] = True, True
    student[:, masked], teacher[:, masked] = -math.inf, -math.inf
    loss, grad, upstream = fused_loss_and_grad(op, student, teacher, alpha)
    assert torch.equal(grad[:, masked], torch.zeros_like(grad[:, masked]))
    assert_loss_and_grad_match_oracle(op, loss, grad[:, ~masked], student[:, ~masked], teacher[:, ~masked], alpha,
                                      upstream=upstream, what="masked vocabulary")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_large_logits_keep_log_softmax_accuracy(op, alpha):
    """|z/T| near 170 and a loss near 100: log q must be (s − max) − log Σ exp(s − max), as in a log_softmax,
    and s = z / T rounded once. (A log-sum-exp held as one float, or z · fl(1/T), gave a gradient error of
    2e-4 here against 1e-6 for the float32 reference.)"""
    student, teacher = make_logits((1, 2, 915), torch.float32, scale=30.0, seed=0)
    check_against_oracle(op, student, teacher, alpha, temperature=0.7, what="|z/T| ~ 170")


@pytest.mark.parametrize("op", OPS)
def test_mixed_student_and_teacher_dtypes(op):
    student, teacher = make_logits((4, 777), torch.float32, seed=8)
    check_against_oracle(op, student.to(torch.bfloat16), teacher, 0.4, what="bf16 student, fp32 teacher")


@pytest.mark.parametrize("op", OPS)
def test_float64_runs_in_float64(op):
    student, teacher = make_logits((3, 101), torch.float64, seed=9)
    student.requires_grad_(True)
    loss = run_fused(op, student, teacher, 0.3, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), student)
    loss64, grad64 = oracle_loss_and_grad(op, student, teacher, 0.3, dtype=torch.float64, labels=None,
                                          ignore_index=-100, temperature=1.0, upstream=torch.ones(3))
    assert loss.dtype == grad.dtype == torch.float64
    torch.testing.assert_close(loss, loss64, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, grad64, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("op", OPS)
def test_large_vocabulary(op):
    student, teacher = make_logits((3, 262144), torch.bfloat16, scale=4.0, seed=10)
    check_against_oracle(op, student, teacher, 0.1, labels=torch.tensor([0, -100, 2]), what="V = 262144")


# --- the backend interface: row statistics, forward on precomputed statistics, α = 1 ---------------------

REVERSE_DETACH = {"skl": (False, False), "srkl": (True, False), "srkl_detach": (True, True)}
IGNORE_INDEX = -100


def statistics_inputs(dtype, *, vocab=1031, seed=20):
    """Rows with in-vocabulary labels (first and last token), ignored rows, labels outside [0, V), a row with
    masked student entries, and a row with large logits."""
    student, teacher = make_logits((9, vocab), torch.float32, seed=seed)
    student[6, ::3] = -math.inf
    student[7], teacher[7] = student[7] * 30.0, teacher[7] * 30.0
    labels = torch.tensor([0, vocab - 1, IGNORE_INDEX, 17, -1, vocab, IGNORE_INDEX, 5, 6])
    return student.to(dtype), teacher.to(dtype), labels


def assert_identical(actual, expected, what):
    """Equal to the last bit, NaN where the other has NaN."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_statistics_match_torch_backend_and_log_softmax(dtype, temperature):
    student, teacher, labels = statistics_inputs(dtype)
    rows = prepare_rows(student, teacher, 0.3, labels, IGNORE_INDEX, temperature)
    stats = cpu_backend.skew_statistics(rows)
    expected = torch_backend.skew_statistics(rows)
    assert stats.shape == (9, cpu_backend.STATS) == (9, 7) and stats.dtype == torch.float32

    ignored = labels == IGNORE_INDEX
    assert torch.equal(stats[ignored], torch.zeros_like(stats[ignored]))
    counted = ~ignored
    assert torch.equal(stats[counted][:, [0, 2]], expected[counted][:, [0, 2]])  # max z: same float32 values
    log_sums, expected_log_sums = stats[counted][:, [1, 3]].double(), expected[counted][:, [1, 3]].double()
    assert (log_sums - expected_log_sums).abs().max() <= ALLOWANCE_ULPS * EPS[torch.float32] * (
        1.0 + expected_log_sums.abs().max()
    )
    assert torch.equal(stats[:, 4], torch.zeros(9))

    in_vocab = counted & (labels >= 0) & (labels < student.shape[-1])
    assert torch.isnan(stats[counted & ~in_vocab][:, 5:]).all()
    for column, logits in ((5, student), (6, teacher)):
        log_probs = torch.log_softmax(logits[in_vocab].double() / temperature, -1)
        oracle = log_probs.gather(-1, labels[in_vocab].unsqueeze(-1)).squeeze(-1)
        magnitude = logits[in_vocab].double().nan_to_num(0.0, 0.0, 0.0).abs().amax(-1) / temperature
        error = (stats[in_vocab, column].double() - oracle).abs()
        assert (error <= ALLOWANCE_ULPS * EPS[torch.float32] * (1.0 + magnitude)).all(), (column, error)


def test_statistics_without_labels_have_zero_label_columns():
    student, teacher, _ = statistics_inputs(torch.bfloat16)
    rows = prepare_rows(student, teacher, 0.3, None, IGNORE_INDEX, 1.0)
    stats = cpu_backend.skew_statistics(rows)
    assert torch.equal(stats[:, 4:], torch.zeros(9, 3))
    assert torch.equal(stats[:, [0, 2]], torch_backend.skew_statistics(rows)[:, [0, 2]])


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_on_precomputed_statistics_is_identical(op, dtype):
    """`skew_forward(rows, stats=skew_statistics(rows))` gives exactly what `skew_forward(rows)` gives, and
    leaves the given statistics as they were (also when they are not contiguous)."""
    reverse, detach = REVERSE_DETACH[op]
    student, teacher, labels = statistics_inputs(dtype)
    alpha = torch.linspace(0.0, 1.0, 9)
    rows = prepare_rows(student, teacher, alpha, labels, IGNORE_INDEX, 1.3)
    loss, stats = cpu_backend.skew_forward(rows, reverse, detach)
    precomputed = cpu_backend.skew_statistics(rows)
    assert_identical(precomputed[:, [0, 1, 2, 3, 5, 6]], stats[:, [0, 1, 2, 3, 5, 6]], "statistics")
    for given in (precomputed, precomputed.t().contiguous().t()):
        before = given.clone()
        loss_reused, stats_reused = cpu_backend.skew_forward(rows, reverse, detach, stats=given)
        assert_identical(given, before, "the given statistics")
        assert stats_reused.data_ptr() != given.data_ptr()
        assert_identical(loss_reused, loss, "loss")
        assert_identical(stats_reused, stats, "statistics with C")
    grad_loss = torch.rand(9, generator=torch.Generator().manual_seed(2))
    grad = cpu_backend.skew_backward(rows, reverse, detach, stats, grad_loss)
    assert torch.equal(cpu_backend.skew_backward(rows, reverse, detach, stats_reused, grad_loss), grad)


@pytest.mark.parametrize("op", OPS)
def test_float64_statistics_are_the_torch_backends(op):
    """backend="cpu" on float64 rows: the torch backend's results (`backends.backend_module` routes them)."""
    from distillm2_kernels import custom_ops

    reverse, detach = REVERSE_DETACH[op]
    student, teacher, labels = statistics_inputs(torch.float64)
    rows = prepare_rows(student, teacher, 0.3, labels, IGNORE_INDEX, 0.8)
    stats = custom_ops.statistics(rows, "cpu")
    assert stats.dtype == torch.float64 and stats.shape == (9, 7)
    assert_identical(stats, torch_backend.skew_statistics(rows), "float64 statistics")
    before = stats.clone()
    loss, stats_with_c = custom_ops.forward(rows, reverse=reverse, detach=detach, backend="cpu", stats=stats)
    assert_identical(stats, before, "the given statistics")
    expected_loss, expected_stats = torch_backend.skew_forward(rows, reverse, detach)
    assert_identical(loss, expected_loss, "loss")
    assert_identical(stats_with_c, expected_stats, "statistics with C")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_alpha_one_gives_exactly_zero_loss_and_gradient(op, dtype):
    """At α = 1 the mixture is the distribution itself: ā = e = d = 0, so loss, C and gradient are exactly 0
    (also with masked entries), and a row with α = 1 among others gets exactly zero."""
    student, teacher, labels = statistics_inputs(dtype)
    labels[(labels != IGNORE_INDEX) & ((labels < 0) | (labels >= student.shape[-1]))] = 0  # the ops reject them
    teacher[3, 1::2] = -math.inf
    per_row = torch.tensor([1.0, 0.2, 1.0, 1.0, 0.5, 1.0, 1.0, 1.0, 0.0])
    for alpha, at_one in ((1.0, torch.ones(9, dtype=torch.bool)), (per_row, per_row == 1.0)):
        loss, grad, _ = fused_loss_and_grad(op, student, teacher, alpha, labels=labels, temperature=0.9)
        assert torch.equal(loss[at_one], torch.zeros_like(loss[at_one]))
        assert torch.equal(grad[at_one], torch.zeros_like(grad[at_one]))
    rows = prepare_rows(student, teacher, 1.0, labels, IGNORE_INDEX, 0.9)
    _, stats = cpu_backend.skew_forward(rows, *REVERSE_DETACH[op])
    assert torch.equal(stats[:, 4], torch.zeros(9))


# --- layouts, reductions, determinism ---------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sliced_row_views_match_contiguous(op, dtype):
    wide_student, wide_teacher = make_logits((4, 3, 700), dtype, seed=11)
    student = wide_student[:, :, 5:605]  # row stride 700: stays a view
    teacher = wide_teacher.transpose(0, 1).contiguous().transpose(0, 1)[:, :, :600]  # other strides
    assert not student.is_contiguous() and not teacher.is_contiguous()
    loss, grad = check_against_oracle(op, student, teacher, 0.25, temperature=1.3, what="sliced views")
    loss_c, grad_c = check_against_oracle(op, student.contiguous(), teacher.contiguous(), 0.25, temperature=1.3)
    assert torch.equal(loss, loss_c) and torch.equal(grad, grad_c)


@pytest.mark.parametrize("reduction", ["sum", "mean", "seqmean"])
def test_reductions_broadcast_the_upstream_gradient(reduction):
    """The reductions hand the backward an expanded (stride-0) or scaled upstream gradient."""
    student, teacher = make_logits((2, 5, 300), torch.float32, seed=12)
    labels = torch.tensor([[1, 2, -100, 3, 4], [-100, -100, 1, 2, 3]])
    leaf = student.clone().requires_grad_(True)
    loss = fused_skl(leaf, teacher, 0.1, labels=labels, reduction=reduction, backend="cpu")
    (grad,) = torch.autograd.grad(loss, leaf)
    results = {}
    for dtype in (torch.float64, torch.float32):
        leaf_ref = student.to(dtype).requires_grad_(True)
        ref = reference.skl_reference(leaf_ref, teacher.to(dtype), 0.1, labels=labels, reduction=reduction)
        results[dtype] = (ref, *torch.autograd.grad(ref, leaf_ref))
    (loss64, grad64), (loss32, grad32) = results[torch.float64], results[torch.float32]
    magnitude = max(student.abs().max().item(), teacher.abs().max().item())
    assert_matches_oracle(loss, loss64, loss32, out_dtype=torch.float32, magnitude=magnitude,
                          scale=loss64.abs().item() + math.log(301), what=f"{reduction} loss")
    assert_matches_oracle(grad, grad64, grad32, out_dtype=torch.float32, magnitude=magnitude,
                          scale=2 * grad64.abs().max().item(), what=f"{reduction} grad")


def test_thread_counts_give_identical_results():
    """Each row is computed by one thread in a fixed order: 1 and 2 threads agree to the last bit."""
    student, teacher = make_logits((64, 3001), torch.bfloat16, seed=13)
    labels = torch.arange(64).remainder(7).masked_fill(torch.arange(64).remainder(5) == 0, -100)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            for op in OPS:
                leaf = student.clone().requires_grad_(True)
                loss = run_fused(op, leaf, teacher, 0.1, labels=labels, reduction="none")
                (grad,) = torch.autograd.grad(loss.sum(), leaf)
                results.append((count, op, loss, grad))
    finally:
        torch.set_num_threads(threads)
    for (_, op, loss_1, grad_1), (_, _, loss_2, grad_2) in zip(results[:3], results[3:]):
        assert torch.equal(loss_1, loss_2), op
        assert torch.equal(grad_1, grad_2), op


# --- every instruction-set build, the fallback, the backend registry --------------------------------------

ISA_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from distillm2_kernels import fused_skl, fused_srkl
    from distillm2_kernels.backends import cpu_backend
    inputs = torch.load(sys.argv[1])
    results = {"isa": cpu_backend.kernel_isa()}
    for op in ("skl", "srkl", "srkl_detach"):
        student = inputs["student"].clone().requires_grad_(True)
        kw = dict(labels=inputs["labels"], temperature=1.5, reduction="none", backend="cpu")
        if op == "skl":
            loss = fused_skl(student, inputs["teacher"], 0.3, **kw)
        else:
            loss = fused_srkl(student, inputs["teacher"], 0.3, detach_mixture=op == "srkl_detach", **kw)
        loss.backward(inputs["upstream"])
        results[op] = (loss.detach(), student.grad)
    torch.save(results, sys.argv[2])
    """
)


def _subprocess_env(**extra):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **extra)
    env.pop("TRITON_INTERPRET", None)
    return env


@pytest.mark.parametrize("capability", ["DEFAULT", "AVX2", "AVX512"])
def test_other_instruction_set_builds_match_the_oracle(capability, tmp_path):
    """ATen picks the widest instruction set the CPU has; ATEN_CPU_CAPABILITY forces each build (AVX512
    only where the CPU has AVX-512: elsewhere ATen falls back to a narrower one and the case is skipped)."""
    student, teacher = make_logits((5, 1500), torch.bfloat16, seed=14)
    labels = torch.tensor([1, -100, 2, 3, 4])
    upstream = torch.rand(5, generator=torch.Generator().manual_seed(1))
    torch.save(dict(student=student, teacher=teacher, labels=labels, upstream=upstream), tmp_path / "in.pt")
    env = _subprocess_env(ATEN_CPU_CAPABILITY=capability.lower())
    subprocess.run([sys.executable, "-c", ISA_SCRIPT, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                   env=env, check=True, timeout=120)
    results = torch.load(tmp_path / "out.pt")
    if results["isa"] != capability:
        pytest.skip(f"this CPU or build runs {results['isa']} when {capability} is requested")
    kw = dict(labels=labels, ignore_index=-100, temperature=1.5, upstream=upstream)
    for op in OPS:
        loss, grad = results[op]
        loss64, grad64 = oracle_loss_and_grad(op, student, teacher, 0.3, dtype=torch.float64, **kw)
        loss_lo, grad_lo = oracle_loss_and_grad(op, student, teacher, 0.3, dtype=torch.bfloat16, **kw)
        magnitude = max(student.abs().max().item(), teacher.abs().max().item()) / 1.5
        loss_scale = loss64.abs().max().item() + math.log(1501)
        assert_matches_oracle(loss, loss64, loss_lo, out_dtype=torch.float32, magnitude=magnitude, scale=loss_scale,
                              what=f"{capability} {op} loss")
        q64, p64 = torch.softmax(student.double() / 1.5, -1), torch.softmax(teacher.double() / 1.5, -1)
        grad_scale = (upstream.double().unsqueeze(-1) * (q64 + p64)).max().item() / 1.5
        assert_matches_oracle(grad, grad64, grad_lo, out_dtype=torch.bfloat16, magnitude=magnitude,
                              scale=grad_scale, what=f"{capability} {op} grad")


NON_FINITE_SCRIPT = textwrap.dedent(
    """
    import math, sys, torch
    from distillm2_kernels import fused_skl, fused_srkl, token_statistics
    from distillm2_kernels.backends import cpu_backend
    inputs = torch.load(sys.argv[1])
    results = {"isa": cpu_backend.kernel_isa()}
    for name in ("poisoned", "finite"):
        student, teacher = inputs[name]
        labels = inputs["labels"]
        results[name, "stats"] = token_statistics(student, teacher, labels, temperature=0.8, backend="cpu").stats
        for op in ("skl", "srkl", "srkl_detach"):
            for alpha in (0.3, 0.0, 1.0, inputs["alpha_rows"]):
                leaf = student.clone().requires_grad_(True)
                kw = dict(labels=labels, temperature=0.8, reduction="none", backend="cpu")
                if op == "skl":
                    loss = fused_skl(leaf, teacher, alpha, **kw)
                else:
                    loss = fused_srkl(leaf, teacher, alpha, detach_mixture=op == "srkl_detach", **kw)
                (grad,) = torch.autograd.grad(loss.sum(), leaf)
                results[name, op, str(alpha)] = (loss.detach(), grad)
    torch.save(results, sys.argv[2])
    """
)


def non_finite_inputs(dtype):
    """Rows of V = 1500 (two blocks of 1024, a scalar tail of 12 entries) holding NaN or +inf in the first
    entry, the second block, or the tail, in the student, the teacher or both, with masked (−inf) entries;
    rows 1 and 8 are ignored (row 1 is poisoned). Returns the poisoned inputs, the same with the poisoned
    entries made finite, which rows are poisoned, and the labels."""
    vocab = 1500
    student, teacher = make_logits((10, vocab), torch.float32, seed=30)
    student[:, 200:260], teacher[:, 200:260] = -math.inf, -math.inf
    finite = (student.to(dtype), teacher.to(dtype))
    poisons = {  # row: (logits, column, value)
        0: ("student", 0, math.nan),
        1: ("teacher", 5, math.nan),
        2: ("teacher", 1030, math.inf),
        3: ("student", vocab - 1, math.inf),
        4: ("both", vocab - 3, math.nan),
        6: ("teacher", 230, math.nan),  # inside the masked entries
        7: ("student", 1100, math.nan),
    }
    for row, (side, column, value) in poisons.items():
        if side in ("student", "both"):
            student[row, column] = value
        if side in ("teacher", "both"):
            teacher[row, column] = value
    poisoned = torch.zeros(10, dtype=torch.bool)
    poisoned[list(poisons)] = True
    labels = torch.tensor([3, IGNORE_INDEX, 5, 1499, 7, 8, 9, 10, IGNORE_INDEX, 11])
    return (student.to(dtype), teacher.to(dtype)), finite, poisoned, labels


def check_non_finite_results(results, poisoned, labels, what):
    """The poisoned counted rows are NaN (loss, every gradient entry, the label log-probabilities of the
    poisoned model), the ignored rows exactly 0, the others bit for bit the finite inputs' results."""
    counted = labels != IGNORE_INDEX
    bad, clean = poisoned & counted, ~poisoned & counted
    for key, (loss, grad) in ((k, v) for k, v in results.items() if isinstance(k, tuple) and k[0] == "poisoned" and k[1] != "stats"):
        expected_loss, expected_grad = results[("finite",) + key[1:]]
        assert loss[bad].isnan().all() and grad[bad].isnan().all(), f"{what} {key}: a poisoned row is not all NaN"
        assert torch.equal(loss[~counted], torch.zeros_like(loss[~counted])), f"{what} {key}"
        assert torch.equal(grad[~counted], torch.zeros_like(grad[~counted])), f"{what} {key}"
        assert torch.isfinite(loss[clean]).all() and torch.isfinite(grad[clean]).all(), f"{what} {key}"
        assert torch.equal(loss[clean], expected_loss[clean]), f"{what} {key}: a finite row changed"
        assert torch.equal(grad[clean], expected_grad[clean]), f"{what} {key}: a finite row's gradient changed"
    stats, expected = results["poisoned", "stats"], results["finite", "stats"]
    assert stats[bad][:, [1, 3]].isnan().any(-1).all(), f"{what}: a poisoned row's log-sums are not NaN"
    assert stats[bad][:, [5, 6]].isnan().any(-1).all(), f"{what}: a poisoned row's label log-probabilities"
    assert torch.equal(stats[~counted], torch.zeros_like(stats[~counted]))
    assert torch.equal(stats[clean], expected[clean])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("capability", ["native", "DEFAULT", "AVX2", "AVX512"])
def test_non_finite_rows_are_nan_on_every_instruction_set(capability, dtype, tmp_path):
    """A NaN or +inf logit makes its row NaN (loss, gradient, label log-probabilities) on every build: the
    vector paths (at::vec maximum/minimum, blends, comparisons) and the scalar tail alike."""
    poisoned_inputs, finite_inputs, poisoned, labels = non_finite_inputs(dtype)
    alpha_rows = torch.linspace(0.0, 1.0, 10)
    torch.save(dict(poisoned=poisoned_inputs, finite=finite_inputs, labels=labels, alpha_rows=alpha_rows),
               tmp_path / "in.pt")
    extra = {} if capability == "native" else {"ATEN_CPU_CAPABILITY": capability.lower()}
    subprocess.run([sys.executable, "-c", NON_FINITE_SCRIPT, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                   env=_subprocess_env(**extra), check=True, timeout=120)
    results = torch.load(tmp_path / "out.pt")
    if capability != "native" and results["isa"] != capability:
        pytest.skip(f"this CPU or build runs {results['isa']} when {capability} is requested")
    check_non_finite_results(results, poisoned, labels, f"{results['isa']} {dtype}")


def test_non_finite_rows_through_the_backend_interface():
    """skew_statistics gives NaN log-sums for a row holding NaN or +inf, and skew_forward on those statistics
    (the path of the DistiLLM-2 objective) and skew_backward carry the NaN to the loss, C and the gradient."""
    (student, teacher), _, poisoned, labels = non_finite_inputs(torch.float32)
    bad = poisoned & (labels != IGNORE_INDEX)
    for reverse, detach in REVERSE_DETACH.values():
        rows = prepare_rows(student, teacher, 0.4, labels, IGNORE_INDEX, 1.0)
        stats = cpu_backend.skew_statistics(rows)
        loss, stats_with_c = cpu_backend.skew_forward(rows, reverse, detach, stats=stats)
        assert loss[bad].isnan().all() and stats_with_c[bad, 4].isnan().all()
        grad = cpu_backend.skew_backward(rows, reverse, detach, stats_with_c, torch.ones(10))
        assert grad[bad].isnan().all()
        assert torch.isfinite(grad[~bad]).all() and torch.isfinite(loss[~bad]).all()


# --- skew_forward_and_grad: the forward of a scalar reduction with its gradient ------------------------------


def forward_and_grad_inputs(dtype):
    """statistics_inputs' rows (labels in and outside [0, V), ignored rows, masked entries, large logits) with a
    NaN row and a +inf row added, a per-row α holding both ends, and a per-row gradient scale."""
    student, teacher, labels = statistics_inputs(torch.float32)
    student, teacher = torch.cat([student, student[:2]]), torch.cat([teacher, teacher[:2]])
    student[9, 100], teacher[10, 1030] = math.nan, math.inf
    labels = torch.cat([labels, torch.tensor([3, 4])])
    alpha = torch.tensor([0.3, 1.0, 0.0, 0.7, 1.0, 0.05, 0.5, 0.0, 0.9, 0.3, 1.0])
    scale = torch.rand(11, generator=torch.Generator().manual_seed(3)) - 0.25
    return student.to(dtype), teacher.to(dtype), labels, alpha, scale


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 1.3])
def test_forward_and_grad_is_the_forward_and_the_backward_bit_for_bit(op, dtype, temperature):
    """skew_forward_and_grad(rows, ..., scale) gives skew_forward's loss and statistics and
    skew_backward(rows, ..., stats, scale)'s gradient to the last bit (NaN rows NaN, ignored rows 0)."""
    reverse, detach = REVERSE_DETACH[op]
    student, teacher, labels, alpha, scale = forward_and_grad_inputs(dtype)
    for alpha_value in (alpha, 0.4):
        rows = prepare_rows(student, teacher, alpha_value, labels, IGNORE_INDEX, temperature)
        loss, stats, grad = cpu_backend.skew_forward_and_grad(rows, reverse, detach, scale)
        expected_loss, expected_stats = cpu_backend.skew_forward(rows, reverse, detach)
        assert grad.dtype == dtype and grad.shape == student.shape and grad.is_contiguous()
        assert_identical(loss, expected_loss, "loss")
        assert_identical(stats, expected_stats, "statistics")
        assert_identical(grad, cpu_backend.skew_backward(rows, reverse, detach, expected_stats, scale), "gradient")
        assert loss[9:].isnan().all() and grad[9:].isnan().all()
        assert torch.equal(grad[labels == IGNORE_INDEX], torch.zeros_like(grad[labels == IGNORE_INDEX]))


def test_forward_and_grad_in_float64_is_the_torch_backends():
    """backend="cpu" on float64 logits with a scalar reduction: `backends.backend_module` routes the rows to
    the torch backend, so the loss and the gradient (computed in the forward) are the torch backend's."""
    from distillm2_kernels import fused_srkl
    from distillm2_kernels.backends import backend_module

    assert backend_module("cpu", torch.float64) is torch_backend
    student, teacher, labels = statistics_inputs(torch.float64)
    labels = torch.where((labels >= 0) & (labels < student.shape[-1]), labels, IGNORE_INDEX)  # ids the ops accept
    results = {}
    for backend in ("cpu", "torch"):
        leaf = student.detach().clone().requires_grad_(True)
        loss = fused_srkl(leaf, teacher, 0.3, labels=labels, ignore_index=IGNORE_INDEX, temperature=0.8, backend=backend)
        loss.backward()
        results[backend] = (loss.detach(), leaf.grad)
    assert results["cpu"][0].dtype == results["cpu"][1].dtype == torch.float64
    assert_identical(results["cpu"][0], results["torch"][0], "loss")
    assert_identical(results["cpu"][1], results["torch"][1], "gradient")


FORWARD_AND_GRAD_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from distillm2_kernels._inputs import prepare_rows
    from distillm2_kernels.backends import cpu_backend
    inputs = torch.load(sys.argv[1])
    results = {"isa": cpu_backend.kernel_isa()}
    rows = prepare_rows(inputs["student"], inputs["teacher"], inputs["alpha"], inputs["labels"], -100, 1.3)
    for name, (reverse, detach) in (("skl", (False, False)), ("srkl", (True, False)), ("srkl_detach", (True, True))):
        loss, stats, grad = cpu_backend.skew_forward_and_grad(rows, reverse, detach, inputs["scale"])
        expected_loss, expected_stats = cpu_backend.skew_forward(rows, reverse, detach)
        expected_grad = cpu_backend.skew_backward(rows, reverse, detach, expected_stats, inputs["scale"])
        results[name] = (loss, stats, grad, expected_loss, expected_stats, expected_grad)
    torch.save(results, sys.argv[2])
    """
)


@pytest.mark.parametrize("capability", ["DEFAULT", "AVX2", "AVX512"])
def test_forward_and_grad_is_the_backward_on_every_instruction_set(capability, tmp_path):
    student, teacher, labels, alpha, scale = forward_and_grad_inputs(torch.bfloat16)
    torch.save(dict(student=student, teacher=teacher, labels=labels, alpha=alpha, scale=scale), tmp_path / "in.pt")
    subprocess.run([sys.executable, "-c", FORWARD_AND_GRAD_SCRIPT, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                   env=_subprocess_env(ATEN_CPU_CAPABILITY=capability.lower()), check=True, timeout=120)
    results = torch.load(tmp_path / "out.pt")
    if results["isa"] != capability:
        pytest.skip(f"this CPU or build runs {results['isa']} when {capability} is requested")
    for op in OPS:
        loss, stats, grad, expected_loss, expected_stats, expected_grad = results[op]
        assert_identical(loss, expected_loss, f"{capability} {op} loss")
        assert_identical(stats, expected_stats, f"{capability} {op} statistics")
        assert_identical(grad, expected_grad, f"{capability} {op} gradient")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("alpha", [0.0, 1e-30, 0.3])
def test_underflowing_probabilities_keep_log_space_accuracy(op, alpha):
    """Entries whose q or p underflows float32 (a logit 100 to 150 below its row's max) while the other
    distribution holds mass there: the mixture there takes the log-space form, so at α = 0 the loss uses the
    finite log q (≈ −120) rather than log 0, and the result holds to the tolerance rule."""
    student, teacher = make_logits((4, 2000), torch.float32, seed=15)
    student[0, :300] -= 120.0  # q underflows where p does not
    teacher[1, 500:900] -= 130.0  # p underflows where q does not
    student[2, ::2] -= 150.0
    teacher[2, 1::2] -= 150.0
    student[3, :1000] -= 100.0  # q tiny but normal, p normal: the linear form's boundary
    check_against_oracle(op, student, teacher, alpha, what=f"underflow α={alpha}")


FALLBACK_SCRIPT = textwrap.dedent(
    """
    import sys, warnings
    sys.modules["distillm2_kernels._C"] = None  # a build-less install (the environment has no C++ compiler)
    import torch
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        import distillm2_kernels
        from distillm2_kernels import fused_skl, fused_srkl
        from distillm2_kernels.backends import available_backends, cpu_backend
        student = torch.randn(4, 50, requires_grad=True)
        teacher = torch.randn(4, 50)
        auto = [fused_skl(student, teacher, 0.1), fused_srkl(student, teacher, 0.1)]
        torch.autograd.grad(auto[0] + auto[1], student)
        auto.append(fused_skl(student, teacher, 0.1))
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert "C++ CPU backend is unavailable" in messages[0] and "'torch' backend" in messages[0], messages[0]
    assert "no C++ compiler found" in messages[0] and "apt install g++" in messages[0], messages[0]
    assert "python -m distillm2_kernels.env" in messages[0], messages[0]
    assert cpu_backend.unavailable_reason() is not None
    assert "cpu" not in available_backends(torch.device("cpu"))
    expected = [fused_skl(student, teacher, 0.1, backend="torch"), fused_srkl(student, teacher, 0.1, backend="torch")]
    assert torch.equal(auto[0], expected[0]) and torch.equal(auto[1], expected[1])
    try:
        fused_skl(student, teacher, 0.1, backend="cpu")
    except ValueError as error:
        assert "backend='cpu' cannot run here" in str(error), error
    else:
        raise AssertionError("backend='cpu' ran without its extension")
    print("fallback ok")
    """
)


def test_buildless_install_without_a_compiler_falls_back_to_torch_with_one_warning(tmp_path):
    env = _subprocess_env(CXX=str(tmp_path / "no-such-compiler"), DISTILLM2_KERNELS_CACHE=str(tmp_path / "cache"))
    result = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "fallback ok" in result.stdout


def test_extension_built_against_another_torch_is_not_used(monkeypatch):
    class StaleExtension:
        built_with_torch = "0.0.1"

    monkeypatch.setitem(sys.modules, "distillm2_kernels._C", StaleExtension)
    extension, reason = cpu_backend._load_installed_extension()
    assert extension is None and "built against torch 0.0.1" in reason


def test_registry():
    from distillm2_kernels.backends import resolve_backend

    assert resolve_backend("cpu", torch.device("cpu")) is cpu_backend
    assert "cpu" in available_backends(torch.device("cpu"))
    assert cpu_backend.kernel_isa() in ("AVX512", "AVX2", "DEFAULT")
    student, teacher = make_logits((2, 9), torch.float32)
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_skl(student, teacher, 0.1, backend="openmp")
    with pytest.raises(ValueError, match="alpha must lie in"):
        fused_skl(student, teacher, 1.5, backend="cpu")


# --- custom ops and torch.compile -------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["rows", "outer_inner"])
def test_custom_ops_pass_opcheck(layout):
    if layout == "rows":
        student, teacher = make_logits((3, 40), torch.bfloat16)
        student, teacher = student[:, :33], teacher[:, :33]  # a row-strided view
    else:  # [outer, inner, V] with a stride per level: the rows of a [B, T−1, V] slice
        student, teacher = make_logits((3, 4, 33), torch.bfloat16)
        student, teacher = student[:, :1], teacher[:, 1:2]
    labels, alpha_rows = torch.tensor([0, -100, 2]), torch.tensor([0.0, 0.5, 1.0])
    torch.library.opcheck(torch.ops.distillm2.skew_statistics.default, (student, teacher, labels, -100, 0.8, "cpu"))
    for reverse, detach in ((False, False), (True, False), (True, True)):
        args = (student, teacher, labels, alpha_rows, 0.0, -100, 0.8, reverse, detach, "cpu")
        torch.library.opcheck(torch.ops.distillm2.skew_forward.default, args)
        loss, stats = torch.ops.distillm2.skew_forward(*args)
        torch.library.opcheck(torch.ops.distillm2.skew_backward.default, args + (stats, torch.rand(3)))


@pytest.mark.slow
@pytest.mark.parametrize("sliced", [False, True])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_torch_compile_traces_a_training_step_without_graph_breaks(backend, sliced):
    """`sliced`: the logits are `[:, :-1]` slices, rows with a stride per sequence and one per token."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(15)
    head = torch.nn.Linear(16, 101)
    hidden = torch.randn(2, 5 + sliced, 16, generator=gen)
    teacher = torch.randn(2, 5 + sliced, 101, generator=gen)
    labels = torch.randint(0, 101, (2, 5), generator=gen)
    labels[0, :2] = -100

    def step(hidden, teacher, labels, alpha):
        student, teacher = head(hidden)[:, :5], teacher[:, -5:]
        skl = fused_skl(student, teacher, alpha, labels=labels, reduction="seqmean", backend=backend)
        srkl = fused_srkl(student, teacher, 0.2, labels=labels, temperature=2.0, detach_mixture=True, backend=backend)
        return skl + srkl

    compiled = torch.compile(step, fullgraph=True)  # fullgraph: any graph break is an error
    # Compile afresh: inductor's on-disk caches key on the graph, not on the custom ops' fake implementations,
    # so a graph cached before a fake's output shape changed would be reused.
    no_caches = torch._inductor.config.patch(fx_graph_cache=False, autotune_local_cache=False)
    with no_caches, torch._functorch.config.patch(enable_autograd_cache=False):
        check_compiled_step(step, compiled, hidden, teacher, labels, head)


def check_compiled_step(step, compiled, hidden, teacher, labels, head):
    for alpha in (0.1, torch.tensor([0.1, 0.9])):
        expected = step(hidden, teacher, labels, alpha)
        (expected_grad,) = torch.autograd.grad(expected, head.weight)
        actual = compiled(hidden, teacher, labels, alpha)
        (actual_grad,) = torch.autograd.grad(actual, head.weight)
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(actual_grad, expected_grad, rtol=1e-5, atol=1e-7)
