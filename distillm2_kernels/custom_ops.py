"""The backends' sweeps as PyTorch custom ops, so that `torch.compile` traces the logits ops without graph breaks.

    distillm2::skew_statistics(<rows>, backend) -> stats [N, STATS]                         (sweep 1)
    distillm2::skew_forward(<rows>, reverse, detach, backend, stats?) -> (loss [N], stats)  (sweeps 1 and 2)
    distillm2::skew_backward(<rows>, reverse, detach, backend, stats, grad_loss [N]) -> grad_student [N, V]
    distillm2::skew_forward_and_grad(<rows>, reverse, detach, backend, row_grad_scale [N])
        -> (loss, stats, grad_student)                                                 (sweeps 1 to 3)

`<rows>` is the fields of a validated `_inputs.SkewRows` in the order of `ROW_FIELDS` (skew_statistics takes
no α): the op schemas take tensors and scalars only, so a `SkewRows` is split into them here and rebuilt on
the other side, in one place (`_split`, `_inputs.flat_rows`); callers pass and get `SkewRows`. `backend` is a concrete
name ("triton", "cpu" or "torch", `backends.resolve_backend_name`); the module that runs the rows is
`backends.backend_module`, as for the fused-linear ops. `skew_forward_and_grad` uses the backend's
`skew_forward_and_grad` when it has one (`backends.protocol.SkewForwardAndGrad`), else `skew_forward` then
`skew_backward`. The fake implementations give the output shapes and dtypes: float32 loss and stats
(float64 for float64 logits) and a contiguous `[N, V]` gradient in the student's dtype.

`statistics`, `forward`, `backward` and `forward_and_grad` call the ops while torch.compile traces and their
implementations directly in eager mode (the first call through the dispatcher imports the compiler stack,
~800 modules, ~75 MB resident).
"""

from __future__ import annotations

from typing import Optional

import torch

from ._inputs import SkewRows, compute_dtype, flat_rows, num_rows
from .backends import backend_module
from .backends.protocol import forward_and_grad_of
from .statistics import STATS

ROW_FIELDS = ("student", "teacher", "labels", "alpha_rows", "alpha", "ignore_index", "inv_temperature")


def _split(rows: SkewRows) -> tuple:
    return tuple(getattr(rows, name) for name in ROW_FIELDS)


def run_op(op, implementation, *args):
    """The custom op while torch.compile traces, its implementation directly in eager mode."""
    return op(*args) if torch.compiler.is_compiling() else implementation(*args)


# --- sweep 1 ---------------------------------------------------------------------------------------------


def _skew_statistics(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: Optional[torch.Tensor],
    ignore_index: int,
    inv_temperature: float,
    backend: str,
) -> torch.Tensor:
    rows = flat_rows(student, teacher, labels, None, 0.0, ignore_index, inv_temperature)
    return backend_module(backend, compute_dtype(rows.student, rows.teacher)).skew_statistics(rows)


skew_statistics = torch.library.custom_op("distillm2::skew_statistics", mutates_args=())(_skew_statistics)


@skew_statistics.register_fake
def _(student, teacher, labels, ignore_index, inv_temperature, backend):
    return student.new_empty((num_rows(student), STATS), dtype=compute_dtype(student, teacher))


def statistics(rows: SkewRows, backend: str) -> torch.Tensor:
    """Sweep 1: the row statistics `[N, STATS]`, with the label tokens' log-probabilities."""
    args = (rows.student, rows.teacher, rows.labels, rows.ignore_index, rows.inv_temperature, backend)
    return run_op(skew_statistics, _skew_statistics, *args)


# --- sweeps 1 and 2 ---------------------------------------------------------------------------------------


def _skew_forward(
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
    rows = flat_rows(student, teacher, labels, alpha_rows, alpha, ignore_index, inv_temperature)
    return backend_module(backend, compute_dtype(rows.student, rows.teacher)).skew_forward(rows, reverse, detach, stats)


skew_forward = torch.library.custom_op("distillm2::skew_forward", mutates_args=())(_skew_forward)


@skew_forward.register_fake
def _(student, teacher, labels, alpha_rows, alpha, ignore_index, inv_temperature, reverse, detach, backend, stats=None):
    dtype, n = compute_dtype(student, teacher), num_rows(student)
    return student.new_empty((n,), dtype=dtype), student.new_empty((n, STATS), dtype=dtype)


def forward(
    rows: SkewRows, *, reverse: bool, detach: bool, backend: str, stats: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sweeps 1 and 2 (sweep 2 only when `stats` is given): per-row loss `[N]` and statistics `[N, STATS]`."""
    return run_op(skew_forward, _skew_forward, *_split(rows), reverse, detach, backend, stats)


# --- sweep 3 ----------------------------------------------------------------------------------------------


def _skew_backward(
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
    rows = flat_rows(student, teacher, labels, alpha_rows, alpha, ignore_index, inv_temperature)
    return backend_module(backend, compute_dtype(rows.student, rows.teacher)).skew_backward(rows, reverse, detach, stats, grad_loss)


skew_backward = torch.library.custom_op("distillm2::skew_backward", mutates_args=())(_skew_backward)


@skew_backward.register_fake
def _(student, teacher, labels, alpha_rows, alpha, ignore_index, inv_temperature, reverse, detach, backend, stats, grad_loss):
    return student.new_empty((num_rows(student), student.shape[-1]), dtype=student.dtype)


def backward(
    rows: SkewRows, *, reverse: bool, detach: bool, backend: str, stats: torch.Tensor, grad_loss: torch.Tensor
) -> torch.Tensor:
    """Sweep 3: the gradient w.r.t. the student logits, `[N, V]` contiguous in the student's dtype."""
    args = (*_split(rows), reverse, detach, backend, stats, grad_loss)
    return run_op(skew_backward, _skew_backward, *args)


# --- sweeps 1 to 3, for a scalar reduction ------------------------------------------------------------------


def _skew_forward_and_grad(
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
    row_grad_scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = flat_rows(student, teacher, labels, alpha_rows, alpha, ignore_index, inv_temperature)
    module = backend_module(backend, compute_dtype(rows.student, rows.teacher))
    fused = forward_and_grad_of(module)
    if fused is not None:
        return fused(rows, reverse, detach, row_grad_scale)
    loss, stats = module.skew_forward(rows, reverse, detach)
    return loss, stats, module.skew_backward(rows, reverse, detach, stats, row_grad_scale)


skew_forward_and_grad = torch.library.custom_op("distillm2::skew_forward_and_grad", mutates_args=())(_skew_forward_and_grad)


@skew_forward_and_grad.register_fake
def _(student, teacher, labels, alpha_rows, alpha, ignore_index, inv_temperature, reverse, detach, backend, row_grad_scale):
    dtype, n = compute_dtype(student, teacher), num_rows(student)
    grad = student.new_empty((n, student.shape[-1]), dtype=student.dtype)
    return student.new_empty((n,), dtype=dtype), student.new_empty((n, STATS), dtype=dtype), grad


def forward_and_grad(
    rows: SkewRows, *, reverse: bool, detach: bool, backend: str, row_grad_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss [N], stats [N, STATS], row_grad_scale[i] · ∂loss_i/∂student_i [N, V]) in one call."""
    args = (*_split(rows), reverse, detach, backend, row_grad_scale)
    return run_op(skew_forward_and_grad, _skew_forward_and_grad, *args)
