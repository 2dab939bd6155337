"""Chunked pure-PyTorch SKL/SRKL: the same closed-form math as the Triton kernels, a block of rows at a time.

Runs on any device. Rows are processed in chunks sized so that each float32 temporary stays within
`CHUNK_BYTES`, so no full-size `[N, V]` float32 tensor is built; the forward keeps only `lse_s, lse_t, C`
per row and the backward recomputes the rest (see `triton_backend` for the formulas). float64 logits are
computed in float64, everything else in float32.
"""

from __future__ import annotations

import torch

from .._inputs import SkewRows

CHUNK_BYTES = 32 * 1024 * 1024  # bytes of one float32 [rows, V] temporary per chunk
STATS = 3  # lse_s, lse_t, C
# [rows, V] float32 temporaries alive at once while a block of rows is processed (measured peak, forward
# and backward), for callers that size their own row blocks, such as the fused-linear op.
ROW_TEMPORARIES = 18


def _chunks(rows: SkewRows):
    n, v = rows.num_rows, rows.vocab_size
    step = max(1, CHUNK_BYTES // (4 * v))
    for start in range(0, n, step):
        yield start, min(n, start + step)


def _compute_dtype(rows: SkewRows) -> torch.dtype:
    if rows.student.dtype == torch.float64 or rows.teacher.dtype == torch.float64:
        return torch.float64
    return torch.float32


class _Chunk:
    """The recomputable per-entry quantities of rows [start, end)."""

    def __init__(self, rows: SkewRows, start: int, end: int, dtype: torch.dtype, lse=None):
        s = rows.student[start:end].to(dtype) * rows.inv_temperature
        t = rows.teacher[start:end].to(dtype) * rows.inv_temperature
        if lse is None:
            self.lse_s, self.lse_t = torch.logsumexp(s, -1), torch.logsumexp(t, -1)
        else:
            self.lse_s, self.lse_t = lse
        self.log_q = s - self.lse_s.unsqueeze(-1)
        self.log_p = t - self.lse_t.unsqueeze(-1)
        if rows.alpha_rows is None:
            alpha = torch.tensor(rows.alpha, dtype=dtype, device=s.device)
        else:
            alpha = rows.alpha_rows[start:end].to(dtype).unsqueeze(-1)
        self.log_alpha = torch.log(alpha)
        self.log_one_minus_alpha = torch.log1p(-alpha)
        self.valid = None if rows.labels is None else rows.labels[start:end] != rows.ignore_index

    def skl_terms(self):
        """Per-entry loss terms p·(log p − log m) and p·a with a = α p / m."""
        log_m = torch.logaddexp(self.log_alpha + self.log_p, self.log_one_minus_alpha + self.log_q)
        p = self.log_p.exp()
        live = p > 0
        loss = torch.where(live, p * (self.log_p - log_m), 0.0)
        finite_m = live & (log_m > float("-inf"))
        a = torch.where(finite_m, torch.exp(self.log_alpha + self.log_p - torch.where(finite_m, log_m, 0.0)), 0.0)
        return p, loss, a

    def srkl_terms(self, detach: bool):
        """Per-entry q, d = log q − log r (0 where q = 0) and b = α q / r (0 when detached)."""
        log_r = torch.logaddexp(self.log_one_minus_alpha + self.log_p, self.log_alpha + self.log_q)
        q = self.log_q.exp()
        live = q > 0
        d = torch.where(live, self.log_q - torch.where(live, log_r, 0.0), 0.0)
        if detach:
            b = torch.zeros_like(q)
        else:
            finite_r = live & (log_r > float("-inf"))
            b = torch.where(finite_r, torch.exp(self.log_alpha + self.log_q - torch.where(finite_r, log_r, 0.0)), 0.0)
        return q, d, b


def skew_forward(rows: SkewRows, reverse: bool, detach: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss `[N]` (float32, float64 for float64 logits) and the statistics `[N, 3]`."""
    dtype = _compute_dtype(rows)
    device = rows.student.device
    loss = torch.empty(rows.num_rows, dtype=dtype, device=device)
    stats = torch.empty((rows.num_rows, STATS), dtype=dtype, device=device)
    for start, end in _chunks(rows):
        chunk = _Chunk(rows, start, end, dtype)
        if reverse:
            q, d, b = chunk.srkl_terms(detach)
            row_loss = (q * d).sum(-1)
            c = row_loss - (q * b).sum(-1)
        else:
            p, terms, a = chunk.skl_terms()
            row_loss = terms.sum(-1)
            c = (p * a).sum(-1)
        row_stats = torch.stack([chunk.lse_s, chunk.lse_t, c], dim=-1)
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
        lse_s, lse_t, c = stats[start:end].to(dtype).unbind(-1)
        chunk = _Chunk(rows, start, end, dtype, lse=(lse_s, lse_t))
        c = c.unsqueeze(-1)
        if reverse:
            q, d, b = chunk.srkl_terms(detach)
            g = q * (d - b - c)
        else:
            p, _, a = chunk.skl_terms()
            q = chunk.log_q.exp()
            g = q * (1.0 - c) - p * (1.0 - a)
        scale = grad_loss[start:end].to(dtype).unsqueeze(-1) * rows.inv_temperature
        g = g * scale
        if chunk.valid is not None:
            g = torch.where(chunk.valid.unsqueeze(-1), g, 0.0)
        grad[start:end] = g
    return grad
