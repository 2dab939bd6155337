"""Sparse teachers: k token ids per row with their teacher log-probabilities, and the rows of SKL / SRKL against them.

A `SparseTeacher` row holds k distinct ids with their log-probabilities `lp` at temperature 1 and optionally
the log of the remaining mass `tail_logprob` (else log(1 − Σ exp lp), 0 mass when that is ≤ 0). The tail mode
(`TEACHER_TAILS`) says what the V − k other tokens get: "renormalize" restricts the teacher to its k tokens,
"uniform" spreads the tail mass evenly over them. At temperature T (docs/design.md §8):

    s_i = lp_i / T,   u = (tail_logprob − log(V−k)) / T   (uniform, k < V; else no tail)
    logZ = logsumexp(s_1..s_k [, log(V−k) + u]),   log p_i = s_i − logZ,   log c = u − logZ  (−inf: no tail)

i.e. `log_softmax(densified / T)` of the densified T = 1 teacher (`reference.densify_sparse_teacher`).

`sparse_skew_rows` computes a row's loss (and, on request, its gradient) with the student dense and the teacher
never densified: the k support entries here in torch (`[N, k]`, mixtures in log space, so α = 0 or 1 and q = 0
are exact), the V − k tail entries by the backends' three sweeps (`sparse_custom_ops`, spec
`backends/torch_sparse.py`). With g_v = ∂(row loss)/∂q_v and S = Σ_v q_v g_v:

    renormalize SKL     tail 0, g_tail = 0
    renormalize SRKL    off the support r = αq: tail = −log α · (1 − Σ_support q_i), g_tail = −log α (+1 detached)
    uniform             the tail sweep's sums over all V entries, minus the support entries' tail-formula terms
                        (from log q_i and log c), plus their true terms
    ∂ loss / ∂z_v = (1/T) · q_v · (g_v − S)

The gradient is one `student_grad` sweep with the tail's g (uniform; row shift S) or g ≡ 0 (renormalize; row
shift S − g_tail), whose k support entries are then overwritten with their true values (the ids of a row
are distinct). Detached SRKL uses S = L + 1 (Σ q = 1), so that α = 1 gives an exact zero gradient.

The checks of a sparse teacher: ids an integer tensor `[..., k]` with the student's leading shape,
1 ≤ k ≤ V, logprobs a float tensor of the same shape, tail_logprob of the leading shape; ids in [0, V) and
distinct within each row (ValueError on the CPU, an asynchronous device assert on CUDA and under
torch.compile, `_inputs.require`). A NaN log-probability is not checked: it makes its row's loss NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from . import sparse_custom_ops
from ._inputs import (
    Alpha,
    as_rows,
    check_float_tensor,
    check_label_ids,
    check_logits,
    compute_dtype,
    prepare_token_options,
    require,
)

__all__ = [
    "SparseTeacher",
    "as_sparse_teacher",
    "TEACHER_TAILS",
    "check_teacher_tail",
    "flatten_sparse_teacher",
    "SparseRows",
    "prepare_sparse_rows",
    "SparseForward",
    "SparseRowOutputs",
    "sparse_statistics",
    "sparse_forward",
    "sparse_grad",
    "sparse_skew_rows",
    "sparse_teacher_logprobs",
    "log_remaining_mass",
]

TEACHER_TAILS = ("renormalize", "uniform")


@dataclass(frozen=True)
class SparseTeacher:
    """A teacher given by k token ids per token with their log-probabilities at temperature 1.

    ids: `[..., k]` integer, distinct per row, in [0, V); logprobs: `[..., k]` float (−inf allowed);
    tail_logprob: `[...]` log of the mass outside ids, or None (then log(1 − Σ exp logprobs))."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail_logprob: Optional[torch.Tensor] = None


def as_sparse_teacher(obj: object) -> Optional[SparseTeacher]:
    """`obj` as a SparseTeacher: itself, or built from an (ids, logprobs[, tail_logprob]) tuple; None for
    anything else (a dense teacher tensor)."""
    if isinstance(obj, SparseTeacher):
        return obj
    if isinstance(obj, tuple):
        if len(obj) not in (2, 3):
            raise TypeError(
                f"a sparse teacher tuple is (ids, logprobs) or (ids, logprobs, tail_logprob), got {len(obj)} items"
            )
        return SparseTeacher(*obj)
    return None


def check_teacher_tail(tail: str) -> str:
    if tail not in TEACHER_TAILS:
        raise ValueError(f"teacher_tail must be one of {TEACHER_TAILS}, got {tail!r}")
    return tail


def flatten_sparse_teacher(
    teacher: SparseTeacher, leading_shape: torch.Size, vocab_size: int, device: torch.device, source: str = "the logits"
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Check `teacher` against student inputs of token shape `leading_shape` and vocabulary `vocab_size` on
    `device` (`source` names them in messages) and flatten it: (ids [N, k] int64, logprobs [N, k],
    tail_logprob [N] or None)."""
    ids, logprobs, tail = teacher.ids, teacher.logprobs, teacher.tail_logprob
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"the sparse teacher's ids must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"the sparse teacher's ids must be an integer tensor, got dtype {ids.dtype}")
    logprobs = check_float_tensor("the sparse teacher's logprobs", logprobs)
    if ids.dim() == 0 or ids.shape[:-1] != leading_shape:
        raise ValueError(
            f"the sparse teacher's ids must have shape [..., k] with {source}' leading shape {tuple(leading_shape)}, "
            f"got {tuple(ids.shape)}"
        )
    k = ids.shape[-1]
    if not 1 <= k <= vocab_size:
        raise ValueError(f"the sparse teacher needs 1 <= k <= V = {vocab_size} ids per token, got k = {k}")
    if logprobs.shape != ids.shape:
        raise ValueError(
            f"the sparse teacher's logprobs {tuple(logprobs.shape)} must have the shape of its ids {tuple(ids.shape)}"
        )
    for name, tensor in (("ids", ids), ("logprobs", logprobs), ("tail_logprob", tail)):
        if tensor is not None and tensor.device != device:
            raise ValueError(f"the sparse teacher's {name} is on {tensor.device} but {source} are on {device}")
    if logprobs.requires_grad or (tail is not None and tail.requires_grad):
        raise ValueError(
            "the sparse teacher's log-probabilities require grad, but the teacher is a constant of the loss: "
            "pass them detached"
        )
    if tail is not None:
        tail = check_float_tensor("the sparse teacher's tail_logprob", tail)
        if tail.shape != leading_shape:
            raise ValueError(
                f"the sparse teacher's tail_logprob must have {source}' leading shape {tuple(leading_shape)}, "
                f"got {tuple(tail.shape)}"
            )
        tail = tail.reshape(-1)
    ids = ids.reshape(-1, k).long()
    logprobs = logprobs.reshape(-1, k)
    require(((ids >= 0) & (ids < vocab_size)).all(), f"the sparse teacher's ids must lie in [0, {vocab_size})")
    if k > 1:
        ordered = ids.sort(dim=-1).values
        require((ordered[:, 1:] != ordered[:, :-1]).all(), "the sparse teacher's ids must be distinct within each token")
    return ids, logprobs, tail


@dataclass
class SparseRows:
    """One call's inputs against a sparse teacher, flattened to rows."""

    student: torch.Tensor  # [N, V] or [outer, inner, V], unit column stride
    ids: torch.Tensor  # [N, k] int64
    logprobs: torch.Tensor  # [N, k], the teacher's T = 1 log-probabilities
    tail_logprob: Optional[torch.Tensor]  # [N] or None
    labels: Optional[torch.Tensor]  # [N] or None
    alpha_rows: torch.Tensor  # [N] in the compute dtype
    ignore_index: int
    inv_temperature: float
    tail: str
    leading_shape: torch.Size


def prepare_sparse_rows(
    student: torch.Tensor,
    teacher: SparseTeacher,
    alpha: Alpha,
    labels: Optional[torch.Tensor],
    ignore_index: int,
    temperature: float,
    tail: str,
    reverse: bool,
) -> SparseRows:
    """Check the arguments of a skew divergence against a sparse teacher (student first) and flatten them.
    SRKL with tail "renormalize", k < V and a float α of 0 is +inf wherever the student has mass off the
    support: a ValueError."""
    student = check_logits("student_logits", student)
    tail = check_teacher_tail(tail)
    leading, vocab = student.shape[:-1], student.shape[-1]
    ids, logprobs, tail_logprob = flatten_sparse_teacher(teacher, leading, vocab, student.device)
    options = prepare_token_options(leading, student.device, alpha, labels, ignore_index, temperature, "the logits")
    if reverse and tail == "renormalize" and ids.shape[-1] < vocab and options.alpha_rows is None and options.alpha == 0:
        raise ValueError(
            "SRKL with teacher_tail='renormalize' and alpha = 0 is +inf: the renormalized teacher has probability "
            "0 off its k tokens, so r = (1−α)p + αq is 0 there while the student's q is not; use alpha > 0 or "
            "teacher_tail='uniform'"
        )
    dtype = compute_dtype(student)
    n = ids.shape[0]
    if options.alpha_rows is None:
        alpha_rows = torch.full((n,), options.alpha, dtype=dtype, device=student.device)
    else:
        alpha_rows = options.alpha_rows.to(dtype)
    return SparseRows(
        student=as_rows(student), ids=ids, logprobs=logprobs, tail_logprob=tail_logprob, labels=options.labels,
        alpha_rows=alpha_rows, ignore_index=options.ignore_index, inv_temperature=options.inv_temperature,
        tail=tail, leading_shape=leading,
    )


def _gather_rows(student: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """student[r, index[r, j]] as `[N, j]`, for row logits `[N, V]` or `[outer, inner, V]`."""
    return student.gather(-1, index.view(*student.shape[:-1], index.shape[-1])).reshape(index.shape)


def log_remaining_mass(log_values: torch.Tensor) -> torch.Tensor:
    """log(1 − Σ_j exp(log_values[..., j])), −inf where the sum reaches 1."""
    return torch.log(-torch.expm1(torch.logsumexp(log_values, dim=-1).clamp(max=0.0)))


def sparse_teacher_logprobs(
    logprobs: torch.Tensor, tail_logprob: Optional[torch.Tensor], vocab_size: int, tail: str, inv_temperature: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The tempered teacher of the module docstring: (log p_i [N, k], log c [N] or None without a tail)."""
    k = logprobs.shape[-1]
    scaled = logprobs.to(dtype) * inv_temperature
    if tail != "uniform" or k == vocab_size:
        return scaled - torch.logsumexp(scaled, dim=-1, keepdim=True), None
    if tail_logprob is None:  # 1 − Σ p_i cancels: in float64 (k entries a row), exact for float32 log-probabilities
        tail_lp = log_remaining_mass(logprobs.double()).to(dtype)
    else:
        tail_lp = tail_logprob.to(dtype)
    log_others = math.log(vocab_size - k)
    u = (tail_lp - log_others) * inv_temperature
    log_z = torch.logaddexp(torch.logsumexp(scaled, dim=-1), log_others + u)
    return scaled - log_z.unsqueeze(-1), u - log_z


def _entry_terms(log_q, log_p, alpha, reverse: bool, detach: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(f, q·g) per entry from log q and log p, in log space: f the entry's loss term, g = ∂f/∂q. α: [N, 1]."""
    log_alpha, log_rest = torch.log(alpha), torch.log1p(-alpha)
    if not reverse:  # f = p (log p − log m), m = αp + (1−α)q;  q·g = −p · (1−α)q/m  (share 1 where m = 0)
        weighted_q = log_rest + log_q
        log_m = torch.logaddexp(log_alpha + log_p, weighted_q)
        p = log_p.exp()
        f = torch.where(log_p == float("-inf"), 0.0, p * (log_p - log_m))
        share = torch.where(log_m == float("-inf"), 1.0, (weighted_q - log_m).exp())
        return f, -p * share
    # f = q (log q − log r), r = (1−α)p + αq;  g = log q − log r + 1 − [not detached] αq/r
    weighted_q = log_alpha + log_q
    log_r = torch.logaddexp(log_rest + log_p, weighted_q)
    q = log_q.exp()
    d = log_q - log_r
    g = d + 1.0
    if not detach:
        g = g - torch.where(log_r == float("-inf"), 0.0, (weighted_q - log_r).exp())
    zero_q = log_q == float("-inf")
    return torch.where(zero_q, 0.0, q * d), torch.where(zero_q, 0.0, q * g)


def _label_logprobs(rows: SparseRows, lse: torch.Tensor, log_p: torch.Tensor, log_c: Optional[torch.Tensor]):
    """[N, 2] (log q(y), log p(y)), 0 at ignored rows; log p(y) off the support is log c, or −inf without a
    tail. None without labels."""
    if rows.labels is None:
        return None
    kept = rows.labels != rows.ignore_index
    safe_labels = torch.where(kept, rows.labels, 0).unsqueeze(-1)
    label_log_q = _gather_rows(rows.student, safe_labels).squeeze(-1).to(lse.dtype) * rows.inv_temperature - lse
    matches = rows.ids == safe_labels
    position = matches.to(torch.int8).argmax(-1, keepdim=True)
    off_support = torch.full_like(label_log_q, float("-inf")) if log_c is None else log_c
    label_log_p = torch.where(matches.any(-1), log_p.gather(-1, position).squeeze(-1), off_support)
    return torch.where(kept.unsqueeze(-1), torch.stack([label_log_q, label_log_p], dim=-1), 0.0)


def sparse_statistics(rows: SparseRows, backend: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The student's log-sum-exp `[N]` (one sweep) and the label log-probabilities `[N, 2]` (or None)."""
    dtype = compute_dtype(rows.student)
    lse = sparse_custom_ops.student_logsumexp(rows.student, rows.labels, rows.ignore_index, rows.inv_temperature, backend)
    lse = lse.to(dtype)
    log_p, log_c = sparse_teacher_logprobs(
        rows.logprobs, rows.tail_logprob, rows.student.shape[-1], rows.tail, rows.inv_temperature, dtype
    )
    return lse, _label_logprobs(rows, lse, log_p, log_c)


class SparseForward(NamedTuple):
    """The forward of `sparse_forward`, and what its gradient needs."""

    loss: torch.Tensor  # [N], 0 at ignored rows
    label_logprobs: Optional[torch.Tensor]  # [N, 2]: log q(y), log p(y); 0 at ignored rows; None without labels
    lse: torch.Tensor  # [N] the student's log Σ exp(z/T)
    row_shift: torch.Tensor  # [N] the `student_grad` row shift
    log_tail: Optional[torch.Tensor]  # [N] log c (uniform), None (renormalize or k = V)
    support_grad: torch.Tensor  # [N, k] q_i (g_i − S) at the support (q·g − q·S): the gradient there per unit scale


def sparse_forward(
    rows: SparseRows, *, reverse: bool, detach: bool, backend: str, lse: Optional[torch.Tensor] = None
) -> SparseForward:
    """The loss rows against a sparse teacher (`lse`: the student's, when a statistics pass computed it)."""
    student, labels, ignore_index, inv_t = rows.student, rows.labels, rows.ignore_index, rows.inv_temperature
    dtype = compute_dtype(student)
    vocab, k = student.shape[-1], rows.ids.shape[-1]
    if lse is None:
        lse = sparse_custom_ops.student_logsumexp(student, labels, ignore_index, inv_t, backend)
    lse = lse.to(dtype)
    alpha = rows.alpha_rows.to(dtype).unsqueeze(-1)
    log_q = _gather_rows(student, rows.ids).to(dtype) * inv_t - lse.unsqueeze(-1)
    log_p, log_c = sparse_teacher_logprobs(rows.logprobs, rows.tail_logprob, vocab, rows.tail, inv_t, dtype)
    f, qg = _entry_terms(log_q, log_p, alpha, reverse, detach)
    loss, shift = f.sum(-1), qg.sum(-1)
    g_tail = None
    if log_c is not None:
        sums = sparse_custom_ops.tail_sums(
            student, labels, ignore_index, inv_t, lse, log_c, rows.alpha_rows, reverse, detach, backend
        ).to(dtype)
        f_c, qg_c = _entry_terms(log_q, log_c.unsqueeze(-1), alpha, reverse, detach)
        # an infinite tail (SRKL at α = 0 where the tail mass is 0) stays +inf rather than inf − inf
        tail_loss = sums[:, 0]
        loss = torch.where(tail_loss == float("inf"), tail_loss, tail_loss - f_c.sum(-1) + loss)
        shift = sums[:, 1] - qg_c.sum(-1) + shift
    elif reverse and k < vocab:  # off the support r = αq: f = −q log α, g = −log α (+ 1 detached)
        tail_q = log_remaining_mass(log_q).exp()
        log_alpha = alpha.squeeze(-1).log()
        no_mass = tail_q == 0
        loss = loss + torch.where(no_mass, 0.0, -log_alpha * tail_q)
        g_tail = 1.0 - log_alpha if detach else -log_alpha
        shift = shift + torch.where(no_mass, 0.0, g_tail * tail_q)
    if reverse and detach:
        shift = loss + 1.0  # Σ q g = L + Σ q, and Σ q = 1
    poison = lse * 0.0  # NaN for a row holding NaN or +inf (NaN or infinite lse), else 0
    loss, shift = loss + poison, shift + poison
    support_grad = qg - torch.where(log_q == float("-inf"), 0.0, log_q.exp() * shift.unsqueeze(-1)) + poison.unsqueeze(-1)
    row_shift = shift if g_tail is None else shift - g_tail

    label_logprobs = _label_logprobs(rows, lse, log_p, log_c)
    if labels is not None:
        kept = labels != ignore_index
        loss = torch.where(kept, loss, 0.0)
        row_shift = torch.where(kept, row_shift, 0.0)
        support_grad = torch.where(kept.unsqueeze(-1), support_grad, 0.0)
    return SparseForward(loss, label_logprobs, lse, row_shift.contiguous(), log_c, support_grad)


def sparse_grad(
    rows: SparseRows, forward: SparseForward, row_grad_scale: torch.Tensor, *, reverse: bool, detach: bool, backend: str
) -> torch.Tensor:
    """row_grad_scale_r · ∂loss_r/∂z `[N, V]` in the student's dtype: one `student_grad` sweep, then the k
    support entries of each row set to their values."""
    dtype = compute_dtype(rows.student)
    row_scale = (row_grad_scale.to(dtype) * rows.inv_temperature).contiguous()
    alpha_rows = rows.alpha_rows
    grad = sparse_custom_ops.student_grad(
        rows.student, rows.labels, rows.ignore_index, rows.inv_temperature, forward.lse, row_scale,
        forward.row_shift, forward.log_tail, alpha_rows, reverse, detach, backend,
    )
    support = (row_scale.unsqueeze(-1) * forward.support_grad).to(grad.dtype)
    return grad.scatter_(1, rows.ids, support)  # in place: the gradient stays the op's only [N, V] tensor


class SparseRowOutputs(NamedTuple):
    loss: torch.Tensor  # [n], compute dtype (float32; float64 for float64 logits)
    label_logprobs: Optional[torch.Tensor]  # [n, 2] log q(y), log p(y) (0 at ignored rows), or None without labels
    grad: Optional[torch.Tensor]  # [n, V] row_grad_scale_r · ∂loss_r/∂z in the student's dtype, or None


def sparse_skew_rows(
    *,
    student: torch.Tensor,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    tail_logprob: Optional[torch.Tensor],
    alpha_rows: torch.Tensor,
    labels: Optional[torch.Tensor],
    ignore_index: int,
    inv_temperature: float,
    reverse: bool,
    detach: bool,
    tail: str,
    backend: str,
    row_grad_scale: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None,
) -> SparseRowOutputs:
    """SKL (`reverse=False`) or SRKL rows of student row logits `[n, V]` / `[outer, inner, V]` against an
    already-checked sparse teacher (`ids` `[n, k]` int64, `logprobs` `[n, k]`, `tail_logprob` `[n]` or None),
    α per row, on the concrete `backend`. With `row_grad_scale` `[n]` also the gradient, scaled per row
    (the 1/T inside). `lse`: the student's log-sum-exp when known (skips its sweep)."""
    rows = SparseRows(
        student=student, ids=ids, logprobs=logprobs, tail_logprob=tail_logprob, labels=labels,
        alpha_rows=alpha_rows.to(compute_dtype(student)), ignore_index=ignore_index, inv_temperature=inv_temperature,
        tail=check_teacher_tail(tail), leading_shape=torch.Size([ids.shape[0]]),
    )
    detach = reverse and detach
    forward = sparse_forward(rows, reverse=reverse, detach=detach, backend=backend, lse=lse)
    grad = None
    if row_grad_scale is not None:
        grad = sparse_grad(rows, forward, row_grad_scale, reverse=reverse, detach=detach, backend=backend)
    return SparseRowOutputs(forward.loss, forward.label_logprobs, grad)


def check_sparse_labels(rows: SparseRows) -> None:
    """Labels must be token ids in [0, V) or ignore_index."""
    check_label_ids(rows.labels, rows.student.shape[-1], rows.ignore_index)
