"""The public fused-linear functions: `fused_linear_skl`, `fused_linear_srkl`, `fused_linear_token_statistics`,
`fused_linear_skl_plus_srkl`, and the positional entry points `FusedLinearSKLFunction.apply` /
`FusedLinearSRKLFunction.apply`. Each checks its arguments (`checks.prepare_term`) and applies one of the
Functions of `function`, or of `sparse` when the teacher is sparse (`teacher_hidden` a `SparseTeacher` or
an (ids, logprobs[, tail_logprob]) tuple, `teacher_weight` None)."""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

from .._inputs import Alpha, check_label_ids, prepare_token_options
from ..backends import resolve_backend_name
from ..reductions import SCALAR_REDUCTIONS
from ..sparse_teacher import SparseTeacher, as_sparse_teacher, check_teacher_tail
from ..statistics import TokenStatistics
from .checks import (
    SparseTeacherRows,
    Softcap,
    check_dense_teacher_tail,
    check_inputs,
    check_memory_budget,
    check_softcap,
    check_sparse_inputs,
    check_student_softcap,
    prepare_term,
)
from .function import FusedLinearSkewFunction, FusedLinearSkewPairFunction
from .ops import Head, statistics_pass
from .sparse import FusedLinearSparseSkewFunction, FusedLinearSparseSkewPairFunction, sparse_statistics_pass

Teacher = Union[torch.Tensor, SparseTeacher, tuple]  # hidden states [..., H_t], or a sparse teacher


class FusedLinearTokenOutputs(NamedTuple):
    """What the fused-linear ops give besides the loss with `return_token_outputs=True` (no gradient).

    losses: the per-token loss, the hidden states' leading shape (0 at ignored tokens; float32, float64
        for float64 inputs).
    label_logprobs: `[..., 2]`, (log q(y_k), log p(y_k)) at each token's label under student and teacher,
        at the temperature T (0 at ignored tokens); None without labels.
    """

    losses: torch.Tensor
    label_logprobs: Optional[torch.Tensor]


class SKLPlusSRKL(NamedTuple):
    """`fused_linear_skl_plus_srkl`'s result: the combined loss and each half's by-products."""

    loss: torch.Tensor
    skl: FusedLinearTokenOutputs  # of the _t rows
    srkl: FusedLinearTokenOutputs  # of the _s rows


def fused_linear_skew(
    *,
    reverse: bool,
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: Teacher,
    teacher_weight: Optional[torch.Tensor],
    alpha: Alpha = 0.1,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: Softcap = None,
    reduction: str = "mean",
    detach_mixture: bool = False,
    backend: str = "auto",
    memory_budget_bytes: Optional[int] = None,
    statistics: Optional[TokenStatistics] = None,
    return_token_outputs: bool = False,
    teacher_tail: str = "renormalize",
):
    """SKL (`reverse=False`) or SRKL from hidden states and lm_head weights: `fused_linear_skl`'s arguments."""
    term = prepare_term(
        student_hidden=student_hidden, student_weight=student_weight, student_bias=student_bias,
        teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, teacher_bias=teacher_bias, alpha=alpha,
        labels=labels, ignore_index=ignore_index, temperature=temperature, softcap=softcap, reduction=reduction,
        backend=backend, memory_budget_bytes=memory_budget_bytes, reverse=reverse,
        detach=reverse and bool(detach_mixture), statistics=statistics, want_token_outputs=return_token_outputs,
        teacher_tail=teacher_tail,
    )
    if term.sparse_teacher is not None:
        outputs = FusedLinearSparseSkewFunction.apply(
            student_hidden, student_weight, student_bias, *term.sparse_teacher, term.labels, term.alpha_rows,
            term.statistics, term.sweep,
        )
    else:
        outputs = FusedLinearSkewFunction.apply(
            student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, term.labels,
            term.alpha_rows, term.statistics, term.sweep,
        )
    if not return_token_outputs:
        return outputs[0]
    loss, token_losses, label_logprobs = outputs
    return loss, FusedLinearTokenOutputs(token_losses, None if labels is None else label_logprobs)


def fused_linear_skl(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: Teacher,
    teacher_weight: Optional[torch.Tensor],
    alpha: Alpha = 0.1,
    *,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: Softcap = None,
    reduction: str = "mean",
    backend: str = "auto",
    memory_budget_bytes: Optional[int] = None,
    statistics: Optional[TokenStatistics] = None,
    return_token_outputs: bool = False,
    teacher_tail: str = "renormalize",
):
    """Skew KL, KL(p ‖ αp + (1−α)q), with logits z = softcap(h Wᵀ + b) never built in full.

    student_hidden `[..., H_s]`, student_weight `[V, H_s]`, teacher_hidden `[..., H_t]`, teacher_weight
    `[V, H_t]` (student first; the teacher must not require grad). alpha, labels, ignore_index,
    temperature, reduction: as in `fused_skl`. softcap: None, a float c for `c·tanh(z/c)` on both models,
    or a (student, teacher) pair. memory_budget_bytes: bytes of per-chunk `[rows, V]` temporaries, the
    op's and the backend's (default `DEFAULT_MEMORY_BUDGET_BYTES`: 512 MiB on CUDA, 64 MiB otherwise). The
    loss is float32; gradients reach the student's hidden states, weight and bias.

    statistics: `fused_linear_token_statistics` of the same inputs, labels, temperature and soft-cap, to
    skip sweep 1. return_token_outputs=True returns `(loss, FusedLinearTokenOutputs(losses,
    label_logprobs))`: the per-token losses and (with labels) the label log-probabilities `[..., 2]` from
    sweep 1, both without gradient and at no extra pass.

    Sparse teacher (docs/design.md "Sparse teachers"): `teacher_hidden` a `SparseTeacher` (or an (ids,
    logprobs[, tail_logprob]) tuple) of ids / temperature-1 log-probabilities `[..., k]` and tail log-mass
    `[...]` with the student's leading shape, `teacher_weight` and `teacher_bias` None; `teacher_tail`
    ("renormalize" or "uniform") says what the V − k other tokens get. The teacher is tempered by T like
    logits; `softcap` applies to the student only (a pair's teacher entry must be None). No teacher GEMM is
    done and no `[N, V]` teacher tensor is built. SRKL with "renormalize" and a float α of 0 is a ValueError
    (+inf off the support).
    """
    return fused_linear_skew(
        reverse=False, student_hidden=student_hidden, student_weight=student_weight, teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight, alpha=alpha, student_bias=student_bias, teacher_bias=teacher_bias,
        labels=labels, ignore_index=ignore_index, temperature=temperature, softcap=softcap, reduction=reduction,
        backend=backend, memory_budget_bytes=memory_budget_bytes, statistics=statistics,
        return_token_outputs=return_token_outputs, teacher_tail=teacher_tail,
    )


def fused_linear_srkl(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: Teacher,
    teacher_weight: Optional[torch.Tensor],
    alpha: Alpha = 0.1,
    *,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: Softcap = None,
    reduction: str = "mean",
    detach_mixture: bool = False,
    backend: str = "auto",
    memory_budget_bytes: Optional[int] = None,
    statistics: Optional[TokenStatistics] = None,
    return_token_outputs: bool = False,
    teacher_tail: str = "renormalize",
):
    """Skew reverse KL, KL(q ‖ (1−α)p + αq), with logits z = softcap(h Wᵀ + b) never built in full.

    detach_mixture=True treats the q inside r as a constant in the backward (the released DistiLLM-2
    code); the value is the same. Other arguments, `statistics`, `return_token_outputs`, a sparse teacher
    and `teacher_tail` as in `fused_linear_skl`.
    """
    return fused_linear_skew(
        reverse=True, student_hidden=student_hidden, student_weight=student_weight, teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight, alpha=alpha, student_bias=student_bias, teacher_bias=teacher_bias,
        labels=labels, ignore_index=ignore_index, temperature=temperature, softcap=softcap, reduction=reduction,
        detach_mixture=detach_mixture, backend=backend, memory_budget_bytes=memory_budget_bytes,
        statistics=statistics, return_token_outputs=return_token_outputs, teacher_tail=teacher_tail,
    )


class FusedLinearSKLFunction:
    """The positional entry point of the fused-linear SKL (module docstring; the autograd Function is
    `function.FusedLinearSkewFunction`).

    `FusedLinearSKLFunction.apply(student_hidden, student_weight, teacher_hidden, teacher_weight,
    student_bias, teacher_bias, alpha, labels, ignore_index, temperature, softcap, reduction, backend,
    memory_budget_bytes)` -> float32 loss, reduced (or of the hidden states' leading shape for "none").
    """

    @staticmethod
    def apply(
        student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias=None, teacher_bias=None,
        alpha=0.1, labels=None, ignore_index=-100, temperature=1.0, softcap=None, reduction="mean",
        backend="auto", memory_budget_bytes=None,
    ):
        return fused_linear_skew(
            reverse=False, student_hidden=student_hidden, student_weight=student_weight,
            teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, student_bias=student_bias,
            teacher_bias=teacher_bias, alpha=alpha, labels=labels, ignore_index=ignore_index,
            temperature=temperature, softcap=softcap, reduction=reduction, backend=backend,
            memory_budget_bytes=memory_budget_bytes,
        )


class FusedLinearSRKLFunction:
    """The positional entry point of the fused-linear SRKL; `detach_mixture` treats the q inside r as a
    constant in the backward.

    `FusedLinearSRKLFunction.apply(..., memory_budget_bytes, detach_mixture)`, arguments otherwise as in
    `FusedLinearSKLFunction`.
    """

    @staticmethod
    def apply(
        student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias=None, teacher_bias=None,
        alpha=0.1, labels=None, ignore_index=-100, temperature=1.0, softcap=None, reduction="mean",
        backend="auto", memory_budget_bytes=None, detach_mixture=False,
    ):
        return fused_linear_skew(
            reverse=True, student_hidden=student_hidden, student_weight=student_weight,
            teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, student_bias=student_bias,
            teacher_bias=teacher_bias, alpha=alpha, labels=labels, ignore_index=ignore_index,
            temperature=temperature, softcap=softcap, reduction=reduction, detach_mixture=detach_mixture,
            backend=backend, memory_budget_bytes=memory_budget_bytes,
        )


def fused_linear_token_statistics(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: Teacher,
    teacher_weight: Optional[torch.Tensor],
    labels: torch.Tensor,
    *,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: Softcap = None,
    backend: str = "auto",
    memory_budget_bytes: Optional[int] = None,
    teacher_tail: str = "renormalize",
) -> TokenStatistics:
    """Sweep 1 alone from hidden states and lm_head weights (student first, arguments as in
    `fused_linear_skl`): the label tokens' log-probabilities log q(y_k), log p(y_k) at temperature T
    (`.student_label_logprobs`, `.teacher_label_logprobs`, `.label_logprobs` `[..., 2]`; 0 at ignored
    tokens), and the row statistics that let `fused_linear_skl` / `fused_linear_srkl` skip sweep 1.

    Cost: per chunk of kept rows the two logits GEMMs and one sweep over the vocabulary; nothing is
    differentiated. Used before a loss whose α depends on these log-probabilities, the statistics passed
    on as `statistics=` make the pair cost two GEMMs more than the loss alone, and no extra sweep.

    With a sparse teacher (and `teacher_tail`, as in `fused_linear_skl`) the pass is the student's GEMM
    and log-sum-exp sweep; log p(y) is the tempered teacher's at the label (log c of the uniform tail, −inf
    under "renormalize", for a label outside the ids). Its statistics let the sparse loss skip that sweep.
    """
    if labels is None:
        raise ValueError(
            "fused_linear_token_statistics needs labels: the label tokens' log-probabilities are its output"
        )
    student_hidden, student_weight = student_hidden.detach(), student_weight.detach()
    student_bias = None if student_bias is None else student_bias.detach()
    sparse = as_sparse_teacher(teacher_hidden)
    if sparse is None:
        check_dense_teacher_tail(teacher_tail)
        check_inputs(
            student_hidden=student_hidden, student_weight=student_weight, student_bias=student_bias,
            teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, teacher_bias=teacher_bias,
        )
    else:
        check_teacher_tail(teacher_tail)
        sparse = SparseTeacherRows(*check_sparse_inputs(
            student_hidden=student_hidden, student_weight=student_weight, student_bias=student_bias, teacher=sparse,
            teacher_weight=teacher_weight, teacher_bias=teacher_bias,
        ))
    leading, device = student_hidden.shape[:-1], student_hidden.device
    options = prepare_token_options(leading, device, 0.0, labels, ignore_index, temperature, "the hidden states")
    check_label_ids(options.labels, student_weight.shape[0], options.ignore_index)
    if sparse is None:
        student_cap, teacher_cap = check_softcap(softcap)
    else:
        student_cap = check_student_softcap(softcap)
    budget = check_memory_budget(memory_budget_bytes, device)
    name = resolve_backend_name(backend, device)
    student = Head(student_hidden.reshape(-1, student_hidden.shape[-1]), student_weight, student_bias, student_cap)
    with torch.no_grad():
        if sparse is None:
            teacher = Head(teacher_hidden.reshape(-1, teacher_hidden.shape[-1]), teacher_weight, teacher_bias, teacher_cap)
            stats = statistics_pass(student=student, teacher=teacher, options=options, backend=name, budget=budget)
        else:
            stats = sparse_statistics_pass(
                student=student, teacher=sparse, options=options, tail=teacher_tail, backend=name, budget=budget
            )
    return TokenStatistics(stats, leading, sparse_teacher=sparse is not None)


def fused_linear_skl_plus_srkl(
    student_hidden_t: torch.Tensor,
    teacher_hidden_t: Teacher,
    labels_t: Optional[torch.Tensor],
    student_hidden_s: torch.Tensor,
    teacher_hidden_s: Teacher,
    labels_s: Optional[torch.Tensor],
    *,
    student_weight: torch.Tensor,
    teacher_weight: Optional[torch.Tensor] = None,
    alpha_t: Alpha = 0.1,
    alpha_s: Alpha = 0.1,
    coefficients: tuple[float, float] = (1.0, 1.0),
    detach_mixture: bool = False,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: Softcap = None,
    reduction: str = "seqmean",
    backend: str = "auto",
    memory_budget_bytes: Optional[int] = None,
    statistics_t: Optional[TokenStatistics] = None,
    statistics_s: Optional[TokenStatistics] = None,
    teacher_tail: str = "renormalize",
) -> SKLPlusSRKL:
    """c_t · SKL_{α_t}(_t rows) + c_s · SRKL_{α_s}(_s rows), each reduced by `reduction` ("sum", "mean",
    "seqmean"), from hidden states `[..., H]` of the two sets of rows and one lm_head per model (the
    DistiLLM-2 objective's two terms). Equal to `c_t · fused_linear_skl(...) + c_s · fused_linear_srkl(...)`
    on the two halves, with `(c_t, c_s) = coefficients`, and with each half's per-token losses and label
    log-probabilities (`return_token_outputs`); but the weight and bias gradients of both halves share one
    float32 accumulator and are rounded to the parameter's dtype once, and only one `[V, H_s]` gradient
    is held until the backward. `statistics_t` / `statistics_s`: `fused_linear_token_statistics` of each
    half, to skip sweep 1. Sparse teachers: both `teacher_hidden_t` and `teacher_hidden_s` sparse,
    `teacher_weight` None, one `teacher_tail` (as in `fused_linear_skl`). Other arguments as in
    `fused_linear_skl`.
    """
    if reduction not in SCALAR_REDUCTIONS:
        raise ValueError(f"reduction must be 'sum', 'mean' or 'seqmean' (a scalar loss), got {reduction!r}")
    sparse_t, sparse_s = as_sparse_teacher(teacher_hidden_t) is not None, as_sparse_teacher(teacher_hidden_s) is not None
    if sparse_t != sparse_s:
        raise ValueError(
            "teacher_hidden_t and teacher_hidden_s must both be sparse teachers or both hidden states, got "
            f"{'a sparse teacher' if sparse_t else 'hidden states'} and {'a sparse teacher' if sparse_s else 'hidden states'}"
        )
    common = dict(
        student_weight=student_weight, student_bias=student_bias, teacher_weight=teacher_weight,
        teacher_bias=teacher_bias, ignore_index=ignore_index, temperature=temperature, softcap=softcap,
        reduction=reduction, backend=backend, memory_budget_bytes=memory_budget_bytes, want_token_outputs=True,
        teacher_tail=teacher_tail,
    )
    term_t = prepare_term(
        student_hidden=student_hidden_t, teacher_hidden=teacher_hidden_t, alpha=alpha_t, labels=labels_t,
        reverse=False, detach=False, statistics=statistics_t, **common,
    )
    term_s = prepare_term(
        student_hidden=student_hidden_s, teacher_hidden=teacher_hidden_s, alpha=alpha_s, labels=labels_s,
        reverse=True, detach=bool(detach_mixture), statistics=statistics_s, **common,
    )
    per_term = (
        term_t.labels, term_s.labels, term_t.alpha_rows, term_s.alpha_rows, term_t.statistics, term_s.statistics,
        term_t.sweep, term_s.sweep, tuple(float(c) for c in coefficients),
    )
    if sparse_t:
        outputs = FusedLinearSparseSkewPairFunction.apply(
            student_hidden_t, student_hidden_s, student_weight, student_bias, *term_t.sparse_teacher,
            *term_s.sparse_teacher, *per_term,
        )
    else:
        outputs = FusedLinearSkewPairFunction.apply(
            student_hidden_t, student_hidden_s, student_weight, student_bias, teacher_hidden_t, teacher_hidden_s,
            teacher_weight, teacher_bias, *per_term,
        )
    loss, losses_t, label_logprobs_t, losses_s, label_logprobs_s = outputs
    return SKLPlusSRKL(
        loss,
        FusedLinearTokenOutputs(losses_t, None if labels_t is None else label_logprobs_t),
        FusedLinearTokenOutputs(losses_s, None if labels_s is None else label_logprobs_s),
    )
