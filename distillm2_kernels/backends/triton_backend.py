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
gradient and by 1/T. Between forward and backward only the seven row statistics survive. For the scalar reductions
`skew_forward_and_grad` runs the three sweeps of a row back to back in one kernel (the gradient in the forward).

Inside the sweeps the math is in base 2: y = log2 q = (z − max z)·log2(e)/T − log2-sum (one subtraction and one
FMA per entry), probabilities are 2^y, and log2 of a mixture is `hi + lg2(1 + 2^(lo − hi))` of its two log2 terms.
Compiled, 2^x, log2 and 1/x are single SFU instructions (ex2 / lg2 / rcp `.approx.ftz`, through
`tl.inline_asm_elementwise`) instead of libdevice's polynomial logf; the interpreter cannot run PTX, so there the
same algebra runs on tl.exp2, tl.log2 and a division (`FAST_MATH`, fixed at import): the interpreter tests check
the math, not those instructions' rounding (within about 2^-22 relative, far below the tolerance rule's float32
allowance). The per-entry costs in the kernels' docstrings are sm_90 bf16 figures at BLOCK_V = 4096 with 8 warps
(`python -m benchmarks.aot_compile`, docs/design.md §7); traffic is in units of one [N, V] input.
"""

from __future__ import annotations

import os
import struct
from typing import Optional

import torch

from .._inputs import SkewRows, row_layout
from ..statistics import STATS, RowStat

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
    LOG2E = tl.constexpr(1.4426950408889634)
    LN2 = tl.constexpr(0.6931471805599453)
    MIN_NORMAL = tl.constexpr(1.1754943508222875e-38)  # 2^-126, float32's smallest normal
    TWO_TO_64 = tl.constexpr(18446744073709551616.0)  # 2^64
    TWO_TO_MINUS_64 = tl.constexpr(5.421010862427522e-20)  # 2^-64
    # Compiled kernels take ex2 / lg2 / rcp straight from the special-function unit (PTX `.approx.ftz`); the
    # interpreter cannot run inline PTX, so it evaluates the same base-2 algebra with tl.exp2 / tl.log2 / a
    # division. Chosen once, at import, like the interpreter itself.
    FAST_MATH = tl.constexpr(not interpreter_enabled())
    # the columns of the [N, STATS] row statistics, as `statistics.RowStat` (and the C++ RowStat) names them
    N_STATS = tl.constexpr(STATS)
    MAX_S = tl.constexpr(int(RowStat.MAX_S))
    LOG_SUM_S = tl.constexpr(int(RowStat.LOG_SUM_S))
    MAX_T = tl.constexpr(int(RowStat.MAX_T))
    LOG_SUM_T = tl.constexpr(int(RowStat.LOG_SUM_T))
    ROW_C = tl.constexpr(int(RowStat.C))
    LABEL_LOG_Q = tl.constexpr(int(RowStat.LABEL_LOG_Q))
    LABEL_LOG_P = tl.constexpr(int(RowStat.LABEL_LOG_P))

    @triton.jit
    def _exp2(x):
        """2^x; ex2.approx.ftz (relative error about 2^-22, a result below 2^-126 is 0, −inf gives 0)."""
        if FAST_MATH:
            return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                             is_pure=True, pack=1)
        else:
            return tl.exp2(x)

    @triton.jit
    def _log2(x):
        """log2 x for x in [1, 2] (the only use here); lg2.approx.ftz (absolute error about 2^-22)."""
        if FAST_MATH:
            return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                             is_pure=True, pack=1)
        else:
            return tl.log2(x)

    @triton.jit
    def _reciprocal(x):
        """1 / x for x in [1, 2] or a normal float; rcp.approx.ftz (relative error 1 ulp)."""
        if FAST_MATH:
            return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                             is_pure=True, pack=1)
        else:
            return 1.0 / x

    @triton.jit
    def _to_output_dtype(x, out_dtype: tl.constexpr):
        """float32 -> out_dtype, rounding to nearest even (cvt.rn on a GPU). The interpreter truncates to
        bfloat16, so there bfloat16 is rounded by hand first (then the cast is exact and both agree)."""
        if not FAST_MATH:
            if out_dtype == tl.bfloat16:
                bits = x.to(tl.uint32, bitcast=True)
                bits = bits + 0x7FFF + ((bits >> 16) & 1)
                x = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
        return x.to(out_dtype)

    @triton.jit
    def _log2_mixture(a, b):
        """(log2(2^a + 2^b), x = 2^(lo − hi) ∈ [0, 1]): hi = max(a, b), lo = min(a, b); log2 of an empty
        mixture (a = b = −inf) is −inf with x = 0; NaN when a or b is NaN. 2 SFU ops (ex2, lg2)."""
        hi = tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)
        lo = tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)
        x = _exp2(lo - tl.where(hi == float("-inf"), 0.0, hi))
        return hi + _log2(1.0 + x), x

    @triton.jit
    def _row_start(base_ptr, row, inner_rows, outer_stride, inner_stride):
        """Row `row` (int64) of logits laid out as [outer, inner, V]: [N, V] logits are one outer index."""
        return base_ptr + (row // inner_rows) * outer_stride + (row % inner_rows) * inner_stride

    @triton.jit
    def _block_log2_probs(row_ptr, cols, in_row, row_max, log2_sum, scale):
        """log2 softmax(z/T) of one block, `(z − max)·scale − log2_sum` with scale = log2(e)/T; −inf outside
        the row. (z − max is exact for the entries that carry the probability mass.)"""
        z = tl.load(row_ptr + cols, mask=in_row, other=float("-inf")).to(tl.float32)
        return (z - row_max) * scale - log2_sum

    @triton.jit
    def _row_log_sum(row_ptr, V, scale, BLOCK_V: tl.constexpr):
        """Online (max z, log Σ exp((z − max z)/T)) = (max z, ln Σ 2^((z − max z)·scale)) over `row[:V]`,
        scale = log2(e)/T; a row of −inf gives max 0, log-sum −inf, a row holding NaN or +inf gives log-sum NaN
        (so every log-probability is NaN).
        Per entry: 1 ex2, about 7 instructions (load, convert, max, sub, mul, ex2, add) plus the block
        reductions."""
        offsets = tl.arange(0, BLOCK_V)
        running_max = float("-inf")
        running_sum = 0.0
        for start in range(0, V, BLOCK_V):
            cols = start + offsets
            z = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(running_max, tl.max(z, 0))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            running_sum = running_sum * _exp2((running_max - shift) * scale) + tl.sum(_exp2((z - shift) * scale), 0)
            running_max = new_max
        log_sum = tl.where(running_max == float("inf"), float("nan"), tl.log(running_sum))
        return tl.where(running_max == float("-inf"), 0.0, running_max), log_sum

    @triton.jit
    def _skl_loss_terms(log2_q, log2_p, log2_alpha, log2_one_minus_alpha):
        """SKL per entry, base 2: (p·(log2 p − log2 m), p·ā), both exactly 0 where p = 0; ā = (1−α) q / m.
        4 SFU ops (ex2 of the mixture's ratio, its lg2, rcp, ex2 for p)."""
        a = log2_alpha + log2_p  # log2(α p)
        b = log2_one_minus_alpha + log2_q  # log2((1−α) q)
        log2_m, x = _log2_mixture(a, b)
        p = _exp2(log2_p)
        a_bar = tl.where(b >= a, 1.0, x) * _reciprocal(1.0 + x)  # (1−α)q/m: 2^b / (2^hi (1 + x))
        no_p = p == 0
        return tl.where(no_p, 0.0, p * (log2_p - log2_m)), tl.where(no_p, 0.0, p * a_bar)

    @triton.jit
    def _srkl_terms(log2_q, log2_p, log2_alpha, log2_one_minus_alpha, WITH_E: tl.constexpr):
        """SRKL per entry, base 2: q, d2 = log2 q − log2 r (0 where q = 0) and, WITH_E, e = (1−α) p / r
        (else 0). 3 SFU ops (ex2 and lg2 for the mixture, ex2 for q), 4 WITH_E (rcp)."""
        a = log2_one_minus_alpha + log2_p  # log2((1−α) p)
        b = log2_alpha + log2_q  # log2(α q)
        log2_r, x = _log2_mixture(a, b)
        q = _exp2(log2_q)
        d2 = tl.where(q == 0, 0.0, log2_q - log2_r)
        e = 0.0
        if WITH_E:
            e = tl.where(a >= b, 1.0, x) * _reciprocal(1.0 + x)
        return q, d2, e

    @triton.jit
    def _pair_sums(x, BLOCK_V: tl.constexpr, ACC_V: tl.constexpr):
        """[BLOCK_V] -> [ACC_V]: x[2i] + x[2i+1] (x itself when ACC_V = BLOCK_V = 1)."""
        if ACC_V == BLOCK_V:
            return x
        else:
            return tl.sum(tl.reshape(x, [ACC_V, 2]), 1)

    @triton.jit
    def _loss_sweep(student_row, teacher_row, V, max_s, log2_sum_s, max_t, log2_sum_t, scale, alpha,
                    REVERSE: tl.constexpr, DETACH: tl.constexpr, BLOCK_V: tl.constexpr):
        """Sweep 2: (loss, C) of one row from its statistics (log2-sums, scale = log2(e)/T)."""
        # SRKL's accumulators hold adjacent pairs of entries summed (in-thread: half the registers, which keeps
        # ptxas from spilling its SRKL loops); SKL's hold every entry (its loops spill with the pairs)
        ACC_V: tl.constexpr = BLOCK_V // 2 if REVERSE and BLOCK_V > 1 else BLOCK_V
        log2_alpha = tl.log2(alpha)
        log2_one_minus_alpha = tl.log2(1.0 - alpha)
        offsets = tl.arange(0, BLOCK_V)
        loss_acc = tl.zeros([ACC_V], dtype=tl.float32)
        c_acc = tl.zeros([ACC_V], dtype=tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + offsets
            in_row = cols < V
            log2_q = _block_log2_probs(student_row, cols, in_row, max_s, log2_sum_s, scale)
            log2_p = _block_log2_probs(teacher_row, cols, in_row, max_t, log2_sum_t, scale)
            if REVERSE:
                q, d2, e = _srkl_terms(log2_q, log2_p, log2_alpha, log2_one_minus_alpha, not DETACH)
                loss_acc += _pair_sums(q * d2, BLOCK_V, ACC_V)
                if not DETACH:
                    c_acc += _pair_sums(q * e, BLOCK_V, ACC_V)
            else:
                loss_terms, c_terms = _skl_loss_terms(log2_q, log2_p, log2_alpha, log2_one_minus_alpha)
                loss_acc += _pair_sums(loss_terms, BLOCK_V, ACC_V)
                c_acc += _pair_sums(c_terms, BLOCK_V, ACC_V)
        loss = tl.sum(loss_acc, 0) * LN2
        c = tl.sum(c_acc, 0)
        if REVERSE:
            c += loss
        return loss, c

    @triton.jit
    def _gradient_sweep(grad_row, student_row, teacher_row, V, max_s, log2_sum_s, max_t, log2_sum_t, scale, alpha,
                        c, grad_scale, REVERSE: tl.constexpr, DETACH: tl.constexpr, BLOCK_V: tl.constexpr):
        """Sweep 3: grad_row[:V] = grad_scale · ∂loss/∂s (grad_scale includes 1/T)."""
        offsets = tl.arange(0, BLOCK_V)
        log2_alpha = tl.log2(alpha)
        log2_one_minus_alpha = tl.log2(1.0 - alpha)
        one_minus_alpha = 1.0 - alpha
        # A zero probability gets a zero gradient, unless the row holds NaN or +inf (then C is NaN): NaN.
        zero_probability_grad = tl.where(c == c, 0.0, float("nan"))
        # SKL: ā where even the rescaled mixture is below MIN_NORMAL (see below): 1, 0 at α = 1 (the exact zero)
        tiny_mixture_share = tl.where(one_minus_alpha == 0.0, 0.0, 1.0)
        zero_student_share = tl.where(alpha == 0.0, 1.0, 0.0)  # the same where q = 0 too
        for start in range(0, V, BLOCK_V):
            cols = start + offsets
            in_row = cols < V
            log2_q = _block_log2_probs(student_row, cols, in_row, max_s, log2_sum_s, scale)
            log2_p = _block_log2_probs(teacher_row, cols, in_row, max_t, log2_sum_t, scale)
            if REVERSE:
                q, d2, e = _srkl_terms(log2_q, log2_p, log2_alpha, log2_one_minus_alpha, not DETACH)
                g = q * (d2 * LN2 + e - c)
                g = tl.where(q == 0, zero_probability_grad, g)
            else:
                # The linear mixture: every term is bounded, ā = (1−α) q / m ∈ [0, 1]. It is formed from q and p
                # scaled by 2^64 (exact: the same ā and gradient, bit for bit, wherever they are normal floats), so
                # that the reciprocal sees a normal float unless m < 2^-190 (or the compiled ex2.ftz flushed q and p
                # to 0). Below that, where α > 0, p·ā ≤ p < 2^-190/α ≤ 2^-64: any ā in [0, 1] is exact enough; at
                # α = 0, m = q and ā = 1. So there ā = 1, 0 at α = 1 (the exact zero) and 0 where q = 0 and α > 0.
                q_scaled = _exp2(log2_q) * TWO_TO_64
                p_scaled = _exp2(log2_p) * TWO_TO_64
                m_scaled = alpha * p_scaled + one_minus_alpha * q_scaled
                a_bar = one_minus_alpha * q_scaled * _reciprocal(tl.maximum(m_scaled, MIN_NORMAL))
                tiny_share = tl.where(q_scaled == 0, zero_student_share, tiny_mixture_share)
                a_bar = tl.where(m_scaled < MIN_NORMAL, tiny_share, a_bar)
                g = (q_scaled * c - p_scaled * a_bar) * TWO_TO_MINUS_64
            tl.store(grad_row + cols, _to_output_dtype(g * grad_scale, grad_row.dtype.element_ty), mask=in_row)

    @triton.jit
    def _zero_row(grad_row, V, BLOCK_V: tl.constexpr):
        offsets = tl.arange(0, BLOCK_V)
        for start in range(0, V, BLOCK_V):
            cols = start + offsets
            tl.store(grad_row + cols, tl.zeros([BLOCK_V], dtype=grad_row.dtype.element_ty), mask=cols < V)

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
        outside [0, V)). Ignored rows are skipped and get zeros.
        Per entry (both rows): 2.1 ex2, 21.6 PTX instructions; reads 2 units, writes none."""
        row = tl.program_id(0).to(tl.int64)
        _statistics(student_ptr, teacher_ptr, student_outer_stride, student_inner_stride, teacher_outer_stride,
                    teacher_inner_stride, inner_rows, labels_ptr, ignore_index, inv_temperature, stats_ptr, V, row,
                    BLOCK_V, HAS_LABELS)

    @triton.jit
    def _statistics(student_ptr, teacher_ptr, student_outer_stride, student_inner_stride, teacher_outer_stride,
                    teacher_inner_stride, inner_rows, labels_ptr, ignore_index, inv_temperature, stats_ptr, V, row,
                    BLOCK_V: tl.constexpr, HAS_LABELS: tl.constexpr):
        """Sweep 1 of row `row`: writes its N_STATS statistics (column ROW_C as 0); returns (ignored, max_s,
        log2-sum_s, max_t, log2-sum_t)."""
        out = stats_ptr + row * N_STATS
        student_row = _row_start(student_ptr, row, inner_rows, student_outer_stride, student_inner_stride)
        teacher_row = _row_start(teacher_ptr, row, inner_rows, teacher_outer_stride, teacher_inner_stride)
        scale = inv_temperature * LOG2E
        ignored = False
        if HAS_LABELS:
            label = tl.load(labels_ptr + row)
            ignored = label == ignore_index
        max_s = 0.0
        max_t = 0.0
        log2_sum_s = 0.0
        log2_sum_t = 0.0
        if ignored:
            for k in tl.static_range(N_STATS):
                tl.store(out + k, 0.0)
        else:
            max_s, log_sum_s = _row_log_sum(student_row, V, scale, BLOCK_V)
            max_t, log_sum_t = _row_log_sum(teacher_row, V, scale, BLOCK_V)
            log2_sum_s = log_sum_s * LOG2E
            log2_sum_t = log_sum_t * LOG2E
            label_log_q = 0.0
            label_log_p = 0.0
            if HAS_LABELS:
                in_vocab = (label >= 0) & (label < V)
                z_s = tl.load(student_row + label, mask=in_vocab, other=float("nan")).to(tl.float32)
                z_t = tl.load(teacher_row + label, mask=in_vocab, other=float("nan")).to(tl.float32)
                label_log_q = (z_s - max_s) * inv_temperature - log_sum_s
                label_log_p = (z_t - max_t) * inv_temperature - log_sum_t
            tl.store(out + MAX_S, max_s)
            tl.store(out + LOG_SUM_S, log_sum_s)
            tl.store(out + MAX_T, max_t)
            tl.store(out + LOG_SUM_T, log_sum_t)
            tl.store(out + ROW_C, 0.0)
            tl.store(out + LABEL_LOG_Q, label_log_q)
            tl.store(out + LABEL_LOG_P, label_log_p)
        return ignored, max_s, log2_sum_s, max_t, log2_sum_t

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
        """Sweep 2: the loss and the row constant C. Per entry: SKL 4 SFU ops (ex2 ×2, lg2, rcp) and 33.2 PTX
        instructions, SRKL 4 and 31.0, detached SRKL 3 (no rcp) and 25.5; reads 2 units, writes none."""
        program = tl.program_id(0)
        row = program.to(tl.int64)
        stats_row = stats_ptr + row * N_STATS
        if HAS_LABELS:
            if tl.load(labels_ptr + row) == ignore_index:
                tl.store(loss_ptr + row, 0.0)
                tl.store(stats_row + ROW_C, 0.0)
                return
        if ALPHA_PER_ROW:
            alpha = tl.load(alpha_ptr + row)
        student_row = _row_start(student_ptr, row, inner_rows, student_outer_stride, student_inner_stride)
        teacher_row = _row_start(teacher_ptr, row, inner_rows, teacher_outer_stride, teacher_inner_stride)
        loss, c = _loss_sweep(student_row, teacher_row, V, tl.load(stats_row + MAX_S), tl.load(stats_row + LOG_SUM_S) * LOG2E,
                              tl.load(stats_row + MAX_T), tl.load(stats_row + LOG_SUM_T) * LOG2E, inv_temperature * LOG2E, alpha,
                              REVERSE, DETACH, BLOCK_V)
        # [N] and [N, 7] outputs: 32-bit offsets (N·7 < 2^31); recomputed here, not kept across the loop
        tl.store(loss_ptr + program, loss)
        tl.store(stats_ptr + program * N_STATS + ROW_C, c)

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
        """Sweep 3: the gradient. Per entry: SKL 3 SFU ops (ex2 ×2, rcp: a linear mixture) and 22.8 PTX
        instructions, SRKL 4 (ex2 ×2, lg2, rcp) and 33.8, detached SRKL 3 and 29.8; reads 2 units, writes 1."""
        row = tl.program_id(0).to(tl.int64)
        grad_row = grad_student_ptr + row * V
        if HAS_LABELS:
            if tl.load(labels_ptr + row) == ignore_index:
                _zero_row(grad_row, V, BLOCK_V)
                return
        if ALPHA_PER_ROW:
            alpha = tl.load(alpha_ptr + row)
        grad_scale = tl.load(grad_loss_ptr + row * grad_loss_stride) * inv_temperature
        stats_row = stats_ptr + row * N_STATS
        student_row = _row_start(student_ptr, row, inner_rows, student_outer_stride, student_inner_stride)
        teacher_row = _row_start(teacher_ptr, row, inner_rows, teacher_outer_stride, teacher_inner_stride)
        _gradient_sweep(grad_row, student_row, teacher_row, V, tl.load(stats_row + MAX_S), tl.load(stats_row + LOG_SUM_S) * LOG2E,
                        tl.load(stats_row + MAX_T), tl.load(stats_row + LOG_SUM_T) * LOG2E, inv_temperature * LOG2E, alpha,
                        tl.load(stats_row + ROW_C), grad_scale, REVERSE, DETACH, BLOCK_V)

    @triton.jit
    def _skew_forward_and_grad_kernel(
        grad_student_ptr,  # [N, V] out: gradient w.r.t. the student logits, contiguous, input dtype
        row_grad_scale_ptr,  # [N] float32: d(reduced loss)/d(loss_i), known at forward time
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
        ignore_index,  # rows whose label equals this get zero statistics, loss and gradient
        inv_temperature,  # 1 / T
        loss_ptr,  # [N] float32 out: per-row loss
        stats_ptr,  # [N, 7] float32 out: the row statistics, C included
        V,  # vocabulary size
        BLOCK_V: tl.constexpr,  # vocabulary entries per block
        REVERSE: tl.constexpr,  # False: SKL, True: SRKL
        DETACH: tl.constexpr,  # SRKL only: q inside r is a constant
        HAS_LABELS: tl.constexpr,  # whether labels_ptr is given
        ALPHA_PER_ROW: tl.constexpr,  # whether alpha_ptr is given
    ):
        """Sweeps 1, 2 and 3 of one row back to back, for the scalar reductions: the loss, the statistics and
        the gradient scaled by row_grad_scale / T. The same per-entry work as the three kernels above (their
        sum: SKL 9.1 SFU ops and 78.4 PTX instructions per entry, SRKL 10.1 and 87.1, detached 8.1 and 77.6);
        the second and third reads of a row follow the first within one program, so that they hit L2 while the
        rows in flight fit there: then 2 units read and 1 written from HBM, else 6 read and 1 written
        (docs/design.md §7)."""
        program = tl.program_id(0)
        row = program.to(tl.int64)
        # the [N] and [N, 7] arrays take 32-bit offsets (N·7 < 2^31), recomputed where used, so that no address
        # lives across a sweep (it would spill at sm_80); the [N, V] ones 64-bit
        if ALPHA_PER_ROW:
            alpha = tl.load(alpha_ptr + program)
        ignored, max_s, log2_sum_s, max_t, log2_sum_t = _statistics(
            student_ptr, teacher_ptr, student_outer_stride, student_inner_stride, teacher_outer_stride,
            teacher_inner_stride, inner_rows, labels_ptr, ignore_index, inv_temperature, stats_ptr, V, row,
            BLOCK_V, HAS_LABELS)
        if ignored:
            tl.store(loss_ptr + program, 0.0)
            _zero_row(grad_student_ptr + row * V, V, BLOCK_V)
        else:
            student_row = _row_start(student_ptr, row, inner_rows, student_outer_stride, student_inner_stride)
            teacher_row = _row_start(teacher_ptr, row, inner_rows, teacher_outer_stride, teacher_inner_stride)
            scale = inv_temperature * LOG2E
            loss, c = _loss_sweep(student_row, teacher_row, V, max_s, log2_sum_s, max_t, log2_sum_t, scale, alpha,
                                  REVERSE, DETACH, BLOCK_V)
            tl.store(loss_ptr + program, loss)
            tl.store(stats_ptr + program * N_STATS + ROW_C, c)
            grad_scale = tl.load(row_grad_scale_ptr + program) * inv_temperature
            _gradient_sweep(grad_student_ptr + row * V, student_row, teacher_row, V, max_s, log2_sum_s, max_t,
                            log2_sum_t, scale, alpha, c, grad_scale, REVERSE, DETACH, BLOCK_V)

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


def skew_forward_and_grad(
    rows: SkewRows, reverse: bool, detach: bool, row_grad_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss [N], stats [N, 7], grad_student [N, V]) in one kernel, for the scalar reductions:
    grad_student equals `skew_backward(rows, reverse, detach, stats, row_grad_scale)` (row_grad_scale[i] =
    d(reduced loss)/d(loss_i), without the 1/T this applies)."""
    _check_runnable(rows)
    n, v = rows.num_rows, rows.vocab_size
    device = rows.student.device
    stats = torch.empty((n, STATS), dtype=torch.float32, device=device)
    loss = torch.empty(n, dtype=torch.float32, device=device)
    grad = torch.empty((n, v), dtype=rows.student.dtype, device=device)
    if n == 0:
        return loss, stats, grad
    row_grad_scale = row_grad_scale.to(device=device, dtype=torch.float32).contiguous()
    block, warps = launch_config(v)
    _skew_forward_and_grad_kernel[(n,)](
        grad,
        row_grad_scale,
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
    return loss, stats, grad
