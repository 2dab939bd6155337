"""The row statistics that sweep 1 computes and the later sweeps read, `[N, STATS]` per call.

The columns are `RowStat`, named as the C++ kernels name them (csrc/skew_divergence_kernel.h): the student's
max z_s and log Σ exp((z_s − max z_s)/T), the same two for the teacher, the row constant C of the gradient
(0 until the loss sweep fills it), and the label tokens' log q(label), log p(label) (0 without labels).
A row whose label is `ignore_index` is all zeros. `TokenStatistics` carries them between a statistics-only
pass (`token_statistics`, `fused_linear_token_statistics`) and the loss op that reuses them.
"""

from __future__ import annotations

import enum
import math
from typing import NamedTuple, Optional

import torch

__all__ = ["RowStat", "STATS", "LABEL_LOGPROBS", "LabelLogprob", "TokenStatistics", "check_statistics"]


class RowStat(enum.IntEnum):
    """The columns of the `[N, STATS]` row statistics (the C++ `RowStat`)."""

    MAX_S = 0
    LOG_SUM_S = 1
    MAX_T = 2
    LOG_SUM_T = 3
    C = 4
    LABEL_LOG_Q = 5
    LABEL_LOG_P = 6


STATS = len(RowStat)
# The (log q(label), log p(label)) columns as one slice: `stats[:, LABEL_LOGPROBS]` is `[N, 2]`.
LABEL_LOGPROBS = slice(int(RowStat.LABEL_LOG_Q), int(RowStat.LABEL_LOG_P) + 1)


class LabelLogprob(enum.IntEnum):
    """The last dim of a `[..., 2]` label log-probabilities tensor (`stats[:, LABEL_LOGPROBS]`)."""

    STUDENT = RowStat.LABEL_LOG_Q - LABEL_LOGPROBS.start  # log q(label)
    TEACHER = RowStat.LABEL_LOG_P - LABEL_LOGPROBS.start  # log p(label)


class TokenStatistics(NamedTuple):
    """Sweep 1's row statistics for one pair of logits `[..., V]` (`token_statistics`, or
    `fused_linear_token_statistics` for the logits a fused-linear op builds): `stats` is `[N, STATS]`
    (columns `RowStat`). `sparse_teacher`: computed against a sparse teacher (docs/design.md §8), which fills
    only the student's log-sum-exp and the label columns: such statistics serve sparse-teacher ops only."""

    stats: torch.Tensor
    leading_shape: torch.Size
    sparse_teacher: bool = False

    @property
    def student_label_logprobs(self) -> torch.Tensor:
        """log q(label) per token, the logits' leading shape (0 at ignored tokens)."""
        return self.stats[:, RowStat.LABEL_LOG_Q].view(self.leading_shape)

    @property
    def teacher_label_logprobs(self) -> torch.Tensor:
        """log p(label) per token, the logits' leading shape (0 at ignored tokens)."""
        return self.stats[:, RowStat.LABEL_LOG_P].view(self.leading_shape)

    @property
    def label_logprobs(self) -> torch.Tensor:
        """(log q(label), log p(label)) per token, `[..., 2]` (0 at ignored tokens)."""
        return self.stats[:, LABEL_LOGPROBS].view(*self.leading_shape, 2)


def check_statistics(
    statistics: Optional[TokenStatistics], leading_shape: torch.Size, device: torch.device, *, source: str, producer: str,
    sparse_teacher: bool = False,
) -> Optional[torch.Tensor]:
    """The `[N, STATS]` tensor of `statistics`, checked against inputs of token shape `leading_shape` on
    `device` (`source`: "logits" or "hidden states"; `producer`: the function that computes them), or None.
    `sparse_teacher`: the op's teacher is sparse (it reads only the student's columns, so statistics of either
    kind serve it; a dense-teacher op refuses statistics computed against a sparse teacher)."""
    if statistics is None:
        return None
    if not isinstance(statistics, TokenStatistics):
        raise TypeError(f"statistics must come from {producer}(), got {type(statistics).__name__}")
    if statistics.sparse_teacher and not sparse_teacher:
        raise ValueError(
            "these statistics were computed against a sparse teacher: they hold the student's log-sum-exp and the "
            "label log-probabilities only, not the dense teacher's columns this op reads; compute them with the "
            "dense teacher"
        )
    if statistics.leading_shape != leading_shape or statistics.stats.shape != (math.prod(leading_shape), STATS):
        raise ValueError(
            f"statistics were computed for {source} of leading shape {tuple(statistics.leading_shape)}, "
            f"these have {tuple(leading_shape)}"
        )
    if statistics.stats.device != device:
        raise ValueError(f"statistics are on {statistics.stats.device}, the {source} on {device}")
    return statistics.stats
