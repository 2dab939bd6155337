"""The sparse-teacher backends' three dense sweeps as PyTorch custom ops, so that `torch.compile` traces the
sparse-teacher ops without graph breaks (as `custom_ops` does for the dense sweeps).

    distillm2::sparse_student_logsumexp(student, labels?, ignore_index, inv_temperature, backend) -> lse [N]
    distillm2::sparse_tail_sums(student, labels?, ignore_index, inv_temperature, lse, log_tail, alpha_rows,
                                reverse, detach, backend) -> [N, 2]
    distillm2::sparse_student_grad(student, labels?, ignore_index, inv_temperature, lse, row_scale, row_shift,
                                   log_tail?, alpha_rows, reverse, detach, backend) -> grad [N, V]

The arguments are those of `backends/torch_sparse.py` (the spec) plus the concrete backend name, whose module
`backends.sparse_backend_module` gives for the rows' compute dtype. The fake implementations give the output
shapes and dtypes: the per-row outputs in the compute dtype (float64 for float64 logits, else float32), the
gradient `[N, V]` contiguous in the student's dtype. `student_logsumexp`, `tail_sums` and `student_grad`
call the ops while torch.compile traces and their implementations directly in eager mode.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._inputs import compute_dtype, num_rows
from .backends import sparse_backend_module
from .custom_ops import run_op

__all__ = ["student_logsumexp", "tail_sums", "student_grad"]


def _student_logsumexp(
    student: torch.Tensor, labels: Optional[torch.Tensor], ignore_index: int, inv_temperature: float, backend: str
) -> torch.Tensor:
    module = sparse_backend_module(backend, compute_dtype(student))
    return module.student_logsumexp(student, labels, ignore_index, inv_temperature)


_logsumexp_op = torch.library.custom_op("distillm2::sparse_student_logsumexp", mutates_args=())(_student_logsumexp)


@_logsumexp_op.register_fake
def _(student, labels, ignore_index, inv_temperature, backend):
    return student.new_empty((num_rows(student),), dtype=compute_dtype(student))


def student_logsumexp(student, labels, ignore_index: int, inv_temperature: float, backend: str) -> torch.Tensor:
    """lse [N] = log Σ_v exp(z_v/T) per row (0 at ignored rows)."""
    return run_op(_logsumexp_op, _student_logsumexp, student, labels, ignore_index, inv_temperature, backend)


def _tail_sums(
    student: torch.Tensor,
    labels: Optional[torch.Tensor],
    ignore_index: int,
    inv_temperature: float,
    lse: torch.Tensor,
    log_tail: torch.Tensor,
    alpha_rows: torch.Tensor,
    reverse: bool,
    detach: bool,
    backend: str,
) -> torch.Tensor:
    module = sparse_backend_module(backend, compute_dtype(student))
    return module.tail_sums(student, labels, ignore_index, inv_temperature, lse, log_tail, alpha_rows, reverse, detach)


_tail_sums_op = torch.library.custom_op("distillm2::sparse_tail_sums", mutates_args=())(_tail_sums)


@_tail_sums_op.register_fake
def _(student, labels, ignore_index, inv_temperature, lse, log_tail, alpha_rows, reverse, detach, backend):
    return student.new_empty((num_rows(student), 2), dtype=compute_dtype(student))


def tail_sums(student, labels, ignore_index, inv_temperature, lse, log_tail, alpha_rows, reverse, detach, backend):
    """[N, 2]: Σ_v f_v and Σ_v q_v·g_v of the uniform tail's formulas over all V entries of each row."""
    args = (student, labels, ignore_index, inv_temperature, lse, log_tail, alpha_rows, reverse, detach, backend)
    return run_op(_tail_sums_op, _tail_sums, *args)


def _student_grad(
    student: torch.Tensor,
    labels: Optional[torch.Tensor],
    ignore_index: int,
    inv_temperature: float,
    lse: torch.Tensor,
    row_scale: torch.Tensor,
    row_shift: torch.Tensor,
    log_tail: Optional[torch.Tensor],
    alpha_rows: torch.Tensor,
    reverse: bool,
    detach: bool,
    backend: str,
) -> torch.Tensor:
    module = sparse_backend_module(backend, compute_dtype(student))
    return module.student_grad(
        student, labels, ignore_index, inv_temperature, lse, row_scale, row_shift, log_tail, alpha_rows, reverse, detach
    )


_grad_op = torch.library.custom_op("distillm2::sparse_student_grad", mutates_args=())(_student_grad)


@_grad_op.register_fake
def _(student, labels, ignore_index, inv_temperature, lse, row_scale, row_shift, log_tail, alpha_rows, reverse, detach, backend):
    return student.new_empty((num_rows(student), student.shape[-1]), dtype=student.dtype)


def student_grad(
    student, labels, ignore_index, inv_temperature, lse, row_scale, row_shift, log_tail, alpha_rows, reverse, detach, backend
):
    """grad [N, V] = row_scale · q · (g − row_shift), g the tail's (0 when `log_tail` is None)."""
    args = (student, labels, ignore_index, inv_temperature, lse, row_scale, row_shift, log_tail, alpha_rows, reverse, detach, backend)
    return run_op(_grad_op, _student_grad, *args)
