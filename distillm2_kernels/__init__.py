"""Fused skew KL / skew reverse KL losses for LLM distillation with the DistiLLM-2 objective."""

from .functional import fused_skl, fused_srkl
from .fused_linear import (
    FusedLinearSKLFunction,
    FusedLinearSRKLFunction,
    FusedLinearTokenOutputs,
    fused_linear_skl,
    fused_linear_srkl,
    fused_linear_token_statistics,
)
from .modules import SkewKLLoss, SkewReverseKLLoss
from .objective import DistiLLM2Loss, distillm2_loss, distillm2_loss_from_hidden
from .skew_divergence import FusedSKLFunction, FusedSRKLFunction, TokenStatistics, token_statistics
from .sparse_teacher import SparseTeacher

__version__ = "0.1.0"

__all__ = [
    "fused_skl",
    "fused_srkl",
    "fused_linear_skl",
    "fused_linear_srkl",
    "fused_linear_token_statistics",
    "FusedLinearTokenOutputs",
    "FusedSKLFunction",
    "FusedSRKLFunction",
    "FusedLinearSKLFunction",
    "FusedLinearSRKLFunction",
    "SkewKLLoss",
    "SkewReverseKLLoss",
    "distillm2_loss",
    "distillm2_loss_from_hidden",
    "DistiLLM2Loss",
    "token_statistics",
    "TokenStatistics",
    "SparseTeacher",
    "__version__",
]
