"""`nn.Module` wrappers of `fused_skl` / `fused_srkl` for trainers that hold their loss as a module."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ._inputs import Alpha, check_alpha_value
from .functional import fused_skl, fused_srkl
from .reductions import check_reduction_name
from .sparse_teacher import check_teacher_tail


class _SkewLoss(nn.Module):
    def __init__(
        self, alpha: float, ignore_index: int, temperature: float, reduction: str, backend: str, teacher_tail: str
    ):
        super().__init__()
        check_reduction_name(reduction)
        self.teacher_tail = check_teacher_tail(teacher_tail)
        self.alpha = check_alpha_value(alpha)
        self.ignore_index = ignore_index
        self.temperature = temperature
        self.reduction = reduction
        self.backend = backend

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, temperature={self.temperature}, reduction={self.reduction!r}, "
            f"ignore_index={self.ignore_index}, backend={self.backend!r}, teacher_tail={self.teacher_tail!r}"
        )


class SkewKLLoss(_SkewLoss):
    """`loss(student_logits, teacher_logits, labels=None, alpha=None)`: SKL as in `fused_skl`.

    `alpha` given at call time (a float or a per-sequence / per-token tensor) overrides the module's.
    `teacher_logits` may be a sparse teacher (`SparseTeacher`), whose tail mode is `teacher_tail`.
    """

    def __init__(
        self,
        alpha: float = 0.1,
        *,
        ignore_index: int = -100,
        temperature: float = 1.0,
        reduction: str = "mean",
        backend: str = "auto",
        teacher_tail: str = "renormalize",
    ):
        super().__init__(alpha, ignore_index, temperature, reduction, backend, teacher_tail)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        alpha: Optional[Alpha] = None,
    ) -> torch.Tensor:
        return fused_skl(
            student_logits,
            teacher_logits,
            self.alpha if alpha is None else alpha,
            labels=labels,
            ignore_index=self.ignore_index,
            temperature=self.temperature,
            reduction=self.reduction,
            backend=self.backend,
            teacher_tail=self.teacher_tail,
        )


class SkewReverseKLLoss(_SkewLoss):
    """`loss(student_logits, teacher_logits, labels=None, alpha=None)`: SRKL as in `fused_srkl` (the teacher
    dense logits or a sparse teacher, as in `SkewKLLoss`)."""

    def __init__(
        self,
        alpha: float = 0.1,
        *,
        ignore_index: int = -100,
        temperature: float = 1.0,
        reduction: str = "mean",
        detach_mixture: bool = False,
        backend: str = "auto",
        teacher_tail: str = "renormalize",
    ):
        super().__init__(alpha, ignore_index, temperature, reduction, backend, teacher_tail)
        self.detach_mixture = detach_mixture

    def extra_repr(self) -> str:
        return super().extra_repr() + f", detach_mixture={self.detach_mixture}"

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        alpha: Optional[Alpha] = None,
    ) -> torch.Tensor:
        return fused_srkl(
            student_logits,
            teacher_logits,
            self.alpha if alpha is None else alpha,
            labels=labels,
            ignore_index=self.ignore_index,
            temperature=self.temperature,
            reduction=self.reduction,
            detach_mixture=self.detach_mixture,
            backend=self.backend,
            teacher_tail=self.teacher_tail,
        )
