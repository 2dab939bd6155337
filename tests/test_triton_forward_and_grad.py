"""The Triton backend's optional `skew_forward_and_grad` (one kernel: sweeps 1-3 of a row back to back) equals
`skew_forward` followed by `skew_backward` with the row scales as the incoming gradient (`backends/protocol.py`, `SkewForwardAndGrad`:
the gradient of a scalar reduction computed in the forward). Under the interpreter (tests/conftest.py)
both run the same jitted sweeps, so the results agree exactly; the oracle tests of test_skew_divergence.py check
those sweeps against float64."""

import math

import pytest
import torch
from conftest import kernel_device

from distillm2_kernels._inputs import SkewRows
from distillm2_kernels.backends import triton_backend

DEVICE = kernel_device()
pytestmark = pytest.mark.skipif(triton_backend.unavailable_reason(DEVICE) is not None,
                                reason=str(triton_backend.unavailable_reason(DEVICE)))


def make_rows(student, teacher, *, labels=None, alpha=0.1, alpha_rows=None, temperature=1.0):
    return SkewRows(student=student, teacher=teacher, labels=labels, alpha_rows=alpha_rows, alpha=alpha,
                    ignore_index=-100, inv_temperature=1.0 / temperature, leading_shape=student.shape[:-1])


def assert_same(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.equal(torch.nan_to_num(actual, nan=7.0), torch.nan_to_num(expected, nan=7.0))
    assert torch.equal(actual.isnan(), expected.isnan())


@pytest.mark.parametrize("reverse,detach", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_grad_equals_forward_then_backward(reverse, detach, dtype):
    generator = torch.Generator().manual_seed(3)
    n, v = 6, 5003  # V not a multiple of the block
    student = (torch.randn(n, v, generator=generator) * 3).to(dtype).to(DEVICE)
    teacher = (torch.randn(n, v, generator=generator) * 3).to(dtype).to(DEVICE)
    student[1, :7] = -math.inf  # zero probabilities
    teacher[2, 5:9] = -math.inf
    student[4, 11] = math.nan  # a NaN row: NaN loss and gradient
    labels = torch.tensor([3, -100, 17, 4, 9, 0], device=DEVICE)
    alpha_rows = torch.tensor([0.0, 0.5, 0.2, 1.0, 0.3, 0.9], device=DEVICE)
    scales = torch.tensor([0.5, 0.0, -2.0, 1.0, 1.0, 3.0], device=DEVICE)
    for rows in (make_rows(student, teacher, labels=labels, alpha_rows=alpha_rows, temperature=2.0),
                 make_rows(student, teacher, alpha=0.25)):
        loss, stats, grad = triton_backend.skew_forward_and_grad(rows, reverse, detach, scales)
        expected_loss, expected_stats = triton_backend.skew_forward(rows, reverse, detach)
        expected_grad = triton_backend.skew_backward(rows, reverse, detach, expected_stats, scales)
        assert_same(loss, expected_loss)
        assert_same(stats, expected_stats)
        assert_same(grad, expected_grad)
        if rows.labels is not None:
            assert torch.all(grad[1] == 0) and loss[1] == 0  # the ignored row
        assert grad[4].isnan().all() and loss[4].isnan()  # the NaN row
        assert grad[[0, 2, 3, 5]].isfinite().all()


def test_forward_and_grad_of_ignored_rows_is_zero():
    student = torch.randn(3, 300).to(DEVICE)
    teacher = torch.randn(3, 300).to(DEVICE)
    labels = torch.full((3,), -100, device=DEVICE)
    loss, stats, grad = triton_backend.skew_forward_and_grad(
        make_rows(student, teacher, labels=labels), False, False, torch.ones(3, device=DEVICE))
    assert torch.equal(loss, torch.zeros(3, device=DEVICE))
    assert torch.equal(stats, torch.zeros(3, 7, device=DEVICE))
    assert torch.equal(grad, torch.zeros(3, 300, device=DEVICE))
