"""Fused-linear SKL / SRKL: the skew divergences from the last hidden states and the lm_head weights of
both models, without ever building their full `[N, V]` logits.

Student first. For every token (a row of the flattened leading shape) and each model::

    z = h Wᵀ + b              h: [H] hidden state, W: [V, H] lm_head weight, b: [V] optional bias
    z = c · tanh(z / c)       optional final-logit soft-cap c (Gemma-2 style), per model

then SKL_α = KL(p ‖ αp + (1−α)q) or SRKL_α = KL(q ‖ (1−α)p + αq) with q = softmax(z_s/T),
p = softmax(z_t/T), exactly as in `functional.fused_skl` / `fused_srkl`, and the same reductions.
The student's two hidden sizes may differ from the teacher's; the vocabularies must agree.

Gradients flow to the student only. With G = ∂loss/∂z_s (rows already weighted by the reduction)::

    G ← G ⊙ (1 − tanh²(z_raw / c))       the soft-cap derivative, when capped
    ∂/∂h_s = G W_s      ∂/∂W_s = Gᵀ H_s      ∂/∂b_s = Σ_rows G

How it runs:
- Rows whose label is `ignore_index` are dropped before any matmul (an index_select of the kept rows; the
  one host synchronisation of the op, to learn how many rows are kept). Without labels there is none.
- The kept rows go through in chunks of `chunk_rows(V, memory_budget_bytes, ...)` rows, so that the
  chunk's `[rows, V]` temporaries, this op's and the backend's, fit the budget (a backend with
  temporaries of its own is called on sub-blocks of the chunk). Per chunk: both
  logits as float32 GEMM outputs (float32 accumulation, never rounded to bf16), the soft-cap, the loss and
  its logits gradient from the backend's `skew_forward` / `skew_backward` (Triton on CUDA, the CPU
  backend on CPU), then the chunk's hidden gradient and the float32 accumulation of the weight (and bias)
  gradient. The weight gradient is skipped when the weight does not require grad (a frozen lm_head under
  LoRA), the hidden gradient when the hidden states do not.
- Scalar reductions ("sum", "mean", "seqmean"): each row's weight in the reduction is known in the
  forward, so the forward computes the gradients as well (four GEMMs: two logits, grad hidden, grad
  weight) and the backward only multiplies them by the incoming scalar, as Liger-Kernel's fused linear
  losses do.
- reduction="none": the per-row weights arrive only in the backward, so the forward computes the losses
  (two GEMMs) and the backward recomputes each chunk's logits (four more GEMMs).

By-products for the DistiLLM-2 objective (`return_token_outputs=True`, `FusedLinearTokenOutputs`): the
per-token losses and, with labels, the label tokens' log-probabilities `[..., 2]` = (log q(y_k), log p(y_k))
(0 at ignored tokens), both without gradient. The label log-probabilities come out of the backend's sweep 1
(its stats columns 5 and 6), so they cost no extra pass; a scalar reduction still computes its gradients in
the forward.

When the label log-probabilities are needed *before* the loss (the adaptive α of the paper's curriculum
picks each row's α from its sequence probability, and a sequence spans chunks),
`fused_linear_token_statistics` runs a statistics-only pass: per chunk the two logits GEMMs and sweep 1,
no loss sweep, no gradient. Its `TokenStatistics` passed as `statistics=` to the loss op let that op skip
sweep 1, so the adaptive α costs two extra GEMMs over the kept rows and no extra sweep over the vocabulary.
The loss op recomputes the same logits from the same inputs; the statistics (row maxima and log-sum-exps)
only need to match them to rounding.

`fused_linear_skl_plus_srkl` runs the DistiLLM-2 pair, `c_t · SKL` on one set of rows plus `c_s · SRKL` on
another with the same lm_heads, as one op: both terms' weight (and bias) gradients share one float32
accumulator and are rounded to the parameter's dtype once, and one `[V, H_s]` gradient waits for the
backward instead of two.

Memory, beyond inputs and outputs: at most about `memory_budget_bytes` of per-chunk `[rows, V]`
temporaries (default `DEFAULT_MEMORY_BUDGET_BYTES`: 512 MiB for CUDA tensors, 64 MiB otherwise; a chunk
has at least one row); a float32 `[V, H_s]`
weight-gradient accumulator when the student weight requires grad; on the non-CUDA path (and for mixed
dtypes) float32 copies of both lm_head weights made once per call, since CPU matmuls cannot write a float32
result from bfloat16 inputs. Between forward and backward the scalar reductions hold the finished
gradients (in the inputs' dtypes); "none" holds only what it recomputes from.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch.autograd.function import once_differentiable

from ._inputs import (
    LOGIT_DTYPES,
    Alpha,
    SkewRows,
    TokenOptions,
    check_label_ids,
    check_reduction,
    prepare_token_options,
)
from .backends import STATS, resolve_backend
from .functional import reduce_token_losses
from .skew_divergence import TokenStatistics

__all__ = [
    "fused_linear_skl",
    "fused_linear_srkl",
    "fused_linear_token_statistics",
    "fused_linear_skl_plus_srkl",
    "FusedLinearTokenOutputs",
    "SKLPlusSRKL",
    "FusedLinearSKLFunction",
    "FusedLinearSRKLFunction",
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "chunk_rows",
]

DEFAULT_MEMORY_BUDGET_BYTES = {"cuda": 512 * 2**20, "other": 64 * 2**20}

# [rows, V] tensors of the compute dtype this op holds at once in a chunk: the student and teacher logits,
# the soft-cap's tanh, the logits gradient. A backend adds its own count, `ROW_TEMPORARIES` in its module
# (Triton 0, the chunked-torch fallback 18); one that does not declare it is assumed to need
# UNDECLARED_BACKEND_TEMPORARIES.
LIVE_ROW_TENSORS = 4
UNDECLARED_BACKEND_TEMPORARIES = 18

Softcap = Union[None, float, Sequence[Optional[float]]]


def chunk_rows(
    vocab_size: int, memory_budget_bytes: int, element_size: int = 4, backend_temporaries: int = 0
) -> tuple[int, int]:
    """(rows per GEMM chunk, rows per backend call) so that the `[rows, V]` temporaries fit the budget.

    This op holds LIVE_ROW_TENSORS per row of a GEMM chunk; a backend that needs temporaries of its own is
    called on sub-blocks of the chunk, and then each side gets half of the budget.
    """
    if backend_temporaries == 0:
        return max(1, memory_budget_bytes // (LIVE_ROW_TENSORS * element_size * vocab_size)), 0
    half = memory_budget_bytes // 2
    gemm_rows = max(1, half // (LIVE_ROW_TENSORS * element_size * vocab_size))
    return gemm_rows, max(1, min(gemm_rows, half // (backend_temporaries * element_size * vocab_size)))


def default_memory_budget(device: torch.device) -> int:
    return DEFAULT_MEMORY_BUDGET_BYTES["cuda" if device.type == "cuda" else "other"]


# ----------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------


def _check_float_tensor(name: str, tensor: object) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in LOGIT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16 or float32), got dtype {tensor.dtype}")
    return tensor


def _check_model_side(prefix: str, hidden, weight, bias) -> None:
    """Shapes of one model's hidden states `[..., H]`, weight `[V, H]` and bias `[V]`."""
    hidden = _check_float_tensor(f"{prefix}_hidden", hidden)
    weight = _check_float_tensor(f"{prefix}_weight", weight)
    if hidden.dim() == 0:
        raise ValueError(f"{prefix}_hidden must have shape [..., H], got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"{prefix}_weight must be the lm_head weight of shape [V, H], got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{prefix}_weight has an empty vocabulary dimension (V = 0)")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{prefix}_hidden has H = {hidden.shape[-1]} but {prefix}_weight has shape {tuple(weight.shape)} "
            f"= [V, H] with H = {weight.shape[1]}; pass the last hidden states of the model this lm_head belongs to"
        )
    if bias is not None:
        bias = _check_float_tensor(f"{prefix}_bias", bias)
        if bias.shape != weight.shape[:1]:
            raise ValueError(
                f"{prefix}_bias must have shape [V] = ({weight.shape[0]},), got {tuple(bias.shape)}"
            )


def _check_softcap(softcap: Softcap) -> tuple[Optional[float], Optional[float]]:
    """`softcap` as a (student, teacher) pair; a single value applies to both models."""
    pair = tuple(softcap) if isinstance(softcap, (tuple, list)) else (softcap, softcap)
    if len(pair) != 2:
        raise ValueError(f"softcap must be None, a float, or a (student, teacher) pair, got {softcap!r}")
    for value in pair:
        if value is None:
            continue
        if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, (int, float)):
            raise TypeError(f"softcap must be None, a float, or a (student, teacher) pair, got {softcap!r}")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"softcap must be a finite number > 0 (or None for no cap), got {value}")
    return tuple(None if v is None else float(v) for v in pair)


def _check_inputs(
    student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias
) -> None:
    _check_model_side("student", student_hidden, student_weight, student_bias)
    _check_model_side("teacher", teacher_hidden, teacher_weight, teacher_bias)
    v_s, v_t = student_weight.shape[0], teacher_weight.shape[0]
    if v_s != v_t:
        larger, small = ("student", v_t) if v_s > v_t else ("teacher", v_s)
        raise ValueError(
            f"student_weight has V = {v_s} but teacher_weight has V = {v_t}; the two models must share a "
            f"vocabulary: slice the larger one, e.g. {larger}_weight[:{small}] (and its bias)"
        )
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            f"student_hidden {tuple(student_hidden.shape)} and teacher_hidden {tuple(teacher_hidden.shape)} "
            "differ in their leading (token) dimensions"
        )
    device = student_hidden.device
    named = {
        "student_weight": student_weight,
        "student_bias": student_bias,
        "teacher_hidden": teacher_hidden,
        "teacher_weight": teacher_weight,
        "teacher_bias": teacher_bias,
    }
    for name, tensor in named.items():
        if tensor is not None and tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device} but student_hidden is on {device}")
    if teacher_hidden.requires_grad:
        raise ValueError(
            "teacher_hidden requires grad, but the teacher is a constant of the loss: compute it under "
            "torch.no_grad() or pass teacher_hidden.detach()"
        )
    for name in ("teacher_weight", "teacher_bias"):
        if named[name] is not None and named[name].requires_grad:
            raise ValueError(
                f"{name} requires grad, but the teacher is a constant of the loss: freeze the teacher "
                f"(teacher.requires_grad_(False)) or pass {name}.detach()"
            )


def _check_memory_budget(memory_budget_bytes: Optional[int], device: torch.device) -> int:
    if memory_budget_bytes is None:
        return default_memory_budget(device)
    if isinstance(memory_budget_bytes, bool) or not isinstance(memory_budget_bytes, int):
        raise TypeError(f"memory_budget_bytes must be an int or None, got {type(memory_budget_bytes).__name__}")
    if memory_budget_bytes <= 0:
        raise ValueError(f"memory_budget_bytes must be > 0, got {memory_budget_bytes}")
    return memory_budget_bytes


# ----------------------------------------------------------------------------------------------------
# One model's lm_head over chunks of rows
# ----------------------------------------------------------------------------------------------------


class _LMHead:
    """One model's hidden rows `[N, H]`, lm_head weight `[V, H]`, bias and soft-cap, for chunked GEMMs.

    On CUDA with float16/bfloat16 hidden states and weight of one dtype the GEMMs take them as they are and
    write float32 (`out_dtype`); otherwise the weight is converted to the compute dtype once.
    """

    def __init__(self, hidden_rows, weight, bias, softcap, compute_dtype):
        self.hidden = hidden_rows
        self.native = (
            hidden_rows.is_cuda
            and compute_dtype == torch.float32
            and hidden_rows.dtype == weight.dtype
            and weight.dtype in (torch.float16, torch.bfloat16)
        )
        self.weight = weight if self.native else weight.to(compute_dtype)
        self.bias = None if bias is None else bias.to(compute_dtype)
        self.softcap = softcap
        self.compute_dtype = compute_dtype

    def with_hidden(self, hidden_rows: torch.Tensor) -> "_LMHead":
        """The same lm_head (and its converted weight) over other hidden rows."""
        head = object.__new__(_LMHead)
        head.__dict__.update(self.__dict__, hidden=hidden_rows)
        return head

    def rows(self, start: int, end: int, kept: Optional[torch.Tensor]) -> torch.Tensor:
        if kept is None:
            return self.hidden[start:end]
        return self.hidden.index_select(0, kept[start:end])

    def logits(self, hidden: torch.Tensor, keep_tanh: bool):
        """(soft-capped logits `[rows, V]` in the compute dtype, tanh(z_raw / c) or None)."""
        if self.native:
            z = torch.mm(hidden, self.weight.t(), out_dtype=torch.float32)
        else:
            z = torch.mm(hidden.to(self.compute_dtype), self.weight.t())
        if self.bias is not None:
            z += self.bias
        if self.softcap is None:
            return z, None
        tanh = z.div_(self.softcap).tanh_()
        if keep_tanh:
            return tanh * self.softcap, tanh
        return tanh.mul_(self.softcap), None

    def hidden_grad(self, grad_logits: torch.Tensor) -> torch.Tensor:
        """G W for a chunk, in the hidden states' dtype."""
        if self.native:
            return torch.mm(grad_logits.to(self.weight.dtype), self.weight)
        return torch.mm(grad_logits, self.weight).to(self.hidden.dtype)

    def accumulate_weight_grad(self, accumulator: torch.Tensor, grad_logits, hidden) -> None:
        """accumulator [V, H] (compute dtype) += Gᵀ h for a chunk."""
        if self.native:
            accumulator.add_(torch.mm(grad_logits.to(hidden.dtype).t(), hidden, out_dtype=torch.float32))
        else:
            accumulator.addmm_(grad_logits.t(), hidden.to(self.compute_dtype))


def _compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _kept_rows(options: TokenOptions) -> Optional[torch.Tensor]:
    """Indices of the rows that count, or None when all do (no host sync without labels)."""
    if options.labels is None:
        return None
    return torch.nonzero(options.labels != options.ignore_index).squeeze(1)


def _reduction_row_weights(
    reduction: str, options: TokenOptions, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """∂(reduced loss)/∂(row loss) for the scalar reductions, `[N]` (ignored rows: don't care)."""
    leading = options.leading_shape
    n = math.prod(leading)
    valid = None if options.labels is None else (options.labels != options.ignore_index)
    if reduction == "sum":
        return torch.ones(n, dtype=dtype, device=device)
    if reduction == "mean":
        count = valid.sum().clamp(min=1) if valid is not None else max(n, 1)
        return torch.ones(n, dtype=dtype, device=device) / count
    # seqmean over [B, T]: 1 / (tokens kept in the row's sequence · sequences with a kept token)
    batch, length = leading
    if valid is None:
        counts = torch.full((batch,), length, dtype=dtype, device=device)
    else:
        counts = valid.view(batch, length).sum(-1).to(dtype)
    sequences = (counts > 0).sum().clamp(min=1)
    per_sequence = 1.0 / (counts.clamp(min=1) * sequences)
    return per_sequence.unsqueeze(1).expand(batch, length).reshape(-1)


def _chunked_pass(
    student: _LMHead,
    teacher: _LMHead,
    options: TokenOptions,
    kept: Optional[torch.Tensor],
    impl,
    reverse: bool,
    detach: bool,
    budget: int,
    row_weights: Optional[torch.Tensor],
    want_loss: bool,
    want: tuple[bool, bool, bool],
    statistics: Optional[torch.Tensor] = None,
    label_logprobs_out: Optional[torch.Tensor] = None,
    grad_weight: Optional[torch.Tensor] = None,
    grad_bias: Optional[torch.Tensor] = None,
):
    """Run the chunks. Returns (row losses [N] or None, grad hidden [N, H_s] or None, grad weight [V, H_s]
    float accumulator or None, grad bias [V] or None). Gradients are computed when `row_weights`
    (∂loss/∂row loss, [N]) is given, for the (hidden, weight, bias) flags set in `want`.

    `statistics` `[N, STATS]` from `_statistics_pass` on the same inputs skips the backend's sweep 1.
    `label_logprobs_out` `[N, 2]` (needs labels) receives the kept rows' (log q(label), log p(label)).
    `grad_weight` / `grad_bias`: accumulators to add this pass's gradients to (else zeros are allocated)."""
    n = student.hidden.shape[0]
    vocab = student.weight.shape[0]
    device, cd = student.hidden.device, student.compute_dtype
    want_hidden, want_weight, want_bias = want if row_weights is not None else (False, False, False)
    want_grad = want_hidden or want_weight or want_bias

    row_losses = torch.zeros(n, dtype=cd, device=device) if want_loss else None
    grad_hidden = torch.zeros_like(student.hidden, memory_format=torch.contiguous_format) if want_hidden else None
    if want_weight and grad_weight is None:
        grad_weight = torch.zeros((vocab, student.hidden.shape[1]), dtype=cd, device=device)
    if want_bias and grad_bias is None:
        grad_bias = torch.zeros(vocab, dtype=cd, device=device)

    total = n if kept is None else kept.numel()
    backend_temporaries = getattr(impl, "ROW_TEMPORARIES", UNDECLARED_BACKEND_TEMPORARIES)
    step, backend_step = chunk_rows(vocab, budget, torch.finfo(cd).bits // 8, backend_temporaries)
    for start in range(0, total, step):
        end = min(total, start + step)
        index = None if kept is None else kept[start:end]
        h_s = student.rows(start, end, kept)
        z_s, tanh_s = student.logits(h_s, keep_tanh=want_grad)
        z_t, _ = teacher.logits(teacher.rows(start, end, kept), keep_tanh=False)
        alpha_rows = _chunk_of(options.alpha_rows, start, end, index)
        chunk_stats = _chunk_of(statistics, start, end, index)
        # The kept rows' labels only serve the label log-probabilities: every kept row counts.
        labels = _chunk_of(options.labels, start, end, index) if label_logprobs_out is not None else None
        blocks = []  # (rows of the backend call, its stats)
        losses = []
        for a in range(0, end - start, backend_step or end - start):
            b = min(end - start, a + (backend_step or end - start))
            rows = SkewRows(
                student=z_s[a:b],
                teacher=z_t[a:b],
                labels=None if labels is None else labels[a:b],
                alpha_rows=None if alpha_rows is None else alpha_rows[a:b],
                alpha=options.alpha,
                ignore_index=options.ignore_index,
                inv_temperature=options.inv_temperature,
                leading_shape=torch.Size([b - a]),
            )
            if chunk_stats is None:
                loss, stats = impl.skew_forward(rows, reverse, detach)
            else:
                loss, stats = impl.skew_forward(rows, reverse, detach, chunk_stats[a:b])
            losses.append(loss)
            blocks.append((a, b, rows, stats))
        if label_logprobs_out is not None:
            label_logprobs = torch.cat([stats[:, 5:7] for *_, stats in blocks])
            label_logprobs_out.index_copy_(0, index, label_logprobs.to(label_logprobs_out.dtype))
        if want_loss:
            loss = losses[0] if len(losses) == 1 else torch.cat(losses)
            if index is None:
                row_losses[start:end] = loss
            else:
                row_losses.index_copy_(0, index, loss.to(cd))
        if not want_grad:
            continue
        weights = row_weights[start:end] if index is None else row_weights.index_select(0, index)
        if len(blocks) == 1:
            _, _, rows, stats = blocks[0]
            grad_z = impl.skew_backward(rows, reverse, detach, stats, weights)
        else:
            grad_z = torch.empty_like(z_s)
            for a, b, rows, stats in blocks:
                grad_z[a:b] = impl.skew_backward(rows, reverse, detach, stats, weights[a:b])
        del blocks, rows, z_s, z_t
        if tanh_s is not None:
            grad_z.mul_(tanh_s.square_().neg_().add_(1.0))  # d/dz c·tanh(z/c) = 1 − tanh²(z/c)
            del tanh_s
        if want_hidden:
            chunk_grad = student.hidden_grad(grad_z)
            if index is None:
                grad_hidden[start:end] = chunk_grad
            else:
                grad_hidden.index_copy_(0, index, chunk_grad)
        if want_weight:
            student.accumulate_weight_grad(grad_weight, grad_z, h_s)
        if want_bias:
            grad_bias += grad_z.sum(0)
    return row_losses, grad_hidden, grad_weight, grad_bias


def _chunk_of(per_row: Optional[torch.Tensor], start: int, end: int, index: Optional[torch.Tensor]):
    """The rows of a per-row tensor that a chunk covers (`index`: the chunk's kept rows, or None for all)."""
    if per_row is None:
        return None
    return per_row[start:end] if index is None else per_row.index_select(0, index)


def _statistics_pass(
    student: _LMHead,
    teacher: _LMHead,
    options: TokenOptions,
    kept: Optional[torch.Tensor],
    impl,
    budget: int,
) -> torch.Tensor:
    """Sweep 1 alone over the chunks: the row statistics `[N, STATS]` (zeros at dropped rows), with the
    label log-probabilities in columns 5 and 6 when `options.labels` is given."""
    n, vocab, cd = student.hidden.shape[0], student.weight.shape[0], student.compute_dtype
    stats = torch.zeros((n, STATS), dtype=cd, device=student.hidden.device)
    total = n if kept is None else kept.numel()
    backend_temporaries = getattr(impl, "ROW_TEMPORARIES", UNDECLARED_BACKEND_TEMPORARIES)
    step, backend_step = chunk_rows(vocab, budget, torch.finfo(cd).bits // 8, backend_temporaries)
    for start in range(0, total, step):
        end = min(total, start + step)
        index = None if kept is None else kept[start:end]
        z_s, _ = student.logits(student.rows(start, end, kept), keep_tanh=False)
        z_t, _ = teacher.logits(teacher.rows(start, end, kept), keep_tanh=False)
        labels = _chunk_of(options.labels, start, end, index)
        blocks = []
        for a in range(0, end - start, backend_step or end - start):
            b = min(end - start, a + (backend_step or end - start))
            rows = SkewRows(
                student=z_s[a:b],
                teacher=z_t[a:b],
                labels=None if labels is None else labels[a:b],
                alpha_rows=None,
                alpha=0.0,
                ignore_index=options.ignore_index,
                inv_temperature=options.inv_temperature,
                leading_shape=torch.Size([b - a]),
            )
            blocks.append(impl.skew_statistics(rows))
        chunk_stats = torch.cat(blocks).to(cd)
        if index is None:
            stats[start:end] = chunk_stats
        else:
            stats.index_copy_(0, index, chunk_stats)
    return stats


# ----------------------------------------------------------------------------------------------------
# The autograd ops
# ----------------------------------------------------------------------------------------------------


def _check_statistics(statistics: Optional[TokenStatistics], leading: torch.Size, device) -> Optional[torch.Tensor]:
    if statistics is None:
        return None
    if not isinstance(statistics, TokenStatistics):
        raise TypeError(
            f"statistics must come from fused_linear_token_statistics(), got {type(statistics).__name__}"
        )
    if statistics.leading_shape != leading or statistics.stats.shape != (math.prod(leading), STATS):
        raise ValueError(
            f"statistics were computed for hidden states of leading shape {tuple(statistics.leading_shape)}, "
            f"these have {tuple(leading)}"
        )
    if statistics.stats.device != device:
        raise ValueError(f"statistics are on {statistics.stats.device}, the hidden states on {device}")
    return statistics.stats


def _forward(
    ctx,
    student_hidden,
    student_weight,
    teacher_hidden,
    teacher_weight,
    student_bias,
    teacher_bias,
    alpha,
    labels,
    ignore_index,
    temperature,
    softcap,
    reduction,
    backend,
    memory_budget_bytes,
    reverse,
    detach,
    statistics=None,
    want_token_outputs=False,
):
    """The op's forward: (loss, per-token losses or None, label log-probabilities `[..., 2]` or None); the
    last two only with `want_token_outputs` (the label log-probabilities only with labels)."""
    _check_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias)
    leading = student_hidden.shape[:-1]
    check_reduction(reduction, leading, "hidden states of shape [B, T, H]")
    device = student_hidden.device
    options = prepare_token_options(
        leading, device, alpha, labels, ignore_index, temperature, "the hidden states"
    )
    given_stats = _check_statistics(statistics, leading, device)
    student_cap, teacher_cap = _check_softcap(softcap)
    budget = _check_memory_budget(memory_budget_bytes, device)
    impl = resolve_backend(backend, device)
    cd = _compute_dtype(student_hidden, student_weight, teacher_hidden, teacher_weight)

    student_rows = student_hidden.reshape(-1, student_hidden.shape[-1])
    teacher_rows = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    student = _LMHead(student_rows, student_weight, student_bias, student_cap, cd)
    teacher = _LMHead(teacher_rows, teacher_weight, teacher_bias, teacher_cap, cd)
    kept = _kept_rows(options)
    want = (
        ctx.needs_input_grad[0],
        ctx.needs_input_grad[1],
        student_bias is not None and ctx.needs_input_grad[4],
    )
    ctx.set_materialize_grads(False)
    ctx.reduction = reduction
    ctx.want = want
    ctx.student_hidden_shape = student_hidden.shape

    label_logprobs = None
    if options.labels is not None and (given_stats is None or want_token_outputs):  # as in the logits ops
        check_label_ids(options.labels, student_weight.shape[0], options.ignore_index)
    if want_token_outputs and options.labels is not None:
        label_logprobs = torch.zeros((*leading, 2), dtype=cd, device=device)
    chunk_options = dict(
        statistics=given_stats, label_logprobs_out=None if label_logprobs is None else label_logprobs.view(-1, 2)
    )

    def by_products(token_losses):
        # mark_non_differentiable replaces what an earlier call marked: one call for both
        ctx.mark_non_differentiable(*(t for t in (token_losses, label_logprobs) if t is not None))
        return token_losses, label_logprobs

    if reduction == "none":
        row_losses, *_ = _chunked_pass(
            student, teacher, options, kept, impl, reverse, detach, budget, None, True, want, **chunk_options
        )
        if any(want):
            ctx.save_for_backward(
                student_rows, student_weight, student_bias, teacher_rows, teacher_weight, teacher_bias,
                options.labels, options.alpha_rows, kept, given_stats,
            )
            ctx.recompute = (options, impl, reverse, detach, budget, student_cap, teacher_cap, cd)
        token_losses = row_losses.clone().view(leading) if want_token_outputs else None
        return (row_losses.view(leading), *by_products(token_losses))

    row_weights = _reduction_row_weights(reduction, options, device, cd) if any(want) else None
    row_losses, grad_hidden, grad_weight, grad_bias = _chunked_pass(
        student, teacher, options, kept, impl, reverse, detach, budget, row_weights, True, want, **chunk_options
    )
    labels_shaped = None if options.labels is None else options.labels.view(leading)
    loss = reduce_token_losses(row_losses.view(leading), labels_shaped, ignore_index, reduction)
    if any(want):
        ctx.save_for_backward(
            None if grad_hidden is None else grad_hidden.view(student_hidden.shape),
            None if grad_weight is None else grad_weight.to(student_weight.dtype),
            None if grad_bias is None else grad_bias.to(student_bias.dtype),
        )
    return (loss, *by_products(row_losses.view(leading) if want_token_outputs else None))


def _backward(ctx, grad_output):
    """Gradients for (student_hidden, student_weight, student_bias)."""
    if grad_output is None or not any(ctx.want):
        return None, None, None
    if ctx.reduction != "none":
        return tuple(None if g is None else g * grad_output for g in ctx.saved_tensors)

    (student_rows, student_weight, student_bias, teacher_rows, teacher_weight, teacher_bias, labels,
     alpha_rows, kept, given_stats) = ctx.saved_tensors
    options, impl, reverse, detach, budget, student_cap, teacher_cap, cd = ctx.recompute
    options = TokenOptions(**{**vars(options), "labels": labels, "alpha_rows": alpha_rows})
    student = _LMHead(student_rows, student_weight, student_bias, student_cap, cd)
    teacher = _LMHead(teacher_rows, teacher_weight, teacher_bias, teacher_cap, cd)
    _, grad_hidden, grad_weight, grad_bias = _chunked_pass(
        student, teacher, options, kept, impl, reverse, detach, budget,
        grad_output.reshape(-1), False, ctx.want, statistics=given_stats,
    )
    return (
        None if grad_hidden is None else grad_hidden.view(ctx.student_hidden_shape),
        None if grad_weight is None else grad_weight.to(student_weight.dtype),
        None if grad_bias is None else grad_bias.to(student_bias.dtype),
    )


class FusedLinearTokenOutputs(NamedTuple):
    """What the fused-linear ops give besides the loss with `return_token_outputs=True` (no gradient).

    losses: the per-token loss, the hidden states' leading shape (0 at ignored tokens; float32, float64
        for float64 inputs).
    label_logprobs: `[..., 2]`, (log q(y_k), log p(y_k)) at each token's label under student and teacher,
        at the temperature T (0 at ignored tokens); None without labels.
    """

    losses: torch.Tensor
    label_logprobs: Optional[torch.Tensor]


class _FusedLinearSkewFunction(torch.autograd.Function):
    """SKL or SRKL (`reverse`) with the by-products: `apply(<the FusedLinearSRKLFunction arguments>,
    reverse, statistics)` -> (loss, per-token losses, label log-probabilities `[..., 2]` or None)."""

    @staticmethod
    def forward(
        ctx, student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias, alpha,
        labels, ignore_index, temperature, softcap, reduction, backend, memory_budget_bytes, detach_mixture,
        reverse, statistics,
    ):
        return _forward(
            ctx, student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias,
            alpha, labels, ignore_index, temperature, softcap, reduction, backend, memory_budget_bytes,
            reverse, bool(detach_mixture) and reverse, statistics, True,
        )

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, _grad_token_losses, _grad_label_logprobs):
        grad_hidden, grad_weight, grad_bias = _backward(ctx, grad_output)
        return (grad_hidden, grad_weight, None, None, grad_bias) + (None,) * 12


class FusedLinearSKLFunction(torch.autograd.Function):
    """SKL_α = KL(p ‖ αp + (1−α)q) from hidden states and lm_head weights (module docstring).

    `FusedLinearSKLFunction.apply(student_hidden, student_weight, teacher_hidden, teacher_weight,
    student_bias, teacher_bias, alpha, labels, ignore_index, temperature, softcap, reduction, backend,
    memory_budget_bytes)` -> float32 loss, reduced (or of the hidden states' leading shape for "none").
    """

    @staticmethod
    def forward(
        ctx,
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        student_bias=None,
        teacher_bias=None,
        alpha=0.1,
        labels=None,
        ignore_index=-100,
        temperature=1.0,
        softcap=None,
        reduction="mean",
        backend="auto",
        memory_budget_bytes=None,
    ):
        return _forward(
            ctx, student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias,
            alpha, labels, ignore_index, temperature, softcap, reduction, backend, memory_budget_bytes,
            False, False,
        )[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = _backward(ctx, grad_output)
        return (grad_hidden, grad_weight, None, None, grad_bias) + (None,) * 9


class FusedLinearSRKLFunction(torch.autograd.Function):
    """SRKL_α = KL(q ‖ (1−α)p + αq) from hidden states and lm_head weights (module docstring);
    `detach_mixture` treats the q inside r as a constant in the backward.

    `FusedLinearSRKLFunction.apply(..., memory_budget_bytes, detach_mixture)`, arguments otherwise as in
    `FusedLinearSKLFunction`.
    """

    @staticmethod
    def forward(
        ctx,
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        student_bias=None,
        teacher_bias=None,
        alpha=0.1,
        labels=None,
        ignore_index=-100,
        temperature=1.0,
        softcap=None,
        reduction="mean",
        backend="auto",
        memory_budget_bytes=None,
        detach_mixture=False,
    ):
        return _forward(
            ctx, student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias,
            alpha, labels, ignore_index, temperature, softcap, reduction, backend, memory_budget_bytes,
            True, bool(detach_mixture),
        )[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = _backward(ctx, grad_output)
        return (grad_hidden, grad_weight, None, None, grad_bias) + (None,) * 10


# ----------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------


def _fused_linear_skew(
    reverse, student_hidden, student_weight, teacher_hidden, teacher_weight, alpha, student_bias, teacher_bias,
    labels, ignore_index, temperature, softcap, reduction, detach_mixture, backend, memory_budget_bytes,
    statistics, return_token_outputs,
):
    if statistics is None and not return_token_outputs:
        if reverse:
            return FusedLinearSRKLFunction.apply(
                student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias,
                alpha, labels, ignore_index, temperature, softcap, reduction, backend, memory_budget_bytes,
                detach_mixture,
            )
        return FusedLinearSKLFunction.apply(
            student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias, alpha,
            labels, ignore_index, temperature, softcap, reduction, backend, memory_budget_bytes,
        )
    loss, token_losses, label_logprobs = _FusedLinearSkewFunction.apply(
        student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias, alpha,
        labels, ignore_index, temperature, softcap, reduction, backend, memory_budget_bytes, detach_mixture,
        reverse, statistics,
    )
    if return_token_outputs:
        return loss, FusedLinearTokenOutputs(token_losses, label_logprobs)
    return loss


def fused_linear_skl(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
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
    """
    return _fused_linear_skew(
        False, student_hidden, student_weight, teacher_hidden, teacher_weight, alpha, student_bias, teacher_bias,
        labels, ignore_index, temperature, softcap, reduction, False, backend, memory_budget_bytes, statistics,
        return_token_outputs,
    )


def fused_linear_srkl(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
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
):
    """Skew reverse KL, KL(q ‖ (1−α)p + αq), with logits z = softcap(h Wᵀ + b) never built in full.

    detach_mixture=True treats the q inside r as a constant in the backward (the released DistiLLM-2
    code); the value is the same. Other arguments, `statistics` and `return_token_outputs` as in
    `fused_linear_skl`.
    """
    return _fused_linear_skew(
        True, student_hidden, student_weight, teacher_hidden, teacher_weight, alpha, student_bias, teacher_bias,
        labels, ignore_index, temperature, softcap, reduction, detach_mixture, backend, memory_budget_bytes,
        statistics, return_token_outputs,
    )


def fused_linear_token_statistics(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: Softcap = None,
    backend: str = "auto",
    memory_budget_bytes: Optional[int] = None,
) -> TokenStatistics:
    """Sweep 1 alone from hidden states and lm_head weights (student first, arguments as in
    `fused_linear_skl`): the label tokens' log-probabilities log q(y_k), log p(y_k) at temperature T
    (`.student_label_logprobs`, `.teacher_label_logprobs`, `.label_logprobs` `[..., 2]`; 0 at ignored
    tokens), and the row statistics that let `fused_linear_skl` / `fused_linear_srkl` skip sweep 1.

    Cost: per chunk of kept rows the two logits GEMMs and one sweep over the vocabulary; nothing is
    differentiated. Used before a loss whose α depends on these log-probabilities, the statistics passed
    on as `statistics=` make the pair cost two GEMMs more than the loss alone, and no extra sweep.
    """
    if labels is None:
        raise ValueError(
            "fused_linear_token_statistics needs labels: the label tokens' log-probabilities are its output"
        )
    student_hidden, student_weight = student_hidden.detach(), student_weight.detach()
    student_bias = None if student_bias is None else student_bias.detach()
    _check_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias)
    leading = student_hidden.shape[:-1]
    device = student_hidden.device
    options = prepare_token_options(leading, device, 0.0, labels, ignore_index, temperature, "the hidden states")
    check_label_ids(options.labels, student_weight.shape[0], options.ignore_index)
    student_cap, teacher_cap = _check_softcap(softcap)
    budget = _check_memory_budget(memory_budget_bytes, device)
    impl = resolve_backend(backend, device)
    cd = _compute_dtype(student_hidden, student_weight, teacher_hidden, teacher_weight)
    student = _LMHead(student_hidden.reshape(-1, student_hidden.shape[-1]), student_weight, student_bias, student_cap, cd)
    teacher = _LMHead(teacher_hidden.reshape(-1, teacher_hidden.shape[-1]), teacher_weight, teacher_bias, teacher_cap, cd)
    with torch.no_grad():
        stats = _statistics_pass(student, teacher, options, _kept_rows(options), impl, budget)
    return TokenStatistics(stats, leading)


# ----------------------------------------------------------------------------------------------------
# The DistiLLM-2 pair: SKL on one set of rows plus SRKL on another, one lm_head
# ----------------------------------------------------------------------------------------------------


class SKLPlusSRKL(NamedTuple):
    """`fused_linear_skl_plus_srkl`'s result: the combined loss and each half's by-products."""

    loss: torch.Tensor
    skl: FusedLinearTokenOutputs  # of the _t rows
    srkl: FusedLinearTokenOutputs  # of the _s rows


class _FusedLinearSKLPlusSRKLFunction(torch.autograd.Function):
    """c_t · SKL(_t rows) + c_s · SRKL(_s rows) with one student lm_head: both halves' weight and bias
    gradients go into one float32 accumulator, rounded to the parameter's dtype once (two separate ops
    would each round theirs and leave autograd to add them: two roundings, two saved `[V, H_s]` gradients).

    `apply(student_hidden_t, student_hidden_s, student_weight, student_bias, teacher_hidden_t,
    teacher_hidden_s, teacher_weight, teacher_bias, alpha_t, alpha_s, labels_t, labels_s, statistics_t,
    statistics_s, coefficients, detach_mixture, ignore_index, temperature, softcap, reduction, backend,
    memory_budget_bytes)` -> (loss, token losses _t, label log-probabilities _t, the same two of _s).
    """

    @staticmethod
    def forward(
        ctx, student_hidden_t, student_hidden_s, student_weight, student_bias, teacher_hidden_t,
        teacher_hidden_s, teacher_weight, teacher_bias, alpha_t, alpha_s, labels_t, labels_s, statistics_t,
        statistics_s, coefficients, detach_mixture, ignore_index, temperature, softcap, reduction, backend,
        memory_budget_bytes,
    ):
        if reduction not in ("sum", "mean", "seqmean"):
            raise ValueError(f"reduction must be 'sum', 'mean' or 'seqmean' (a scalar loss), got {reduction!r}")
        for hidden, teacher_hidden in ((student_hidden_t, teacher_hidden_t), (student_hidden_s, teacher_hidden_s)):
            _check_inputs(hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias)
            check_reduction(reduction, hidden.shape[:-1], "hidden states of shape [B, T, H]")
        device = student_hidden_t.device
        student_cap, teacher_cap = _check_softcap(softcap)
        budget = _check_memory_budget(memory_budget_bytes, device)
        impl = resolve_backend(backend, device)
        cd = _compute_dtype(student_hidden_t, student_hidden_s, student_weight, teacher_hidden_t, teacher_hidden_s, teacher_weight)
        student_head = _LMHead(student_hidden_t.reshape(-1, student_hidden_t.shape[-1]), student_weight, student_bias, student_cap, cd)
        teacher_head = _LMHead(teacher_hidden_t.reshape(-1, teacher_hidden_t.shape[-1]), teacher_weight, teacher_bias, teacher_cap, cd)
        want_weight = ctx.needs_input_grad[2]
        want_bias = student_bias is not None and ctx.needs_input_grad[3]
        vocab = student_weight.shape[0]
        grad_weight = torch.zeros((vocab, student_weight.shape[1]), dtype=cd, device=device) if want_weight else None
        grad_bias = torch.zeros(vocab, dtype=cd, device=device) if want_bias else None

        loss = 0.0
        grad_hiddens, by_products = [], []
        halves = (
            (student_hidden_t, teacher_hidden_t, alpha_t, labels_t, statistics_t, False, False, ctx.needs_input_grad[0]),
            (student_hidden_s, teacher_hidden_s, alpha_s, labels_s, statistics_s, True, bool(detach_mixture), ctx.needs_input_grad[1]),
        )
        for (hidden, teacher_hidden, alpha, labels, statistics, reverse, detach, want_hidden), coefficient in zip(
            halves, coefficients
        ):
            leading = hidden.shape[:-1]
            options = prepare_token_options(leading, device, alpha, labels, ignore_index, temperature, "the hidden states")
            given_stats = _check_statistics(statistics, leading, device)
            label_logprobs = None
            if options.labels is not None:
                check_label_ids(options.labels, vocab, options.ignore_index)
                label_logprobs = torch.zeros((*leading, 2), dtype=cd, device=device)
            # A term weighted 0 (β = 1 in the paper's schedule) still gives its losses, but no gradient.
            want = (want_hidden, want_weight, want_bias) if coefficient != 0 else (False, False, False)
            row_weights = None
            if any(want):
                row_weights = _reduction_row_weights(reduction, options, device, cd) * coefficient
            row_losses, grad_hidden, _, _ = _chunked_pass(
                student_head.with_hidden(hidden.reshape(-1, hidden.shape[-1])),
                teacher_head.with_hidden(teacher_hidden.reshape(-1, teacher_hidden.shape[-1])),
                options, _kept_rows(options), impl, reverse, detach, budget, row_weights, True, want,
                statistics=given_stats,
                label_logprobs_out=None if label_logprobs is None else label_logprobs.view(-1, 2),
                grad_weight=grad_weight, grad_bias=grad_bias,
            )
            labels_shaped = None if options.labels is None else options.labels.view(leading)
            loss = loss + coefficient * reduce_token_losses(row_losses.view(leading), labels_shaped, ignore_index, reduction)
            grad_hiddens.append(None if grad_hidden is None else grad_hidden.view(hidden.shape))
            by_products += [row_losses.view(leading), label_logprobs]

        ctx.set_materialize_grads(False)
        ctx.save_for_backward(
            *grad_hiddens,
            None if grad_weight is None else grad_weight.to(student_weight.dtype),
            None if grad_bias is None else grad_bias.to(student_bias.dtype),
        )
        ctx.mark_non_differentiable(*(t for t in by_products if t is not None))
        return (loss, *by_products)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *_grad_by_products):
        if grad_loss is None:
            return (None,) * 22
        grads = tuple(None if g is None else g * grad_loss for g in ctx.saved_tensors)
        return grads + (None,) * 18


def fused_linear_skl_plus_srkl(
    student_hidden_t: torch.Tensor,
    teacher_hidden_t: torch.Tensor,
    labels_t: Optional[torch.Tensor],
    student_hidden_s: torch.Tensor,
    teacher_hidden_s: torch.Tensor,
    labels_s: Optional[torch.Tensor],
    *,
    student_weight: torch.Tensor,
    teacher_weight: torch.Tensor,
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
) -> SKLPlusSRKL:
    """c_t · SKL_{α_t}(_t rows) + c_s · SRKL_{α_s}(_s rows), each reduced by `reduction` ("sum", "mean",
    "seqmean"), from hidden states `[..., H]` of the two sets of rows and one lm_head per model (the
    DistiLLM-2 objective's two terms). Equal to `c_t · fused_linear_skl(...) + c_s · fused_linear_srkl(...)`
    on the two halves, with `(c_t, c_s) = coefficients`, and with each half's per-token losses and label
    log-probabilities (`return_token_outputs`); but the weight and bias gradients of both halves share one
    float32 accumulator and are rounded to the parameter's dtype once, and only one `[V, H_s]` gradient
    is held until the backward. `statistics_t` / `statistics_s`: `fused_linear_token_statistics` of each
    half, to skip sweep 1. Other arguments as in `fused_linear_skl`.
    """
    outputs = _FusedLinearSKLPlusSRKLFunction.apply(
        student_hidden_t, student_hidden_s, student_weight, student_bias, teacher_hidden_t, teacher_hidden_s,
        teacher_weight, teacher_bias, alpha_t, alpha_s, labels_t, labels_s, statistics_t, statistics_s,
        tuple(float(c) for c in coefficients), detach_mixture, ignore_index, temperature, softcap, reduction,
        backend, memory_budget_bytes,
    )
    loss, losses_t, label_logprobs_t, losses_s, label_logprobs_s = outputs
    return SKLPlusSRKL(
        loss, FusedLinearTokenOutputs(losses_t, label_logprobs_t), FusedLinearTokenOutputs(losses_s, label_logprobs_s)
    )
