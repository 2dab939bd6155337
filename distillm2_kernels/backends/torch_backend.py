"""Chunked pure-PyTorch SKL/SRKL: the same closed-form math as the Triton kernels, a block of rows at a time.

Runs on any device, in eager mode (it is the path where no C++ compiler exists, and torch.compile's CPU
backend needs one). Rows are processed in chunks sized so that each float32 temporary stays within
`CHUNK_BYTES` (1 MiB: the few temporaries of a chunk stay in the CPU's caches), so no full-size `[N, V]`
float32 tensor is built. The forward keeps the seven row statistics of `triton_backend` (max z and
log Σ exp((z − max z)/T) of both logits, the row constant C, the label tokens' log-probabilities) and the
backward recomputes the rest. float64 logits are computed in float64, everything else in float32.

Per entry, with x = (z − max z)/T and L the row's log-sum, the mixtures are formed in log space relative to
the distribution that weighs each loss (docs/design.md §2.1, §2.3):

    SKL:   w = log((1−α) q / p) = x_s − x_t + (L_t − L_s + log(1−α)),   λ = log(m / p) = logaddexp(w, log α)
           loss = −Σ p·λ,   ā = (1−α) q / m = exp(w − λ),   C = Σ p·ā,   ∂/∂z_s = q·C − p·ā
    SRKL:  w = log((1−α) p / q),   μ = log(r / q) = logaddexp(w, log α),   d = −μ,   e = exp(w − μ)
           loss = Σ q·d,   C = loss (+ Σ q·e unless detached),   ∂/∂z_s = q·(d (+ e) − C)

one logaddexp and at most one exp per entry beyond the two softmax exps, in place where possible. Guards
(docs/design.md §2.2): where the weighing probability is exactly 0 (a −inf logit, or an underflow), w is +inf
or NaN and λ (μ) is set to 0, so the entry contributes exactly 0; ā (e) is 1 where it is NaN (a zero
mixture, or a zero weighing probability, which multiplies it by 0). A row holding NaN or +inf has a NaN
log-sum, which is added (times 0) to its loss and C, so its loss and its whole gradient row are NaN.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._inputs import SkewRows, compute_dtype
from ..statistics import STATS, RowStat

CHUNK_BYTES = 1024 * 1024  # bytes of one float32 [rows, V] temporary per chunk
# [rows, V] float32 temporaries alive at once while a block of rows is processed (measured peak, forward
# and backward), for callers that size their own row blocks, such as the fused-linear op.
ROW_TEMPORARIES = 8

_NEG_INF = float("-inf")


def _chunks(rows: SkewRows):
    """(start, end, student rows [end − start, V], teacher rows) in the logits' own dtypes, over blocks of
    rows. Blocks of `[N, V]` logits, and blocks within one outer index of `[outer, inner, V]` logits, are
    views; blocks of whole outer indices are flattened, a copy of the block at most, never of the whole
    tensor."""
    n, v = rows.num_rows, rows.vocab_size
    step = max(1, CHUNK_BYTES // (4 * v))
    if rows.student.dim() == 2:
        for start in range(0, n, step):
            end = min(n, start + step)
            yield start, end, rows.student[start:end], rows.teacher[start:end]
        return
    inner = rows.student.shape[1]
    if step < inner:
        for outer in range(rows.student.shape[0]):
            for a in range(0, inner, step):
                b = min(inner, a + step)
                start = outer * inner
                yield start + a, start + b, rows.student[outer, a:b], rows.teacher[outer, a:b]
        return
    outer_step = step // inner
    for a in range(0, rows.student.shape[0], outer_step):
        b = min(rows.student.shape[0], a + outer_step)
        yield a * inner, b * inner, rows.student[a:b].reshape(-1, v), rows.teacher[a:b].reshape(-1, v)


def _any(mask: torch.Tensor) -> bool:
    """Whether `mask` holds a True, for a rare special case: read on CPU (no device to wait for); elsewhere
    assumed True, so that no host synchronisation happens (the general path is exact, only slower)."""
    return bool(mask.any()) if mask.device.type == "cpu" else True


def _row_max(z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """max z per row `[R, 1]` in `dtype`, 0 for a row of −inf (NaN for a row holding NaN)."""
    row_max = z.amax(-1, keepdim=True).to(dtype)
    return row_max.masked_fill_(row_max == _NEG_INF, 0.0)


def _shifted(z: torch.Tensor, row_max: torch.Tensor, inv_temperature: float) -> torch.Tensor:
    """x = (z − max z)/T, a new `[R, V]` tensor in row_max's dtype (z is read in its own dtype)."""
    x = z.to(row_max.dtype, copy=True).sub_(row_max) if z.dtype != row_max.dtype else torch.sub(z, row_max)
    if inv_temperature != 1.0:
        x.mul_(inv_temperature)
    return x


class _Block:
    """The shifted logits x_s, x_t and exp(x_s), exp(x_t) of rows [start, end), their row statistics, and the
    block's α as log α and log(1−α) (0-d or `[R, 1]`)."""

    def __init__(self, rows: SkewRows, start: int, end: int, s, t, dtype: torch.dtype, stats=None,
                 teacher_exp: bool = True):
        if stats is None:
            self.max_s, self.max_t = _row_max(s, dtype), _row_max(t, dtype)
        else:
            self.max_s, self.max_t = stats[:, RowStat.MAX_S, None].to(dtype), stats[:, RowStat.MAX_T, None].to(dtype)
        self.x_s = _shifted(s, self.max_s, rows.inv_temperature)
        self.x_t = _shifted(t, self.max_t, rows.inv_temperature)
        self.exp_s = torch.exp(self.x_s)
        self.exp_t = torch.exp(self.x_t) if teacher_exp else None
        if stats is None:
            self.log_sum_s = self.exp_s.sum(-1, keepdim=True).log_()
            self.log_sum_t = self.exp_t.sum(-1, keepdim=True).log_()
        else:
            self.log_sum_s, self.log_sum_t = stats[:, RowStat.LOG_SUM_S, None].to(dtype), stats[:, RowStat.LOG_SUM_T, None].to(dtype)
        if rows.alpha_rows is None:
            alpha = torch.tensor(rows.alpha, dtype=dtype, device=s.device)
        else:
            alpha = rows.alpha_rows[start:end].to(dtype).unsqueeze(-1)
        self.alpha, self.one_minus_alpha = alpha, 1.0 - alpha
        self.log_alpha, self.log_one_minus_alpha = torch.log(alpha), torch.log1p(-alpha)
        self.valid = None if rows.labels is None else rows.labels[start:end] != rows.ignore_index
        # 0, or NaN for a row holding NaN or +inf (NaN log-sum)
        self.poison = (self.log_sum_s + self.log_sum_t).mul_(0.0).squeeze(-1)

    def alpha_may_be_zero(self, rows: SkewRows, start: int, end: int) -> bool:
        if rows.alpha_rows is None:
            return rows.alpha == 0.0
        return _any(rows.alpha_rows[start:end] == 0)

    def statistics(self, rows: SkewRows, start: int, end: int) -> torch.Tensor:
        """The block's `[R, STATS]` statistics, column `RowStat.C` 0."""
        zeros = torch.zeros_like(self.max_s)
        columns = [self.max_s, self.log_sum_s, self.max_t, self.log_sum_t, zeros]
        if rows.labels is None:
            columns += [zeros, zeros]
        else:
            labels = rows.labels[start:end].unsqueeze(-1)
            in_vocab = (labels >= 0) & (labels < rows.vocab_size)
            index = torch.where(in_vocab, labels, 0)
            for x, log_sum in ((self.x_s, self.log_sum_s), (self.x_t, self.log_sum_t)):
                columns.append(torch.where(in_vocab, x.gather(-1, index) - log_sum, float("nan")))
        stats = torch.cat(columns, dim=-1)
        if self.valid is not None:
            stats = torch.where(self.valid.unsqueeze(-1), stats, 0.0)
        return stats

    def student_probabilities(self, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """q (times a per-row `scale`), in place of exp(x_s)."""
        factor = torch.exp(-self.log_sum_s)
        return self.exp_s.mul_(factor if scale is None else factor * scale)

    def teacher_probabilities(self) -> torch.Tensor:
        """p, in place of exp(x_t)."""
        return self.exp_t.mul_(torch.exp(-self.log_sum_t))

    def weighted_log_ratio(self, reverse: bool) -> torch.Tensor:
        """w = log((1−α)·other/weight): SKL log((1−α) q / p), SRKL log((1−α) p / q)."""
        if reverse:
            return torch.sub(self.x_t, self.x_s).add_(self.log_sum_s - self.log_sum_t + self.log_one_minus_alpha)
        return torch.sub(self.x_s, self.x_t).add_(self.log_sum_t - self.log_sum_s + self.log_one_minus_alpha)

    def log_mixture_ratio(self, reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(w, logaddexp(w, log α)) with w = log((1−α)·other/weight): SKL (weight p) λ = log(m/p), SRKL
        (weight q) μ = log(r/q). x_s and x_t are left as they are."""
        w = self.weighted_log_ratio(reverse)
        return w, torch.logaddexp(w, self.log_alpha)


def _zero_where_weight_is_zero(log_ratio: torch.Tensor) -> torch.Tensor:
    """λ (μ) in place: 0 where the weighing probability is exactly 0 (there it is +inf or NaN, and only
    there: a finite log-probability gives a finite ratio or, for a zero mixture, −inf)."""
    return log_ratio.nan_to_num_(nan=0.0, posinf=0.0, neginf=_NEG_INF)


def _share(w: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """ā = exp(w − λ) (SKL) or e = exp(w − μ) (SRKL) in place of w: the other distribution's share of the
    mixture, 1 where that is NaN (a zero mixture, or a zero weight, which multiplies it by 0)."""
    return w.sub_(log_ratio).exp_().nan_to_num_(nan=1.0, posinf=1.0)


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_v a·b per row, b overwritten."""
    return b.mul_(a).sum(-1)


def skew_statistics(rows: SkewRows) -> torch.Tensor:
    """Sweep 1: the row statistics `[N, STATS]` (column `RowStat.C` is 0 until `skew_forward` fills it)."""
    dtype = compute_dtype(rows.student, rows.teacher)
    stats = torch.empty((rows.num_rows, STATS), dtype=dtype, device=rows.student.device)
    for start, end, s, t in _chunks(rows):
        stats[start:end] = _Block(rows, start, end, s, t, dtype).statistics(rows, start, end)
    return stats


def skew_forward(
    rows: SkewRows, reverse: bool, detach: bool, stats: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss `[N]` (float32, float64 for float64 logits) and the statistics `[N, STATS]`. `stats` from
    `skew_statistics` on the same rows skips sweep 1 (it is not modified); the result is the same either way."""
    dtype = compute_dtype(rows.student, rows.teacher) if stats is None else stats.dtype
    out_stats = torch.empty((rows.num_rows, STATS), dtype=dtype, device=rows.student.device)
    if stats is not None:
        out_stats.copy_(stats)
    loss = torch.empty(rows.num_rows, dtype=dtype, device=rows.student.device)
    for start, end, s, t in _chunks(rows):
        given = None if stats is None else out_stats[start:end]
        block = _Block(rows, start, end, s, t, dtype, stats=given)
        if stats is None:
            out_stats[start:end] = block.statistics(rows, start, end)
        if block.alpha_may_be_zero(rows, start, end):
            row_loss, c = _forward_terms(block, reverse, detach)
        else:
            row_loss, c = _positive_alpha_forward_terms(block, reverse, detach)
        if block.valid is not None:
            row_loss = torch.where(block.valid, row_loss, 0.0)
            c = torch.where(block.valid, c, 0.0)
        loss[start:end] = row_loss
        out_stats[start:end, RowStat.C] = c
    return loss, out_stats


def _mixture_over_weight(block: _Block, reverse: bool, share: bool):
    """For α > 0: (the other distribution's share of the mixture, ā or e, or None; log(mixture/weight), λ or
    μ), as E = exp(w), M = α + E, share = E/M, log M. M ≥ α > 0; where the weight is 0 (w = +inf or NaN) or
    tiny (exp(w) overflows: weight < 1e-38·other), log M is set to 0 and the share to 1: the entry contributes
    0, or at most 1e-38·|w| of its weight's row sum."""
    ratio = block.weighted_log_ratio(reverse).exp_()
    mixture = ratio + block.alpha
    shares = ratio.div_(mixture).nan_to_num_(nan=1.0) if share else None
    return shares, mixture.log_().nan_to_num_(nan=0.0, posinf=0.0)


def _positive_alpha_forward_terms(block: _Block, reverse: bool, detach: bool):
    """(row loss, C) of a block whose α is positive: no zero mixture."""
    shares, log_ratio = _mixture_over_weight(block, reverse, share=not (reverse and detach))
    if reverse:
        q = block.student_probabilities()
        row_loss = -_row_dot(q, log_ratio) + block.poison  # Σ q·d, d = −μ
        c = row_loss if detach else row_loss + _row_dot(q, shares)
    else:
        p = block.teacher_probabilities()
        row_loss = -_row_dot(p, log_ratio) + block.poison  # Σ p·(log p − log m)
        c = _row_dot(p, shares) + block.poison
    return row_loss, c


def _forward_terms(block: _Block, reverse: bool, detach: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(row loss, C) of a block, for any α in [0, 1], zero mixtures (α = 0) included."""
    w, log_ratio = block.log_mixture_ratio(reverse)
    _zero_where_weight_is_zero(log_ratio)
    if reverse:
        q = block.student_probabilities()
        e = None if detach else _share(w, log_ratio)
        row_loss = -_row_dot(q, log_ratio) + block.poison  # Σ q·d, d = −μ
        c = row_loss if detach else row_loss + _row_dot(q, e)
    else:
        p = block.teacher_probabilities()
        a_bar = _share(w, log_ratio)
        row_loss = -_row_dot(p, log_ratio) + block.poison  # Σ p·(log p − log m)
        c = _row_dot(p, a_bar) + block.poison
    return row_loss, c


def skew_backward(
    rows: SkewRows, reverse: bool, detach: bool, stats: torch.Tensor, grad_loss: torch.Tensor
) -> torch.Tensor:
    """Gradient w.r.t. the student logits, `[N, V]` contiguous in the student's dtype."""
    dtype = compute_dtype(rows.student, rows.teacher)
    grad = torch.empty((rows.num_rows, rows.vocab_size), dtype=rows.student.dtype, device=rows.student.device)
    for start, end, s, t in _chunks(rows):
        chunk_stats = stats[start:end].to(dtype)
        block = _Block(rows, start, end, s, t, dtype, stats=chunk_stats, teacher_exp=False)
        c = chunk_stats[:, RowStat.C, None]
        scale = grad_loss[start:end].to(dtype).unsqueeze(-1) * rows.inv_temperature
        rows_grad = grad[start:end]
        if block.alpha_may_be_zero(rows, start, end):
            _exact_gradient(block, reverse, detach, c, scale, rows_grad)
        elif reverse:
            _srkl_gradient(block, detach, c, scale, rows_grad)
        else:
            _skl_gradient(block, c, scale, rows_grad)
        if block.valid is not None and _any(~block.valid):
            rows_grad.masked_fill_(~block.valid.unsqueeze(-1), 0.0)
    return grad


def _skl_gradient(block: _Block, c, scale, out) -> None:
    """out = (q·C − p·ā)·scale = (C − E)·q·scale with E = (1−α) p / m = (1−α)/M, M = α + exp(w) (α > 0).
    M = +inf where p = 0 or tiny (E = 0), NaN where p = q = 0 (E := 0)."""
    mixture = block.weighted_log_ratio(reverse=False).exp_().add_(block.alpha)
    q = block.student_probabilities(scale)
    share = torch.div(block.one_minus_alpha, mixture, out=mixture).nan_to_num_(nan=0.0)
    torch.mul(torch.sub(c, share, out=share), q, out=out)


def _srkl_gradient(block: _Block, detach: bool, c, scale, out) -> None:
    """out = q·(d (+ e) − C)·scale with d = −μ (0 where q = 0) and e the share, for α > 0."""
    shares, log_ratio = _mixture_over_weight(block, reverse=True, share=not detach)
    q = block.student_probabilities(scale)
    if detach:
        torch.mul(log_ratio.add_(c), q.neg_(), out=out)  # −(μ + C)·q
    else:
        torch.mul(shares.sub_(log_ratio).sub_(c), q, out=out)  # (e + d − C)·q


def _exact_gradient(block: _Block, reverse: bool, detach: bool, c, scale, out) -> None:
    """The gradient for any α in [0, 1], zero mixtures (α = 0) included."""
    w, log_ratio = block.log_mixture_ratio(reverse)
    q = block.student_probabilities()
    if reverse:
        _zero_where_weight_is_zero(log_ratio)  # d = −μ, 0 where q = 0
        g = log_ratio.neg_() if detach else _share(w, log_ratio).sub_(log_ratio)  # d (+ e)
        g.sub_(c).mul_(q)
        # a zero mixture makes C infinite: a zero q still gets 0 (NaN where C is NaN)
        zero_probability_grad = torch.where(c.isnan(), float("nan"), 0.0)
        g = torch.where(q == 0, zero_probability_grad, g)
    else:
        block.exp_t = torch.exp(block.x_t)
        p = block.teacher_probabilities()
        g = q.mul_(c).sub_(_share(w, log_ratio).mul_(p))  # q·C − p·ā
    torch.mul(g, scale, out=out)


def skew_forward_and_grad(
    rows: SkewRows, reverse: bool, detach: bool, row_grad_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`skew_forward` and `skew_backward(rows, reverse, detach, stats, row_grad_scale)` in one sweep: (loss
    `[N]`, statistics `[N, STATS]`, gradient `[N, V]`). Each block's gradient is formed from the forward's own
    per-entry quantities while they are in cache (for α > 0; a block whose α may be 0 is recomputed)."""
    dtype = compute_dtype(rows.student, rows.teacher)
    device = rows.student.device
    stats = torch.empty((rows.num_rows, STATS), dtype=dtype, device=device)
    loss = torch.empty(rows.num_rows, dtype=dtype, device=device)
    grad = torch.empty((rows.num_rows, rows.vocab_size), dtype=rows.student.dtype, device=device)
    for start, end, s, t in _chunks(rows):
        block = _Block(rows, start, end, s, t, dtype)
        chunk_stats = block.statistics(rows, start, end)
        scale = row_grad_scale[start:end].to(dtype).unsqueeze(-1) * rows.inv_temperature
        rows_grad = grad[start:end]
        if block.alpha_may_be_zero(rows, start, end):
            row_loss, c = _forward_terms(block, reverse, detach)
            c = c if block.valid is None else torch.where(block.valid, c, 0.0)
            chunk_stats[:, RowStat.C] = c
            block = None  # its temporaries go before the gradient's block is built
            block = _Block(rows, start, end, s, t, dtype, stats=chunk_stats, teacher_exp=False)
            _exact_gradient(block, reverse, detach, chunk_stats[:, RowStat.C, None], scale, rows_grad)
        else:
            row_loss, c = _positive_alpha_forward_and_grad(block, reverse, detach, scale, rows_grad)
        if block.valid is not None:
            row_loss = torch.where(block.valid, row_loss, 0.0)
            c = torch.where(block.valid, c, 0.0)
            if _any(~block.valid):
                rows_grad.masked_fill_(~block.valid.unsqueeze(-1), 0.0)
        chunk_stats[:, RowStat.C] = c
        stats[start:end] = chunk_stats
        loss[start:end] = row_loss
    return loss, stats, grad


def _positive_alpha_forward_and_grad(block: _Block, reverse: bool, detach: bool, scale, out):
    """(row loss, C) of a block whose α is positive, and its gradient times `scale` into `out`."""
    shares, log_ratio = _mixture_over_weight(block, reverse, share=not (reverse and detach))
    if reverse:
        q = block.student_probabilities()
        row_loss = -torch.linalg.vecdot(q, log_ratio) + block.poison  # Σ q·d, d = −μ
        c = row_loss if detach else row_loss + torch.linalg.vecdot(q, shares)
        g = log_ratio.neg_() if detach else shares.sub_(log_ratio)  # d (+ e)
        torch.mul(g.sub_(c.unsqueeze(-1)), q.mul_(scale), out=out)
    else:
        p = block.teacher_probabilities()
        row_loss = -torch.linalg.vecdot(p, log_ratio) + block.poison  # Σ p·(log p − log m)
        c = torch.linalg.vecdot(p, shares) + block.poison
        q = block.student_probabilities(scale * c.unsqueeze(-1))  # q·C·scale
        torch.sub(q, shares.mul_(p).mul_(scale), out=out)  # (q·C − p·ā)·scale
    return row_loss, c
