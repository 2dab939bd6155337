"""Validation of the public arguments and their flattening into rows.

Every backend sees the same normalised view of a call: logits as rows with a unit column stride, either
`[N, V]` (any row stride) or `[outer, inner, V]` (rows = outer × inner, each level with its own stride: a
`[B, T−1, V]` slice of `[B, T, V]` logits), both of the same shape; optional `[N]` labels; and α either as one
float or as an `[N]` float32 tensor (N = outer · inner). Row r lies at
`(r // inner) · outer_stride + (r % inner) · inner_stride` (`row_layout`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

Alpha = Union[float, torch.Tensor]


@dataclass
class SkewRows:
    """One call's inputs, flattened to rows."""

    student: torch.Tensor  # [N, V] or [outer, inner, V], unit column stride
    teacher: torch.Tensor  # the student's shape, unit column stride (strides of its own)
    labels: Optional[torch.Tensor]  # [N] integer, or None when every row counts
    alpha_rows: Optional[torch.Tensor]  # [N] float32 per-row α, or None
    alpha: float  # the scalar α, used when alpha_rows is None
    ignore_index: int
    inv_temperature: float
    leading_shape: torch.Size  # the logits' shape without V

    @property
    def num_rows(self) -> int:
        return num_rows(self.student)

    @property
    def vocab_size(self) -> int:
        return self.student.shape[-1]


def flat_rows(student, teacher, labels, alpha_rows, alpha, ignore_index, inv_temperature) -> SkewRows:
    """`SkewRows` of already-checked row logits and per-row tensors, with the flat leading shape `[N]`."""
    return SkewRows(
        student=student,
        teacher=teacher,
        labels=labels,
        alpha_rows=alpha_rows,
        alpha=alpha,
        ignore_index=ignore_index,
        inv_temperature=inv_temperature,
        leading_shape=torch.Size([num_rows(student)]),
    )


def num_rows(logits: torch.Tensor) -> int:
    """N of row logits `[N, V]` or `[outer, inner, V]`."""
    return logits.shape[0] if logits.dim() == 2 else logits.shape[0] * logits.shape[1]


def row_layout(logits: torch.Tensor) -> tuple[int, int, int]:
    """(inner, outer_stride, inner_stride) of row logits: row r starts `(r // inner) · outer_stride +
    (r % inner) · inner_stride` elements after the first. `[N, V]` has one level: inner = N (at least 1)."""
    if logits.dim() == 2:
        return max(1, logits.shape[0]), 0, logits.stride(0)
    return max(1, logits.shape[1]), logits.stride(0), logits.stride(1)


def _level_breaks(logits: torch.Tensor) -> list[int]:
    """The positions p among the leading dims where dim p cannot merge with the last dim before it of size
    above 1 into one strided level (size-1 dims merge with anything, so they are skipped)."""
    kept = [d for d in range(logits.dim() - 1) if logits.shape[d] != 1]
    return [
        inner
        for outer, inner in zip(kept, kept[1:])
        if logits.stride(outer) != logits.stride(inner) * logits.shape[inner]
    ]


def _as_rows_pair(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`[..., V]` logits (one leading shape) -> views of the same shape, `[N, V]` when each one's leading dims
    merge into one strided level, else `[outer, inner, V]` when they merge into two at a split both share.
    No copy then: sliced rows (`logits[..., :V]`) and sliced sequences (`logits[:, :-1]`) are read in place.
    Copied (`contiguous`): logits whose vocabulary stride is not 1, logits whose leading dims need three or
    more strided levels, and the teacher when the two need different splits."""
    vocab = student.shape[-1]
    leading = student.shape[:-1]
    if math.prod(leading) == 0:
        return student.reshape(0, vocab), teacher.reshape(0, vocab)
    if vocab > 1 and student.stride(-1) != 1:
        student = student.contiguous()
    if vocab > 1 and teacher.stride(-1) != 1:
        teacher = teacher.contiguous()
    if len(_level_breaks(student)) > 1:
        student = student.contiguous()
    breaks = set(_level_breaks(student)) | set(_level_breaks(teacher))
    if len(breaks) > 1:
        teacher = teacher.contiguous()
        breaks = set(_level_breaks(student))
    if not breaks:
        return student.view(-1, vocab), teacher.view(-1, vocab)
    (split,) = breaks
    shape = (math.prod(leading[:split]), math.prod(leading[split:]), vocab)
    return student.view(shape), teacher.view(shape)


def as_rows(logits: torch.Tensor) -> torch.Tensor:
    """`[..., V]` logits as row logits `[N, V]` or `[outer, inner, V]`, read in place where `_as_rows_pair` would."""
    return _as_rows_pair(logits, logits)[0]


def compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """The dtype the arithmetic runs in: float64 when any of `tensors` is float64, else float32."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def check_float_tensor(name: str, tensor: object) -> torch.Tensor:
    """TypeError unless `tensor` is a tensor of one of `LOGIT_DTYPES`."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in LOGIT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float16, bfloat16 or float32; float64 on the torch "
            f"backend), got dtype {tensor.dtype}"
        )
    return tensor


def check_logits(name: str, logits: object) -> torch.Tensor:
    logits = check_float_tensor(name, logits)
    if logits.dim() == 0:
        raise ValueError(f"{name} must have shape [..., V], got a 0-d tensor")
    if logits.shape[-1] == 0:
        raise ValueError(f"{name} has an empty vocabulary dimension (V = 0)")
    return logits


def check_alpha_value(alpha: float) -> float:
    alpha = float(alpha)
    if not (0.0 <= alpha <= 1.0):  # also rejects NaN
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    return alpha


def _alpha_rows(alpha: torch.Tensor, leading: torch.Size, device: torch.device, source: str) -> torch.Tensor:
    if not alpha.is_floating_point():
        raise TypeError(f"alpha must be a float or a floating tensor, got dtype {alpha.dtype}")
    if alpha.requires_grad:
        raise ValueError("alpha requires grad, but no gradient flows to alpha: pass alpha.detach()")
    if alpha.device != device and alpha.dim() > 0:
        raise ValueError(f"alpha is on {alpha.device} but {source} are on {device}")
    shape = tuple(alpha.shape)
    if alpha.dim() == 1 and len(leading) >= 2:
        # A 1-D α is per sequence: it aligns with the first leading dim, not the last.
        if shape[0] not in (1, leading[0]):
            raise ValueError(
                f"a 1-D alpha is per sequence and needs length {leading[0]} (the first leading dim of "
                f"{source}' shape {tuple(leading)}), got length {shape[0]}"
            )
        alpha = alpha.reshape(shape + (1,) * (len(leading) - 1))
    try:
        if alpha.dim() > len(leading) or torch.broadcast_shapes(alpha.shape, leading) != leading:
            raise RuntimeError
    except RuntimeError:
        raise ValueError(
            f"alpha of shape {shape} does not broadcast to {source}' leading shape {tuple(leading)}; "
            "use a float, [B] or [B, 1] per sequence, or [B, T] per token"
        ) from None
    rows = alpha.to(device=device, dtype=torch.float32).expand(leading).reshape(-1).contiguous()
    require(((rows >= 0) & (rows <= 1)).all(), "alpha must lie in [0, 1]; the alpha tensor has entries outside it (or NaN)")
    return rows


@dataclass
class TokenOptions:
    """The per-token arguments of a call (everything of `SkewRows` but the logits), flattened to rows."""

    labels: Optional[torch.Tensor]  # [N] integer, or None when every row counts
    alpha_rows: Optional[torch.Tensor]  # [N] float32 per-row α, or None
    alpha: float  # the scalar α, used when alpha_rows is None
    ignore_index: int
    inv_temperature: float
    leading_shape: torch.Size  # the token shape: the logits' (or hidden states') shape without the last dim


def prepare_token_options(
    leading: torch.Size,
    device: torch.device,
    alpha: Alpha,
    labels: Optional[torch.Tensor],
    ignore_index: int,
    temperature: float,
    source: str,
) -> TokenOptions:
    """Check α, labels, ignore_index and temperature against the token shape `leading` of `source`
    (a plural noun for the messages: "the logits", "the hidden states") and flatten them to rows."""
    if labels is not None:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
        if labels.shape != leading:
            raise ValueError(
                f"labels must have {source}' leading shape {tuple(leading)}, got {tuple(labels.shape)}"
            )
        if labels.device != device:
            raise ValueError(f"labels is on {labels.device} but {source} are on {device}")
        labels = labels.reshape(-1)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")

    if isinstance(temperature, torch.Tensor) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a Python float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")

    if isinstance(alpha, torch.Tensor):
        alpha_rows, alpha_value = _alpha_rows(alpha, leading, device, source), 0.0
    elif isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
        alpha_rows, alpha_value = None, check_alpha_value(alpha)
    else:
        raise TypeError(f"alpha must be a float or a tensor, got {type(alpha).__name__}")

    return TokenOptions(
        labels=labels,
        alpha_rows=alpha_rows,
        alpha=alpha_value,
        ignore_index=ignore_index,
        inv_temperature=1.0 / float(temperature),
        leading_shape=leading,
    )


def prepare_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    alpha: Alpha,
    labels: Optional[torch.Tensor],
    ignore_index: int,
    temperature: float,
) -> SkewRows:
    """Check the arguments of a skew divergence (student first) and flatten them to rows."""
    student = check_logits("student_logits", student)
    teacher = check_logits("teacher_logits", teacher)
    if student.shape[-1] != teacher.shape[-1]:
        small = min(student.shape[-1], teacher.shape[-1])
        raise ValueError(
            f"student_logits has V = {student.shape[-1]} but teacher_logits has V = {teacher.shape[-1]}; "
            f"the two models must share a vocabulary: slice the larger one, e.g. logits[..., :{small}]"
        )
    if student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(
            f"student_logits {tuple(student.shape)} and teacher_logits {tuple(teacher.shape)} differ in "
            "their leading (token) dimensions"
        )
    if student.device != teacher.device:
        raise ValueError(f"student_logits is on {student.device} but teacher_logits is on {teacher.device}")
    if teacher.requires_grad:
        raise ValueError(
            "teacher_logits requires grad, but the teacher is a constant of the loss: compute it under "
            "torch.no_grad() or pass teacher_logits.detach()"
        )
    options = prepare_token_options(
        student.shape[:-1], student.device, alpha, labels, ignore_index, temperature, "the logits"
    )
    student_rows, teacher_rows = _as_rows_pair(student, teacher)
    return SkewRows(student=student_rows, teacher=teacher_rows, **vars(options))


def require(ok: torch.Tensor, message: str) -> None:
    """ValueError(message) unless the 0-d bool tensor `ok` holds. On the GPU, and under torch.compile, an
    asynchronous assert instead: no host sync, and no data-dependent branch (a graph break)."""
    if ok.is_cuda or torch.compiler.is_compiling():
        torch._assert_async(ok, message)
    elif not bool(ok):
        raise ValueError(message)


def check_label_ids(labels: Optional[torch.Tensor], vocab_size: int, ignore_index: int) -> None:
    """Labels must be token ids in [0, V) or `ignore_index` where their log-probabilities are read."""
    if labels is None:
        return
    ok = ((labels == ignore_index) | ((labels >= 0) & (labels < vocab_size))).all()
    require(ok, f"labels must be token ids in [0, {vocab_size}) or ignore_index ({ignore_index})")

