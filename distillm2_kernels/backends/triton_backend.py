"""Triton kernels for SKL and SRKL over rows of logits (`[N, V]`, or `[outer, inner, V]` with a stride per
level, see `_inputs`), one program per row, three sweeps per row.

Math (per row; `log q = (z_s − max z_s)/T − log Σ exp((z_s − max z_s)/T)`, `log p` likewise from z_t;
subtracting the maximum before scaling keeps log q as accurate as `log_softmax`'s):

    SKL:   loss = Σ p (log p − log m),   log m = logaddexp(log α + log p, log(1−α) + log q)
           ∂loss/∂s = q·C − p·ā,           ā = 1 − αp/m = (1−α) q / m ∈ [0, 1],   C = Σ p·ā
    SRKL:  loss = L = Σ q d,   d = log q − log r,   log r = logaddexp(log(1−α) + log p, log α + log q)
           ∂loss/∂s = q·(d + e − C),       e = 1 − αq/r = (1−α) p / r ∈ [0, 1],   C = L + Σ q·e
           detached mixture (q inside r constant): ∂loss/∂s = q·(d − C),  C = L

These are docs/design.md §2.3's `q − p + α(p²/m − q·W)` and `q ⊙ (d − αq/r − L + αU)` rewritten with Σp = Σq = 1, so
that every term is bounded (ā, e ∈ [0, 1]) and α = 1 gives exactly zero (ā = e = d = 0). A zero
probability contributes exactly zero; a zero mixture (only possible at α = 0) gives an infinite loss.
A row holding a NaN or +inf logit (that is not ignored) gets NaN statistics in sweep 1, so its loss, its C
and its whole gradient row are NaN: the zero-probability guards test `p == 0` (false for NaN), never `p > 0`.

Sweep 1 (forward, `_row_statistics_kernel`): online log-sum-exp of both rows, and the label tokens'
log-probabilities as a by-product (one load each). Sweep 2 (forward, `_skew_loss_kernel`): the loss and the
row constant C; it can run on statistics computed earlier, so that a caller can pick α from the label
log-probabilities without another pass. Sweep 3 (backward): the gradient, scaled by the incoming per-row
gradient and by 1/T. Between forward and backward only the seven row statistics survive.
"""

from __future__ import annotations

import os
import struct
from typing import Optional

import torch

from .._inputs import SkewRows, row_layout
from ..statistics import STATS

try:
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:  # pragma: no cover - exercised only where triton is not installed
    TRITON_AVAILABLE = False

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
        """log(exp a + exp b), exact −inf when both are −inf, NaN when either is NaN."""
        hi = tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)
        lo = tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)
        hi_shift = tl.where(hi == float("-inf"), 0.0, hi)
        return hi + tl.log(1.0 + tl.exp(lo - hi_shift))

    @triton.jit
    def _to_output_dtype(x, out_dtype: tl.constexpr):
        """float32 -> out_dtype, rounding to nearest even. bfloat16 is rounded by hand because the
        interpreter truncates (on a GPU the final cast is then exact, so both agree)."""
        if out_dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            x = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
        return x.to(out_dtype)

    @triton.jit
    def _skl_terms(log_q, log_p, log_alpha, log_one_minus_alpha):
        """SKL per entry: p, the loss terms p·(log p − log m), and ā = (1−α) q / m."""
        log_m = _log_add_exp(log_alpha + log_p, log_one_minus_alpha + log_q)
        p = tl.exp(log_p)
        loss_terms = tl.where(p == 0, 0.0, p * (log_p - log_m))
        empty_m = log_m == float("-inf")
        a_bar = tl.where(empty_m, 1.0, tl.exp(log_one_minus_alpha + log_q - tl.where(empty_m, 0.0, log_m)))
        return p, loss_terms, a_bar

    @triton.jit
    def _srkl_terms(log_q, log_p, log_alpha, log_one_minus_alpha):
        """SRKL per entry: q, d = log q − log r (0 where q = 0), and e = (1−α) p / r."""
        log_r = _log_add_exp(log_one_minus_alpha + log_p, log_alpha + log_q)
        q = tl.exp(log_q)
        d = tl.where(q == 0, 0.0, log_q - log_r)
        empty_r = log_r == float("-inf")
        e = tl.where(empty_r, 1.0, tl.exp(log_one_minus_alpha + log_p - tl.where(empty_r, 0.0, log_r)))
        return q, d, e

    @triton.jit
    def _row_log_sum(row_ptr, V, inv_temperature, BLOCK_V: tl.constexpr):
        """Online (max z, log Σ exp((z − max z)/T)) over `row[:V]`; a row of −inf gives max 0, log-sum −inf,
        a row holding NaN or +inf gives log-sum NaN (so every log-probability of the row is NaN)."""
        offsets = tl.arange(0, BLOCK_V)
        running_max = float("-inf")
        running_sum = 0.0
        for start in range(0, V, BLOCK_V):
            cols = start + offsets
            z = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(running_max, tl.max(z, 0))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            running_sum = running_sum * tl.exp((running_max - shift) * inv_temperature) + tl.sum(
                tl.exp((z - shift) * inv_temperature), 0
            )
            running_max = new_max
        log_sum = tl.where(running_max == float("inf"), float("nan"), tl.log(running_sum))
        return tl.where(running_max == float("-inf"), 0.0, running_max), log_sum

    @triton.jit
    def _row_start(base_ptr, row, inner_rows, outer_stride, inner_stride):
        """Row `row` (int64) of logits laid out as [outer, inner, V]: [N, V] logits are one outer index."""
        return base_ptr + (row // inner_rows) * outer_stride + (row % inner_rows) * inner_stride

    @triton.jit
    def _block_log_probs(row_ptr, cols, in_row, row_max, log_sum, inv_temperature):
        """log softmax(z/T) of one block, from the row's max and log-sum; −inf outside the row."""
        z = tl.load(row_ptr + cols, mask=in_row, other=float("-inf")).to(tl.float32)
        return (z - row_max) * inv_temperature - log_sum

    @triton.jit
    def _row_statistics_kernel(
        student_ptr,  # student logits, N rows of V (row layout: see `_row_start`), unit column stride
        teacher_ptr,  # teacher logits, the same rows with strides of their own
        student_outer_stride,  # elements between student rows r and r + inner_rows
        student_inner_stride,  # elements between consecutive student rows of one outer index
        teacher_outer_stride,  # elements between teacher rows r and r + inner_rows
        teacher_inner_stride,  # elements between consecutive teacher rows of one outer index
        inner_rows,  # rows per outer index (N for [N, V] logits)
        labels_ptr,  # [N] integer labels; read only when HAS_LABELS
        ignore_index,  # rows whose label equals this get zero statistics
        inv_temperature,  # 1 / T
        stats_ptr,  # [N, 7] float32 out: max z_s, log-sum_s, max z_t, log-sum_t, 0, log q(label), log p(label)
        V,  # vocabulary size
        BLOCK_V: tl.constexpr,  # vocabulary entries per block
        HAS_LABELS: tl.constexpr,  # whether labels_ptr is given
    ):
        """Sweep 1: both rows' max and log-sum, and the label tokens' log-probabilities (NaN for a label
        outside [0, V)). Ignored rows are skipped and get zeros."""
        row = tl.program_id(0).to(tl.int64)
        out = stats_ptr + row * 7
        student_row = _row_start(student_ptr, row, inner_rows, student_outer_stride, student_inner_stride)
        teacher_row = _row_start(teacher_ptr, row, inner_rows, teacher_outer_stride, teacher_inner_stride)
        label_log_q = 0.0
        label_log_p = 0.0
        if HAS_LABELS:
            label = tl.load(labels_ptr + row)
            if label == ignore_index:
                for k in tl.static_range(7):
                    tl.store(out + k, 0.0)
                return
        max_s, log_sum_s = _row_log_sum(student_row, V, inv_temperature, BLOCK_V)
        max_t, log_sum_t = _row_log_sum(teacher_row, V, inv_temperature, BLOCK_V)
        if HAS_LABELS:
            in_vocab = (label >= 0) & (label < V)
            z_s = tl.load(student_row + label, mask=in_vocab, other=float("nan")).to(tl.float32)
            z_t = tl.load(teacher_row + label, mask=in_vocab, other=float("nan")).to(tl.float32)
            label_log_q = (z_s - max_s) * inv_temperature - log_sum_s
            label_log_p = (z_t - max_t) * inv_temperature - log_sum_t
        tl.store(out + 0, max_s)
        tl.store(out + 1, log_sum_s)
        tl.store(out + 2, max_t)
        tl.store(out + 3, log_sum_t)
        tl.store(out + 4, 0.0)
        tl.store(out + 5, label_log_q)
        tl.store(out + 6, label_log_p)

    @triton.jit
    def _skew_loss_kernel(
        student_ptr,  # student logits, N rows of V (row layout: see `_row_start`), unit column stride
        teacher_ptr,  # teacher logits, the same rows with strides of their own
        student_outer_stride,  # elements between student rows r and r + inner_rows
        student_inner_stride,  # elements between consecutive student rows of one outer index
        teacher_outer_stride,  # elements between teacher rows r and r + inner_rows
        teacher_inner_stride,  # elements between consecutive teacher rows of one outer index
        inner_rows,  # rows per outer index (N for [N, V] logits)
        labels_ptr,  # [N] integer labels; read only when HAS_LABELS
        alpha_ptr,  # [N] float32 per-row α; read only when ALPHA_PER_ROW
        alpha,  # scalar α, used when not ALPHA_PER_ROW
        ignore_index,  # rows whose label equals this get loss 0
        inv_temperature,  # 1 / T
        loss_ptr,  # [N] float32 out: per-row loss
        stats_ptr,  # [N, 7] float32 in/out: reads the row statistics of sweep 1, writes C at column 4
        V,  # vocabulary size
        BLOCK_V: tl.constexpr,  # vocabulary entries per block
        REVERSE: tl.constexpr,  # False: SKL, True: SRKL
        DETACH: tl.constexpr,  # SRKL only: q inside r is a constant
        HAS_LABELS: tl.constexpr,  # whether labels_ptr is given
        ALPHA_PER_ROW: tl.constexpr,  # whether alpha_ptr is given
    ):
        """Sweep 2: the loss and the row constant C."""
        row = tl.program_id(0).to(tl.int64)
        stats_row = stats_ptr + row * 7
        if HAS_LABELS:
            if tl.load(labels_ptr + row) == ignore_index:
                tl.store(loss_ptr + row, 0.0)
                tl.store(stats_row + 4, 0.0)
                return
        if ALPHA_PER_ROW:
            alpha = tl.load(alpha_ptr + row)
        student_row = _row_start(student_ptr, row, inner_rows, student_outer_stride, student_inner_stride)
        teacher_row = _row_start(teacher_ptr, row, inner_rows, teacher_outer_stride, teacher_inner_stride)
        max_s = tl.load(stats_row + 0)
        log_sum_s = tl.load(stats_row + 1)
        max_t = tl.load(stats_row + 2)
        log_sum_t = tl.load(stats_row + 3)
        log_alpha = tl.log(alpha)
        log_one_minus_alpha = tl.log(1.0 - alpha)
        offsets = tl.arange(0, BLOCK_V)
        loss_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
        c_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + offsets
            in_row = cols < V
            log_q = _block_log_probs(student_row, cols, in_row, max_s, log_sum_s, inv_temperature)
            log_p = _block_log_probs(teacher_row, cols, in_row, max_t, log_sum_t, inv_temperature)
            if REVERSE:
                q, d, e = _srkl_terms(log_q, log_p, log_alpha, log_one_minus_alpha)
                loss_acc += q * d
                if not DETACH:
                    c_acc += q * e
            else:
                p, loss_terms, a_bar = _skl_terms(log_q, log_p, log_alpha, log_one_minus_alpha)
                loss_acc += loss_terms
                c_acc += p * a_bar
        loss = tl.sum(loss_acc, 0)
        c = tl.sum(c_acc, 0)
        if REVERSE:
            c += loss
        tl.store(loss_ptr + row, loss)
        tl.store(stats_row + 4, c)

    @triton.jit
    def _skew_backward_kernel(
        grad_student_ptr,  # [N, V] out: gradient w.r.t. the student logits, contiguous, input dtype
        grad_loss_ptr,  # [N] float32 incoming gradient of each row's loss, `grad_loss_stride` apart
        grad_loss_stride,  # elements between consecutive grad_loss entries (0 when broadcast)
        student_ptr,  # student logits, N rows of V (row layout: see `_row_start`), unit column stride
        teacher_ptr,  # teacher logits, the same rows with strides of their own
        student_outer_stride,  # elements between student rows r and r + inner_rows
        student_inner_stride,  # elements between consecutive student rows of one outer index
        teacher_outer_stride,  # elements between teacher rows r and r + inner_rows
        teacher_inner_stride,  # elements between consecutive teacher rows of one outer index
        inner_rows,  # rows per outer index (N for [N, V] logits)
        labels_ptr,  # [N] integer labels; read only when HAS_LABELS
        alpha_ptr,  # [N] float32 per-row α; read only when ALPHA_PER_ROW
        alpha,  # scalar α, used when not ALPHA_PER_ROW
        ignore_index,  # rows whose label equals this get a zero gradient
        inv_temperature,  # 1 / T
        stats_ptr,  # [N, 7] float32: the forward's statistics (max z_s, log-sum_s, max z_t, log-sum_t, C, ...)
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
                    zeros = tl.zeros([BLOCK_V], dtype=grad_student_ptr.dtype.element_ty)
                    tl.store(grad_row + cols, zeros, mask=cols < V)
                return
        if ALPHA_PER_ROW:
            alpha = tl.load(alpha_ptr + row)
        scale = tl.load(grad_loss_ptr + row * grad_loss_stride) * inv_temperature
        max_s = tl.load(stats_ptr + row * 7 + 0)
        log_sum_s = tl.load(stats_ptr + row * 7 + 1)
        max_t = tl.load(stats_ptr + row * 7 + 2)
        log_sum_t = tl.load(stats_ptr + row * 7 + 3)
        c = tl.load(stats_ptr + row * 7 + 4)
        student_row = _row_start(student_ptr, row, inner_rows, student_outer_stride, student_inner_stride)
        teacher_row = _row_start(teacher_ptr, row, inner_rows, teacher_outer_stride, teacher_inner_stride)
        log_alpha = tl.log(alpha)
        log_one_minus_alpha = tl.log(1.0 - alpha)
        # A zero probability gets a zero gradient, unless the row holds NaN or +inf (then C is NaN): NaN.
        zero_probability_grad = tl.where(c == c, 0.0, float("nan"))

        # Sweep 3: the gradient.
        for start in range(0, V, BLOCK_V):
            cols = start + offsets
            in_row = cols < V
            log_q = _block_log_probs(student_row, cols, in_row, max_s, log_sum_s, inv_temperature)
            log_p = _block_log_probs(teacher_row, cols, in_row, max_t, log_sum_t, inv_temperature)
            if REVERSE:
                q, d, e = _srkl_terms(log_q, log_p, log_alpha, log_one_minus_alpha)
                if DETACH:
                    g = q * (d - c)
                else:
                    g = q * (d + e - c)
                g = tl.where(q == 0, zero_probability_grad, g)
            else:
                p, _, a_bar = _skl_terms(log_q, log_p, log_alpha, log_one_minus_alpha)
                g = tl.exp(log_q) * c - p * a_bar
            tl.store(grad_row + cols, _to_output_dtype(g * scale, grad_student_ptr.dtype.element_ty), mask=in_row)


def _check_runnable(rows: SkewRows) -> None:
    reason = unavailable_reason(rows.student.device)
    if reason is not None:
        raise RuntimeError(reason)
    for name, logits in (("student_logits", rows.student), ("teacher_logits", rows.teacher)):
        if logits.dtype == torch.float64:
            raise TypeError(f"the triton backend takes float16, bfloat16 or float32 {name}, got float64")


def _logits_args(rows: SkewRows) -> tuple:
    """student_ptr, teacher_ptr, their outer and inner strides, inner_rows."""
    inner, student_outer, student_inner = row_layout(rows.student)
    _, teacher_outer, teacher_inner = row_layout(rows.teacher)
    return rows.student, rows.teacher, student_outer, student_inner, teacher_outer, teacher_inner, inner


def _common_args(rows: SkewRows) -> tuple:
    dummy = rows.student  # any tensor on the device: never read when its flag is off
    labels = rows.labels if rows.labels is not None else dummy
    alpha_rows = rows.alpha_rows if rows.alpha_rows is not None else dummy
    return (
        *_logits_args(rows),
        labels,
        alpha_rows,
        _as_float32(rows.alpha),
        rows.ignore_index,
        _as_float32(rows.inv_temperature),
    )


def _as_float32(value: float) -> float:
    """Round a scalar to float32, so that triton types it as fp32 (it makes tiny or huge floats fp64)."""
    return struct.unpack("f", struct.pack("f", value))[0]


def skew_statistics(rows: SkewRows) -> torch.Tensor:
    """Sweep 1: the row statistics `[N, STATS]` (column `RowStat.C` is 0 until `skew_forward` fills it)."""
    _check_runnable(rows)
    n, v = rows.num_rows, rows.vocab_size
    stats = torch.empty((n, STATS), dtype=torch.float32, device=rows.student.device)
    if n == 0:
        return stats
    block, warps = launch_config(v)
    labels = rows.labels if rows.labels is not None else rows.student
    _row_statistics_kernel[(n,)](
        *_logits_args(rows),
        labels,
        rows.ignore_index,
        _as_float32(rows.inv_temperature),
        stats,
        v,
        BLOCK_V=block,
        HAS_LABELS=rows.labels is not None,
        num_warps=warps,
    )
    return stats


def skew_forward(
    rows: SkewRows, reverse: bool, detach: bool, stats: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss `[N]` float32 and the statistics `[N, STATS]` the backward needs. `stats` from
    `skew_statistics` on the same rows skips sweep 1 (it is not modified)."""
    stats = skew_statistics(rows) if stats is None else stats.clone()
    n, v = rows.num_rows, rows.vocab_size
    loss = torch.empty(n, dtype=torch.float32, device=rows.student.device)
    if n == 0:
        return loss, stats
    block, warps = launch_config(v)
    _skew_loss_kernel[(n,)](
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
