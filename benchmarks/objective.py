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
from . import skew_divergence
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


class Bench(skew_divergence.Bench):
    """The logits suite's bench on `[2B, T, V]` logits (first B rows the teacher's responses, last B the
    student's), with the objective as the loss."""

    @staticmethod
    def make_inputs(shape: dict, device: torch.device):
        pairs, seq = pairs_and_length(shape)
        return skew_divergence.make_logits(shape, device, (2 * pairs, seq, shape["V"]))

    @staticmethod
    def make_loss(op: str, impl: str):
        return loss_function(impl)
