"""Chunked pure-PyTorch SKL/SRKL: the same closed-form math as the Triton kernels, a block of rows at a time.

Runs on any device. Rows are processed in chunks sized so that each float32 temporary stays within
`CHUNK_BYTES`, so no full-size `[N, V]` float32 tensor is built; the forward keeps only `lse_s, lse_t, C`
per row (`max z`, `log Σ exp((z − max z)/T)` of both logits, and C) and the backward recomputes the rest (see `triton_backend` for the formulas). float64 logits are
computed in float64, everything else in float32.
"""

from __future__ import annotations

import torch

from .._inputs import SkewRows

CHUNK_BYTES = 8 * 1024 * 1024  # bytes of one float32 [rows, V] temporary per chunk
STATS = 5  # max z_s, log-sum_s, max z_t, log-sum_t, C


def _chunks(rows: SkewRows):
    n, v = rows.num_rows, rows.vocab_size
    step = max(1, CHUNK_BYTES // (4 * v))
    for start in range(0, n, step):
        yield start, min(n, start + step)


def _compute_dtype(rows: SkewRows) -> torch.dtype:
    if rows.student.dtype == torch.float64 or rows.teacher.dtype == torch.float64:
        return torch.float64
    return torch.float32


def _max_and_log_sum(z: torch.Tensor, inv_temperature: float):
    """(max z, log Σ exp((z − max z)/T)) per row; a row of −inf gives max 0 and log-sum −inf."""
    row_max = z.amax(-1)
    row_max = torch.where(row_max == float("-inf"), 0.0, row_max)
    return row_max, torch.log(torch.exp((z - row_max.unsqueeze(-1)) * inv_temperature).sum(-1))


class _Chunk:
    """The recomputable per-entry quantities of rows [start, end)."""

    def __init__(self, rows: SkewRows, start: int, end: int, dtype: torch.dtype, row_stats=None):
        s = rows.student[start:end].to(dtype)
        t = rows.teacher[start:end].to(dtype)
        if row_stats is None:
            row_stats = (*_max_and_log_sum(s, rows.inv_temperature), *_max_and_log_sum(t, rows.inv_temperature))
        self.row_stats = row_stats
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
        loss_terms = torch.where(p > 0, p * (self.log_p - log_m), 0.0)
        finite_m = log_m > float("-inf")
        a_bar = torch.exp(self.log_one_minus_alpha + self.log_q - torch.where(finite_m, log_m, 0.0))
        return p, loss_terms, torch.where(finite_m, a_bar, 1.0)

    def srkl_terms(self):
        """SRKL per entry: q, d = log q − log r (0 where q = 0), and e = (1−α) p / r."""
        log_r = torch.logaddexp(self.log_one_minus_alpha + self.log_p, self.log_alpha + self.log_q)
        q = self.log_q.exp()
        d = torch.where(q > 0, self.log_q - log_r, 0.0)
        finite_r = log_r > float("-inf")
        e = torch.exp(self.log_one_minus_alpha + self.log_p - torch.where(finite_r, log_r, 0.0))
        return q, d, torch.where(finite_r, e, 1.0)


def skew_forward(rows: SkewRows, reverse: bool, detach: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss `[N]` (float32, float64 for float64 logits) and the statistics `[N, 3]`."""
    dtype = _compute_dtype(rows)
    device = rows.student.device
    loss = torch.empty(rows.num_rows, dtype=dtype, device=device)
    stats = torch.empty((rows.num_rows, STATS), dtype=dtype, device=device)
    for start, end in _chunks(rows):
        chunk = _Chunk(rows, start, end, dtype)
        if reverse:
            q, d, e = chunk.srkl_terms()
            row_loss = (q * d).sum(-1)
            c = row_loss if detach else row_loss + (q * e).sum(-1)
        else:
            p, loss_terms, a_bar = chunk.skl_terms()
            row_loss = loss_terms.sum(-1)
            c = (p * a_bar).sum(-1)
        row_stats = torch.stack([*chunk.row_stats, c], dim=-1)
        if chunk.valid is not None:
            row_loss = torch.where(chunk.valid, row_loss, 0.0)
            row_stats = torch.where(chunk.valid.unsqueeze(-1), row_stats, 0.0)
        loss[start:end] = row_loss
        stats[start:end] = row_stats
    return loss, stats


def skew_backward(
    rows: SkewRows, reverse: bool, detach: bool, stats: torch.Tensor, grad_loss: torch.Tensor
) -> torch.Tensor:
    """Gradient w.r.t. the student logits, `[N, V]` contiguous in the student's dtype."""
    dtype = _compute_dtype(rows)
    grad = torch.empty((rows.num_rows, rows.vocab_size), dtype=rows.student.dtype, device=rows.student.device)
    for start, end in _chunks(rows):
        *row_stats, c = stats[start:end].to(dtype).unbind(-1)
        chunk = _Chunk(rows, start, end, dtype, row_stats=row_stats)
        c = c.unsqueeze(-1)
        if reverse:
            q, d, e = chunk.srkl_terms()
            g = torch.where(q > 0, q * (d - c if detach else d + e - c), 0.0)
        else:
            p, _, a_bar = chunk.skl_terms()
            g = chunk.log_q.exp() * c - p * a_bar
        scale = grad_loss[start:end].to(dtype).unsqueeze(-1) * rows.inv_temperature
        g = g * scale
        if chunk.valid is not None:
            g = torch.where(chunk.valid.unsqueeze(-1), g, 0.0)
        grad[start:end] = g
    return grad
