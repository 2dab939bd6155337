"""The fused-linear ops' own argument checks: each model's hidden states, lm_head weight and bias, the
soft-cap and the memory budget; `prepare_term` runs every check of a call. The per-token arguments (α,
labels, temperature), the reduction and the statistics are checked by the code the logits ops use, a sparse
teacher by `sparse_teacher.flatten_sparse_teacher` (the logits ops' check)."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Union

import torch

from .._inputs import check_float_tensor, check_label_ids, prepare_token_options
from ..backends import resolve_backend_name
from ..reductions import check_reduction
from ..sparse_teacher import SparseTeacher, as_sparse_teacher, check_teacher_tail, flatten_sparse_teacher
from ..statistics import check_statistics
from .chunks import default_memory_budget

Softcap = Union[None, float, Sequence[Optional[float]]]


def check_model_side(prefix: str, hidden, weight, bias) -> None:
    """Shapes of one model's hidden states `[..., H]`, weight `[V, H]` and bias `[V]`."""
    hidden = check_float_tensor(f"{prefix}_hidden", hidden)
    weight = check_float_tensor(f"{prefix}_weight", weight)
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
        bias = check_float_tensor(f"{prefix}_bias", bias)
        if bias.shape != weight.shape[:1]:
            raise ValueError(
                f"{prefix}_bias must have shape [V] = ({weight.shape[0]},), got {tuple(bias.shape)}"
            )


def check_softcap(softcap: Softcap) -> tuple[Optional[float], Optional[float]]:
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


def check_student_softcap(softcap: Softcap) -> Optional[float]:
    """The student's soft-cap against a sparse teacher (log-probabilities, not logits: nothing to cap): a
    single value caps the student; a (student, teacher) pair must have None for the teacher."""
    student_cap, teacher_cap = check_softcap(softcap)
    if isinstance(softcap, (tuple, list)) and teacher_cap is not None:
        raise ValueError(
            f"softcap={softcap!r} caps the teacher, but a sparse teacher gives log-probabilities, not logits: "
            "pass (student_cap, None) or a single value for the student"
        )
    return student_cap


def check_dense_teacher_tail(teacher_tail: str) -> None:
    """A dense teacher has no tail: `teacher_tail` must keep its default."""
    if teacher_tail != "renormalize":
        raise ValueError(
            f"teacher_tail={teacher_tail!r} applies to a sparse teacher (a SparseTeacher or an (ids, logprobs"
            "[, tail_logprob]) tuple); this teacher is dense (hidden states and an lm_head weight)"
        )


def check_sparse_inputs(
    *, student_hidden, student_weight, student_bias, teacher: SparseTeacher, teacher_weight, teacher_bias
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The student's tensors and a sparse teacher in place of the teacher's hidden states: no teacher
    weight or bias. Returns the teacher flattened to rows (ids [N, k], logprobs [N, k], tail_logprob [N])."""
    check_model_side("student", student_hidden, student_weight, student_bias)
    for name, tensor in (("teacher_weight", teacher_weight), ("teacher_bias", teacher_bias)):
        if tensor is not None:
            raise ValueError(
                f"{name} must be None with a sparse teacher: it gives the log-probabilities themselves, "
                "there is no teacher lm_head to apply"
            )
    device = student_hidden.device
    for name, tensor in (("student_weight", student_weight), ("student_bias", student_bias)):
        if tensor is not None and tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device} but student_hidden is on {device}")
    return flatten_sparse_teacher(teacher, student_hidden.shape[:-1], student_weight.shape[0], device, "the hidden states")


def check_sparse_alpha(alpha_rows: Optional[torch.Tensor], alpha: float, *, reverse: bool, tail: str, k: int, vocab: int) -> None:
    """SRKL with tail "renormalize", k < V and a float α of 0 is +inf wherever the student has mass off
    the support (a tensor α with zeros gives +inf rows, as the dense op does with −inf teacher logits)."""
    if reverse and tail == "renormalize" and k < vocab and alpha_rows is None and alpha == 0:
        raise ValueError(
            "SRKL with teacher_tail='renormalize' and alpha = 0 is +inf: the renormalized teacher has probability "
            "0 off its k tokens, so r = (1−α)p + αq is 0 there while the student's q is not; use alpha > 0 or "
            "teacher_tail='uniform'"
        )


def check_inputs(
    *, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias
) -> None:
    """Both models' tensors: shapes, one vocabulary, one token shape, one device, a constant teacher."""
    check_model_side("student", student_hidden, student_weight, student_bias)
    check_model_side("teacher", teacher_hidden, teacher_weight, teacher_bias)
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


def check_memory_budget(memory_budget_bytes: Optional[int], device: torch.device) -> int:
    """The budget in bytes (the device's default for None)."""
    if memory_budget_bytes is None:
        return default_memory_budget(device)
    if isinstance(memory_budget_bytes, bool) or not isinstance(memory_budget_bytes, int):
        raise TypeError(f"memory_budget_bytes must be an int or None, got {type(memory_budget_bytes).__name__}")
    if memory_budget_bytes <= 0:
        raise ValueError(f"memory_budget_bytes must be > 0, got {memory_budget_bytes}")
    return memory_budget_bytes


class Sweep(NamedTuple):
    """The non-tensor arguments of one fused-linear term, checked (a constant under torch.compile)."""

    alpha: float
    ignore_index: int
    inv_temperature: float
    leading_shape: torch.Size
    student_softcap: Optional[float]
    teacher_softcap: Optional[float]
    reverse: bool
    detach: bool
    reduction: str
    backend: str  # a concrete backend name
    budget: int
    want_token_outputs: bool
    teacher_tail: Optional[str] = None  # a sparse teacher's tail mode (`sparse_teacher.TEACHER_TAILS`); None: dense


class SparseTeacherRows(NamedTuple):
    """A checked sparse teacher, flattened to rows."""

    ids: torch.Tensor  # [N, k] int64
    logprobs: torch.Tensor  # [N, k], temperature 1
    tail_logprob: Optional[torch.Tensor]  # [N], or None


class PreparedTerm(NamedTuple):
    """A checked fused-linear term: its per-row tensors and its `Sweep`."""

    labels: Optional[torch.Tensor]  # [N]
    alpha_rows: Optional[torch.Tensor]  # [N] float32
    statistics: Optional[torch.Tensor]  # [N, STATS]
    sweep: Sweep
    sparse_teacher: Optional[SparseTeacherRows] = None  # a sparse teacher (then `sweep.teacher_tail` is set)


def prepare_term(
    *,
    student_hidden,
    student_weight,
    student_bias,
    teacher_hidden,
    teacher_weight,
    teacher_bias,
    alpha,
    labels,
    ignore_index,
    temperature,
    softcap,
    reduction,
    backend,
    memory_budget_bytes,
    reverse: bool,
    detach: bool,
    statistics,
    want_token_outputs: bool,
    teacher_tail: str = "renormalize",
) -> PreparedTerm:
    """Every check of a fused-linear loss call, in the order the messages are documented, and the
    flattening of its per-token arguments to rows. `teacher_hidden` may be a sparse teacher (a
    `SparseTeacher` or an (ids, logprobs[, tail_logprob]) tuple) with `teacher_weight` None."""
    sparse = as_sparse_teacher(teacher_hidden)
    sparse_rows = None
    if sparse is None:
        check_dense_teacher_tail(teacher_tail)
        check_inputs(
            student_hidden=student_hidden, student_weight=student_weight, student_bias=student_bias,
            teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, teacher_bias=teacher_bias,
        )
    else:
        check_teacher_tail(teacher_tail)
        sparse_rows = SparseTeacherRows(*check_sparse_inputs(
            student_hidden=student_hidden, student_weight=student_weight, student_bias=student_bias,
            teacher=sparse, teacher_weight=teacher_weight, teacher_bias=teacher_bias,
        ))
    leading = student_hidden.shape[:-1]
    check_reduction(reduction, leading, "hidden states of shape [B, T, H]")
    device = student_hidden.device
    options = prepare_token_options(leading, device, alpha, labels, ignore_index, temperature, "the hidden states")
    given_stats = check_statistics(
        statistics, leading, device, source="hidden states", producer="fused_linear_token_statistics",
        sparse_teacher=sparse_rows is not None,
    )
    if sparse_rows is None:
        student_cap, teacher_cap = check_softcap(softcap)
    else:
        student_cap, teacher_cap = check_student_softcap(softcap), None
        check_sparse_alpha(
            options.alpha_rows, options.alpha, reverse=reverse, tail=teacher_tail, k=sparse_rows.ids.shape[-1],
            vocab=student_weight.shape[0],
        )
    budget = check_memory_budget(memory_budget_bytes, device)
    name = resolve_backend_name(backend, device)
    if options.labels is not None and (given_stats is None or want_token_outputs):  # as in the logits ops
        check_label_ids(options.labels, student_weight.shape[0], options.ignore_index)
    sweep = Sweep(
        alpha=options.alpha,
        ignore_index=options.ignore_index,
        inv_temperature=options.inv_temperature,
        leading_shape=leading,
        student_softcap=student_cap,
        teacher_softcap=teacher_cap,
        reverse=reverse,
        detach=detach,
        reduction=reduction,
        backend=name,
        budget=budget,
        want_token_outputs=want_token_outputs,
        teacher_tail=None if sparse_rows is None else teacher_tail,
    )
    return PreparedTerm(options.labels, options.alpha_rows, given_stats, sweep, sparse_rows)
