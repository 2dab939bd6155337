"""Chunked pure-PyTorch SKL/SRKL: the same closed-form math as the Triton kernels, a block of rows at a time.

Runs on any device. Rows are processed in chunks sized so that each float32 temporary stays within
`CHUNK_BYTES`, so no full-size `[N, V]` float32 tensor is built. The forward keeps the seven row statistics
of `triton_backend` (max z and log Σ exp((z − max z)/T) of both logits, the row constant C, the label
tokens' log-probabilities) and the backward recomputes the rest (see `triton_backend` for the formulas).
float64 logits are computed in float64, everything else in float32. A row holding NaN or +inf gets NaN
statistics, so its loss and its whole gradient row are NaN (the guards test `p == 0`, false for NaN).
"""

from __future__ import annotations

from typing import Optional

import torch

from .._inputs import SkewRows, compute_dtype
from ..statistics import STATS, RowStat

CHUNK_BYTES = 8 * 1024 * 1024  # bytes of one float32 [rows, V] temporary per chunk
# [rows, V] float32 temporaries alive at once while a block of rows is processed (measured peak, forward
# and backward), for callers that size their own row blocks, such as the fused-linear op.
ROW_TEMPORARIES = 18


def _chunks(rows: SkewRows, dtype: torch.dtype):
    """(start, end, student rows [end − start, V], teacher rows) in `dtype`, over blocks of rows. Blocks of
    `[N, V]` logits, and blocks within one outer index of `[outer, inner, V]` logits, are views (unless
    converted to `dtype`); blocks of whole outer indices are flattened, a copy of the block at most (one
    with the conversion), never of the whole tensor."""
    n, v = rows.num_rows, rows.vocab_size
    step = max(1, CHUNK_BYTES // (4 * v))
    if rows.student.dim() == 2:
        for start in range(0, n, step):
            end = min(n, start + step)
            yield start, end, rows.student[start:end].to(dtype), rows.teacher[start:end].to(dtype)
        return
    inner = rows.student.shape[1]
    if step < inner:
        for outer in range(rows.student.shape[0]):
            for a in range(0, inner, step):
                b = min(inner, a + step)
                start = outer * inner
                yield start + a, start + b, rows.student[outer, a:b].to(dtype), rows.teacher[outer, a:b].to(dtype)
        return
    outer_step = step // inner
    for a in range(0, rows.student.shape[0], outer_step):
        b = min(rows.student.shape[0], a + outer_step)
        student, teacher = rows.student[a:b].to(dtype), rows.teacher[a:b].to(dtype)
        yield a * inner, b * inner, student.reshape(-1, v), teacher.reshape(-1, v)


def _max_and_log_sum(z: torch.Tensor, inv_temperature: float):
    """(max z, log Σ exp((z − max z)/T)) per row; a row of −inf gives max 0 and log-sum −inf, a row holding
    NaN or +inf gives log-sum NaN."""
    row_max = z.amax(-1)
    row_max = torch.where(row_max == float("-inf"), 0.0, row_max)
    log_sum = torch.log(torch.exp((z - row_max.unsqueeze(-1)) * inv_temperature).sum(-1))
    return row_max, torch.where(row_max == float("inf"), float("nan"), log_sum)


class _Chunk:
    """The recomputable per-entry quantities of rows [start, end)."""

    def __init__(self, rows: SkewRows, start: int, end: int, s, t, dtype: torch.dtype, row_stats):
        max_s, log_sum_s, max_t, log_sum_t = (x.unsqueeze(-1) for x in row_stats)
        self.log_q = (s - max_s) * rows.inv_temperature - log_sum_s
        self.log_p = (t - max_t) * rows.inv_temperature - log_sum_t
        if rows.alpha_rows is None:
            alpha = torch.tensor(rows.alpha, dtype=dtype, device=s.device)
        else:
            alpha = rows.alpha_rows[start:end].to(dtype).unsqueeze(-1)
        self.log_alpha = torch.log(alpha)
        self.log_one_minus_alpha = torch.log1p(-alpha)
        self.valid = None if rows.labels is None else rows.labels[start:end] != rows.ignore_index

    def skl_terms(self):
        """SKL per entry: p, the loss terms p·(log p − log m), and ā = (1−α) q / m."""
        log_m = torch.logaddexp(self.log_alpha + self.log_p, self.log_one_minus_alpha + self.log_q)
        p = self.log_p.exp()
        loss_terms = torch.where(p == 0, 0.0, p * (self.log_p - log_m))
        empty_m = log_m == float("-inf")
        a_bar = torch.exp(self.log_one_minus_alpha + self.log_q - torch.where(empty_m, 0.0, log_m))
        return p, loss_terms, torch.where(empty_m, 1.0, a_bar)

    def srkl_terms(self):
        """SRKL per entry: q, d = log q − log r (0 where q = 0), and e = (1−α) p / r."""
        log_r = torch.logaddexp(self.log_one_minus_alpha + self.log_p, self.log_alpha + self.log_q)
        q = self.log_q.exp()
        d = torch.where(q == 0, 0.0, self.log_q - log_r)
        empty_r = log_r == float("-inf")
        e = torch.exp(self.log_one_minus_alpha + self.log_p - torch.where(empty_r, 0.0, log_r))
        return q, d, torch.where(empty_r, 1.0, e)


def _label_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits[row, label] per row, NaN for a label outside [0, V)."""
    in_vocab = (labels >= 0) & (labels < logits.shape[-1])
    picked = logits.gather(-1, torch.where(in_vocab, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(in_vocab, picked, float("nan"))


def skew_statistics(rows: SkewRows) -> torch.Tensor:
    """Sweep 1: the row statistics `[N, STATS]` (column `RowStat.C` is 0 until `skew_forward` fills it)."""
    dtype = compute_dtype(rows.student, rows.teacher)
    stats = torch.empty((rows.num_rows, STATS), dtype=dtype, device=rows.student.device)
    for start, end, s, t in _chunks(rows, dtype):
        max_s, log_sum_s = _max_and_log_sum(s, rows.inv_temperature)
        max_t, log_sum_t = _max_and_log_sum(t, rows.inv_temperature)
        columns = [max_s, log_sum_s, max_t, log_sum_t, torch.zeros_like(max_s)]
        if rows.labels is None:
            columns += [torch.zeros_like(max_s), torch.zeros_like(max_s)]
        else:
            labels = rows.labels[start:end]
            columns += [(_label_logits(s, labels) - max_s) * rows.inv_temperature - log_sum_s]
            columns += [(_label_logits(t, labels) - max_t) * rows.inv_temperature - log_sum_t]
        chunk_stats = torch.stack(columns, dim=-1)
        if rows.labels is not None:
            valid = (rows.labels[start:end] != rows.ignore_index).unsqueeze(-1)
            chunk_stats = torch.where(valid, chunk_stats, 0.0)
        stats[start:end] = chunk_stats
    return stats


def skew_forward(
    rows: SkewRows, reverse: bool, detach: bool, stats: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss `[N]` (float32, float64 for float64 logits) and the statistics `[N, STATS]`. `stats` from
    `skew_statistics` on the same rows skips sweep 1 (it is not modified)."""
    stats = skew_statistics(rows) if stats is None else stats.clone()
    dtype = stats.dtype
    loss = torch.empty(rows.num_rows, dtype=dtype, device=rows.student.device)
    for start, end, s, t in _chunks(rows, dtype):
        chunk = _Chunk(rows, start, end, s, t, dtype, row_stats=stats[start:end, : RowStat.C].unbind(-1))
        if reverse:
            q, d, e = chunk.srkl_terms()
            row_loss = (q * d).sum(-1)
            c = row_loss if detach else row_loss + (q * e).sum(-1)
        else:
            p, loss_terms, a_bar = chunk.skl_terms()
            row_loss = loss_terms.sum(-1)
            c = (p * a_bar).sum(-1)
        if chunk.valid is not None:
            row_loss = torch.where(chunk.valid, row_loss, 0.0)
            c = torch.where(chunk.valid, c, 0.0)
        loss[start:end] = row_loss
        stats[start:end, RowStat.C] = c
    return loss, stats


def skew_backward(
    rows: SkewRows, reverse: bool, detach: bool, stats: torch.Tensor, grad_loss: torch.Tensor
) -> torch.Tensor:
    """Gradient w.r.t. the student logits, `[N, V]` contiguous in the student's dtype."""
    dtype = compute_dtype(rows.student, rows.teacher)
    grad = torch.empty((rows.num_rows, rows.vocab_size), dtype=rows.student.dtype, device=rows.student.device)
    for start, end, s, t in _chunks(rows, dtype):
        chunk_stats = stats[start:end].to(dtype)
        chunk = _Chunk(rows, start, end, s, t, dtype, row_stats=chunk_stats[:, : RowStat.C].unbind(-1))
        c = chunk_stats[:, RowStat.C, None]
        if reverse:
            q, d, e = chunk.srkl_terms()
            # a zero probability gets 0, NaN in a row holding NaN or +inf (whose C is NaN)
            zero_probability_grad = torch.where(c.isnan(), float("nan"), 0.0)
            g = torch.where(q == 0, zero_probability_grad, q * (d - c if detach else d + e - c))
        else:
            p, _, a_bar = chunk.skl_terms()
            g = chunk.log_q.exp() * c - p * a_bar
        scale = grad_loss[start:end].to(dtype).unsqueeze(-1) * rows.inv_temperature
        g = g * scale
        if chunk.valid is not None:
            g = torch.where(chunk.valid.unsqueeze(-1), g, 0.0)
        grad[start:end] = g
    return grad
