"""The autograd ops `FusedSKLFunction` and `FusedSRKLFunction`.

Both take logits `[..., V]` (student first) and return the per-token loss `[...]` in float32 (reduction
"none"); the public `fused_skl` / `fused_srkl` add the reductions. The forward runs a backend's first two
sweeps and keeps three floats per row; the backward runs the third sweep and writes the gradient of the
student logits, and only when that gradient is needed. The teacher and α get no gradient.

Under torch.compile the sweeps run as the custom ops `distillm2::skew_forward` / `distillm2::skew_backward`
(`custom_ops`), so a step through these Functions traces without graph breaks; eager calls skip the dispatcher.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._inputs import Alpha, prepare_rows
from . import custom_ops
from .backends import resolve_backend_name


def _forward(ctx, student, teacher, alpha, labels, ignore_index, temperature, backend, reverse, detach):
    rows = prepare_rows(student, teacher, alpha, labels, ignore_index, temperature)
    backend = resolve_backend_name(backend, rows.student.device)
    scalars = (rows.alpha, rows.ignore_index, rows.inv_temperature, reverse, detach, backend)
    loss, stats = custom_ops.forward(rows.student, rows.teacher, rows.labels, rows.alpha_rows, *scalars)
    ctx.set_materialize_grads(False)
    ctx.scalars = scalars
    ctx.student_shape = student.shape
    if ctx.needs_input_grad[0]:
        ctx.save_for_backward(rows.student, rows.teacher, rows.labels, rows.alpha_rows, stats)
    return loss.view(rows.leading_shape)


def _backward(ctx, grad_loss):
    if grad_loss is None or not ctx.needs_input_grad[0]:
        return None
    student, teacher, labels, alpha_rows, stats = ctx.saved_tensors
    grad = custom_ops.backward(
        student, teacher, labels, alpha_rows, *ctx.scalars, stats, grad_loss.reshape(-1)
    )
    return grad.view(ctx.student_shape)


class FusedSKLFunction(torch.autograd.Function):
    """SKL_α = KL(p ‖ αp + (1−α)q) per token, with q = softmax(z_s/T), p = softmax(z_t/T).

    `FusedSKLFunction.apply(student_logits, teacher_logits, alpha, labels, ignore_index, temperature,
    backend)` -> float32 loss of shape `student_logits.shape[:-1]`; ignored tokens give 0.
    """

    @staticmethod
    def forward(
        ctx,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        alpha: Alpha = 0.1,
        labels: Optional[torch.Tensor] = None,
        ignore_index: int = -100,
        temperature: float = 1.0,
        backend: str = "auto",
    ) -> torch.Tensor:
        return _forward(
            ctx, student_logits, teacher_logits, alpha, labels, ignore_index, temperature, backend, False, False
        )

    @staticmethod
    def backward(ctx, grad_loss):
        return _backward(ctx, grad_loss), None, None, None, None, None, None


class FusedSRKLFunction(torch.autograd.Function):
    """SRKL_α = KL(q ‖ (1−α)p + αq) per token; `detach_mixture` treats the q inside r as a constant.

    `FusedSRKLFunction.apply(student_logits, teacher_logits, alpha, labels, ignore_index, temperature,
    backend, detach_mixture)` -> float32 loss of shape `student_logits.shape[:-1]`.
    """

    @staticmethod
    def forward(
        ctx,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        alpha: Alpha = 0.1,
        labels: Optional[torch.Tensor] = None,
        ignore_index: int = -100,
        temperature: float = 1.0,
        backend: str = "auto",
        detach_mixture: bool = False,
    ) -> torch.Tensor:
        return _forward(
            ctx,
            student_logits,
            teacher_logits,
            alpha,
            labels,
            ignore_index,
            temperature,
            backend,
            True,
            bool(detach_mixture),
        )

    @staticmethod
    def backward(ctx, grad_loss):
        return _backward(ctx, grad_loss), None, None, None, None, None, None, None
