"""Fused-linear SKL / SRKL against a sparse teacher: the student's logits `softcap(h Wᵀ + b)` a chunk of
rows at a time, the teacher given by k token ids per token with their temperature-1 log-probabilities (and
the tail mass), docs/design.md "Sparse teachers". There is no teacher GEMM and no `[N, V]` teacher tensor.

Per chunk of kept rows (sized by `chunks.chunk_rows` as the dense path, with the sparse backend's
`ROW_TEMPORARIES`, 0 when it declares none): the student logits GEMM and soft-cap (`lm_head.LMHead`), then
`sparse_teacher.sparse_skew_rows` (the support entries in torch, the V − k tail entries by the sparse
backend's sweeps), with `row_grad_scale` when a gradient is wanted, then `∂/∂h = G W`, `∂/∂W += Gᵀ H`,
`∂/∂b += Σ G` with `G ← G ⊙ (1 − tanh²)` under a soft-cap. As in the dense path, ignored rows are dropped
before the GEMM, the scalar reductions compute the gradients in the forward, reduction="none" recomputes
each chunk in the backward, and only the gradients that are needed are computed.

Statistics-only pass (`fused_linear_sparse_statistics`): per chunk the GEMM and the student's log-sum-exp
sweep, the label log-probabilities (log q(y) from the logits, log p(y) from the tempered sparse teacher:
the label's stored entry, else log c for the uniform tail, −inf for "renormalize"). Its statistics `[N, STATS]`
hold lse in `RowStat.LOG_SUM_S` (`MAX_S` 0, the teacher's columns 0) and the label columns; passed back as
`statistics=`, the loss pass skips its log-sum-exp sweep (lse = MAX_S / T + LOG_SUM_S, which also reads the
dense pass's statistics).

The chunk driver runs inside the custom ops `distillm2::fused_linear_sparse_statistics` and
`distillm2::fused_linear_sparse_loss` (the kept-row count is known only at run time, as in `ops`), which
the autograd Functions `FusedLinearSparseSkewFunction` (one term, any reduction) and
`FusedLinearSparseSkewPairFunction` (the DistiLLM-2 pair with one weight-gradient accumulator) apply.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from .._autograd import InputGrads
from .._inputs import TokenOptions, compute_dtype
from ..backends import sparse_backend_module
from ..custom_ops import run_op
from ..reductions import reduction_row_weights
from ..sparse_teacher import SparseRows, sparse_skew_rows, sparse_statistics
from ..statistics import LABEL_LOGPROBS, STATS, RowStat
from .checks import SparseTeacherRows, Sweep
from .chunks import ChunkOutputs, chunk_rows, kept_rows, rows_of, scatter_rows
from .function import as_dtype_of, gradient_accumulators, reduced_loss, token_options
from .lm_head import LMHead
from .ops import Head

__all__ = [
    "FusedLinearSparseSkewFunction",
    "FusedLinearSparseSkewPairFunction",
    "run_sparse_chunks",
    "sparse_statistics_pass",
    "sparse_loss_pass",
]


def run_sparse_chunks(
    student: LMHead,
    teacher: SparseTeacherRows,
    options: TokenOptions,
    *,
    tail: str,
    backend: str,
    budget: int,
    reverse: bool = False,
    detach: bool = False,
    statistics_only: bool = False,
    statistics: Optional[torch.Tensor] = None,
    want_loss: bool = True,
    want_label_logprobs: bool = False,
    row_weights: Optional[torch.Tensor] = None,
    want_hidden: bool = False,
    grad_weight: Optional[torch.Tensor] = None,
    grad_bias: Optional[torch.Tensor] = None,
) -> ChunkOutputs:
    """`chunks.run_chunks` with a sparse teacher (its arguments; `teacher`'s rows `[N, k]`, `[N]`)."""
    n, vocab = student.hidden.shape[0], student.vocab_size
    device, cd = student.hidden.device, student.compute_dtype
    if row_weights is None:
        want_hidden, grad_weight, grad_bias = False, None, None
    want_grad = want_hidden or grad_weight is not None or grad_bias is not None
    want_labels = statistics_only or want_label_logprobs

    stats = torch.zeros((n, STATS), dtype=cd, device=device) if statistics_only else None
    row_losses = torch.zeros(n, dtype=cd, device=device) if want_loss and not statistics_only else None
    label_logprobs = torch.zeros((n, 2), dtype=cd, device=device) if want_label_logprobs else None
    grad_hidden = torch.zeros_like(student.hidden, memory_format=torch.contiguous_format) if want_hidden else None
    lse_all = None
    if statistics is not None:
        lse_all = statistics[:, RowStat.MAX_S] * options.inv_temperature + statistics[:, RowStat.LOG_SUM_S]

    kept = kept_rows(options)
    total = n if kept is None else kept.numel()
    temporaries = getattr(sparse_backend_module(backend, cd), "ROW_TEMPORARIES", 0)
    step, block_rows = chunk_rows(vocab, budget, torch.finfo(cd).bits // 8, temporaries)
    for start in range(0, total, step):
        end = min(total, start + step)
        index = None if kept is None else kept[start:end]
        h_s = student.rows(start, end, kept)
        z_s, tanh_s = student.logits(h_s, keep_tanh=want_grad)
        chunk_teacher = SparseTeacherRows(*(rows_of(t, start, end, index) for t in teacher))
        labels = rows_of(options.labels, start, end, index) if want_labels else None
        if statistics_only:
            rows = SparseRows(
                student=z_s, ids=chunk_teacher.ids, logprobs=chunk_teacher.logprobs,
                tail_logprob=chunk_teacher.tail_logprob, labels=labels, alpha_rows=z_s.new_zeros(end - start),
                ignore_index=options.ignore_index, inv_temperature=options.inv_temperature, tail=tail,
                leading_shape=torch.Size([end - start]),
            )
            lse, chunk_label_logprobs = sparse_statistics(rows, backend)
            chunk_stats = torch.zeros((end - start, STATS), dtype=cd, device=device)
            chunk_stats[:, RowStat.LOG_SUM_S] = lse
            chunk_stats[:, LABEL_LOGPROBS] = chunk_label_logprobs
            scatter_rows(stats, start, end, index, chunk_stats)
            continue

        alpha_rows = rows_of(options.alpha_rows, start, end, index)
        if alpha_rows is None:
            alpha_rows = torch.full((end - start,), options.alpha, dtype=cd, device=device)
        lse = rows_of(lse_all, start, end, index)
        weights = rows_of(row_weights, start, end, index) if want_grad else None
        grad_z = torch.empty_like(z_s) if want_grad and block_rows else None
        losses, label_rows = [], []
        for a in range(0, end - start, block_rows or end - start):
            b = min(end - start, a + (block_rows or end - start))
            out = sparse_skew_rows(
                student=z_s[a:b], ids=chunk_teacher.ids[a:b], logprobs=chunk_teacher.logprobs[a:b],
                tail_logprob=None if chunk_teacher.tail_logprob is None else chunk_teacher.tail_logprob[a:b],
                alpha_rows=alpha_rows[a:b], labels=None if labels is None else labels[a:b],
                ignore_index=options.ignore_index, inv_temperature=options.inv_temperature, reverse=reverse,
                detach=detach, tail=tail, backend=backend, row_grad_scale=None if weights is None else weights[a:b],
                lse=None if lse is None else lse[a:b],
            )
            losses.append(out.loss)
            label_rows.append(out.label_logprobs)
            if grad_z is not None:
                grad_z[a:b] = out.grad
            elif want_grad:
                grad_z = out.grad
        if label_logprobs is not None:
            scatter_rows(label_logprobs, start, end, index, torch.cat(label_rows))
        if row_losses is not None:
            scatter_rows(row_losses, start, end, index, torch.cat(losses))
        if not want_grad:
            continue

        del z_s, out
        if tanh_s is not None:
            grad_z.mul_(tanh_s.square_().neg_().add_(1.0))  # d/dz c·tanh(z/c) = 1 − tanh²(z/c)
            del tanh_s
        if want_hidden:
            scatter_rows(grad_hidden, start, end, index, student.hidden_grad(grad_z))
        if grad_weight is not None:
            student.accumulate_weight_grad(grad_weight, grad_z, h_s)
        if grad_bias is not None:
            grad_bias += grad_z.sum(0)
    return ChunkOutputs(row_losses, stats, label_logprobs, grad_hidden)


# --- the chunk driver as custom ops ---------------------------------------------------------------------------


def _student_head(hidden, weight, bias, softcap) -> LMHead:
    return LMHead(hidden, weight, bias, softcap, compute_dtype(hidden, weight))


def _row_options(labels, alpha_rows, alpha, ignore_index, inv_temperature, n) -> TokenOptions:
    return TokenOptions(
        labels=labels, alpha_rows=alpha_rows, alpha=alpha, ignore_index=ignore_index,
        inv_temperature=inv_temperature, leading_shape=torch.Size([n]),
    )


def _fused_linear_sparse_statistics(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: Optional[torch.Tensor],
    student_softcap: Optional[float],
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    tail_logprob: Optional[torch.Tensor],
    labels: torch.Tensor,
    ignore_index: int,
    inv_temperature: float,
    tail: str,
    backend: str,
    memory_budget_bytes: int,
) -> torch.Tensor:
    student = _student_head(student_hidden, student_weight, student_bias, student_softcap)
    options = _row_options(labels, None, 0.0, ignore_index, inv_temperature, student_hidden.shape[0])
    return run_sparse_chunks(
        student, SparseTeacherRows(ids, logprobs, tail_logprob), options, tail=tail, backend=backend,
        budget=memory_budget_bytes, statistics_only=True,
    ).stats


fused_linear_sparse_statistics = torch.library.custom_op(
    "distillm2::fused_linear_sparse_statistics", mutates_args=()
)(_fused_linear_sparse_statistics)


@fused_linear_sparse_statistics.register_fake
def _(student_hidden, student_weight, *rest):
    dtype = compute_dtype(student_hidden, student_weight)
    return student_hidden.new_empty((student_hidden.shape[0], STATS), dtype=dtype)


def sparse_statistics_pass(
    *, student: Head, teacher: SparseTeacherRows, options: TokenOptions, tail: str, backend: str, budget: int
) -> torch.Tensor:
    """The statistics-only pass over the kept rows: `[N, STATS]` (module docstring; zeros at dropped rows)."""
    return run_op(
        fused_linear_sparse_statistics, _fused_linear_sparse_statistics, *student, *teacher, options.labels,
        options.ignore_index, options.inv_temperature, tail, backend, budget,
    )


def _fused_linear_sparse_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: Optional[torch.Tensor],
    student_softcap: Optional[float],
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    tail_logprob: Optional[torch.Tensor],
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
    tail: str,
    backend: str,
    memory_budget_bytes: int,
    want_loss: bool,
    want_label_logprobs: bool,
    want_hidden: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    student = _student_head(student_hidden, student_weight, student_bias, student_softcap)
    options = _row_options(labels, alpha_rows, alpha, ignore_index, inv_temperature, student_hidden.shape[0])
    out = run_sparse_chunks(
        student, SparseTeacherRows(ids, logprobs, tail_logprob), options, tail=tail, backend=backend,
        budget=memory_budget_bytes, reverse=reverse, detach=detach, statistics=statistics, want_loss=want_loss,
        want_label_logprobs=want_label_logprobs, row_weights=row_weights, want_hidden=want_hidden,
        grad_weight=grad_weight, grad_bias=grad_bias,
    )

    def empty(dtype):  # an output not asked for: empty, of the fake's dtype, aliasing nothing
        return student_hidden.new_empty(0, dtype=dtype)

    cd = student.compute_dtype
    return (
        empty(cd) if out.row_losses is None else out.row_losses,
        empty(cd) if out.label_logprobs is None else out.label_logprobs,
        empty(student_hidden.dtype) if out.grad_hidden is None else out.grad_hidden,
    )


fused_linear_sparse_loss = torch.library.custom_op(
    "distillm2::fused_linear_sparse_loss", mutates_args=("grad_weight", "grad_bias")
)(_fused_linear_sparse_loss)


@fused_linear_sparse_loss.register_fake
def _(
    student_hidden, student_weight, student_bias, student_softcap, ids, logprobs, tail_logprob, labels, alpha_rows,
    statistics, row_weights, grad_weight, grad_bias, alpha, ignore_index, inv_temperature, reverse, detach, tail,
    backend, memory_budget_bytes, want_loss, want_label_logprobs, want_hidden,
):
    want_hidden = want_hidden and row_weights is not None  # as `run_sparse_chunks`: no weights, no gradient
    dtype = compute_dtype(student_hidden, student_weight)
    n = student_hidden.shape[0]
    return (
        student_hidden.new_empty((n,) if want_loss else (0,), dtype=dtype),
        student_hidden.new_empty((n, 2) if want_label_logprobs else (0,), dtype=dtype),
        torch.empty_like(student_hidden, memory_format=torch.contiguous_format) if want_hidden else student_hidden.new_empty(0),
    )


def sparse_loss_pass(
    *,
    student: Head,
    teacher: SparseTeacherRows,
    options: TokenOptions,
    tail: str,
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
    """`run_sparse_chunks` through the op (its arguments; `stats` of the result is None)."""
    want_hidden = want_hidden and row_weights is not None
    args = (
        *student, *teacher, options.labels, options.alpha_rows, statistics, row_weights, grad_weight, grad_bias,
        options.alpha, options.ignore_index, options.inv_temperature, reverse, detach, tail, backend, budget,
        want_loss, want_label_logprobs, want_hidden,
    )
    row_losses, label_logprobs, grad_hidden = run_op(fused_linear_sparse_loss, _fused_linear_sparse_loss, *args)
    return ChunkOutputs(
        row_losses if want_loss else None,
        None,
        label_logprobs if want_label_logprobs else None,
        grad_hidden if want_hidden else None,
    )


# --- the autograd Functions ------------------------------------------------------------------------------------


def _sweep_args(sweep: Sweep) -> dict:
    return dict(
        tail=sweep.teacher_tail, backend=sweep.backend, budget=sweep.budget, reverse=sweep.reverse, detach=sweep.detach
    )


def _student(hidden, weight, bias, sweep: Sweep) -> Head:
    return Head(hidden.reshape(-1, hidden.shape[-1]), weight, bias, sweep.student_softcap)


class FusedLinearSparseSkewFunction(torch.autograd.Function):
    """SKL or SRKL (`sweep.reverse`) from the student's hidden states and lm_head against a sparse teacher,
    reduced by `sweep.reduction` (`function.FusedLinearSkewFunction` with the teacher's rows in place of its
    hidden states and weights).

    `apply(student_hidden, student_weight, student_bias, ids [N, k], logprobs [N, k], tail_logprob [N],
    labels [N], alpha_rows [N], statistics [N, STATS], sweep)` -> `(loss,)`, or `(loss, per-token losses,
    label log-probabilities [..., 2] (empty without labels))` with `sweep.want_token_outputs`.
    """

    @staticmethod
    def forward(
        ctx, student_hidden, student_weight, student_bias, ids, logprobs, tail_logprob, labels, alpha_rows, statistics,
        sweep,
    ):
        leading = sweep.leading_shape
        want_hidden = ctx.needs_input_grad[_GRADS.index("student_hidden")]
        want_weight = ctx.needs_input_grad[_GRADS.index("student_weight")]
        want_bias = student_bias is not None and ctx.needs_input_grad[_GRADS.index("student_bias")]
        ctx.set_materialize_grads(False)
        ctx.sweep, ctx.want = sweep, (want_hidden, want_weight, want_bias)
        ctx.student_hidden_shape = student_hidden.shape
        student = _student(student_hidden, student_weight, student_bias, sweep)
        teacher = SparseTeacherRows(ids, logprobs, tail_logprob)
        want_label_logprobs = sweep.want_token_outputs and labels is not None
        common = dict(
            student=student, teacher=teacher, options=token_options(labels, alpha_rows, sweep), statistics=statistics,
            **_sweep_args(sweep),
        )
        if sweep.reduction == "none":
            out = sparse_loss_pass(**common, want_label_logprobs=want_label_logprobs)
            if any(ctx.want):
                ctx.save_for_backward(
                    student_hidden, student_weight, student_bias, ids, logprobs, tail_logprob, labels, alpha_rows,
                    statistics,
                )
            loss = out.row_losses.view(leading)
            token_losses = loss.clone()
        else:
            cd = compute_dtype(student_hidden, student_weight)
            grad_weight, grad_bias = gradient_accumulators(want_weight, want_bias, student_weight, cd)
            row_weights = None
            if any(ctx.want):
                row_weights = reduction_row_weights(
                    sweep.reduction, labels, sweep.ignore_index, leading, cd, student_hidden.device
                )
            out = sparse_loss_pass(
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

        (student_hidden, student_weight, student_bias, ids, logprobs, tail_logprob, labels, alpha_rows,
         statistics) = ctx.saved_tensors
        want_hidden, want_weight, want_bias = ctx.want
        cd = compute_dtype(student_hidden, student_weight)
        grad_weight, grad_bias = gradient_accumulators(want_weight, want_bias, student_weight, cd)
        out = sparse_loss_pass(
            student=_student(student_hidden, student_weight, student_bias, sweep),
            teacher=SparseTeacherRows(ids, logprobs, tail_logprob), options=token_options(labels, alpha_rows, sweep),
            statistics=statistics, **_sweep_args(sweep), want_loss=False, row_weights=grad_loss.reshape(-1),
            want_hidden=want_hidden, grad_weight=grad_weight, grad_bias=grad_bias,
        )
        return _GRADS(
            student_hidden=None if out.grad_hidden is None else out.grad_hidden.view(ctx.student_hidden_shape),
            student_weight=as_dtype_of(grad_weight, student_weight),
            student_bias=as_dtype_of(grad_bias, student_bias),
        )


_GRADS = InputGrads(FusedLinearSparseSkewFunction.forward)


class FusedLinearSparseSkewPairFunction(torch.autograd.Function):
    """c_t · SKL(_t rows) + c_s · SRKL(_s rows) against sparse teachers with one student lm_head, each term
    reduced by its scalar reduction, both halves' weight and bias gradients in one float32 accumulator
    (`function.FusedLinearSkewPairFunction` with the teachers' rows in place of their hidden states).

    `apply(student_hidden_t, student_hidden_s, student_weight, student_bias, ids_t, logprobs_t,
    tail_logprob_t, ids_s, logprobs_s, tail_logprob_s, labels_t, labels_s, alpha_rows_t, alpha_rows_s,
    statistics_t, statistics_s, sweep_t, sweep_s, coefficients)` -> (loss, token losses _t, label
    log-probabilities _t (empty without labels), the same two of _s).
    """

    @staticmethod
    def forward(
        ctx, student_hidden_t, student_hidden_s, student_weight, student_bias, ids_t, logprobs_t, tail_logprob_t,
        ids_s, logprobs_s, tail_logprob_s, labels_t, labels_s, alpha_rows_t, alpha_rows_s, statistics_t,
        statistics_s, sweep_t, sweep_s, coefficients,
    ):
        want_weight = ctx.needs_input_grad[_PAIR_GRADS.index("student_weight")]
        want_bias = student_bias is not None and ctx.needs_input_grad[_PAIR_GRADS.index("student_bias")]
        cd = compute_dtype(student_hidden_t, student_hidden_s, student_weight)
        grad_weight, grad_bias = gradient_accumulators(want_weight, want_bias, student_weight, cd)
        halves = (
            (student_hidden_t, SparseTeacherRows(ids_t, logprobs_t, tail_logprob_t), labels_t, alpha_rows_t,
             statistics_t, sweep_t, "student_hidden_t"),
            (student_hidden_s, SparseTeacherRows(ids_s, logprobs_s, tail_logprob_s), labels_s, alpha_rows_s,
             statistics_s, sweep_s, "student_hidden_s"),
        )
        loss = 0.0
        grad_hiddens, by_products = [], []
        for (hidden, teacher, labels, alpha_rows, statistics, sweep, name), coefficient in zip(halves, coefficients):
            leading = sweep.leading_shape
            want_hidden = ctx.needs_input_grad[_PAIR_GRADS.index(name)]
            # A term weighted 0 (β = 1 in the paper's schedule) still gives its losses, but no gradient.
            gradients = coefficient != 0 and (want_hidden or want_weight or want_bias)
            row_weights = None
            if gradients:
                row_weights = coefficient * reduction_row_weights(
                    sweep.reduction, labels, sweep.ignore_index, leading, cd, hidden.device
                )
            out = sparse_loss_pass(
                student=_student(hidden, student_weight, student_bias, sweep), teacher=teacher,
                options=token_options(labels, alpha_rows, sweep), statistics=statistics, **_sweep_args(sweep),
                want_label_logprobs=labels is not None, row_weights=row_weights, want_hidden=gradients and want_hidden,
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


_PAIR_GRADS = InputGrads(FusedLinearSparseSkewPairFunction.forward)
