"""Suite `fused_linear`: `fused_linear_skl` and `fused_linear_srkl`, from hidden states and lm_head weights.

Inputs: student hidden states `[B, T, H]` (requires grad) and lm_head weight `[V, H]` (requires grad: full
fine-tuning, the weight gradient is computed), teacher hidden `[B, T, H_t]` and weight `[V, H_t]` (no grad);
every token labelled. The loss: α = 0.1, reduction "seqmean", SRKL's mixture detached.

The baselines build the logits: `naive` computes `h Wᵀ` in the input dtype (the teacher's under no_grad) and
then the released trainer's loss; `naive_compiled` compiles that whole function. `liger` is Liger's
fused-linear JSD at β = 0 (forward KL, SKL at α = 0) or β = 1 (reverse KL, SRKL at α = 0), teacher fused too;
`liger_kl` (SKL only) is Liger's fused-linear KL-div, which takes the teacher's probabilities: their GEMM
and softmax are in its timed region.

Modes as in `skew_divergence`. The fused-linear ops (ours and Liger's) compute the gradients during the
forward when the inputs require grad, so their "fwd" already holds the backward's work.

FLOPs (the TFLOP/s column), counted as the minimum GEMM work of the mode whatever an implementation does:
fwd = 2·N·V·(H + H_t) (student and teacher logits); fwd+bwd = that + 2·2·N·V·H (the gradients of the
student's hidden states and of its weight). Softmax and loss arithmetic are not counted.
"""

from __future__ import annotations

from typing import Optional

import torch

from distillm2_kernels import fused_linear_skl, fused_linear_srkl, reference

from . import implementations as impls
from .skew_divergence import batch_shape

NAME = "fused_linear"
OPS = ("fused_linear_skl", "fused_linear_srkl")
MODES = ("fwd", "fwd+bwd")
IMPLS = ("naive", "naive_compiled", "torch", "cpu", "triton", "liger", "liger_kl")
METRIC = "TFLOP/s"


def not_comparable(impl: str, op: str) -> Optional[str]:
    if impl == "liger_kl" and op == "fused_linear_srkl":
        return "Liger's fused-linear KL-div computes forward KL only (see liger for reverse KL)"
    return None


def work(shape: dict, mode: str) -> dict:
    n, vocab, hidden, teacher_hidden = shape["N"], shape["V"], shape["H"], shape["H_teacher"]
    flops = 2 * n * vocab * (hidden + teacher_hidden)
    if mode != "fwd":
        flops += 2 * 2 * n * vocab * hidden
    return {"flops": flops}


def loss_function(op: str, impl: str):
    """(student_hidden, student_weight, teacher_hidden, teacher_weight, labels) -> scalar loss."""
    reverse = op == "fused_linear_srkl"
    if impl in ("naive", "naive_compiled"):
        naive = reference.naive_srkl if reverse else reference.naive_skl

        def loss(hs, ws, ht, wt, labels):
            student_logits = hs @ ws.T
            with torch.no_grad():
                teacher_logits = ht @ wt.T
            return naive(student_logits, teacher_logits, labels, alpha=impls.ALPHA)
        return impls.compiled(loss) if impl == "naive_compiled" else loss
    if impl in impls.LIBRARY:
        fused = fused_linear_srkl if reverse else fused_linear_skl
        kwargs = {"detach_mixture": True} if reverse else {}
        return lambda hs, ws, ht, wt, labels: fused(hs, ws, ht, wt, impls.ALPHA, labels=labels,
                                                    reduction="seqmean", backend=impl, **kwargs)
    if impl in ("liger", "liger_kl"):
        liger = impls.liger_fused_linear_loss(reverse, kl_div=impl == "liger_kl")
        return lambda hs, ws, ht, wt, labels: liger(hs.view(-1, hs.shape[-1]), ws, ht.view(-1, ht.shape[-1]),
                                                    wt, labels.view(-1))
    raise ValueError(f"{NAME}: no implementation {impl!r}")


class Bench:
    def __init__(self, shape: dict, op: str, impl: str, device: torch.device):
        self.op, self.impl = op, impl
        dtype = getattr(torch, shape["dtype"])
        batch, seq, vocab = batch_shape(shape)
        hidden, teacher_hidden = shape["H"], shape["H_teacher"]
        gen = torch.Generator(device=device).manual_seed(0)

        def randn(*size, scale=1.0):
            return torch.randn(size, generator=gen, device=device, dtype=dtype).mul_(scale)

        self.student_hidden = randn(batch, seq, hidden).requires_grad_(True)
        self.student_weight = randn(vocab, hidden, scale=3 * hidden**-0.5).requires_grad_(True)
        self.teacher_hidden = randn(batch, seq, teacher_hidden)
        self.teacher_weight = randn(vocab, teacher_hidden, scale=3 * teacher_hidden**-0.5)
        self.labels = torch.randint(0, vocab, (batch, seq), generator=gen, device=device)
        self.args = (self.student_hidden, self.student_weight, self.teacher_hidden, self.teacher_weight, self.labels)
        self.loss = loss_function(op, impl)
        self.input_bytes = sum(t.nbytes for t in self.args)

    def output_bytes(self, mode: str) -> int:
        return 0 if mode == "fwd" else self.student_hidden.nbytes + self.student_weight.nbytes

    def zero_grad(self) -> None:
        self.student_hidden.grad = None
        self.student_weight.grad = None

    def run(self, mode: str):
        if mode == "fwd":
            return lambda: self.loss(*self.args).detach()

        def forward_backward():
            loss = self.loss(*self.args)
            loss.backward()
            return loss.detach()
        return forward_backward

    def check(self) -> Optional[str]:
        if not self.impl.startswith("liger"):
            return None
        with torch.no_grad():
            liger = float(self.loss(*self.args))
            fused = fused_linear_srkl if self.op == "fused_linear_srkl" else fused_linear_skl
            ours = float(fused(*self.args[:4], 0.0, labels=self.labels, reduction="seqmean"))
        return f"loss vs ours at alpha=0: rel. diff {abs(liger - ours) / max(abs(ours), 1e-30):.1e}"
