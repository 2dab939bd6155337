"""The backends' kernels as PyTorch custom ops, so that `torch.compile` traces the fused losses without graph breaks.

    distillm2::skew_forward(student, teacher, labels, alpha_rows, alpha, ignore_index, inv_temperature,
                            reverse, detach, backend) -> (loss [N], stats [N, STATS of the backend])
    distillm2::skew_backward(student, teacher, labels, alpha_rows, alpha, ignore_index, inv_temperature,
                             reverse, detach, backend, stats, grad_loss [N]) -> grad_student [N, V]

The arguments are the fields of `_inputs.SkewRows` (already validated); `backend` is a concrete backend name
("triton", "cpu" or "torch", see `backends.resolve_backend_name`). The fake implementations give the output
shapes and dtypes: float32 loss and stats (float64 for float64 logits; as many stats per row as the backend's
`STATS`) and a contiguous gradient in the student's dtype. The autograd Functions of `skew_divergence` call
`forward` / `backward`, which use the ops only while torch.compile traces.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._inputs import SkewRows
from .backends import BACKEND_MODULES


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
        leading_shape=student.shape[:-1],
    )


def _result_dtype(student: torch.Tensor, teacher: torch.Tensor) -> torch.dtype:
    float64 = student.dtype == torch.float64 or teacher.dtype == torch.float64
    return torch.float64 if float64 else torch.float32


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sweeps 1 and 2: per-row loss `[N]` and the backend's per-row statistics `[N, STATS]`."""
    rows = _rows(student, teacher, labels, alpha_rows, alpha, ignore_index, inv_temperature)
    return BACKEND_MODULES[backend].skew_forward(rows, reverse, detach)


skew_forward = torch.library.custom_op("distillm2::skew_forward", mutates_args=())(skew_forward_eager)


@skew_forward.register_fake
def _skew_forward_fake(student, teacher, labels, alpha_rows, alpha, ignore_index, inv_temperature, reverse, detach, backend):
    dtype = _result_dtype(student, teacher)
    num_rows, num_stats = student.shape[0], BACKEND_MODULES[backend].STATS
    return student.new_empty((num_rows,), dtype=dtype), student.new_empty((num_rows, num_stats), dtype=dtype)


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
    return student.new_empty(student.shape, dtype=student.dtype).contiguous()


def forward(*args):
    """`skew_forward`: the custom op while torch.compile traces, its implementation directly in eager mode (the
    first call through the dispatcher imports the compiler stack, ~800 modules and ~75 MB resident)."""
    return skew_forward(*args) if torch.compiler.is_compiling() else skew_forward_eager(*args)


def backward(*args):
    """`skew_backward`, like `forward`."""
    return skew_backward(*args) if torch.compiler.is_compiling() else skew_backward_eager(*args)
