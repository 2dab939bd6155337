"""Triton kernels for SKL and SRKL over `[N, V]` logits, one program per row, three sweeps per row.

Math (per row; `s = z_s / T`, `t = z_t / T`, `log q = s − lse(s)`, `log p = t − lse(t)`):

    SKL:   loss = Σ p (log p − log m),   log m = logaddexp(log α + log p, log(1−α) + log q)
           ∂loss/∂s = q − p + p·a − q·C,          a = α p / m ∈ [0, 1],   C = Σ p·a  (= α W)
    SRKL:  loss = Σ q d,  d = log q − log r,   log r = logaddexp(log(1−α) + log p, log α + log q)
           ∂loss/∂s = q·(d − b − C),               b = α q / r ∈ [0, 1],   C = L − Σ q·b
           detached mixture: b = 0 and C = L.

Writing `α p²/m` as `p·a` keeps every term bounded: `a` and `b` never exceed 1, so α = 0, α = 1 and
underflowing probabilities need no special cases beyond "a zero probability contributes zero".

Sweep 1 (forward): online log-sum-exp of both rows. Sweep 2 (forward): loss and the row constant C.
Sweep 3 (backward): the gradient, scaled by the incoming per-row gradient and by 1/T. Between forward and
backward only `lse_s, lse_t, C` survive (three floats per row).
"""

from __future__ import annotations

import os

import torch

from .._inputs import SkewRows

try:
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:  # pragma: no cover - exercised only where triton is not installed
    TRITON_AVAILABLE = False

# Row statistics kept between forward and backward: [N, STATS] float32.
STATS = 3  # lse_s, lse_t, C
ROW_TEMPORARIES = 0  # [rows, V] temporaries the kernels allocate besides their output (see torch_backend)


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton backend cannot run on `device`, or None when it can."""
    if not TRITON_AVAILABLE:
        return "triton is not installed (pip install triton)"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreter_enabled():
        return None
    return (
        f"the triton backend runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 is set "
        f"before importing distillm2_kernels; got tensors on {device}"
    )


def launch_config(vocab_size: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a row of `vocab_size` entries."""
    block = min(triton.next_power_of_2(vocab_size), 4096)
    if interpreter_enabled():  # the interpreter runs a block as numpy ops: bigger blocks are faster
        block = min(triton.next_power_of_2(vocab_size), 16384)
    return block, max(1, min(8, block // 512))


if TRITON_AVAILABLE:

    @triton.jit
    def _log_add_exp(a, b):
        """log(exp a + exp b), exact −inf when both are −inf."""
        hi = tl.maximum(a, b)
        lo = tl.minimum(a, b)
        hi_shift = tl.where(hi == float("-inf"), 0.0, hi)
        return hi + tl.log(1.0 + tl.exp(lo - hi_shift))

    @triton.jit
    def _row_lse(row_ptr, V, inv_temperature, BLOCK_V: tl.constexpr):
        """Online log-sum-exp of `row[:V] * inv_temperature` (−inf for a row of −inf)."""
        offsets = tl.arange(0, BLOCK_V)
        running_max = float("-inf")
        running_sum = 0.0
        for start in range(0, V, BLOCK_V):
            cols = start + offsets
            x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_temperature
            new_max = tl.maximum(running_max, tl.max(x, 0))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(x - shift), 0)
            running_max = new_max
        shift = tl.where(running_max == float("-inf"), 0.0, running_max)
        return shift + tl.log(running_sum)

    @triton.jit
    def _skew_forward_kernel(
        student_ptr,  # [N, V] student logits, rows `student_row_stride` elements apart
        teacher_ptr,  # [N, V] teacher logits, rows `teacher_row_stride` elements apart
        student_row_stride,  # elements between consecutive student rows
        teacher_row_stride,  # elements between consecutive teacher rows
        labels_ptr,  # [N] integer labels; read only when HAS_LABELS
        alpha_ptr,  # [N] float32 per-row α; read only when ALPHA_PER_ROW
        alpha,  # scalar α, used when not ALPHA_PER_ROW
        ignore_index,  # rows whose label equals this get loss 0
        inv_temperature,  # 1 / T
        loss_ptr,  # [N] float32 out: per-row loss
        stats_ptr,  # [N, 3] float32 out: lse_s, lse_t, C
        V,  # vocabulary size
        BLOCK_V: tl.constexpr,  # vocabulary entries per block
        REVERSE: tl.constexpr,  # False: SKL, True: SRKL
        DETACH: tl.constexpr,  # SRKL only: q inside r is a constant
        HAS_LABELS: tl.constexpr,  # whether labels_ptr is given
        ALPHA_PER_ROW: tl.constexpr,  # whether alpha_ptr is given
    ):
        row = tl.program_id(0).to(tl.int64)
        if HAS_LABELS:
            if tl.load(labels_ptr + row) == ignore_index:
                tl.store(loss_ptr + row, 0.0)
                tl.store(stats_ptr + row * 3 + 0, 0.0)
                tl.store(stats_ptr + row * 3 + 1, 0.0)
                tl.store(stats_ptr + row * 3 + 2, 0.0)
                return
        if ALPHA_PER_ROW:
            alpha = tl.load(alpha_ptr + row)
        student_row = student_ptr + row * student_row_stride
        teacher_row = teacher_ptr + row * teacher_row_stride

        # Sweep 1: log-sum-exps.
        lse_s = _row_lse(student_row, V, inv_temperature, BLOCK_V)
        lse_t = _row_lse(teacher_row, V, inv_temperature, BLOCK_V)

        # Sweep 2: the loss and the row constant C.
        log_alpha = tl.log(alpha)
        log_one_minus_alpha = tl.log(1.0 - alpha)
        offsets = tl.arange(0, BLOCK_V)
        loss_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
        c_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + offsets
            in_row = cols < V
            s = tl.load(student_row + cols, mask=in_row, other=float("-inf")).to(tl.float32) * inv_temperature
            t = tl.load(teacher_row + cols, mask=in_row, other=float("-inf")).to(tl.float32) * inv_temperature
            log_q = s - lse_s
            log_p = t - lse_t
            if REVERSE:
                log_r = _log_add_exp(log_one_minus_alpha + log_p, log_alpha + log_q)
                q = tl.exp(log_q)
                live = q > 0
                loss_acc += tl.where(live, q * (log_q - log_r), 0.0)
                if not DETACH:
                    finite_r = live & (log_r > float("-inf"))
                    b = tl.exp(log_alpha + log_q - tl.where(finite_r, log_r, 0.0))
                    c_acc -= tl.where(finite_r, q * b, 0.0)
            else:
                log_m = _log_add_exp(log_alpha + log_p, log_one_minus_alpha + log_q)
                p = tl.exp(log_p)
                live = p > 0
                loss_acc += tl.where(live, p * (log_p - log_m), 0.0)
                finite_m = live & (log_m > float("-inf"))
                a = tl.exp(log_alpha + log_p - tl.where(finite_m, log_m, 0.0))
                c_acc += tl.where(finite_m, p * a, 0.0)
        loss = tl.sum(loss_acc, 0)
        c = tl.sum(c_acc, 0)
        if REVERSE:
            c += loss
        tl.store(loss_ptr + row, loss)
        tl.store(stats_ptr + row * 3 + 0, lse_s)
        tl.store(stats_ptr + row * 3 + 1, lse_t)
        tl.store(stats_ptr + row * 3 + 2, c)

    @triton.jit
    def _skew_backward_kernel(
        grad_student_ptr,  # [N, V] out: gradient w.r.t. the student logits, contiguous, input dtype
        grad_loss_ptr,  # [N] float32 incoming gradient of each row's loss, `grad_loss_stride` apart
        grad_loss_stride,  # elements between consecutive grad_loss entries (0 when broadcast)
        student_ptr,  # [N, V] student logits, as in the forward
        teacher_ptr,  # [N, V] teacher logits, as in the forward
        student_row_stride,  # elements between consecutive student rows
        teacher_row_stride,  # elements between consecutive teacher rows
        labels_ptr,  # [N] integer labels; read only when HAS_LABELS
        alpha_ptr,  # [N] float32 per-row α; read only when ALPHA_PER_ROW
        alpha,  # scalar α, used when not ALPHA_PER_ROW
        ignore_index,  # rows whose label equals this get a zero gradient
        inv_temperature,  # 1 / T
        stats_ptr,  # [N, 3] float32: lse_s, lse_t, C from the forward
        V,  # vocabulary size
        BLOCK_V: tl.constexpr,  # vocabulary entries per block
        REVERSE: tl.constexpr,  # False: SKL, True: SRKL
        DETACH: tl.constexpr,  # SRKL only: q inside r is a constant
        HAS_LABELS: tl.constexpr,  # whether labels_ptr is given
        ALPHA_PER_ROW: tl.constexpr,  # whether alpha_ptr is given
    ):
        row = tl.program_id(0).to(tl.int64)
        offsets = tl.arange(0, BLOCK_V)
        grad_row = grad_student_ptr + row * V
        if HAS_LABELS:
            if tl.load(labels_ptr + row) == ignore_index:
                for start in range(0, V, BLOCK_V):
                    cols = start + offsets
                    zeros = tl.zeros([BLOCK_V], dtype=tl.float32).to(grad_student_ptr.dtype.element_ty)
                    tl.store(grad_row + cols, zeros, mask=cols < V)
                return
        if ALPHA_PER_ROW:
            alpha = tl.load(alpha_ptr + row)
        scale = tl.load(grad_loss_ptr + row * grad_loss_stride) * inv_temperature
        lse_s = tl.load(stats_ptr + row * 3 + 0)
        lse_t = tl.load(stats_ptr + row * 3 + 1)
        c = tl.load(stats_ptr + row * 3 + 2)
        student_row = student_ptr + row * student_row_stride
        teacher_row = teacher_ptr + row * teacher_row_stride
        log_alpha = tl.log(alpha)
        log_one_minus_alpha = tl.log(1.0 - alpha)

        # Sweep 3: the gradient.
        for start in range(0, V, BLOCK_V):
            cols = start + offsets
            in_row = cols < V
            s = tl.load(student_row + cols, mask=in_row, other=float("-inf")).to(tl.float32) * inv_temperature
            t = tl.load(teacher_row + cols, mask=in_row, other=float("-inf")).to(tl.float32) * inv_temperature
            log_q = s - lse_s
            log_p = t - lse_t
            q = tl.exp(log_q)
            if REVERSE:
                log_r = _log_add_exp(log_one_minus_alpha + log_p, log_alpha + log_q)
                live = q > 0
                d = log_q - tl.where(live, log_r, 0.0)
                if DETACH:
                    g = q * (d - c)
                else:
                    finite_r = live & (log_r > float("-inf"))
                    b = tl.exp(log_alpha + log_q - tl.where(finite_r, log_r, 0.0))
                    g = q * (d - tl.where(finite_r, b, 0.0) - c)
                g = tl.where(live, g, 0.0)
            else:
                log_m = _log_add_exp(log_alpha + log_p, log_one_minus_alpha + log_q)
                p = tl.exp(log_p)
                finite_m = (p > 0) & (log_m > float("-inf"))
                a = tl.exp(log_alpha + log_p - tl.where(finite_m, log_m, 0.0))
                g = q * (1.0 - c) - p * (1.0 - tl.where(finite_m, a, 0.0))
            tl.store(grad_row + cols, (g * scale).to(grad_student_ptr.dtype.element_ty), mask=in_row)


def _check_runnable(rows: SkewRows) -> None:
    reason = unavailable_reason(rows.student.device)
    if reason is not None:
        raise RuntimeError(reason)
    for name, logits in (("student_logits", rows.student), ("teacher_logits", rows.teacher)):
        if logits.dtype == torch.float64:
            raise TypeError(f"the triton backend takes float16, bfloat16 or float32 {name}, got float64")


def _common_args(rows: SkewRows) -> tuple:
    dummy = rows.student  # any tensor on the device: never read when its flag is off
    labels = rows.labels if rows.labels is not None else dummy
    alpha_rows = rows.alpha_rows if rows.alpha_rows is not None else dummy
    return (
        rows.student,
        rows.teacher,
        rows.student.stride(0),
        rows.teacher.stride(0),
        labels,
        alpha_rows,
        rows.alpha,
        rows.ignore_index,
        rows.inv_temperature,
    )


def skew_forward(rows: SkewRows, reverse: bool, detach: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss `[N]` float32 and the statistics `[N, 3]` the backward needs."""
    _check_runnable(rows)
    n, v = rows.num_rows, rows.vocab_size
    loss = torch.empty(n, dtype=torch.float32, device=rows.student.device)
    stats = torch.empty((n, STATS), dtype=torch.float32, device=rows.student.device)
    if n == 0:
        return loss, stats
    block, warps = launch_config(v)
    _skew_forward_kernel[(n,)](
        *_common_args(rows),
        loss,
        stats,
        v,
        BLOCK_V=block,
        REVERSE=reverse,
        DETACH=detach,
        HAS_LABELS=rows.labels is not None,
        ALPHA_PER_ROW=rows.alpha_rows is not None,
        num_warps=warps,
    )
    return loss, stats


def skew_backward(
    rows: SkewRows, reverse: bool, detach: bool, stats: torch.Tensor, grad_loss: torch.Tensor
) -> torch.Tensor:
    """Gradient w.r.t. the student logits, `[N, V]` contiguous in the student's dtype."""
    _check_runnable(rows)
    n, v = rows.num_rows, rows.vocab_size
    grad = torch.empty((n, v), dtype=rows.student.dtype, device=rows.student.device)
    if n == 0:
        return grad
    grad_loss = grad_loss.to(torch.float32)
    block, warps = launch_config(v)
    _skew_backward_kernel[(n,)](
        grad,
        grad_loss,
        grad_loss.stride(0),
        *_common_args(rows),
        stats,
        v,
        BLOCK_V=block,
        REVERSE=reverse,
        DETACH=detach,
        HAS_LABELS=rows.labels is not None,
        ALPHA_PER_ROW=rows.alpha_rows is not None,
        num_warps=warps,
    )
    return grad
