"""The oracle itself: autograd gradcheck in float64, the closed-form gradients of docs/design.md §2.3, special values."""

import math

import pytest
import torch

from distillm2_kernels import reference


def logits(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64) * 2


@pytest.mark.parametrize("rows", ["skl", "srkl"])  # the detached SRKL is not a true gradient by design
@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.7])
def test_gradcheck(rows, alpha):
    student = logits((3, 11), 0).requires_grad_(True)
    teacher = logits((3, 11), 1)
    if rows == "skl":
        fn = lambda s: reference.skew_kl_rows(s, teacher, alpha, temperature=1.3)  # noqa: E731
    else:
        fn = lambda s: reference.skew_reverse_kl_rows(  # noqa: E731
            s, teacher, alpha, temperature=1.3
        )
    assert torch.autograd.gradcheck(fn, (student,))


def closed_form_gradient(kind, student, teacher, alpha):
    """docs/design.md §2.3, written literally."""
    q, p = torch.softmax(student, -1), torch.softmax(teacher, -1)
    if kind == "skl":
        m = alpha * p + (1 - alpha) * q
        w = (p**2 / m).sum(-1, keepdim=True)
        return q - p + alpha * (p**2 / m - q * w)
    r = (1 - alpha) * p + alpha * q
    d = torch.log(q) - torch.log(r)
    loss = (q * d).sum(-1, keepdim=True)
    if kind == "srkl_detach":
        return q * (d - loss)
    u = (q**2 / r).sum(-1, keepdim=True)
    return q * (d - alpha * q / r - loss + alpha * u)


@pytest.mark.parametrize("kind", ["skl", "srkl", "srkl_detach"])
@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 1.0])
def test_closed_form_gradients(kind, alpha):
    student = logits((4, 9), 2).requires_grad_(True)
    teacher = logits((4, 9), 3)
    if kind == "skl":
        loss = reference.skew_kl_rows(student, teacher, alpha)
    else:
        loss = reference.skew_reverse_kl_rows(student, teacher, alpha, detach_mixture=kind == "srkl_detach")
    (grad,) = torch.autograd.grad(loss.sum(), student)
    torch.testing.assert_close(grad, closed_form_gradient(kind, student.detach(), teacher, alpha), rtol=0, atol=1e-14)


def test_special_values():
    student, teacher = logits((2, 6), 4), logits((2, 6), 5)
    for fn in (reference.skew_kl_rows, reference.skew_reverse_kl_rows):
        assert torch.equal(fn(student, teacher, 1.0), torch.zeros(2, dtype=torch.float64))
        assert (fn(student, teacher, 0.5) > 0).all()
        torch.testing.assert_close(fn(student, student, 0.3), torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-15)
    kl = (torch.softmax(teacher, -1) * (torch.log_softmax(teacher, -1) - torch.log_softmax(student, -1))).sum(-1)
    torch.testing.assert_close(reference.skew_kl_rows(student, teacher, 0.0), kl)


def test_negative_infinity_gives_no_nan():
    student, teacher = logits((2, 6), 6), logits((2, 6), 7)
    student[:, 0] = teacher[:, 0] = -math.inf
    student[0, 1] = -math.inf
    teacher[1, 2] = -math.inf
    student.requires_grad_(True)
    for fn in (reference.skew_kl_rows, reference.skew_reverse_kl_rows):
        loss = fn(student, teacher, 0.2)
        (grad,) = torch.autograd.grad(loss.sum(), student)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        assert torch.equal(grad[:, 0], torch.zeros(2, dtype=torch.float64))


def test_naive_matches_reference():
    """The released-code baselines equal the oracle under the same conventions (seqmean, detached SRKL)."""
    student, teacher = logits((2, 5, 13), 8).float(), logits((2, 5, 13), 9).float()
    labels = torch.ones(2, 5, dtype=torch.long)
    labels[0, :2] = -100
    torch.testing.assert_close(
        reference.naive_skl(student, teacher, labels, 0.1),
        reference.skl_reference(student, teacher, 0.1, labels=labels, reduction="seqmean"),
    )
    torch.testing.assert_close(
        reference.naive_srkl(student, teacher, labels, 0.1),
        reference.srkl_reference(student, teacher, 0.1, labels=labels, reduction="seqmean", detach_mixture=True),
    )
