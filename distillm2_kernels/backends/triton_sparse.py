"""Triton kernels for the dense sweeps of the sparse-teacher ops (the spec: `torch_sparse`), one program per
student row, each a loop over V in blocks of BLOCK_V.

Math (row r; log q_v = z_v/T − lse, α = alpha_rows[r], c = exp(log_tail[r]) the tail token's teacher
probability; g_v = ∂(row loss)/∂q_v of a tail entry):

    student_logsumexp   lse = log Σ_v exp(z_v/T)
    tail_sums           (Σ_v f_v, Σ_v q_v·g_v) over all V entries:
                        SKL   f = c·(log c − log m),   m = αc + (1−α)q,   q·g = −c·ā,   ā = (1−α)q/m ∈ [0, 1]
                        SRKL  f = q·d,  d = log q − log r,  r = (1−α)c + αq,  g = d + 1 − [not detach] αq/r
    student_grad        grad_v = row_scale·q_v·(g_v − row_shift) (g = 0 without a tail)

In base 2, as the dense kernels (`triton_backend`): y = log2 q = z·log2(e)/T − lse·log2(e) (one FMA), q = 2^y,
and the SFU's ex2 / lg2 / rcp through inline PTX when compiled (`triton_backend.FAST_MATH`; the interpreter runs
the same algebra on tl.exp2 / tl.log2 / a division). Per entry:
- the log-sum-exp keeps its running shift an integer k (in log2 units), so that rescaling the running sum by
  2^(k_old − k_new) is built from the float's bits: 1 ex2 per entry, none per block;
- the tail sums form both mixtures in log space (`_mixture_terms`): log2 m of log2(αc) and log2((1−α)q), log2 r
  of log2(αq) and log2((1−α)c), as `hi + lg2(1 + 2^(lo − hi))`, with log2(c/m) and log2(q/r) taken without the
  rounding of hi and lg2(1 + x) corrected for the rounding of 1 + x: f stays finite where q underflows (SKL at
  α = 0) and accurate where it cancels (α near 1); the mixture's other share (ā, e = (1−α)c/r ∈ [0, 1]) from the
  same x and 1/(1 + x). SKL: ex2, lg2, rcp (no q); SRKL: ex2 (q), ex2, lg2, rcp;
- the gradient, within the sweep budget of 1 ex2 + 1 lg2 + 1 rcp, forms the mixtures linearly. SKL: q·g = −c·ā
  with ā = (1−α)q/max(m, 2^-125) (ā = 1 wherever q > 0 at α = 0, also where q underflows): ex2 (q), rcp. SRKL:
  r = max((1−α)c + αq, 2^-125) (smaller only where q < 2^-125/α, a contribution below that), ex2 (q), lg2 (log2 r)
  and, not detached, rcp (e); log2 r = log2 c at α = 0 (given exactly), d = 0 set at α = 1 (r = q there, and
  log2 q − lg2(2^y) would leave an SFU rounding).
So α = 1 gives exactly f = 0 and q·g = 0 (SKL: ā = 0, m = c; SRKL: d = e = 0, or, detached, g = 1).

Conventions (`torch_sparse`'s): q = 0 (a −inf logit) gives exactly q·g = 0, SRKL's f = 0 and a zero gradient
entry; c = 0 gives SKL's f = q·g = 0; rows whose label is `ignore_index` get lse 0, sums 0 and an exact-zero gradient,
with no vocabulary work. A row holding NaN or +inf gets lse NaN (as the dense kernels' statistics), and NaN
sums and a NaN gradient row (the q = 0 guards test `q == 0`, which NaN fails; the sums add NaN where lse is
NaN). Student rows are `[N, V]` (any row stride) or `[outer, inner, V]` (`_inputs.row_layout`), float16 /
bfloat16 / float32 (float64 runs on `torch_sparse`), read in place with 64-bit offsets; the per-row inputs are
float32 `[N]`. α, T and ignore_index are runtime values; reverse, detach and whether there is a tail are
constexpr. Nothing synchronises with the host. Per-entry counts (sm_90 PTX, BLOCK_V = 4096, 8 warps) are in
docs/design.md §7.1, printed by `python -m benchmarks.aot_compile`.
"""

from __future__ import annotations

import struct
from typing import Optional

import torch

from .._inputs import num_rows, row_layout
from .triton_backend import TRITON_AVAILABLE, interpreter_enabled, launch_config, unavailable_reason

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    from .triton_backend import FAST_MATH, LN2, LOG2E

__all__ = ["student_logsumexp", "tail_sums", "student_grad", "unavailable_reason", "interpreter_enabled"]

ROW_TEMPORARIES = 0  # [rows, V] temporaries the kernels allocate besides their output


if TRITON_AVAILABLE:
    # the smallest mixture the SFU's ftz forms take without flushing, with a reciprocal that stays finite
    MIN_NORMAL_2 = tl.constexpr(2.350988701644575e-38)  # 2^-125

    @triton.jit
    def _exp2(x):
        """2^x; ex2.approx.ftz compiled (a result below 2^-126 is 0, −inf gives 0)."""
        if FAST_MATH:
            return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                             is_pure=True, pack=1)
        else:
            return tl.exp2(x)

    @triton.jit
    def _log2(x):
        """log2 x of a normal float; lg2.approx.ftz compiled (absolute error about 2^-22)."""
        if FAST_MATH:
            return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                             is_pure=True, pack=1)
        else:
            return tl.log2(x)

    @triton.jit
    def _reciprocal(x):
        """1 / x of a normal float; rcp.approx.ftz compiled (relative error 1 ulp)."""
        if FAST_MATH:
            return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                             is_pure=True, pack=1)
        else:
            return 1.0 / x

    @triton.jit
    def _to_output_dtype(x, out_dtype: tl.constexpr):
        """float32 -> out_dtype rounding to nearest even (the interpreter truncates to bfloat16: rounded by
        hand there first)."""
        if not FAST_MATH:
            if out_dtype == tl.bfloat16:
                bits = x.to(tl.uint32, bitcast=True)
                bits = bits + 0x7FFF + ((bits >> 16) & 1)
                x = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
        return x.to(out_dtype)

    @triton.jit
    def _row_start(base_ptr, row, inner_rows, outer_stride, inner_stride):
        """Row `row` (int64) of rows laid out as [outer, inner, V]; [N, V] rows are one outer index."""
        return base_ptr + (row // inner_rows) * outer_stride + (row % inner_rows) * inner_stride

    @triton.jit
    def _zero_row(grad_row, V, BLOCK_V: tl.constexpr):
        offsets = tl.arange(0, BLOCK_V)
        for start in range(0, V, BLOCK_V):
            cols = start + offsets
            tl.store(grad_row + cols, tl.zeros([BLOCK_V], dtype=grad_row.dtype.element_ty), mask=cols < V)

    @triton.jit
    def _is_ignored(labels_ptr, row, ignore_index, HAS_LABELS: tl.constexpr):
        ignored = False
        if HAS_LABELS:
            ignored = tl.load(labels_ptr + row) == ignore_index
        return ignored

    @triton.jit
    def _pow2_of_integer(k):
        """2^k, exact, of an integer-valued float k ≤ 0 (0 for k ≤ −127 and for k = −inf or NaN), built from
        the float's bits: no SFU op."""
        k = tl.maximum(tl.where(k == k, k, -127.0), -127.0)
        return ((k.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _row_log2_sum(row_ptr, V, scale, BLOCK_V: tl.constexpr):
        """(k, s) with Σ_v 2^(z_v·scale) = 2^k·s over `row[:V]`, scale = log2(e)/T: k the integer ceiling of
        the largest z·scale (−inf for a row of −inf, +inf for a row holding +inf), s ∈ [1/2, V] (0 for a row of
        −inf; NaN for a row holding NaN or +inf). Per entry: load, convert, FMA, ex2, add and the block max."""
        offsets = tl.arange(0, BLOCK_V)
        shift = float("-inf")
        total = 0.0
        for start in range(0, V, BLOCK_V):
            cols = start + offsets
            z = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            new_shift = tl.maximum(shift, tl.ceil(tl.max(z, 0) * scale))
            rescale = _pow2_of_integer(tl.where(new_shift == shift, 0.0, shift - new_shift))
            finite_shift = tl.where(new_shift == float("-inf"), 0.0, new_shift)
            total = total * rescale + tl.sum(_exp2(z * scale - finite_shift), 0)
            shift = new_shift
        return shift, total

    @triton.jit
    def _mixture_terms(a, b, log2_x, minus_log2_w):
        """For a two-term mixture M = 2^a + 2^b with a = log2(w·X): (log2(X/M), 2^b/M ∈ [0, 1]), M in log space:
        log2 M = hi + lg2(1 + x), x = 2^(lo − hi), hi and lo the larger and smaller of a and b; log2 X − hi is
        −log2 w (`minus_log2_w`) or log2 X − b, never log2 X minus a rounded hi (X/M ≈ 1 would cancel), and
        lg2(1 + x) gets back what rounding 1 + x lost. ex2, lg2, rcp; NaN when a or b is NaN."""
        hi = tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)
        lo = tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)
        x = _exp2(lo - tl.where(hi == float("-inf"), 0.0, hi))
        u = 1.0 + x
        inv_u = _reciprocal(u)
        log2_one_plus_x = _log2(u) + (x - (u - 1.0)) * inv_u * LOG2E
        log2_ratio = tl.where(b > a, log2_x - b, minus_log2_w) - log2_one_plus_x
        share_b = tl.where(b >= a, 1.0, x) * inv_u
        return log2_ratio, share_b

    @triton.jit
    def _srkl_tail_terms(y, q, c, log2_c, alpha, alpha_is_zero, alpha_is_one, DETACH: tl.constexpr):
        """SRKL per entry of the gradient, r linear: (d2 = log2 q − log2 r, g), r = (1−α)c + αq; g = d + 1 (DETACH) or d + e with
        e = 1 − αq/r = (1−α)c/r ∈ [0, 1] (no cancellation; exactly 0 at α = 1). lg2, and rcp unless DETACH."""
        one_minus_alpha = 1.0 - alpha
        r = tl.maximum(one_minus_alpha * c + alpha * q, MIN_NORMAL_2)
        log2_r = tl.where(alpha_is_zero, log2_c, _log2(r))
        d2 = tl.where(alpha_is_one, 0.0, y - log2_r)
        if DETACH:
            g = d2 * LN2 + 1.0
        else:
            g = d2 * LN2 + one_minus_alpha * c * _reciprocal(r)
        return d2, g

    @triton.jit
    def _student_logsumexp_kernel(
        student_ptr,  # student logits, N rows of V (row layout: see `_row_start`), unit column stride
        student_outer_stride,  # elements between rows r and r + inner_rows
        student_inner_stride,  # elements between consecutive rows of one outer index
        inner_rows,  # rows per outer index (N for [N, V] logits)
        labels_ptr,  # [N] integer labels; read only when HAS_LABELS
        ignore_index,  # rows whose label equals this get lse 0
        inv_temperature,  # 1 / T
        lse_out_ptr,  # [N] float32 out: log Σ_v exp(z_v / T)
        V,  # vocabulary size
        BLOCK_V: tl.constexpr,  # vocabulary entries per block
        HAS_LABELS: tl.constexpr,  # whether labels_ptr is given
    ):
        """lse of one row, online (integer running shift, see `_row_log2_sum`): 1 ex2 per entry, reads 1 unit."""
        program = tl.program_id(0)
        row = program.to(tl.int64)
        lse = 0.0
        if not _is_ignored(labels_ptr, row, ignore_index, HAS_LABELS):
            student_row = _row_start(student_ptr, row, inner_rows, student_outer_stride, student_inner_stride)
            k, total = _row_log2_sum(student_row, V, inv_temperature * LOG2E, BLOCK_V)
            lse = tl.where(k == float("inf"), float("nan"), k * LN2 + tl.log(total))
        tl.store(lse_out_ptr + program, lse)

    @triton.jit
    def _tail_sums_kernel(
        student_ptr,  # student logits, N rows of V (row layout: see `_row_start`), unit column stride
        student_outer_stride,  # elements between rows r and r + inner_rows
        student_inner_stride,  # elements between consecutive rows of one outer index
        inner_rows,  # rows per outer index (N for [N, V] logits)
        labels_ptr,  # [N] integer labels; read only when HAS_LABELS
        ignore_index,  # rows whose label equals this get sums 0
        inv_temperature,  # 1 / T
        lse_ptr,  # [N] float32: the student's log Σ exp(z / T)
        log_tail_ptr,  # [N] float32: log c, the tail token's teacher log-probability (−inf: no tail mass)
        alpha_ptr,  # [N] float32 per-row α
        sums_ptr,  # [N, 2] float32 out: (Σ_v f_v, Σ_v q_v·g_v)
        V,  # vocabulary size
        BLOCK_V: tl.constexpr,  # vocabulary entries per block
        HAS_LABELS: tl.constexpr,  # whether labels_ptr is given
        REVERSE: tl.constexpr,  # False: SKL, True: SRKL
        DETACH: tl.constexpr,  # SRKL only: q inside r is a constant
    ):
        """The tail sums of one row, the mixtures in log space. Per entry: SKL ex2, lg2, rcp (no q); SRKL 2 ex2
        (q and the mixture's ratio), lg2, rcp; reads 1 unit."""
        program = tl.program_id(0)
        row = program.to(tl.int64)
        f_sum = 0.0
        qg_sum = 0.0
        if not _is_ignored(labels_ptr, row, ignore_index, HAS_LABELS):
            lse = tl.load(lse_ptr + program)
            log2_c = tl.load(log_tail_ptr + program) * LOG2E
            alpha = tl.load(alpha_ptr + program)
            c = tl.exp2(log2_c)
            scale = inv_temperature * LOG2E
            log2_sum = lse * LOG2E
            student_row = _row_start(student_ptr, row, inner_rows, student_outer_stride, student_inner_stride)
            offsets = tl.arange(0, BLOCK_V)
            f_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
            qg_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
            log2_alpha = tl.log2(alpha)
            minus_log2_alpha = -log2_alpha
            log2_alpha_c = log2_alpha + log2_c  # log2(αc), SKL
            log2_one_minus_alpha = tl.log2(1.0 - alpha)
            log2_one_minus_alpha_c = log2_one_minus_alpha + log2_c  # log2((1−α)c), SRKL
            no_tail = (c == 0.0) and not REVERSE
            for start in range(0, V, BLOCK_V):
                cols = start + offsets
                in_row = cols < V
                z = tl.load(student_row + cols, mask=in_row, other=float("-inf")).to(tl.float32)
                y = z * scale - log2_sum
                if REVERSE:
                    # r = (1−α)c + αq in log space: d2 = log2(q/r), e = (1−α)c/r (exactly 0 at α = 1)
                    q = _exp2(y)
                    d2, e = _mixture_terms(log2_alpha + y, log2_one_minus_alpha_c, y, minus_log2_alpha)
                    g = d2 * LN2 + 1.0
                    if not DETACH:
                        g = d2 * LN2 + e
                    f_acc += tl.where(q == 0.0, 0.0, q * d2)
                    qg_acc += tl.where(q == 0.0, 0.0, q * g)
                else:
                    # m = αc + (1−α)q in log space: log2(c/m), ā = (1−α)q/m; no q
                    log2_ratio, a_bar = _mixture_terms(log2_alpha_c, log2_one_minus_alpha + y, log2_c,
                                                       minus_log2_alpha)
                    f_acc += tl.where(in_row, c * log2_ratio, 0.0)  # c·log(c/m) is not 0 off the row
                    qg_acc += tl.where(y == float("-inf"), 0.0, -c * a_bar)
            poison = tl.where(lse == lse, 0.0, float("nan"))  # a NaN lse (NaN or +inf logits): NaN sums
            f_sum = tl.where(no_tail, 0.0, tl.sum(f_acc, 0) * LN2) + poison  # SKL, c = 0: f = 0 (0·log 0 is NaN)
            qg_sum = tl.sum(qg_acc, 0) + poison
        tl.store(sums_ptr + program * 2, f_sum)
        tl.store(sums_ptr + program * 2 + 1, qg_sum)

    @triton.jit
    def _student_grad_kernel(
        grad_student_ptr,  # [N, V] out: the gradient, contiguous, in the student's dtype
        student_ptr,  # student logits, N rows of V (row layout: see `_row_start`), unit column stride
        student_outer_stride,  # elements between rows r and r + inner_rows
        student_inner_stride,  # elements between consecutive rows of one outer index
        inner_rows,  # rows per outer index (N for [N, V] logits)
        labels_ptr,  # [N] integer labels; read only when HAS_LABELS
        ignore_index,  # rows whose label equals this get a zero gradient
        inv_temperature,  # 1 / T
        lse_ptr,  # [N] float32: the student's log Σ exp(z / T)
        row_scale_ptr,  # [N] float32: the factor of row r's gradient
        row_shift_ptr,  # [N] float32: subtracted from g in row r
        log_tail_ptr,  # [N] float32: log c; read only when HAS_TAIL
        alpha_ptr,  # [N] float32 per-row α; read only when HAS_TAIL
        V,  # vocabulary size
        BLOCK_V: tl.constexpr,  # vocabulary entries per block
        HAS_LABELS: tl.constexpr,  # whether labels_ptr is given
        HAS_TAIL: tl.constexpr,  # False: g = 0 (REVERSE and DETACH unused)
        REVERSE: tl.constexpr,  # False: SKL, True: SRKL
        DETACH: tl.constexpr,  # SRKL only: q inside r is a constant
    ):
        """grad = row_scale·q·(g − row_shift) of one row. Per entry: no tail ex2; SKL ex2, rcp; SRKL ex2, lg2
        and, not detached, rcp; reads 1 unit, writes 1."""
        program = tl.program_id(0)
        row = program.to(tl.int64)
        grad_row = grad_student_ptr + row * V
        if _is_ignored(labels_ptr, row, ignore_index, HAS_LABELS):
            _zero_row(grad_row, V, BLOCK_V)
        else:
            log2_sum = tl.load(lse_ptr + program) * LOG2E
            row_scale = tl.load(row_scale_ptr + program)
            minus_scaled_shift = -row_scale * tl.load(row_shift_ptr + program)
            scale = inv_temperature * LOG2E
            alpha = 0.0
            log2_c = float("-inf")
            if HAS_TAIL:
                alpha = tl.load(alpha_ptr + program)
                log2_c = tl.load(log_tail_ptr + program) * LOG2E
            c = tl.exp2(log2_c)
            alpha_is_zero = alpha == 0.0
            alpha_is_one = alpha == 1.0
            student_row = _row_start(student_ptr, row, inner_rows, student_outer_stride, student_inner_stride)
            offsets = tl.arange(0, BLOCK_V)
            for start in range(0, V, BLOCK_V):
                cols = start + offsets
                in_row = cols < V
                z = tl.load(student_row + cols, mask=in_row, other=float("-inf")).to(tl.float32)
                y = z * scale - log2_sum
                q = _exp2(y)
                if not HAS_TAIL:
                    grad = q * minus_scaled_shift
                elif REVERSE:
                    _, g = _srkl_tail_terms(y, q, c, log2_c, alpha, alpha_is_zero, alpha_is_one, DETACH)
                    grad = tl.where(q == 0.0, 0.0, q * (g * row_scale + minus_scaled_shift))
                else:
                    # linear mixture: ā = (1−α)q/m ∈ [0, 1]; at α = 0 it is 1 wherever q > 0, also where q underflows
                    m = alpha * c + (1.0 - alpha) * q
                    a_bar = (1.0 - alpha) * q * _reciprocal(tl.maximum(m, MIN_NORMAL_2))
                    a_bar = tl.where(alpha_is_zero, tl.where(y == float("-inf"), 0.0, 1.0), a_bar)
                    grad = (-c * a_bar) * row_scale + q * minus_scaled_shift
                tl.store(grad_row + cols, _to_output_dtype(grad, grad_row.dtype.element_ty), mask=in_row)


def _check_student(student: torch.Tensor) -> None:
    reason = unavailable_reason(student.device)
    if reason is not None:
        raise RuntimeError(reason)
    if student.dtype == torch.float64:
        raise TypeError("the triton backend takes float16, bfloat16 or float32 student logits, got float64 "
                        "(float64 runs on torch_sparse)")
    if student.dim() not in (2, 3) or student.shape[-1] == 0 or (student.shape[-1] > 1 and student.stride(-1) != 1):
        raise ValueError(f"student rows must be [N, V] or [outer, inner, V] with a unit column stride, got shape "
                         f"{tuple(student.shape)} and strides {student.stride()}")


def _as_float32(value: float) -> float:
    """A scalar rounded to float32, so that triton types it fp32 (it makes tiny or huge floats fp64)."""
    return struct.unpack("f", struct.pack("f", float(value)))[0]


def _per_row(values: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    """`values` as a contiguous float32 [n] tensor on `device` (no copy when it is one already)."""
    values = values.to(device=device, dtype=torch.float32).contiguous()
    if values.shape != (n,):
        raise ValueError(f"per-row values must have shape [{n}], got {tuple(values.shape)}")
    return values


def _row_args(student: torch.Tensor, labels: Optional[torch.Tensor], ignore_index: int, inv_temperature: float):
    """student_ptr, its outer and inner strides, inner_rows, labels_ptr, ignore_index, inv_temperature."""
    inner, outer_stride, inner_stride = row_layout(student)
    return (student, outer_stride, inner_stride, inner, labels if labels is not None else student, int(ignore_index),
            _as_float32(inv_temperature))


def student_logsumexp(
    student: torch.Tensor, labels: Optional[torch.Tensor], ignore_index: int, inv_temperature: float
) -> torch.Tensor:
    """lse [N] float32 = log Σ_v exp(z_v/T) per row, 0 for ignored rows (NaN for rows holding NaN or +inf)."""
    _check_student(student)
    n, v = num_rows(student), student.shape[-1]
    lse = torch.empty(n, dtype=torch.float32, device=student.device)
    if n == 0:
        return lse
    block, warps = launch_config(v)
    _student_logsumexp_kernel[(n,)](
        *_row_args(student, labels, ignore_index, inv_temperature), lse, v,
        BLOCK_V=block, HAS_LABELS=labels is not None, num_warps=warps,
    )
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
    _check_student(student)
    n, v = num_rows(student), student.shape[-1]
    device = student.device
    sums = torch.empty(n, 2, dtype=torch.float32, device=device)
    if n == 0:
        return sums
    block, warps = launch_config(v)
    _tail_sums_kernel[(n,)](
        *_row_args(student, labels, ignore_index, inv_temperature),
        _per_row(lse, n, device), _per_row(log_tail, n, device), _per_row(alpha_rows, n, device), sums, v,
        BLOCK_V=block, HAS_LABELS=labels is not None, REVERSE=bool(reverse), DETACH=bool(reverse and detach),
        num_warps=warps,
    )
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
    """grad [N, V] = row_scale · q · (g − row_shift), contiguous in the student's dtype; g = 0 when
    `log_tail` is None (no tail), else the tail's g. Ignored rows are exact zeros."""
    _check_student(student)
    n, v = num_rows(student), student.shape[-1]
    device = student.device
    grad = torch.empty(n, v, dtype=student.dtype, device=device)
    if n == 0:
        return grad
    has_tail = log_tail is not None
    lse = _per_row(lse, n, device)
    block, warps = launch_config(v)
    _student_grad_kernel[(n,)](
        grad, *_row_args(student, labels, ignore_index, inv_temperature), lse,
        _per_row(row_scale, n, device), _per_row(row_shift, n, device),
        _per_row(log_tail, n, device) if has_tail else lse, _per_row(alpha_rows, n, device) if has_tail else lse, v,
        BLOCK_V=block, HAS_LABELS=labels is not None, HAS_TAIL=has_tail, REVERSE=bool(has_tail and reverse),
        DETACH=bool(has_tail and reverse and detach), num_warps=warps,
    )
    return grad
