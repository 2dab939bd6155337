"""The autograd op `FusedSparseSkewFunction`: SKL / SRKL of dense student logits against a sparse teacher.

The per-token loss `[...]` of `student_logits` `[..., V]` against a `SparseTeacher` (docs/design.md §8); the
public `fused_skl` / `fused_srkl` reach it with a sparse teacher and add the reductions. The forward runs the
student's log-sum-exp sweep (skipped when `statistics` carry it) and, with the "uniform" tail, the tail sweep,
and keeps per row the log-sum-exp, the gradient's row shift and log c, and per support entry its gradient
per unit scale (`[N, k]`). The backward runs one gradient sweep and writes the k support entries, and only
when the student's gradient is needed. The teacher and α get no gradient.

`sparse_token_statistics` is the statistics pass of a sparse teacher: the student's log-sum-exp and the label
tokens' log q(y), log p(y) in a `TokenStatistics` (columns MAX_S = 0, LOG_SUM_S = log Σ exp(z/T), the
label columns; the teacher's and C are 0), which the loss op then reuses.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._autograd import InputGrads
from ._inputs import Alpha
from .backends import resolve_backend_name
from .sparse_teacher import (
    SparseForward,
    SparseRows,
    SparseTeacher,
    check_sparse_labels,
    prepare_sparse_rows,
    sparse_forward,
    sparse_grad,
    sparse_statistics,
)
from .statistics import RowStat, TokenStatistics, check_statistics

__all__ = ["FusedSparseSkewFunction", "sparse_skew_divergence", "sparse_token_statistics"]


def _statistics_lse(stats: Optional[torch.Tensor], inv_temperature: float) -> Optional[torch.Tensor]:
    """The student's log Σ exp(z/T) from `[N, STATS]` row statistics (sparse or dense), or None."""
    if stats is None:
        return None
    return stats[:, RowStat.MAX_S] * inv_temperature + stats[:, RowStat.LOG_SUM_S]


def sparse_token_statistics(
    student_logits: torch.Tensor,
    teacher: SparseTeacher,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    backend: str = "auto",
    teacher_tail: str = "renormalize",
) -> TokenStatistics:
    """`token_statistics` against a sparse teacher: one log-sum-exp sweep over the student; log p(y) of a label
    outside the ids is log c ("uniform") or −inf ("renormalize"). No gradient flows through them."""
    rows = prepare_sparse_rows(student_logits, teacher, 0.0, labels, ignore_index, temperature, teacher_tail, False)
    check_sparse_labels(rows)
    name = resolve_backend_name(backend, rows.student.device)
    with torch.no_grad():
        lse, label_logprobs = sparse_statistics(rows, name)
        zeros = lse.new_zeros((lse.shape[0], 1))
        columns = {RowStat.LOG_SUM_S: lse.unsqueeze(-1), RowStat.LABEL_LOG_Q: label_logprobs}
        stats = torch.cat([columns.get(stat, zeros) for stat in RowStat if stat != RowStat.LABEL_LOG_P], dim=-1)
    return TokenStatistics(stats, rows.leading_shape, sparse_teacher=True)


class FusedSparseSkewFunction(torch.autograd.Function):
    """SKL_α (`reverse=False`) or SRKL_α per token against a sparse teacher (docs/design.md §8).

    `FusedSparseSkewFunction.apply(student_logits, ids, logprobs, tail_logprob, alpha, labels, ignore_index,
    temperature, backend, reverse, detach_mixture, teacher_tail, statistics=None)` -> loss of shape
    `student_logits.shape[:-1]` (float32; float64 for float64 logits); ignored tokens give 0.
    """

    @staticmethod
    def forward(
        ctx,
        student_logits: torch.Tensor,
        ids: torch.Tensor,
        logprobs: torch.Tensor,
        tail_logprob: Optional[torch.Tensor],
        alpha: Alpha,
        labels: Optional[torch.Tensor],
        ignore_index: int,
        temperature: float,
        backend: str,
        reverse: bool,
        detach_mixture: bool,
        teacher_tail: str,
        statistics: Optional[TokenStatistics] = None,
    ) -> torch.Tensor:
        teacher = SparseTeacher(ids, logprobs, tail_logprob)
        rows = prepare_sparse_rows(student_logits, teacher, alpha, labels, ignore_index, temperature, teacher_tail, reverse)
        given = check_statistics(
            statistics, rows.leading_shape, rows.student.device, source="logits", producer="token_statistics",
            sparse_teacher=True,
        )
        if given is None:
            check_sparse_labels(rows)
        name = resolve_backend_name(backend, rows.student.device)
        detach = reverse and bool(detach_mixture)
        forward = sparse_forward(
            rows, reverse=reverse, detach=detach, backend=name, lse=_statistics_lse(given, rows.inv_temperature)
        )
        ctx.set_materialize_grads(False)
        ctx.sweep = dict(reverse=reverse, detach=detach, backend=name)
        ctx.student_shape = student_logits.shape
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(
                rows.student, rows.ids, rows.labels, rows.alpha_rows, forward.lse, forward.row_shift,
                forward.log_tail, forward.support_grad,
            )
            ctx.scalars = (rows.ignore_index, rows.inv_temperature, rows.tail)
        return forward.loss.view(rows.leading_shape)

    @staticmethod
    def backward(ctx, grad_loss):
        if grad_loss is None or not ctx.needs_input_grad[0]:
            return _GRADS()
        student, ids, labels, alpha_rows, lse, row_shift, log_tail, support_grad = ctx.saved_tensors
        ignore_index, inv_temperature, tail = ctx.scalars
        rows = SparseRows(
            student=student, ids=ids, logprobs=None, tail_logprob=None, labels=labels, alpha_rows=alpha_rows,
            ignore_index=ignore_index, inv_temperature=inv_temperature, tail=tail,
            leading_shape=torch.Size([ids.shape[0]]),
        )
        forward = SparseForward(None, None, lse, row_shift, log_tail, support_grad)
        grad = sparse_grad(rows, forward, grad_loss.reshape(-1), **ctx.sweep)
        return _GRADS(student_logits=grad.view(ctx.student_shape))


_GRADS = InputGrads(FusedSparseSkewFunction.forward)


def sparse_skew_divergence(
    student_logits: torch.Tensor,
    teacher: SparseTeacher,
    alpha: Alpha,
    labels: Optional[torch.Tensor],
    *,
    reverse: bool,
    detach_mixture: bool = False,
    ignore_index: int = -100,
    temperature: float = 1.0,
    backend: str = "auto",
    teacher_tail: str = "renormalize",
    statistics: Optional[TokenStatistics] = None,
) -> torch.Tensor:
    """Per-token SKL (`reverse=False`) or SRKL against a sparse teacher, reusing `statistics` when given."""
    return FusedSparseSkewFunction.apply(
        student_logits, teacher.ids, teacher.logprobs, teacher.tail_logprob, alpha, labels, ignore_index,
        temperature, backend, reverse, detach_mixture, teacher_tail, statistics,
    )
