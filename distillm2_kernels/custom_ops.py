"""The backends' kernels as PyTorch custom ops, so that `torch.compile` traces the fused losses without graph breaks.

    distillm2::skew_statistics(student, teacher, labels, ignore_index, inv_temperature, backend)
        -> stats [N, 7]                                                     (sweep 1)
    distillm2::skew_forward(student, teacher, labels, alpha_rows, alpha, ignore_index, inv_temperature,
                            reverse, detach, backend, stats?) -> (loss [N], stats [N, 7])   (sweeps 1 and 2)
    distillm2::skew_backward(student, teacher, labels, alpha_rows, alpha, ignore_index, inv_temperature,
                             reverse, detach, backend, stats, grad_loss [N]) -> grad_student [N, V]   (sweep 3)

The arguments are the fields of `_inputs.SkewRows` (already validated: student and teacher are `[N, V]` or
`[outer, inner, V]` row logits, read in place); `backend` is a concrete backend name
("triton", "cpu" or "torch", see `backends.resolve_backend_name`). `skew_forward` given `stats` from
`skew_statistics` skips sweep 1. The fake implementations give the output shapes and dtypes: float32 loss
and stats (float64 for float64 logits) and a contiguous `[N, V]` gradient in the student's dtype. The autograd
formulas live in `skew_divergence`; its Functions call `statistics` / `forward` / `backward`, which use the
ops only while torch.compile traces.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._inputs import SkewRows, num_rows
from .backends import BACKEND_MODULES, STATS


def _rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: Optional[torch.Tensor],
    alpha_rows: Optional[torch.Tensor],
    alpha: float,
    ignore_index: int,
    inv_temperature: float,
) -> SkewRows:
    return SkewRows(
        student=student,
        teacher=teacher,
        labels=labels,
        alpha_rows=alpha_rows,
        alpha=alpha,
        ignore_index=ignore_index,
        inv_temperature=inv_temperature,
        leading_shape=torch.Size([num_rows(student)]),
    )


def _result_dtype(student: torch.Tensor, teacher: torch.Tensor) -> torch.dtype:
    float64 = student.dtype == torch.float64 or teacher.dtype == torch.float64
    return torch.float64 if float64 else torch.float32


def skew_statistics_eager(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: Optional[torch.Tensor],
    ignore_index: int,
    inv_temperature: float,
    backend: str,
) -> torch.Tensor:
    """Sweep 1: the row statistics `[N, 7]`, with the label tokens' log-probabilities."""
    rows = _rows(student, teacher, labels, None, 0.0, ignore_index, inv_temperature)
    return BACKEND_MODULES[backend].skew_statistics(rows)


skew_statistics = torch.library.custom_op("distillm2::skew_statistics", mutates_args=())(skew_statistics_eager)


@skew_statistics.register_fake
def _skew_statistics_fake(student, teacher, labels, ignore_index, inv_temperature, backend):
    return student.new_empty((num_rows(student), STATS), dtype=_result_dtype(student, teacher))


def skew_forward_eager(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: Optional[torch.Tensor],
    alpha_rows: Optional[torch.Tensor],
    alpha: float,
    ignore_index: int,
    inv_temperature: float,
    reverse: bool,
    detach: bool,
    backend: str,
    stats: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sweeps 1 and 2 (sweep 2 only when `stats` is given): per-row loss `[N]` and statistics `[N, 7]`."""
    rows = _rows(student, teacher, labels, alpha_rows, alpha, ignore_index, inv_temperature)
    return BACKEND_MODULES[backend].skew_forward(rows, reverse, detach, stats)


skew_forward = torch.library.custom_op("distillm2::skew_forward", mutates_args=())(skew_forward_eager)


@skew_forward.register_fake
def _skew_forward_fake(
    student, teacher, labels, alpha_rows, alpha, ignore_index, inv_temperature, reverse, detach, backend, stats=None
):
    dtype = _result_dtype(student, teacher)
    n = num_rows(student)
    return student.new_empty((n,), dtype=dtype), student.new_empty((n, STATS), dtype=dtype)


def skew_backward_eager(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: Optional[torch.Tensor],
    alpha_rows: Optional[torch.Tensor],
    alpha: float,
    ignore_index: int,
    inv_temperature: float,
    reverse: bool,
    detach: bool,
    backend: str,
    stats: torch.Tensor,
    grad_loss: torch.Tensor,
) -> torch.Tensor:
    """Sweep 3: the gradient w.r.t. the student logits, `[N, V]` contiguous in the student's dtype."""
    rows = _rows(student, teacher, labels, alpha_rows, alpha, ignore_index, inv_temperature)
    return BACKEND_MODULES[backend].skew_backward(rows, reverse, detach, stats, grad_loss)


skew_backward = torch.library.custom_op("distillm2::skew_backward", mutates_args=())(skew_backward_eager)


@skew_backward.register_fake
def _skew_backward_fake(
    student, teacher, labels, alpha_rows, alpha, ignore_index, inv_temperature, reverse, detach, backend, stats, grad_loss
):
    return student.new_empty((num_rows(student), student.shape[-1]), dtype=student.dtype)


def _eager_or_op(op, eager):
    """The custom op while torch.compile traces, its implementation directly in eager mode: the first call
    through the dispatcher imports the compiler stack (~800 modules, ~75 MB resident)."""

    def call(*args):
        return op(*args) if torch.compiler.is_compiling() else eager(*args)

    call.__doc__ = eager.__doc__
    return call


statistics = _eager_or_op(skew_statistics, skew_statistics_eager)
forward = _eager_or_op(skew_forward, skew_forward_eager)
backward = _eager_or_op(skew_backward, skew_backward_eager)
