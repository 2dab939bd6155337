"""`fused_skl` and `fused_srkl`: the skew divergences of DistiLLM-2 with their reductions.

Student first: `fused_skl(student_logits, teacher_logits, alpha, ...)`. Per token, with
q = softmax(z_s/T) and p = softmax(z_t/T):

    SKL_α  = KL(p ‖ αp + (1−α)q)        SRKL_α = KL(q ‖ (1−α)p + αq)

Reductions (`reductions`; no host synchronisation in any of them):
    "none"     per-token loss, the logits' leading shape; ignored tokens are 0
    "sum"      sum over tokens
    "mean"     sum over the non-ignored tokens divided by their count (0 when there are none)
    "seqmean"  [B, T, V] input: the token mean within each sequence, then the mean over the sequences
               that have at least one non-ignored token (the released DistiLLM-2 reduction)
"""

from __future__ import annotations

from typing import Optional

import torch

from ._inputs import Alpha
from .reductions import check_reduction_name, reduce_token_losses
from .skew_divergence import reduced_skew_divergence

__all__ = ["fused_skl", "fused_srkl", "reduce_token_losses"]  # reduce_token_losses: see `reductions`


def fused_skl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    alpha: Alpha = 0.1,
    *,
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    reduction: str = "mean",
    backend: str = "auto",
    teacher_tail: str = "renormalize",
) -> torch.Tensor:
    """Skew KL, KL(p ‖ αp + (1−α)q), of student logits against teacher logits `[..., V]`.

    The teacher may instead be sparse (docs/design.md §8): a `SparseTeacher(ids, logprobs, tail_logprob=None)`
    or an `(ids, logprobs[, tail_logprob])` tuple, ids `[..., k]` distinct token ids with their temperature-1
    log-probabilities, the leading shape the student's. `teacher_tail`: "renormalize" restricts the teacher
    to its k tokens, "uniform" spreads the remaining mass evenly over the other V − k (a non-default value
    with dense teacher logits is a ValueError). Then the loss is float32 (float64 for float64 logits).

    alpha: a float in [0, 1], or a tensor broadcastable to the leading shape (`[B]` or `[B, 1]` per
    sequence, `[B, T]` per token). α is applied in float32 like the rest of the arithmetic (float64 on the
    torch backend with float64 logits): an α below float32's normal range (~1e-38) acts as 0. labels: an
    integer tensor of the leading shape, each a token id in [0, V) or `ignore_index` (any other value raises
    ValueError; on CUDA and under torch.compile through an asynchronous assert, no host sync); tokens whose
    label is `ignore_index` count 0. The loss is float32; the gradient flows to `student_logits` only.
    backend: "auto", "triton", "cpu" or "torch".

    >>> import torch
    >>> student, teacher = torch.randn(2, 4, 16, requires_grad=True), torch.randn(2, 4, 16)
    >>> labels = torch.tensor([[-100, 3, 5, 7], [-100, -100, 1, 2]])  # the prompt tokens are ignored
    >>> loss = fused_skl(student, teacher, alpha=0.1, labels=labels, reduction="seqmean")
    >>> loss.backward()
    >>> bool(loss > 0), student.grad[0, 0].abs().max().item()  # an ignored token gets no gradient
    (True, 0.0)
    """
    check_reduction_name(reduction)
    return reduced_skew_divergence(
        student_logits, teacher_logits, alpha, labels, reverse=False, ignore_index=ignore_index,
        temperature=temperature, reduction=reduction, backend=backend, teacher_tail=teacher_tail,
    )


def fused_srkl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    alpha: Alpha = 0.1,
    *,
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    reduction: str = "mean",
    detach_mixture: bool = False,
    backend: str = "auto",
    teacher_tail: str = "renormalize",
) -> torch.Tensor:
    """Skew reverse KL, KL(q ‖ (1−α)p + αq), of student logits against teacher logits `[..., V]`.

    detach_mixture=True treats the q inside r as a constant in the backward, as the released DistiLLM-2
    code does; the forward value is the same. Other arguments as in `fused_skl`. With a sparse teacher,
    teacher_tail="renormalize" and a float α = 0 raise ValueError: the teacher is 0 off its k tokens, so
    the loss is +inf (a tensor α's zero entries give +inf tokens).
    """
    check_reduction_name(reduction)
    return reduced_skew_divergence(
        student_logits, teacher_logits, alpha, labels, reverse=True, detach_mixture=detach_mixture,
        ignore_index=ignore_index, temperature=temperature, reduction=reduction, backend=backend,
        teacher_tail=teacher_tail,
    )
