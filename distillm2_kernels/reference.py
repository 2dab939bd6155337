"""Plain-PyTorch skew divergences, written from the formulas: the test oracle and the benchmark baseline.

Per token, with `q = softmax(z_s / T)` (student) and `p = softmax(z_t / T)` (teacher)::

    SKL_α  = Σ_v p_v (log p_v − log m_v),   m = α p + (1−α) q     KL(p ‖ αp + (1−α)q)
    SRKL_α = Σ_v q_v (log q_v − log r_v),   r = (1−α) p + α q     KL(q ‖ (1−α)p + αq)

The mixtures are formed in log space with `logaddexp`; a probability of exactly 0 contributes exactly 0.
Everything runs in the dtype it is given (float64 for the oracle, the input dtype for the tolerance
baseline) and builds several `[N, V]` tensors: this is not a user path. Gradients come from autograd.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

__all__ = [
    "skl_reference",
    "srkl_reference",
    "skew_kl_rows",
    "skew_reverse_kl_rows",
    "naive_skl",
    "naive_srkl",
    "densify_sparse_teacher",
]


def _log_mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: torch.Tensor) -> torch.Tensor:
    """log(w·a + (1−w)·b) from log a and log b, with w of shape [..., 1].

    Where both terms are 0 the result is −inf; the `where`s keep logaddexp's NaN derivative at
    (−inf, −inf) out of the gradient."""
    term_a = torch.log(weight_a) + log_a
    term_b = torch.log1p(-weight_a) + log_b
    both_zero = (term_a == float("-inf")) & (term_b == float("-inf"))
    mixed = torch.logaddexp(torch.where(both_zero, 0.0, term_a), torch.where(both_zero, 0.0, term_b))
    return torch.where(both_zero, float("-inf"), mixed)


def _xlogy_terms(prob: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """prob · log_ratio with 0 · anything = 0 (the inner `where` keeps NaN out of the gradient too)."""
    positive = prob > 0
    return torch.where(positive, prob * torch.where(positive, log_ratio, 0.0), 0.0)


def _alpha_column(alpha: Union[float, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    alpha = torch.as_tensor(alpha, dtype=like.dtype, device=like.device)
    if alpha.dim() == 1 and like.dim() >= 3:  # a 1-D α is per sequence
        alpha = alpha.reshape((-1,) + (1,) * (like.dim() - 2))
    return alpha.unsqueeze(-1)


def skew_kl_rows(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    alpha: Union[float, torch.Tensor] = 0.1,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token SKL_α = KL(p ‖ αp + (1−α)q), shape `student_logits.shape[:-1]`, in the input dtype."""
    log_q = torch.log_softmax(student_logits / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits / temperature, dim=-1)
    a = _alpha_column(alpha, log_q)
    log_m = _log_mixture(log_p, log_q, a)
    return _xlogy_terms(log_p.exp(), log_p - log_m).sum(-1)


def skew_reverse_kl_rows(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    alpha: Union[float, torch.Tensor] = 0.1,
    temperature: float = 1.0,
    detach_mixture: bool = False,
) -> torch.Tensor:
    """Per-token SRKL_α = KL(q ‖ (1−α)p + αq); `detach_mixture` stops the gradient through q inside r."""
    log_q = torch.log_softmax(student_logits / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits / temperature, dim=-1)
    a = _alpha_column(alpha, log_q)
    log_r = _log_mixture(log_q.detach() if detach_mixture else log_q, log_p, a)
    return _xlogy_terms(log_q.exp(), log_q - log_r).sum(-1)


def _reduce(
    per_token: torch.Tensor, labels: Optional[torch.Tensor], ignore_index: int, reduction: str
) -> torch.Tensor:
    """The reductions of `reductions`, written again from their definitions: the oracle must not share the
    code it checks (a wrong seqmean there would pass against itself)."""
    if labels is None:
        mask = torch.ones_like(per_token, dtype=torch.bool)
    else:
        mask = labels != ignore_index
    per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    if reduction == "mean":
        return per_token.sum() / mask.sum().clamp(min=1)
    if reduction == "seqmean":
        counts = mask.sum(-1)
        per_sequence = per_token.sum(-1) / counts.clamp(min=1)
        return per_sequence.sum() / (counts > 0).sum().clamp(min=1)
    raise ValueError(f"unknown reduction {reduction!r}")


def skl_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    alpha: Union[float, torch.Tensor] = 0.1,
    *,
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """SKL with the options and reductions of `fused_skl`, computed naively in the input dtype."""
    per_token = skew_kl_rows(student_logits, teacher_logits, alpha, temperature)
    return _reduce(per_token, labels, ignore_index, reduction)


def srkl_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    alpha: Union[float, torch.Tensor] = 0.1,
    *,
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    reduction: str = "mean",
    detach_mixture: bool = False,
) -> torch.Tensor:
    """SRKL with the options and reductions of `fused_srkl`, computed naively in the input dtype."""
    per_token = skew_reverse_kl_rows(student_logits, teacher_logits, alpha, temperature, detach_mixture)
    return _reduce(per_token, labels, ignore_index, reduction)


def densify_sparse_teacher(
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    vocab_size: int,
    tail: str,
    tail_logprob: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The dense float64 T = 1 log-probabilities `[..., V]` of a sparse teacher (docs/design.md §8): `logprobs`
    at `ids`; elsewhere −inf ("renormalize"), or the tail mass τ spread evenly, log(τ / (V − k)) ("uniform"),
    τ = exp(tail_logprob), or 1 − Σ exp(logprobs) clamped at 0 when `tail_logprob` is None. Tempering these
    by T (`log_softmax(dense / T)`, as the dense ops do with logits) gives the sparse teacher at T."""
    k = ids.shape[-1]
    logprobs = logprobs.double()
    dense = torch.full((*ids.shape[:-1], vocab_size), float("-inf"), dtype=torch.float64, device=ids.device)
    if tail == "uniform" and k < vocab_size:
        if tail_logprob is None:
            tail_logprob = torch.log((1.0 - logprobs.exp().sum(-1)).clamp(min=0.0))
        dense = (tail_logprob.double() - math.log(vocab_size - k)).unsqueeze(-1).expand_as(dense).clone()
    elif tail not in ("renormalize", "uniform"):
        raise ValueError(f"unknown tail {tail!r}")
    return dense.scatter(-1, ids.long(), logprobs)


def _naive_log_mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """The released code's mixture: `logsumexp` over the stacked pair (log w + log a, log(1−w) + log b)."""
    stacked = torch.stack([log_a + torch.log(torch.tensor(weight_a)), log_b + torch.log(torch.tensor(1 - weight_a))])
    return torch.logsumexp(stacked, dim=0)


def _naive_sequence_mean(per_token: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """The released trainer's seqmean, as it writes it (a sequence without tokens divides by 0): the baseline
    reproduces that code, not our `reductions.sequence_mean`."""
    mask = (labels != ignore_index).float()
    return ((per_token * mask).sum(-1) / mask.sum(-1)).mean()


def naive_skl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 0.1,
    ignore_index: int = -100,
) -> torch.Tensor:
    """SKL as the released DistiLLM-2 trainer computes it (docs/design.md §4): the benchmark baseline.

    float32 upcast of `[B, T, V]` logits, full `log_softmax` tensors, the mixture as a `logsumexp` over
    a stacked pair, then the token mean within each sequence and the mean over sequences.
    """
    log_q = torch.log_softmax(student_logits.float(), dim=-1)
    log_p = torch.log_softmax(teacher_logits.float(), dim=-1)
    log_m = _naive_log_mixture(log_p, log_q, alpha)
    per_token = (log_p.exp() * (log_p - log_m)).sum(-1)
    return _naive_sequence_mean(per_token, labels, ignore_index)


def naive_srkl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 0.1,
    ignore_index: int = -100,
) -> torch.Tensor:
    """SRKL as the released DistiLLM-2 trainer computes it: like `naive_skl`, with the q inside
    r = (1−α)p + αq detached."""
    log_q = torch.log_softmax(student_logits.float(), dim=-1)
    log_p = torch.log_softmax(teacher_logits.float(), dim=-1)
    log_r = _naive_log_mixture(log_p, log_q.detach(), 1 - alpha)
    per_token = (log_q.exp() * (log_q - log_r)).sum(-1)
    return _naive_sequence_mean(per_token, labels, ignore_index)
