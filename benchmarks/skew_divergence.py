"""Suite `skew_divergence`: `fused_skl` and `fused_srkl` on logits.

Inputs: student and teacher logits `[B, T, V]` (N = B·T tokens, T = min(N, 1024)), student ~ 3·randn, teacher
= 3·randn + student / 2, every token labelled (none ignored); the student requires grad. The loss is the
released trainer's: α = 0.1, reduction "seqmean" (token mean within each sequence, mean over sequences), SRKL
with the q inside the mixture detached (`detach_mixture=True`, as `reference.naive_srkl`).

Modes: "fwd" = the loss on a student that requires grad (the training forward: autograd state is built,
then dropped); "fwd+bwd" = the loss and its backward (the student's gradient is the output).

Minimum traffic (the GB/s column): fwd reads both logits once, 2·N·V·bytes(dtype); fwd+bwd also writes the
gradient, 3·N·V·bytes(dtype). Liger's ops (`implementations.liger_logits_loss`) compute KL at α = 0 and
are credited with the same traffic.
"""

from __future__ import annotations

from typing import Optional

import torch

from distillm2_kernels import fused_skl, fused_srkl, reference

from . import implementations as impls

NAME = "skew_divergence"
OPS = ("fused_skl", "fused_srkl")
MODES = ("fwd", "fwd+bwd")
IMPLS = ("naive", "naive_compiled", "torch", "cpu", "triton", "liger")
METRIC = "GB/s"


def not_comparable(impl: str, op: str) -> Optional[str]:
    return None


def batch_shape(shape: dict) -> tuple:
    n, vocab = shape["N"], shape["V"]
    seq = min(n, 1024) if n % min(n, 1024) == 0 else n
    return n // seq, seq, vocab


def work(shape: dict, mode: str) -> dict:
    elements = shape["N"] * shape["V"]
    itemsize = torch.empty((), dtype=getattr(torch, shape["dtype"])).element_size()
    return {"bytes": (2 if mode == "fwd" else 3) * elements * itemsize}


def make_logits(shape: dict, device: torch.device, size: Optional[tuple] = None):
    """(student requiring grad, teacher, labels) of `size` (default `batch_shape(shape)`), seeded: every worker
    builds the same inputs."""
    dtype = getattr(torch, shape["dtype"])
    size = size or batch_shape(shape)
    gen = torch.Generator(device=device).manual_seed(0)
    student = torch.randn(size, generator=gen, device=device, dtype=dtype).mul_(3)
    teacher = torch.randn(size, generator=gen, device=device, dtype=dtype).mul_(3).add_(student, alpha=0.5)
    labels = torch.randint(0, size[-1], size[:-1], generator=gen, device=device)
    return student.requires_grad_(True), teacher, labels


def loss_function(op: str, impl: str):
    """(student, teacher, labels) -> scalar loss."""
    reverse = op == "fused_srkl"
    if impl in ("naive", "naive_compiled"):
        naive = reference.naive_srkl if reverse else reference.naive_skl

        def loss(student, teacher, labels):
            return naive(student, teacher, labels, alpha=impls.ALPHA)
        return impls.compiled(loss) if impl == "naive_compiled" else loss
    if impl in impls.LIBRARY:
        fused = fused_srkl if reverse else fused_skl
        kwargs = {"detach_mixture": True} if reverse else {}
        return lambda student, teacher, labels: fused(student, teacher, impls.ALPHA, labels=labels,
                                                      reduction="seqmean", backend=impl, **kwargs)
    if impl == "liger":
        liger = impls.liger_logits_loss(reverse)
        return lambda student, teacher, labels: liger(student.view(-1, student.shape[-1]),
                                                      teacher.view(-1, teacher.shape[-1]))
    raise ValueError(f"{NAME}: no implementation {impl!r}")


class Bench:
    def __init__(self, shape: dict, op: str, impl: str, device: torch.device):
        self.op, self.impl = op, impl
        self.student, self.teacher, self.labels = self.make_inputs(shape, device)
        self.loss = self.make_loss(op, impl)
        self.input_bytes = self.student.nbytes + self.teacher.nbytes + self.labels.nbytes

    @staticmethod
    def make_inputs(shape: dict, device: torch.device):
        return make_logits(shape, device)

    @staticmethod
    def make_loss(op: str, impl: str):
        return loss_function(op, impl)

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
        """For Liger (α = 0): its loss against ours at α = 0 on the same inputs."""
        if self.impl != "liger":
            return None
        with torch.no_grad():
            liger = float(self.loss(self.student, self.teacher, self.labels))
            fused = fused_srkl if self.op == "fused_srkl" else fused_skl
            ours = float(fused(self.student, self.teacher, 0.0, labels=self.labels, reduction="seqmean"))
        return f"loss vs ours at alpha=0: rel. diff {abs(liger - ours) / max(abs(ours), 1e-30):.1e}"
