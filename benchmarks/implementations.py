"""The named implementations every suite compares, whether each can run here, and the baselines' code.

| name | what |
| --- | --- |
| `naive` | the released DistiLLM-2 trainer's PyTorch code (docs/design.md §4): float32 upcast, full `log_softmax` tensors, the mixture as a `logsumexp` over a stacked pair (`reference.naive_skl` / `naive_srkl`; the objective on all 2B rows, `naive_distillm2_loss`) |
| `naive_compiled` | `torch.compile` of the same code (inductor, `dynamic=False`: one compile per shape, its time in the `warmup_s` column) |
| `torch` | this library, `backend="torch"` (chunked pure PyTorch) |
| `cpu` | this library, `backend="cpu"` (the C++ extension; CPU tensors) |
| `triton` | this library, `backend="triton"` (CUDA) |
| `liger` | Liger-Kernel at α = 0, where it computes the same function: forward KL = SKL at α = 0 (`LigerKLDivLossFunction` on log-probabilities; fused-linear: `LigerFusedLinearJSDFunction` at β = 0), reverse KL = SRKL at α = 0 (`LigerJSDFunction` / `LigerFusedLinearJSDFunction` at β = 1). Its time includes the `log_softmax` of both logits that its logits ops need. |
| `liger_kl` | fused-linear SKL only: Liger's `LigerFusedLinearKLDivFunction` (student fused, teacher given as probabilities `softmax(h_t W_tᵀ)`, computed in the timed region) |

Our rows run at α = 0.1 (the DistiLLM-2 default); the Liger rows at α = 0. Our kernels do the same work at every
α (there is no special case for α = 0), so the comparison is one of equal work; on CUDA the Liger rows'
`note` gives the relative difference of Liger's loss from ours at α = 0 on the same inputs.
"""

from __future__ import annotations

import importlib.util
from typing import Callable, Optional

import torch

from distillm2_kernels.backends import cpu_backend

IMPLEMENTATIONS = ("naive", "naive_compiled", "torch", "cpu", "triton", "liger", "liger_kl")
BASELINES = ("naive", "naive_compiled", "torch", "liger", "liger_kl")  # the ratio columns' denominators
LIBRARY = ("torch", "cpu", "triton")  # this library's backends
ALPHA = 0.1  # the released DistiLLM-2 code's α, for both terms

DESCRIPTIONS = {
    "naive": "the released DistiLLM-2 trainer's PyTorch code (float32, full log_softmax, logsumexp over a stacked pair)",
    "naive_compiled": "torch.compile (inductor, dynamic=False) of the naive code; compile time in warmup_s",
    "torch": "distillm2_kernels, backend='torch' (chunked PyTorch)",
    "cpu": "distillm2_kernels, backend='cpu' (C++ extension)",
    "triton": "distillm2_kernels, backend='triton' (Triton kernels)",
    "liger": "Liger-Kernel at alpha = 0 (forward KL = SKL_0, reverse KL = SRKL_0), log_softmax included",
    "liger_kl": "Liger-Kernel LigerFusedLinearKLDivFunction (teacher softmax materialised, in the timed region)",
}


def liger_unavailable_reason(device: torch.device) -> Optional[str]:
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install liger-kernel)"
    if device.type != "cuda":
        return "Liger-Kernel's Triton kernels run on CUDA only"
    return None


def unavailable_reason(impl: str, device: torch.device) -> Optional[str]:
    """Why `impl` cannot run on `device` at all (None: it can). What a suite cannot compare is the suite's
    `not_comparable(impl, op)`."""
    if impl in ("naive", "naive_compiled", "torch"):
        return None
    if impl == "cpu":
        if device.type != "cpu":
            return "the C++ backend runs on CPU tensors"
        return None if cpu_backend.unavailable_reason() is None else (
            f"the C++ extension is not built ({cpu_backend.unavailable_reason()}; run `make install`)")
    if impl == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if device.type != "cuda":
            return "the Triton kernels need a CUDA GPU (the Triton interpreter is for tests, not for timing)"
        return None
    if impl in ("liger", "liger_kl"):
        return liger_unavailable_reason(device)
    raise ValueError(f"unknown implementation {impl!r}; known: {IMPLEMENTATIONS}")


# --- torch.compile of the naive code ------------------------------------------------------------------------

def compiled(fn: Callable) -> Callable:
    """`torch.compile(fn, dynamic=False)` with dynamo's caches reset first: one compile per benchmark case
    (the worker builds each case once and runs all its modes on it), never a recompile limit reached
    silently falling back to eager."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


# --- the released objective, as its code computes it ---------------------------------------------------------

def naive_distillm2_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                         alpha: float = ALPHA, ignore_index: int = -100) -> torch.Tensor:
    """The released DistiLLM-2 trainer's loss over one batch `[2B, T, V]` whose first B rows are the teacher's
    responses and last B rows the student's (docs/design.md §4): float32 `log_softmax` of both logits, SKL
    and SRKL (q inside r detached) on all 2B rows, the token mean within each sequence, then SKL of the first
    half plus SRKL of the second half, mean over the B pairs."""
    log_q = torch.log_softmax(student_logits.float(), dim=-1)
    log_p = torch.log_softmax(teacher_logits.float(), dim=-1)
    log_alpha, log_1m_alpha = torch.log(torch.tensor(alpha)), torch.log(torch.tensor(1 - alpha))
    log_m = torch.logsumexp(torch.stack([log_p + log_alpha, log_q + log_1m_alpha]), dim=0)
    log_r = torch.logsumexp(torch.stack([log_p + log_1m_alpha, log_q.detach() + log_alpha]), dim=0)
    skl = (log_p.exp() * (log_p - log_m)).sum(-1)
    srkl = (log_q.exp() * (log_q - log_r)).sum(-1)
    mask = (labels != ignore_index).float()
    skl = (skl * mask).sum(-1) / mask.sum(-1)
    srkl = (srkl * mask).sum(-1) / mask.sum(-1)
    pairs = student_logits.shape[0] // 2
    return (skl[:pairs] + srkl[pairs:]).mean()


# --- Liger-Kernel ------------------------------------------------------------------------------------------------

def liger_logits_loss(reverse: bool) -> Callable:
    """(student [N, V], teacher [N, V]) -> KL(p‖q) (reverse=False) or KL(q‖p) (reverse=True), mean over rows,
    with Liger's ops on the log-probabilities (computed here, in the input dtype, as a Liger user does)."""
    if reverse:
        from liger_kernel.ops.jsd import LigerJSDFunction

        def loss(student, teacher):
            with torch.no_grad():
                log_p = torch.log_softmax(teacher, dim=-1)
            return LigerJSDFunction.apply(torch.log_softmax(student, dim=-1), log_p, None, 1.0)
    else:
        from liger_kernel.ops.kl_div import LigerKLDivLossFunction

        def loss(student, teacher):
            with torch.no_grad():
                log_p = torch.log_softmax(teacher, dim=-1)
            return LigerKLDivLossFunction.apply(torch.log_softmax(student, dim=-1), log_p, "batchmean", True)
    return loss


def liger_fused_linear_loss(reverse: bool, kl_div: bool = False) -> Callable:
    """(student_hidden [N, H_s], student_weight, teacher_hidden [N, H_t], teacher_weight, labels [N]) -> forward
    KL (reverse=False) or reverse KL (reverse=True), mean over non-ignored rows. kl_div=True: Liger's
    fused-linear KL-div op, the teacher's probabilities materialised first (forward KL only)."""
    if kl_div:
        from liger_kernel.ops.fused_linear_kl_div import LigerFusedLinearKLDivFunction

        def loss(hs, ws, ht, wt, labels):
            with torch.no_grad():
                target = torch.softmax(ht @ wt.T, dim=-1)
            return LigerFusedLinearKLDivFunction.apply(hs, ws, target, labels, "batchmean", -100, 1.0)
    else:
        from liger_kernel.ops.fused_linear_jsd import LigerFusedLinearJSDFunction

        beta = 1.0 if reverse else 0.0

        def loss(hs, ws, ht, wt, labels):
            return LigerFusedLinearJSDFunction.apply(hs, ws, ht, wt, labels, beta, -100, 1.0)
    return loss
