"""The autograd ops `FusedSKLFunction` and `FusedSRKLFunction`, and the row statistics they share.

Both take logits `[..., V]` (student first) and return the per-token loss `[...]` in float32 (reduction
"none"); the public `fused_skl` / `fused_srkl` add the reductions. The forward runs a backend's first two
sweeps and keeps seven floats per row; the backward runs the third sweep and writes the gradient of the
student logits, and only when that gradient is needed. The teacher and α get no gradient.

Sweep 1 can run on its own (`token_statistics`): it gives the label tokens' log-probabilities
log q(y_k), log p(y_k) as a by-product, and passing its result as `statistics` to an op on the same
logits skips sweep 1 there. The DistiLLM-2 objective uses this to pick α from sequence probabilities
without an extra pass over the vocabulary.

Labels must be token ids in [0, V) or `ignore_index`, in every op (as in the fused-linear ops): a label
outside raises ValueError. The check is one reduction over the `[N]` labels and no host synchronisation where
it matters: on CUDA and under torch.compile it is an asynchronous device-side assert (`_inputs.require`);
on the CPU the flag is read directly, which waits for nothing.

Under torch.compile the sweeps run as the custom ops `distillm2::skew_statistics` / `skew_forward` /
`skew_backward` (`custom_ops`), so a step through these Functions traces without graph breaks; eager calls
skip the dispatcher.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import custom_ops
from ._autograd import InputGrads
from ._inputs import Alpha, SkewRows, check_label_ids, compute_dtype, flat_rows, prepare_rows
from .backends import backend_module, resolve_backend_name
from .backends.protocol import forward_and_grad_of
from .reductions import SCALAR_REDUCTIONS, reduce_token_losses, reduction_row_weights
from .sparse_skew_divergence import sparse_skew_divergence, sparse_token_statistics
from .sparse_teacher import as_sparse_teacher, check_teacher_tail
from .statistics import TokenStatistics, check_statistics

__all__ = [
    "FusedSKLFunction",
    "FusedSRKLFunction",
    "TokenStatistics",
    "token_statistics",
    "skew_divergence",
    "reduced_skew_divergence",
    "check_dense_teacher_tail",
]


def check_dense_teacher_tail(teacher_tail: str) -> None:
    """A dense teacher has no tail: `teacher_tail` must keep its default."""
    if check_teacher_tail(teacher_tail) != "renormalize":
        raise ValueError(
            f"teacher_tail={teacher_tail!r} applies to a sparse teacher (SparseTeacher or (ids, logprobs[, tail])); "
            "the teacher here is dense logits, which have no tail"
        )


def token_statistics(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    backend: str = "auto",
    teacher_tail: str = "renormalize",
) -> TokenStatistics:
    """Sweep 1 over `[..., V]` logits (student first): the label tokens' log-probabilities under student
    and teacher, at temperature T, and the statistics that let `fused_skl` / `fused_srkl` skip sweep 1.
    No gradient flows through them. `teacher_logits` may be a sparse teacher (`SparseTeacher` or an
    (ids, logprobs[, tail_logprob]) tuple, docs/design.md §8) with its `teacher_tail`: then one log-sum-exp
    sweep over the student, and log p(y) of a label outside the ids is log c ("uniform") or −inf."""
    if labels is None:
        raise ValueError("token_statistics needs labels: the label tokens' log-probabilities are its output")
    sparse = as_sparse_teacher(teacher_logits)
    if sparse is not None:
        return sparse_token_statistics(
            student_logits, sparse, labels, ignore_index=ignore_index, temperature=temperature, backend=backend,
            teacher_tail=teacher_tail,
        )
    check_dense_teacher_tail(teacher_tail)
    rows = prepare_rows(student_logits, teacher_logits, 0.0, labels, ignore_index, temperature)
    check_label_ids(rows.labels, rows.vocab_size, rows.ignore_index)
    name = resolve_backend_name(backend, rows.student.device)
    with torch.no_grad():  # statistics carry no gradient (an α computed from them must not require grad)
        stats = custom_ops.statistics(rows, name)
    return TokenStatistics(stats, rows.leading_shape)


def _prepare(student, teacher, alpha, labels, ignore_index, temperature, backend, statistics):
    """(rows, concrete backend name, the given stats or None), arguments checked."""
    rows = prepare_rows(student, teacher, alpha, labels, ignore_index, temperature)
    given_stats = check_statistics(
        statistics, rows.leading_shape, rows.student.device, source="logits", producer="token_statistics"
    )
    if given_stats is None:  # else token_statistics checked the labels when it read their log-probabilities
        check_label_ids(rows.labels, rows.vocab_size, rows.ignore_index)
    return rows, resolve_backend_name(backend, rows.student.device), given_stats


def _save_rows(ctx, rows: SkewRows, *tensors: Optional[torch.Tensor]) -> None:
    ctx.save_for_backward(rows.student, rows.teacher, rows.labels, rows.alpha_rows, *tensors)
    ctx.scalars = (rows.alpha, rows.ignore_index, rows.inv_temperature)


def _saved_rows(ctx) -> tuple[SkewRows, tuple]:
    student, teacher, labels, alpha_rows, *rest = ctx.saved_tensors
    alpha, ignore_index, inv_temperature = ctx.scalars
    return flat_rows(student, teacher, labels, alpha_rows, alpha, ignore_index, inv_temperature), tuple(rest)


def _per_token_forward(ctx, student, teacher, alpha, labels, ignore_index, temperature, backend, reverse, detach, statistics):
    rows, name, given_stats = _prepare(student, teacher, alpha, labels, ignore_index, temperature, backend, statistics)
    loss, stats = custom_ops.forward(rows, reverse=reverse, detach=detach, backend=name, stats=given_stats)
    ctx.set_materialize_grads(False)
    ctx.sweep = dict(reverse=reverse, detach=detach, backend=name)
    ctx.student_shape = student.shape
    if ctx.needs_input_grad[0]:
        _save_rows(ctx, rows, stats)
    return loss.view(rows.leading_shape)


def _per_token_backward(ctx, grad_loss) -> Optional[torch.Tensor]:
    if grad_loss is None or not ctx.needs_input_grad[0]:
        return None
    rows, (stats,) = _saved_rows(ctx)
    grad = custom_ops.backward(rows, **ctx.sweep, stats=stats, grad_loss=grad_loss.reshape(-1))
    return grad.view(ctx.student_shape)


class FusedSKLFunction(torch.autograd.Function):
    """SKL_α = KL(p ‖ αp + (1−α)q) per token, with q = softmax(z_s/T), p = softmax(z_t/T).

    `FusedSKLFunction.apply(student_logits, teacher_logits, alpha, labels, ignore_index, temperature,
    backend, statistics=None)` -> float32 loss of shape `student_logits.shape[:-1]`; ignored tokens give 0.
    `statistics`: `token_statistics` of the same logits, labels and temperature, to skip sweep 1.
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
        statistics: Optional[TokenStatistics] = None,
    ) -> torch.Tensor:
        return _per_token_forward(
            ctx, student_logits, teacher_logits, alpha, labels, ignore_index, temperature, backend, False, False,
            statistics,
        )

    @staticmethod
    def backward(ctx, grad_loss):
        return _SKL_GRADS(student_logits=_per_token_backward(ctx, grad_loss))


class FusedSRKLFunction(torch.autograd.Function):
    """SRKL_α = KL(q ‖ (1−α)p + αq) per token; `detach_mixture` treats the q inside r as a constant.

    `FusedSRKLFunction.apply(student_logits, teacher_logits, alpha, labels, ignore_index, temperature,
    backend, detach_mixture, statistics=None)` -> float32 loss of shape `student_logits.shape[:-1]`.
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
        statistics: Optional[TokenStatistics] = None,
    ) -> torch.Tensor:
        return _per_token_forward(
            ctx, student_logits, teacher_logits, alpha, labels, ignore_index, temperature, backend, True,
            bool(detach_mixture), statistics,
        )

    @staticmethod
    def backward(ctx, grad_loss):
        return _SRKL_GRADS(student_logits=_per_token_backward(ctx, grad_loss))


_SKL_GRADS = InputGrads(FusedSKLFunction.forward)
_SRKL_GRADS = InputGrads(FusedSRKLFunction.forward)


def skew_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    alpha: Alpha,
    labels: Optional[torch.Tensor],
    *,
    reverse: bool,
    detach_mixture: bool = False,
    ignore_index: int = -100,
    temperature: float = 1.0,
    backend: str = "auto",
    statistics: Optional[TokenStatistics] = None,
    teacher_tail: str = "renormalize",
) -> torch.Tensor:
    """Per-token SKL (`reverse=False`) or SRKL (`reverse=True`), reusing `statistics` when given; the
    teacher dense logits or a sparse teacher (with `teacher_tail`)."""
    sparse = as_sparse_teacher(teacher_logits)
    if sparse is not None:
        return sparse_skew_divergence(
            student_logits, sparse, alpha, labels, reverse=reverse, detach_mixture=detach_mixture,
            ignore_index=ignore_index, temperature=temperature, backend=backend, teacher_tail=teacher_tail,
            statistics=statistics,
        )
    check_dense_teacher_tail(teacher_tail)
    if reverse:
        return FusedSRKLFunction.apply(
            student_logits, teacher_logits, alpha, labels, ignore_index, temperature, backend, detach_mixture, statistics
        )
    return FusedSKLFunction.apply(
        student_logits, teacher_logits, alpha, labels, ignore_index, temperature, backend, statistics
    )


class _ReducedSkewFunction(torch.autograd.Function):
    """A scalar reduction of SKL / SRKL whose gradient comes out of the forward, from the backend's
    `skew_forward_and_grad` with the reduction's per-row weights: the backward only scales it by the
    incoming gradient (no third sweep). Used where the backend has that extension (`_has_forward_and_grad`).
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, alpha, labels, ignore_index, temperature, backend, reverse, detach, reduction):
        rows, name, _ = _prepare(student_logits, teacher_logits, alpha, labels, ignore_index, temperature, backend, None)
        row_grad_scale = reduction_row_weights(
            reduction, rows.labels, rows.ignore_index, rows.leading_shape, torch.float32, rows.student.device
        )
        loss, _, grad = custom_ops.forward_and_grad(
            rows, reverse=reverse, detach=detach, backend=name, row_grad_scale=row_grad_scale
        )
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad)
        ctx.student_shape = student_logits.shape
        ctx.grad_consumed = False
        return reduce_token_losses(loss.view(rows.leading_shape), labels, ignore_index, reduction)

    @staticmethod
    def backward(ctx, grad_loss):
        if grad_loss is None:
            return _REDUCED_GRADS()
        if ctx.grad_consumed:
            raise RuntimeError(
                "distillm2_kernels: a second backward through a fused loss with a scalar reduction; its gradient "
                "is computed in the forward and scaled in place by the first backward (so no second [N, V] "
                "tensor is allocated). Compute the loss again, or use reduction='none' and reduce it yourself."
            )
        ctx.grad_consumed = True
        (grad,) = ctx.saved_tensors
        # in place: the gradient is the only [N, V] tensor of the op, forward and backward together
        if not _is_one_on_host(grad_loss):
            grad.mul_(grad_loss)
        return _REDUCED_GRADS(student_logits=grad.view(ctx.student_shape))


def _is_one_on_host(grad_loss: torch.Tensor) -> bool:
    """Whether the incoming gradient is a CPU scalar equal to 1 (`loss.backward()` on the loss itself), so that
    scaling the gradient by it (a pass over [N, V]) changes nothing and is skipped. Reading a CPU scalar waits
    for nothing; a CUDA one would, and under torch.compile the value is not known while tracing: both multiply,
    as does an upstream gradient that itself requires grad (a double backward differentiates through the scale)."""
    return (
        grad_loss.device.type == "cpu"
        and grad_loss.numel() == 1
        and not grad_loss.requires_grad
        and not torch.compiler.is_compiling()
        and bool(grad_loss.reshape(()) == 1)
    )


_REDUCED_GRADS = InputGrads(_ReducedSkewFunction.forward)


def _has_forward_and_grad(backend: str, student: object, teacher: object) -> bool:
    """Whether the backend that would run these logits implements `skew_forward_and_grad` (and a gradient is
    wanted). An argument error says False: the per-token path then raises it, in its usual order."""
    if not (isinstance(student, torch.Tensor) and isinstance(teacher, torch.Tensor)):
        return False
    if not (torch.is_grad_enabled() and student.requires_grad):
        return False
    try:
        name = resolve_backend_name(backend, student.device)
    except ValueError:
        return False
    return forward_and_grad_of(backend_module(name, compute_dtype(student, teacher))) is not None


def reduced_skew_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    alpha: Alpha,
    labels: Optional[torch.Tensor],
    *,
    reverse: bool,
    detach_mixture: bool = False,
    ignore_index: int = -100,
    temperature: float = 1.0,
    reduction: str,
    backend: str = "auto",
    teacher_tail: str = "renormalize",
) -> torch.Tensor:
    """SKL or SRKL reduced by `reduction` (`reductions`): in one Function with the gradient computed in the
    forward when the reduction is a scalar and the backend implements `skew_forward_and_grad`, else the
    per-token Function followed by the reduction (always so for a sparse teacher)."""
    if teacher_tail != "renormalize" and as_sparse_teacher(teacher_logits) is None:
        check_dense_teacher_tail(teacher_tail)
    if reduction in SCALAR_REDUCTIONS and _has_forward_and_grad(backend, student_logits, teacher_logits):
        return _ReducedSkewFunction.apply(
            student_logits, teacher_logits, alpha, labels, ignore_index, temperature, backend, reverse,
            reverse and bool(detach_mixture), reduction,
        )
    per_token = skew_divergence(
        student_logits, teacher_logits, alpha, labels, reverse=reverse, detach_mixture=detach_mixture,
        ignore_index=ignore_index, temperature=temperature, backend=backend, teacher_tail=teacher_tail,
    )
    return reduce_token_losses(per_token, labels, ignore_index, reduction)
