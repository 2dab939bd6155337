"""The interface every backend module implements (`SkewBackend`), over flattened rows (`_inputs.SkewRows`).

    skew_statistics(rows) -> stats [N, STATS]                                         sweep 1
    skew_forward(rows, reverse, detach, stats=None) -> (loss [N], stats [N, STATS])   sweeps 1 (unless given
                                                                                      stats) and 2
    skew_backward(rows, reverse, detach, stats, grad_loss [N]) -> grad_student [N, V] sweep 3

`reverse` picks SRKL over SKL, `detach` SRKL's detached mixture. The statistics' columns are `RowStat`;
the loss and statistics are float32 (float64 for float64 logits, which only the torch backend takes: see
`backends.backend_module`), the gradient is contiguous in the student's dtype and includes the 1/T factor.
`ROW_TEMPORARIES` says how many `[rows, V]` float32 temporaries a backend holds (for callers that size
their own row blocks).

A backend may also implement `SkewForwardAndGrad.skew_forward_and_grad` (sweeps 1-3 in one call, for a
scalar reduction whose per-row weights are known in the forward); callers look it up with
`forward_and_grad_of` and fall back to `skew_forward` + `skew_backward` without it.
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol, runtime_checkable

import torch

from .._inputs import SkewRows
from ..statistics import STATS, RowStat

__all__ = ["SkewBackend", "SkewForwardAndGrad", "RowStat", "STATS", "forward_and_grad_of"]


@runtime_checkable
class SkewBackend(Protocol):
    """What `backends.BACKEND_MODULES` maps each backend name to (a module)."""

    ROW_TEMPORARIES: int

    def skew_statistics(self, rows: SkewRows) -> torch.Tensor:
        """Sweep 1: the row statistics `[N, STATS]` (column C is 0 until `skew_forward` fills it)."""
        ...

    def skew_forward(
        self, rows: SkewRows, reverse: bool, detach: bool, stats: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row loss `[N]` and the statistics `[N, STATS]`; given `stats` (not modified) skip sweep 1."""
        ...

    def skew_backward(
        self, rows: SkewRows, reverse: bool, detach: bool, stats: torch.Tensor, grad_loss: torch.Tensor
    ) -> torch.Tensor:
        """Sweep 3: grad_loss[i] · ∂loss_i/∂student_i, `[N, V]` contiguous in the student's dtype."""
        ...


@runtime_checkable
class SkewForwardAndGrad(Protocol):
    """The optional extension of a backend: the loss, its statistics and the student gradient in one call."""

    def skew_forward_and_grad(
        self, rows: SkewRows, reverse: bool, detach: bool, row_grad_scale: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss [N], stats [N, STATS], grad_student [N, V]) with grad_student equal to
        `skew_backward(rows, reverse, detach, stats, row_grad_scale)`; `row_grad_scale` `[N]` float32 is
        ∂(reduced loss)/∂loss_i (no 1/T factor: the backend applies it)."""
        ...


def forward_and_grad_of(
    backend: SkewBackend,
) -> Optional[Callable[[SkewRows, bool, bool, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """The backend's `skew_forward_and_grad`, or None when it does not implement the extension."""
    return getattr(backend, "skew_forward_and_grad", None)
