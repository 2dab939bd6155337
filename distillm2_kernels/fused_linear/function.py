"""The fused-linear autograd Functions: one term (`FusedLinearSkewFunction`: SKL or SRKL, any reduction, with
its per-token by-products) and the DistiLLM-2 pair (`FusedLinearSkewPairFunction`: c_t · SKL + c_s · SRKL
with one student lm_head). Both take checked arguments (`checks.prepare_term`) and run the chunk driver
through its custom ops (`ops`).

Scalar reductions: each row's weight in the reduction is known in the forward, so the forward computes the
gradients as well (four GEMMs: two logits, grad hidden, grad weight) and the backward only multiplies them
by the incoming scalar, as Liger-Kernel's fused linear losses do. reduction="none": the per-row weights
arrive only in the backward, so the forward computes the losses (two GEMMs) and the backward recomputes
each chunk's logits (four more GEMMs).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from .._autograd import InputGrads
from .._inputs import TokenOptions, compute_dtype
from ..reductions import reduce_token_losses, reduction_row_weights
from .checks import Sweep
from .ops import Head, loss_pass


def token_options(labels, alpha_rows, sweep: Sweep) -> TokenOptions:
    return TokenOptions(
        labels=labels,
        alpha_rows=alpha_rows,
        alpha=sweep.alpha,
        ignore_index=sweep.ignore_index,
        inv_temperature=sweep.inv_temperature,
        leading_shape=sweep.leading_shape,
    )


def _heads(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, sweep):
    student = Head(student_hidden.reshape(-1, student_hidden.shape[-1]), student_weight, student_bias, sweep.student_softcap)
    teacher = Head(teacher_hidden.reshape(-1, teacher_hidden.shape[-1]), teacher_weight, teacher_bias, sweep.teacher_softcap)
    return student, teacher


def gradient_accumulators(want_weight: bool, want_bias: bool, weight: torch.Tensor, dtype: torch.dtype):
    vocab = weight.shape[0]
    grad_weight = torch.zeros((vocab, weight.shape[1]), dtype=dtype, device=weight.device) if want_weight else None
    grad_bias = torch.zeros(vocab, dtype=dtype, device=weight.device) if want_bias else None
    return grad_weight, grad_bias


def as_dtype_of(grad: Optional[torch.Tensor], like: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if grad is None else grad.to(like.dtype)


def reduced_loss(row_losses: torch.Tensor, labels: Optional[torch.Tensor], sweep: Sweep) -> torch.Tensor:
    labels = None if labels is None else labels.view(sweep.leading_shape)
    return reduce_token_losses(row_losses.view(sweep.leading_shape), labels, sweep.ignore_index, sweep.reduction)


def _sweep_args(sweep: Sweep) -> dict:
    return dict(backend=sweep.backend, budget=sweep.budget, reverse=sweep.reverse, detach=sweep.detach)


class FusedLinearSkewFunction(torch.autograd.Function):
    """SKL or SRKL (`sweep.reverse`) from hidden states and lm_head weights, reduced by `sweep.reduction`.

    `apply(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
    labels [N], alpha_rows [N], statistics [N, STATS], sweep)` (`checks.prepare_term`'s) -> `(loss,)`, or
    `(loss, per-token losses, label log-probabilities [..., 2] (empty without labels))` with
    `sweep.want_token_outputs`; the by-products carry no gradient.
    """

    @staticmethod
    def forward(
        ctx, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, labels,
        alpha_rows, statistics, sweep,
    ):
        leading = sweep.leading_shape
        want_hidden = ctx.needs_input_grad[_GRADS.index("student_hidden")]
        want_weight = ctx.needs_input_grad[_GRADS.index("student_weight")]
        want_bias = student_bias is not None and ctx.needs_input_grad[_GRADS.index("student_bias")]
        ctx.set_materialize_grads(False)
        ctx.sweep, ctx.want = sweep, (want_hidden, want_weight, want_bias)
        ctx.student_hidden_shape = student_hidden.shape
        student, teacher = _heads(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, sweep)
        options = token_options(labels, alpha_rows, sweep)
        want_label_logprobs = sweep.want_token_outputs and labels is not None
        common = dict(student=student, teacher=teacher, options=options, statistics=statistics, **_sweep_args(sweep))

        if sweep.reduction == "none":
            out = loss_pass(**common, want_label_logprobs=want_label_logprobs)
            if any(ctx.want):
                ctx.save_for_backward(
                    student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                    labels, alpha_rows, statistics,
                )
            loss = out.row_losses.view(leading)
            token_losses = loss.clone()
        else:
            cd = compute_dtype(student_hidden, student_weight, teacher_hidden, teacher_weight)
            grad_weight, grad_bias = gradient_accumulators(want_weight, want_bias, student_weight, cd)
            row_weights = None
            if any(ctx.want):
                row_weights = reduction_row_weights(
                    sweep.reduction, labels, sweep.ignore_index, leading, cd, student_hidden.device
                )
            out = loss_pass(
                **common, want_label_logprobs=want_label_logprobs, row_weights=row_weights, want_hidden=want_hidden,
                grad_weight=grad_weight, grad_bias=grad_bias,
            )
            loss = reduced_loss(out.row_losses, labels, sweep)
            if any(ctx.want):
                grad_hidden = None if out.grad_hidden is None else out.grad_hidden.view(student_hidden.shape)
                ctx.save_for_backward(
                    grad_hidden, as_dtype_of(grad_weight, student_weight), as_dtype_of(grad_bias, student_bias)
                )
            token_losses = out.row_losses.view(leading)
        if not sweep.want_token_outputs:
            return (loss,)
        label_logprobs = out.label_logprobs.view(*leading, 2) if want_label_logprobs else loss.new_empty(0)
        ctx.mark_non_differentiable(token_losses, label_logprobs)
        return loss, token_losses, label_logprobs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *_grad_by_products):
        if grad_loss is None or not any(ctx.want):
            return _GRADS()
        sweep = ctx.sweep
        if sweep.reduction != "none":
            grad_hidden, grad_weight, grad_bias = (None if g is None else g * grad_loss for g in ctx.saved_tensors)
            return _GRADS(student_hidden=grad_hidden, student_weight=grad_weight, student_bias=grad_bias)

        (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, labels,
         alpha_rows, statistics) = ctx.saved_tensors
        want_hidden, want_weight, want_bias = ctx.want
        cd = compute_dtype(student_hidden, student_weight, teacher_hidden, teacher_weight)
        grad_weight, grad_bias = gradient_accumulators(want_weight, want_bias, student_weight, cd)
        student, teacher = _heads(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, sweep)
        out = loss_pass(
            student=student, teacher=teacher, options=token_options(labels, alpha_rows, sweep), statistics=statistics,
            **_sweep_args(sweep), want_loss=False, row_weights=grad_loss.reshape(-1), want_hidden=want_hidden,
            grad_weight=grad_weight, grad_bias=grad_bias,
        )
        return _GRADS(
            student_hidden=None if out.grad_hidden is None else out.grad_hidden.view(ctx.student_hidden_shape),
            student_weight=as_dtype_of(grad_weight, student_weight),
            student_bias=as_dtype_of(grad_bias, student_bias),
        )


_GRADS = InputGrads(FusedLinearSkewFunction.forward)


class FusedLinearSkewPairFunction(torch.autograd.Function):
    """c_t · SKL(_t rows) + c_s · SRKL(_s rows) with one student lm_head, each term reduced by its scalar
    reduction: both halves' weight and bias gradients go into one float32 accumulator, rounded to the
    parameter's dtype once (two separate ops would each round theirs and leave autograd to add them: two
    roundings, two saved `[V, H_s]` gradients).

    `apply(student_hidden_t, student_hidden_s, student_weight, student_bias, teacher_hidden_t,
    teacher_hidden_s, teacher_weight, teacher_bias, labels_t, labels_s, alpha_rows_t, alpha_rows_s,
    statistics_t, statistics_s, sweep_t, sweep_s, coefficients)` -> (loss, token losses _t, label
    log-probabilities _t (empty without labels), the same two of _s).
    """

    @staticmethod
    def forward(
        ctx, student_hidden_t, student_hidden_s, student_weight, student_bias, teacher_hidden_t, teacher_hidden_s,
        teacher_weight, teacher_bias, labels_t, labels_s, alpha_rows_t, alpha_rows_s, statistics_t, statistics_s,
        sweep_t, sweep_s, coefficients,
    ):
        want_weight = ctx.needs_input_grad[_PAIR_GRADS.index("student_weight")]
        want_bias = student_bias is not None and ctx.needs_input_grad[_PAIR_GRADS.index("student_bias")]
        cd = compute_dtype(student_hidden_t, student_hidden_s, student_weight, teacher_hidden_t, teacher_hidden_s, teacher_weight)
        grad_weight, grad_bias = gradient_accumulators(want_weight, want_bias, student_weight, cd)
        halves = (
            (student_hidden_t, teacher_hidden_t, labels_t, alpha_rows_t, statistics_t, sweep_t, "student_hidden_t"),
            (student_hidden_s, teacher_hidden_s, labels_s, alpha_rows_s, statistics_s, sweep_s, "student_hidden_s"),
        )
        loss = 0.0
        grad_hiddens, by_products = [], []
        for (hidden, teacher_hidden, labels, alpha_rows, statistics, sweep, name), coefficient in zip(halves, coefficients):
            leading = sweep.leading_shape
            want_hidden = ctx.needs_input_grad[_PAIR_GRADS.index(name)]
            # A term weighted 0 (β = 1 in the paper's schedule) still gives its losses, but no gradient.
            gradients = coefficient != 0 and (want_hidden or want_weight or want_bias)
            row_weights = None
            if gradients:
                row_weights = coefficient * reduction_row_weights(
                    sweep.reduction, labels, sweep.ignore_index, leading, cd, hidden.device
                )
            student, teacher = _heads(hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, sweep)
            out = loss_pass(
                student=student, teacher=teacher, options=token_options(labels, alpha_rows, sweep), statistics=statistics,
                **_sweep_args(sweep), want_label_logprobs=labels is not None, row_weights=row_weights,
                want_hidden=gradients and want_hidden,
                grad_weight=grad_weight if gradients else None, grad_bias=grad_bias if gradients else None,
            )
            loss = loss + coefficient * reduced_loss(out.row_losses, labels, sweep)
            grad_hiddens.append(None if out.grad_hidden is None else out.grad_hidden.view(hidden.shape))
            label_logprobs = hidden.new_empty(0) if out.label_logprobs is None else out.label_logprobs.view(*leading, 2)
            by_products += [out.row_losses.view(leading), label_logprobs]

        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*grad_hiddens, as_dtype_of(grad_weight, student_weight), as_dtype_of(grad_bias, student_bias))
        ctx.mark_non_differentiable(*by_products)
        return (loss, *by_products)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *_grad_by_products):
        if grad_loss is None:
            return _PAIR_GRADS()
        grad_hidden_t, grad_hidden_s, grad_weight, grad_bias = (
            None if g is None else g * grad_loss for g in ctx.saved_tensors
        )
        return _PAIR_GRADS(
            student_hidden_t=grad_hidden_t, student_hidden_s=grad_hidden_s, student_weight=grad_weight,
            student_bias=grad_bias,
        )


_PAIR_GRADS = InputGrads(FusedLinearSkewPairFunction.forward)
