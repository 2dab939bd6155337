"""The reductions of a per-token loss, and their derivatives with respect to each token's loss.

    "none"     per-token loss, the input's leading shape; ignored tokens are 0
    "sum"      sum over tokens
    "mean"     sum over the non-ignored tokens divided by their count (0 when there are none)
    "seqmean"  [B, T] tokens: the token mean within each sequence (`sequence_mean`), then the mean over the
               sequences that have at least one non-ignored token (the released DistiLLM-2 reduction)

No reduction synchronises with the host. Every op of the package and the objective reduce through this
module; `reference` keeps its own plain-PyTorch copy, since the oracle must not share the code it checks.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = [
    "REDUCTIONS",
    "SCALAR_REDUCTIONS",
    "check_reduction_name",
    "check_reduction",
    "sequence_mean",
    "reduce_token_losses",
    "reduction_row_weights",
]

REDUCTIONS = ("none", "sum", "mean", "seqmean")
SCALAR_REDUCTIONS = ("sum", "mean", "seqmean")


def check_reduction_name(reduction: str) -> None:
    """ValueError unless `reduction` is one of `REDUCTIONS` (before any work; the shape is checked later)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_reduction(
    reduction: str, leading_shape: torch.Size, expected_input: str = "logits of shape [B, T, V]"
) -> None:
    """The name, and for "seqmean" a `[B, T]` token shape (`expected_input` names the input in the message)."""
    check_reduction_name(reduction)
    if reduction == "seqmean" and len(leading_shape) != 2:
        raise ValueError(
            f"reduction='seqmean' needs {expected_input} (a token mean within each sequence), "
            f"got leading shape {tuple(leading_shape)}"
        )


def sequence_mean(per_token: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """`[B, T]` -> `[B]`: the mean over each sequence's valid tokens (0 for a sequence without any)."""
    return (per_token * valid).sum(-1) / valid.sum(-1).clamp(min=1)


def reduce_token_losses(
    per_token: torch.Tensor, labels: Optional[torch.Tensor], ignore_index: int, reduction: str
) -> torch.Tensor:
    """Reduce a per-token loss whose ignored tokens (`labels == ignore_index`) are already 0."""
    check_reduction(reduction, per_token.shape)
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    valid = None if labels is None else labels != ignore_index
    if reduction == "mean":
        if valid is None:
            return per_token.sum() / max(per_token.numel(), 1)
        return per_token.sum() / valid.sum().clamp(min=1)
    if valid is None:
        return per_token.mean(-1).sum() / max(per_token.shape[0], 1)
    return sequence_mean(per_token, valid).sum() / (valid.sum(-1) > 0).sum().clamp(min=1)


def reduction_row_weights(
    reduction: str,
    labels: Optional[torch.Tensor],
    ignore_index: int,
    leading_shape: torch.Size,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """∂(reduced loss)/∂(token loss) of a scalar reduction, flattened to `[N]` (`labels`: `[N]` or None;
    the value at ignored tokens does not matter: their loss is 0 whatever its weight)."""
    n = math.prod(leading_shape)
    valid = None if labels is None else labels != ignore_index
    if reduction == "sum":
        return torch.ones(n, dtype=dtype, device=device)
    if reduction == "mean":
        count = valid.sum().clamp(min=1) if valid is not None else max(n, 1)
        return torch.ones(n, dtype=dtype, device=device) / count
    # seqmean over [B, T]: 1 / (tokens kept in the row's sequence · sequences with a kept token)
    batch, length = leading_shape
    if valid is None:
        counts = torch.full((batch,), length, dtype=dtype, device=device)
    else:
        counts = valid.view(batch, length).sum(-1).to(dtype)
    sequences = (counts > 0).sum().clamp(min=1)
    per_sequence = 1.0 / (counts.clamp(min=1) * sequences)
    return per_sequence.unsqueeze(1).expand(batch, length).reshape(-1)
