"""The chunk driver as PyTorch custom ops, so that `torch.compile` traces the fused-linear ops whole.

    distillm2::fused_linear_statistics(<models>, labels, ignore_index, inv_temperature, backend, budget)
        -> stats [N, STATS]
    distillm2::fused_linear_loss(<models>, labels?, alpha_rows?, statistics?, row_weights?, grad_weight!?,
                                 grad_bias!?, alpha, ignore_index, inv_temperature, reverse, detach, backend,
                                 budget, want_loss, want_label_logprobs, want_hidden)
        -> (row losses [N], label log-probabilities [N, 2], grad hidden [N, H_s])

`<models>` is each model's hidden rows `[N, H]`, lm_head weight, bias and soft-cap (`Head`). The driver
drops the ignored rows (a count known only at run time) inside the op, so the graph never sees a
data-dependent shape. An output not asked for is an empty tensor (`loss_pass` gives None for it); the
weight and bias gradients are added into the float accumulators `grad_weight` / `grad_bias` in place.
Eager calls run the implementation directly, skipping the dispatcher (as `custom_ops` does).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .._inputs import TokenOptions, compute_dtype
from ..custom_ops import run_op
from ..statistics import STATS
from .chunks import ChunkOutputs, run_chunks
from .lm_head import LMHead


class Head(NamedTuple):
    """One model's side of a fused-linear call."""

    hidden: torch.Tensor  # [N, H] rows
    weight: torch.Tensor  # [V, H]
    bias: Optional[torch.Tensor]  # [V]
    softcap: Optional[float]


def _heads(s_hidden, s_weight, s_bias, s_cap, t_hidden, t_weight, t_bias, t_cap) -> tuple[LMHead, LMHead]:
    cd = compute_dtype(s_hidden, s_weight, t_hidden, t_weight)
    return LMHead(s_hidden, s_weight, s_bias, s_cap, cd), LMHead(t_hidden, t_weight, t_bias, t_cap, cd)


def _options(labels, alpha_rows, alpha, ignore_index, inv_temperature, n) -> TokenOptions:
    return TokenOptions(
        labels=labels,
        alpha_rows=alpha_rows,
        alpha=alpha,
        ignore_index=ignore_index,
        inv_temperature=inv_temperature,
        leading_shape=torch.Size([n]),
    )


# --- sweep 1 alone ------------------------------------------------------------------------------------------


def _fused_linear_statistics(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: Optional[torch.Tensor],
    student_softcap: Optional[float],
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_bias: Optional[torch.Tensor],
    teacher_softcap: Optional[float],
    labels: torch.Tensor,
    ignore_index: int,
    inv_temperature: float,
    backend: str,
    memory_budget_bytes: int,
) -> torch.Tensor:
    student, teacher = _heads(
        student_hidden, student_weight, student_bias, student_softcap,
        teacher_hidden, teacher_weight, teacher_bias, teacher_softcap,
    )
    options = _options(labels, None, 0.0, ignore_index, inv_temperature, student_hidden.shape[0])
    return run_chunks(
        student, teacher, options, backend=backend, budget=memory_budget_bytes, statistics_only=True
    ).stats


fused_linear_statistics = torch.library.custom_op("distillm2::fused_linear_statistics", mutates_args=())(
    _fused_linear_statistics
)


@fused_linear_statistics.register_fake
def _(student_hidden, student_weight, student_bias, student_softcap, teacher_hidden, teacher_weight, *rest):
    dtype = compute_dtype(student_hidden, student_weight, teacher_hidden, teacher_weight)
    return student_hidden.new_empty((student_hidden.shape[0], STATS), dtype=dtype)


def statistics_pass(
    *, student: Head, teacher: Head, options: TokenOptions, backend: str, budget: int
) -> torch.Tensor:
    """Sweep 1 over the kept rows: the row statistics `[N, STATS]` (zeros at dropped rows)."""
    return run_op(
        fused_linear_statistics, _fused_linear_statistics, *student, *teacher, options.labels,
        options.ignore_index, options.inv_temperature, backend, budget,
    )


# --- the loss, and its gradients ----------------------------------------------------------------------------


def _fused_linear_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: Optional[torch.Tensor],
    student_softcap: Optional[float],
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_bias: Optional[torch.Tensor],
    teacher_softcap: Optional[float],
    labels: Optional[torch.Tensor],
    alpha_rows: Optional[torch.Tensor],
    statistics: Optional[torch.Tensor],
    row_weights: Optional[torch.Tensor],
    grad_weight: Optional[torch.Tensor],
    grad_bias: Optional[torch.Tensor],
    alpha: float,
    ignore_index: int,
    inv_temperature: float,
    reverse: bool,
    detach: bool,
    backend: str,
    memory_budget_bytes: int,
    want_loss: bool,
    want_label_logprobs: bool,
    want_hidden: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    student, teacher = _heads(
        student_hidden, student_weight, student_bias, student_softcap,
        teacher_hidden, teacher_weight, teacher_bias, teacher_softcap,
    )
    options = _options(labels, alpha_rows, alpha, ignore_index, inv_temperature, student_hidden.shape[0])
    out = run_chunks(
        student, teacher, options, backend=backend, budget=memory_budget_bytes, reverse=reverse, detach=detach,
        statistics=statistics, want_loss=want_loss, want_label_logprobs=want_label_logprobs,
        row_weights=row_weights, want_hidden=want_hidden, grad_weight=grad_weight, grad_bias=grad_bias,
    )
    def empty(dtype):  # an output not asked for: empty, of the fake's dtype, aliasing nothing
        return student_hidden.new_empty(0, dtype=dtype)

    cd = student.compute_dtype
    return (
        empty(cd) if out.row_losses is None else out.row_losses,
        empty(cd) if out.label_logprobs is None else out.label_logprobs,
        empty(student_hidden.dtype) if out.grad_hidden is None else out.grad_hidden,
    )


fused_linear_loss = torch.library.custom_op(
    "distillm2::fused_linear_loss", mutates_args=("grad_weight", "grad_bias")
)(_fused_linear_loss)


@fused_linear_loss.register_fake
def _(
    student_hidden, student_weight, student_bias, student_softcap, teacher_hidden, teacher_weight, teacher_bias,
    teacher_softcap, labels, alpha_rows, statistics, row_weights, grad_weight, grad_bias, alpha, ignore_index,
    inv_temperature, reverse, detach, backend, memory_budget_bytes, want_loss, want_label_logprobs, want_hidden,
):
    want_hidden = want_hidden and row_weights is not None  # as `run_chunks`: no weights, no gradient
    dtype = compute_dtype(student_hidden, student_weight, teacher_hidden, teacher_weight)
    n = student_hidden.shape[0]
    return (
        student_hidden.new_empty((n,) if want_loss else (0,), dtype=dtype),
        student_hidden.new_empty((n, 2) if want_label_logprobs else (0,), dtype=dtype),
        torch.empty_like(student_hidden, memory_format=torch.contiguous_format) if want_hidden else student_hidden.new_empty(0),
    )


def loss_pass(
    *,
    student: Head,
    teacher: Head,
    options: TokenOptions,
    backend: str,
    budget: int,
    reverse: bool,
    detach: bool,
    statistics: Optional[torch.Tensor] = None,
    want_loss: bool = True,
    want_label_logprobs: bool = False,
    row_weights: Optional[torch.Tensor] = None,
    want_hidden: bool = False,
    grad_weight: Optional[torch.Tensor] = None,
    grad_bias: Optional[torch.Tensor] = None,
) -> ChunkOutputs:
    """`chunks.run_chunks` through the op (its arguments; `stats` of the result is None)."""
    want_hidden = want_hidden and row_weights is not None
    args = (
        *student, *teacher, options.labels, options.alpha_rows, statistics, row_weights, grad_weight, grad_bias,
        options.alpha, options.ignore_index, options.inv_temperature, reverse, detach, backend, budget,
        want_loss, want_label_logprobs, want_hidden,
    )
    row_losses, label_logprobs, grad_hidden = run_op(fused_linear_loss, _fused_linear_loss, *args)
    return ChunkOutputs(
        row_losses if want_loss else None,
        None,
        label_logprobs if want_label_logprobs else None,
        grad_hidden if want_hidden else None,
    )
