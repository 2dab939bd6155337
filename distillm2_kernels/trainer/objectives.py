"""The training objectives over one batch of hidden states: the DistiLLM-2 loss, or SKL / KD alone.

`loss="distillm2"`: `DistiLLM2Loss(preset)` — SKL on the teacher-response rows plus SRKL on the
student-response rows, with the preset's α, β, weighting and reduction (`distillm2_kernels.objective`).
`loss="skl"`: SKL_α on the teacher-response rows only, α the preset's constant α (0.1 in every preset; the
paper preset's adaptive α needs both halves and is not used), reduced with the preset's reduction.
`loss="kd"`: plain forward KL(p ‖ q) on the teacher-response rows = SKL at α = 0.
`loss="srkl"`: SRKL_α on the student-response rows only (α the preset's constant α, the preset's mixture
detaching and reduction) — DistiLLM-2 without its SKL half; the batch still holds the teacher-response rows.

All three go through the fused-linear ops from the last hidden states and the lm_head weights: no `[N, V]`
logits. Hidden states and labels arrive unshifted (`[R, T, ...]`, position k holds token k); the objective
shifts them (hidden k predicts label k+1). The curriculum state (epoch, step, α anchors) is carried by a
`DistiLLM2Loss` for every loss so that checkpoints have one format.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..fused_linear import fused_linear_skl, fused_linear_srkl
from ..objective import DistiLLM2Loss
from ..reductions import sequence_mean
from .models import LMHead

__all__ = ["LOSSES", "TrainingObjective"]

LOSSES = ("distillm2", "skl", "kd", "srkl")


def _softcap(student: LMHead, teacher: LMHead):
    if student.softcap is None and teacher.softcap is None:
        return None
    return (student.softcap, teacher.softcap)


class TrainingObjective:
    """`objective(student_hidden, teacher_hidden, labels, num_pairs, student_head, teacher_head)` →
    `(loss, metrics)`; metrics are per-batch means (0-d tensors, no gradient) of `skl`, `srkl`, `alpha_t`,
    `alpha_s`, `beta` (the latter three absent or constant where they do not apply)."""

    def __init__(self, loss: str = "distillm2", preset: str = "distillm2", *, num_epochs: Optional[int] = None,
                 total_steps: Optional[int] = None, backend: str = "auto"):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        self.loss = loss
        self.backend = backend
        self.curriculum = DistiLLM2Loss(preset, num_epochs=num_epochs, total_steps=total_steps, backend=backend)

    @property
    def uses_student_responses(self) -> bool:
        return self.loss in ("distillm2", "srkl")

    @property
    def alpha(self) -> float:
        """The constant α of the single-term losses (SKL, KD, SRKL)."""
        return 0.0 if self.loss == "kd" else self.curriculum.config.alpha

    def __call__(
        self,
        student_hidden: torch.Tensor,
        teacher_hidden: torch.Tensor,
        labels: torch.Tensor,
        num_pairs: int,
        student_head: LMHead,
        teacher_head: LMHead,
    ) -> tuple[torch.Tensor, dict]:
        student_hidden, teacher_hidden, labels = student_hidden[:, :-1], teacher_hidden[:, :-1], labels[:, 1:]
        heads = dict(student_weight=student_head.weight, teacher_weight=teacher_head.weight,
                     student_bias=student_head.bias, teacher_bias=teacher_head.bias,
                     softcap=_softcap(student_head, teacher_head))
        t, s = slice(0, num_pairs), slice(num_pairs, 2 * num_pairs)
        if self.loss == "distillm2":
            loss, metrics = self.curriculum.from_hidden(
                student_hidden[t], teacher_hidden[t], labels[t], student_hidden[s], teacher_hidden[s], labels[s],
                **heads,
            )
            return loss, {
                "skl": metrics["skl"].mean(), "srkl": metrics["srkl"].mean(), "alpha_t": metrics["alpha_t"].mean(),
                "alpha_s": metrics["alpha_s"].mean(), "beta": metrics["beta"].float(),
            }
        config = self.curriculum.config
        if self.loss == "srkl":
            loss, outputs = fused_linear_srkl(
                student_hidden[s], heads["student_weight"], teacher_hidden[s], heads["teacher_weight"], self.alpha,
                student_bias=heads["student_bias"], teacher_bias=heads["teacher_bias"], labels=labels[s],
                ignore_index=config.ignore_index, temperature=config.temperature, softcap=heads["softcap"],
                reduction=config.reduction, detach_mixture=config.detach_mixture, backend=self.backend,
                return_token_outputs=True,
            )
            valid = (labels[s] != config.ignore_index).to(torch.float32)
            srkl = sequence_mean(outputs.losses.detach(), valid).mean()
            return loss, {"srkl": srkl, "alpha_s": torch.tensor(self.alpha)}
        loss, outputs = fused_linear_skl(
            student_hidden[t], heads["student_weight"], teacher_hidden[t], heads["teacher_weight"], self.alpha,
            student_bias=heads["student_bias"], teacher_bias=heads["teacher_bias"], labels=labels[t],
            ignore_index=config.ignore_index, temperature=config.temperature, softcap=heads["softcap"],
            reduction=config.reduction, backend=self.backend, return_token_outputs=True,
        )
        valid = (labels[t] != config.ignore_index).to(torch.float32)
        skl = sequence_mean(outputs.losses.detach(), valid).mean()
        return loss, {"skl": skl, "alpha_t": torch.tensor(self.alpha)}

    def share_anchors(self, mean: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace the adaptive α's anchors, which each process fixes on its own first batch, by their mean over
        the processes (`mean`, a collective: `lambda t: accelerator.reduce(t, "mean")`), so that every process
        holds the same ones, as does a checkpoint (written by the main process). A no-op without anchors."""
        state = self.curriculum.state
        if state.anchor_t is not None:
            state.anchor_t, state.anchor_s = mean(state.anchor_t), mean(state.anchor_s)

    def step(self) -> None:
        self.curriculum.step()

    def set_epoch(self, epoch: int) -> None:
        self.curriculum.set_epoch(epoch)

    def state_dict(self) -> dict:
        return {"loss": self.loss, **self.curriculum.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        loss = state.pop("loss", self.loss)
        if loss != self.loss:
            raise ValueError(f"the checkpoint was trained with loss={loss!r}, this run uses loss={self.loss!r}")
        self.curriculum.load_state_dict(state)
