"""The dense sweeps of the sparse-teacher ops in chunked pure PyTorch: the spec of every sparse backend.

A sparse teacher gives, per row, k token ids with their log-probabilities; the other V − k tokens carry the
tail, either nothing ("renormalize") or one shared per-token probability c ("uniform"). Only the student is
dense, so only three sweeps touch `[N, V]` memory; everything per support entry (`[N, k]`) is done by the
caller (`sparse_teacher`). With log q_v = z_v/T − lse (student, row r), α = alpha_rows[r] and c =
exp(log_tail[r]) (the tail token's tempered teacher probability):

    student_logsumexp   lse_r = log Σ_v exp(z_v/T)
    tail_sums           Σ_v f_v and Σ_v q_v·g_v over ALL v (the caller removes the support entries):
                        SKL   f = c·(log c − log m),   m = αc + (1−α)q,   g = −(1−α)·c/m
                        SRKL  f = q·(log q − log r),   r = (1−α)c + αq,   g = log q + 1 − log r − [not detach] αq/r
    student_grad        grad_v = row_scale_r · q_v · (g_v − row_shift_r), g as above with a tail, g = 0 without

g_v is ∂(row loss)/∂q_v of a tail entry. Conventions: q_v = 0 gives f_v = 0, q_v·g_v = 0 and grad_v = 0;
c = 0 gives SKL's f = g = 0; rows whose label is `ignore_index` give lse = 0, sums 0 and a zero gradient.
Student rows are `[N, V]` (any row stride, unit column stride) or `[outer, inner, V]` (`_inputs.row_layout`).
float64 logits are computed in float64, everything else in float32.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from .._inputs import compute_dtype

CHUNK_BYTES = 1024 * 1024  # bytes of one float32 [rows, V] temporary per chunk

__all__ = ["student_logsumexp", "tail_sums", "student_grad"]


def _row_blocks(student: torch.Tensor) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(start, end, student rows [end − start, V]) over blocks of rows, views where the layout allows."""
    v = student.shape[-1]
    step = max(1, CHUNK_BYTES // (4 * v))
    if student.dim() == 2:
        for start in range(0, student.shape[0], step):
            yield start, min(student.shape[0], start + step), student[start : start + step]
        return
    inner = student.shape[1]
    for outer in range(student.shape[0]):
        for a in range(0, inner, step):
            b = min(inner, a + step)
            yield outer * inner + a, outer * inner + b, student[outer, a:b]


def _kept(labels: Optional[torch.Tensor], ignore_index: int, start: int, end: int) -> Optional[torch.Tensor]:
    """[rows, 1] bool of the counted rows of a block, or None when every row counts."""
    if labels is None:
        return None
    return (labels[start:end] != ignore_index).unsqueeze(-1)


def _log_q(block: torch.Tensor, lse: torch.Tensor, inv_temperature: float, dtype: torch.dtype) -> torch.Tensor:
    return block.to(dtype) * inv_temperature - lse.unsqueeze(-1).to(dtype)


def _tail_terms(log_q, log_c, alpha, reverse: bool, detach: bool):
    """(f, q·g, g) of every entry of a block, with the zero conventions of the module docstring."""
    q = log_q.exp()
    c = log_c.exp()
    # the guards test for an exact zero, which a NaN fails, so that a NaN propagates (docs/design.md §2.2)
    if not reverse:
        m = alpha * c + (1 - alpha) * q
        c_zero = c == 0
        log_m = torch.where(alpha == 1, log_c, torch.where(c_zero, 1.0, m).log())  # α = 1: m = c, f = 0 exactly
        f = torch.where(c_zero, 0.0, c * (log_c - log_m))
        g = torch.where(c_zero, 0.0, -(1 - alpha) * c / torch.where(c_zero, 1.0, m))
    else:
        r = (1 - alpha) * c + alpha * q
        q_zero = q == 0
        safe_r = torch.where(q_zero, 1.0, r)
        log_r = torch.where(alpha == 1, log_q, safe_r.log())  # α = 1: r = q, f = 0 exactly
        f = torch.where(q_zero, 0.0, q * (log_q - log_r))
        g = log_q + 1 - log_r
        if not detach:
            g = g - alpha * q / safe_r
        g = torch.where(q_zero, 0.0, g)
    return f, torch.where(q == 0, 0.0, q * g), g


def student_logsumexp(
    student: torch.Tensor, labels: Optional[torch.Tensor], ignore_index: int, inv_temperature: float
) -> torch.Tensor:
    """lse [N] = log Σ_v exp(z_v/T) per row, 0 for ignored rows; float32 (float64 for float64 logits)."""
    dtype = compute_dtype(student)
    n = student.shape[0] if student.dim() == 2 else student.shape[0] * student.shape[1]
    lse = torch.empty(n, dtype=dtype, device=student.device)
    for start, end, block in _row_blocks(student):
        values = torch.logsumexp(block.to(dtype) * inv_temperature, dim=-1)
        kept = _kept(labels, ignore_index, start, end)
        lse[start:end] = values if kept is None else torch.where(kept.squeeze(-1), values, 0.0)
    return lse


def tail_sums(
    student: torch.Tensor,
    labels: Optional[torch.Tensor],
    ignore_index: int,
    inv_temperature: float,
    lse: torch.Tensor,
    log_tail: torch.Tensor,
    alpha_rows: torch.Tensor,
    reverse: bool,
    detach: bool,
) -> torch.Tensor:
    """[N, 2]: (Σ_v f_v, Σ_v q_v·g_v) over all V entries of each row, 0 for ignored rows."""
    dtype = lse.dtype
    out = torch.empty(lse.shape[0], 2, dtype=dtype, device=lse.device)
    for start, end, block in _row_blocks(student):
        log_q = _log_q(block, lse[start:end], inv_temperature, dtype)
        log_c = log_tail[start:end].to(dtype).unsqueeze(-1)
        alpha = alpha_rows[start:end].to(dtype).unsqueeze(-1)
        f, qg, _ = _tail_terms(log_q, log_c, alpha, reverse, detach)
        sums = torch.stack([f.sum(-1), qg.sum(-1)], dim=-1)
        kept = _kept(labels, ignore_index, start, end)
        out[start:end] = sums if kept is None else torch.where(kept, sums, 0.0)
    return out


def student_grad(
    student: torch.Tensor,
    labels: Optional[torch.Tensor],
    ignore_index: int,
    inv_temperature: float,
    lse: torch.Tensor,
    row_scale: torch.Tensor,
    row_shift: torch.Tensor,
    log_tail: Optional[torch.Tensor],
    alpha_rows: torch.Tensor,
    reverse: bool,
    detach: bool,
) -> torch.Tensor:
    """grad [N, V] = row_scale · q · (g − row_shift), contiguous in the student's dtype; g = 0 when
    `log_tail` is None (no tail), else the tail's g. Ignored rows are exact zeros."""
    dtype = lse.dtype
    v = student.shape[-1]
    grad = torch.empty(lse.shape[0], v, dtype=student.dtype, device=student.device)
    for start, end, block in _row_blocks(student):
        log_q = _log_q(block, lse[start:end], inv_temperature, dtype)
        q = log_q.exp()
        if log_tail is None:
            g = torch.zeros((), dtype=dtype, device=q.device)
        else:
            log_c = log_tail[start:end].to(dtype).unsqueeze(-1)
            alpha = alpha_rows[start:end].to(dtype).unsqueeze(-1)
            g = _tail_terms(log_q, log_c, alpha, reverse, detach)[2]
        scale = row_scale[start:end].to(dtype).unsqueeze(-1)
        shift = row_shift[start:end].to(dtype).unsqueeze(-1)
        values = torch.where(q == 0, 0.0, scale * q * (g - shift))
        kept = _kept(labels, ignore_index, start, end)
        if kept is not None:
            values = torch.where(kept, values, 0.0)
        grad[start:end] = values.to(student.dtype)
    return grad
