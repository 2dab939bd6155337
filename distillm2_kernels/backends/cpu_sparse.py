"""The dense sweeps of the sparse-teacher ops in C++ (csrc/sparse_teacher_kernel.h, in the `cpu_backend` extension).

Same signatures, math and conventions as `torch_sparse` (the spec; its docstring has the formulas): with
log q_v = z_v/T − lse, α = alpha_rows[r] and c = exp(log_tail[r]),

    student_logsumexp   lse_r = log Σ_v exp(z_v/T)                                     1 exp per entry
    tail_sums           (Σ_v f_v, Σ_v q_v·g_v) over all V entries                       1 exp, 1 log, ≤ 1 division
    student_grad        row_scale_r · q_v · (g_v − row_shift_r), g = 0 without a tail   1 exp, 1 multiply
                        (with a tail: 1 exp and 1 division for SKL, and 1 log for SRKL)

one thread per row (rows in parallel on `torch.get_num_threads()` threads, each row in a fixed order, so results
do not depend on the thread count), vectorised at the instruction set ATen selects (AVX-512, AVX2 or portable;
`ATEN_CPU_CAPABILITY` forces one), float32 accumulation, the gradient written in the student's dtype. Student rows
are `[N, V]` (any row stride, unit column stride) or `[outer, inner, V]` (`_inputs.row_layout`), float32,
bfloat16 or float16; float64 rows are `torch_sparse`'s (`backends.sparse_backend_module` routes them).

Where the spec's `q > 0` guards would turn a NaN into 0, these kernels keep it: a row holding NaN or +inf gets
lse NaN, and a row whose lse, log_tail or α is NaN (or whose lse is ±inf) gets NaN sums and a NaN gradient row;
the exact zeros (ignored rows, −inf logits, α = 1) are as the spec's.
"""

from __future__ import annotations

from typing import Optional

import torch

from .cpu_backend import loaded_extension, unavailable_reason

__all__ = ["student_logsumexp", "tail_sums", "student_grad", "unavailable_reason"]


def _num_rows(student: torch.Tensor) -> int:
    return student.shape[0] if student.dim() == 2 else student.shape[0] * student.shape[1]


def _labels(labels: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if labels is None else labels.to(torch.int64).contiguous()


def _per_row(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.float32).contiguous()


def student_logsumexp(
    student: torch.Tensor, labels: Optional[torch.Tensor], ignore_index: int, inv_temperature: float
) -> torch.Tensor:
    """lse [N] float32 = log Σ_v exp(z_v/T) per row, 0 for ignored rows."""
    lse = torch.empty(_num_rows(student), dtype=torch.float32)
    loaded_extension().sparse_student_logsumexp(student, _labels(labels), int(ignore_index), float(inv_temperature),
                                                lse)
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
    """[N, 2] float32: (Σ_v f_v, Σ_v q_v·g_v) over all V entries of each row, 0 for ignored rows."""
    sums = torch.empty(_num_rows(student), 2, dtype=torch.float32)
    loaded_extension().sparse_tail_sums(student, _labels(labels), int(ignore_index), float(inv_temperature),
                                        _per_row(lse), _per_row(log_tail), _per_row(alpha_rows), bool(reverse),
                                        bool(detach), sums)
    return sums


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
    """grad [N, V] = row_scale · q · (g − row_shift), contiguous in the student's dtype; g = 0 when `log_tail`
    is None (no tail), else the tail's g. Ignored rows are exact zeros."""
    grad = torch.empty(_num_rows(student), student.shape[-1], dtype=student.dtype)
    loaded_extension().sparse_student_grad(
        student, _labels(labels), int(ignore_index), float(inv_temperature), _per_row(lse), _per_row(row_scale),
        _per_row(row_shift), None if log_tail is None else _per_row(log_tail), _per_row(alpha_rows),
        bool(reverse), bool(detach), grad)
    return grad
