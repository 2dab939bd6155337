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

from typing import NamedTuple, Optional

import torch

from . import custom_ops
from ._inputs import Alpha, check_label_ids, prepare_rows
from .backends import STATS, resolve_backend_name


class TokenStatistics(NamedTuple):
    """Sweep 1's row statistics for one pair of logits `[..., V]` (`token_statistics`, or
    `fused_linear_token_statistics` for the logits a fused-linear op builds): `stats` is `[N, 7]` (see
    `backends`)."""

    stats: torch.Tensor
    leading_shape: torch.Size

    @property
    def student_label_logprobs(self) -> torch.Tensor:
        """log q(label) per token, the logits' leading shape (0 at ignored tokens)."""
        return self.stats[:, 5].view(self.leading_shape)

    @property
    def teacher_label_logprobs(self) -> torch.Tensor:
        """log p(label) per token, the logits' leading shape (0 at ignored tokens)."""
        return self.stats[:, 6].view(self.leading_shape)

    @property
    def label_logprobs(self) -> torch.Tensor:
        """(log q(label), log p(label)) per token, `[..., 2]` (0 at ignored tokens)."""
        return self.stats[:, 5:7].view(*self.leading_shape, 2)


def token_statistics(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    backend: str = "auto",
) -> TokenStatistics:
    """Sweep 1 over `[..., V]` logits (student first): the label tokens' log-probabilities under student
    and teacher, at temperature T, and the statistics that let `fused_skl` / `fused_srkl` skip sweep 1.
    No gradient flows through them."""
    if labels is None:
        raise ValueError("token_statistics needs labels: the label tokens' log-probabilities are its output")
    rows = prepare_rows(student_logits, teacher_logits, 0.0, labels, ignore_index, temperature)
    check_label_ids(rows.labels, rows.vocab_size, rows.ignore_index)
    name = resolve_backend_name(backend, rows.student.device)
    with torch.no_grad():  # statistics carry no gradient (an α computed from them must not require grad)
        stats = custom_ops.statistics(
            rows.student, rows.teacher, rows.labels, rows.ignore_index, rows.inv_temperature, name
        )
    return TokenStatistics(stats, rows.leading_shape)


def _check_statistics(statistics: Optional[TokenStatistics], rows) -> Optional[torch.Tensor]:
    if statistics is None:
        return None
    if not isinstance(statistics, TokenStatistics):
        raise TypeError(f"statistics must come from token_statistics(), got {type(statistics).__name__}")
    if statistics.leading_shape != rows.leading_shape or statistics.stats.shape != (rows.num_rows, STATS):
        raise ValueError(
            f"statistics were computed for logits of leading shape {tuple(statistics.leading_shape)}, "
            f"these have {tuple(rows.leading_shape)}"
        )
    if statistics.stats.device != rows.student.device:
        raise ValueError(f"statistics are on {statistics.stats.device}, the logits on {rows.student.device}")
    return statistics.stats


def _forward(ctx, student, teacher, alpha, labels, ignore_index, temperature, backend, reverse, detach, statistics):
    rows = prepare_rows(student, teacher, alpha, labels, ignore_index, temperature)
    given_stats = _check_statistics(statistics, rows)
    if given_stats is None:  # else token_statistics checked the labels when it read their log-probabilities
        check_label_ids(rows.labels, rows.vocab_size, rows.ignore_index)
    backend = resolve_backend_name(backend, rows.student.device)
    scalars = (rows.alpha, rows.ignore_index, rows.inv_temperature, reverse, detach, backend)
    loss, stats = custom_ops.forward(
        rows.student, rows.teacher, rows.labels, rows.alpha_rows, *scalars, given_stats
    )
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
        return _forward(
            ctx,
            student_logits,
            teacher_logits,
            alpha,
            labels,
            ignore_index,
            temperature,
            backend,
            False,
            False,
            statistics,
        )

    @staticmethod
    def backward(ctx, grad_loss):
        return _backward(ctx, grad_loss), None, None, None, None, None, None, None


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
            statistics,
        )

    @staticmethod
    def backward(ctx, grad_loss):
        return _backward(ctx, grad_loss), None, None, None, None, None, None, None, None


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
) -> torch.Tensor:
    """Per-token SKL (`reverse=False`) or SRKL (`reverse=True`), reusing `statistics` when given."""
    if reverse:
        return FusedSRKLFunction.apply(
            student_logits, teacher_logits, alpha, labels, ignore_index, temperature, backend, detach_mixture, statistics
        )
    return FusedSKLFunction.apply(
        student_logits, teacher_logits, alpha, labels, ignore_index, temperature, backend, statistics
    )
