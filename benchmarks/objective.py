"""Suite `objective`: one DistiLLM-2 objective step on logits (`DistiLLM2Loss("distillm2")`, the released
code's preset: SKL on the teacher-response rows + SRKL on the student-response rows, α = 0.1, per-sequence
token means, mean over pairs).

Inputs: student and teacher logits `[2B, T, V]`, rows `[:B]` the teacher's responses and `[B:]` the
student's (N = 2·B·T tokens; T = min(N/2, 512)), every token labelled. `naive` is the released trainer's
code on that batch (`implementations.naive_distillm2_loss`: float32 log-softmaxes, both divergences on all
2B rows, half of each kept); ours gets the two halves as views (no copy). Liger has no skew divergence.

Modes as in `skew_divergence`; minimum traffic likewise over all N tokens: 2·N·V·bytes (fwd), 3·N·V·bytes
(fwd+bwd).
"""

from __future__ import annotations

from typing import Optional

import torch

from distillm2_kernels import DistiLLM2Loss

from . import implementations as impls
from .skew_divergence import work  # noqa: F401  (the same traffic count over all N tokens)

NAME = "objective"
OPS = ("distillm2_loss",)
MODES = ("fwd", "fwd+bwd")
IMPLS = ("naive", "naive_compiled", "torch", "cpu", "triton", "liger")
METRIC = "GB/s"


def not_comparable(impl: str, op: str) -> Optional[str]:
    if impl.startswith("liger"):
        return "Liger-Kernel has no skew divergence (alpha = 0.1) to compose the objective from"
    return None


def pairs_and_length(shape: dict) -> tuple:
    n = shape["N"]
    seq = min(n // 2, 512)
    if n % (2 * seq):
        raise ValueError(f"objective: N = {n} must be a multiple of 2·T = {2 * seq}")
    return n // (2 * seq), seq


def loss_function(impl: str):
    """(student [2B, T, V], teacher, labels [2B, T]) -> scalar loss."""
    if impl in ("naive", "naive_compiled"):
        def loss(student, teacher, labels):
            return impls.naive_distillm2_loss(student, teacher, labels)
        return impls.compiled(loss) if impl == "naive_compiled" else loss
    if impl in impls.LIBRARY:
        objective = DistiLLM2Loss("distillm2", backend=impl)

        def loss(student, teacher, labels):
            pairs = student.shape[0] // 2
            value, _metrics = objective(student[:pairs], teacher[:pairs], labels[:pairs],
                                        student[pairs:], teacher[pairs:], labels[pairs:])
            return value
        return loss
    raise ValueError(f"{NAME}: no implementation {impl!r}")


class Bench:
    def __init__(self, shape: dict, op: str, impl: str, device: torch.device):
        self.impl = impl
        dtype = getattr(torch, shape["dtype"])
        pairs, seq = pairs_and_length(shape)
        size = (2 * pairs, seq, shape["V"])
        gen = torch.Generator(device=device).manual_seed(0)
        self.student = torch.randn(size, generator=gen, device=device, dtype=dtype).mul_(3)
        self.teacher = torch.randn(size, generator=gen, device=device, dtype=dtype).mul_(3).add_(self.student, alpha=0.5)
        self.labels = torch.randint(0, shape["V"], size[:-1], generator=gen, device=device)
        self.student.requires_grad_(True)
        self.loss = loss_function(impl)
        self.input_bytes = self.student.nbytes + self.teacher.nbytes + self.labels.nbytes

    def output_bytes(self, mode: str) -> int:
        return 0 if mode == "fwd" else self.student.nbytes

    def zero_grad(self) -> None:
        self.student.grad = None

    def run(self, mode: str):
        args = (self.student, self.teacher, self.labels)
        if mode == "fwd":
            return lambda: self.loss(*args).detach()

        def forward_backward():
            loss = self.loss(*args)
            loss.backward()
            return loss.detach()
        return forward_backward

    def check(self) -> Optional[str]:
        return None
