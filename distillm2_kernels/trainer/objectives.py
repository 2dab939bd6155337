"""The training objectives over one batch of hidden states: the DistiLLM-2 loss, or SKL / KD alone.

`loss="distillm2"`: `DistiLLM2Loss(preset)` — SKL on the teacher-response rows plus SRKL on the
student-response rows, with the preset's α, β, weighting and reduction (`distillm2_kernels.objective`).
`loss="skl"`: SKL_α on the teacher-response rows only, α the preset's constant α (0.1 in every preset; the
paper preset's adaptive α needs both halves and is not used), reduced with the preset's reduction.
`loss="kd"`: plain forward KL(p ‖ q) on the teacher-response rows = SKL at α = 0.
`loss="srkl"`: SRKL_α on the student-response rows only (α the preset's constant α, the preset's mixture
detaching and reduction) — DistiLLM-2 without its SKL half; the batch still holds the teacher-response rows.

All of them go through the fused-linear ops from the last hidden states and the lm_head weights: no `[N, V]`
logits. Hidden states and labels arrive unshifted (`[R, T, ...]`, position k holds token k); the objective
shifts them (hidden k predicts label k+1). The teacher is its hidden states `[R, T, H_t]` with its lm_head, or
a `SparseTeacher` (ids / log-probabilities `[R, T, K]`, tail log-mass `[R, T]`, from a score cache) without
one, unshifted like the hidden states (position k's distribution predicts token k+1) and shifted the same
way; `teacher_tail` is its tail mode (docs/design.md §8). The curriculum state (epoch, step, α anchors) is
carried by a `DistiLLM2Loss` for every loss so that checkpoints have one format.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch

from ..fused_linear import fused_linear_skl, fused_linear_srkl
from ..objective import DistiLLM2Loss
from ..reductions import sequence_mean
from ..sparse_teacher import SparseTeacher, as_sparse_teacher
from .models import LMHead

__all__ = ["LOSSES", "TrainingObjective"]

LOSSES = ("distillm2", "skl", "kd", "srkl")


def _softcap(student: LMHead, teacher: Optional[LMHead]):
    teacher_cap = None if teacher is None else teacher.softcap
    if student.softcap is None and teacher_cap is None:
        return None
    return (student.softcap, teacher_cap)


Teacher = Union[torch.Tensor, SparseTeacher]


def _select(teacher: Teacher, rows) -> Teacher:
    """`teacher[rows]` for hidden states or each tensor of a sparse teacher (`rows` indexes the leading dims)."""
    if not isinstance(teacher, SparseTeacher):
        return teacher[rows]
    tail = None if teacher.tail_logprob is None else teacher.tail_logprob[rows]
    return SparseTeacher(teacher.ids[rows], teacher.logprobs[rows], tail)


class TrainingObjective:
    """`objective(student_hidden, teacher, labels, num_pairs, student_head, teacher_head)` → `(loss, metrics)`;
    `teacher` is the teacher's hidden states `[R, T, H_t]` with `teacher_head` its lm_head, or a `SparseTeacher`
    `[R, T, K]` with `teacher_head` None. Metrics are per-batch means (0-d tensors, no gradient) of `skl`,
    `srkl`, `alpha_t`, `alpha_s`, `beta` (the latter three absent or constant where they do not apply).
    `teacher_tail`: the tail mode of a sparse teacher ("renormalize" or "uniform")."""

    def __init__(self, loss: str = "distillm2", preset: str = "distillm2", *, num_epochs: Optional[int] = None,
                 total_steps: Optional[int] = None, backend: str = "auto", teacher_tail: str = "renormalize"):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        self.loss = loss
        self.backend = backend
        self.curriculum = DistiLLM2Loss(
            preset, num_epochs=num_epochs, total_steps=total_steps, backend=backend, teacher_tail=teacher_tail
        )
        self.teacher_tail = self.curriculum.teacher_tail

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
        teacher: Teacher,
        labels: torch.Tensor,
        num_pairs: int,
        student_head: LMHead,
        teacher_head: Optional[LMHead],
    ) -> tuple[torch.Tensor, dict]:
        sparse = as_sparse_teacher(teacher)
        if sparse is not None:
            if teacher_head is not None:
                raise ValueError("a sparse teacher gives log-probabilities and has no lm_head: pass teacher_head=None")
            teacher = sparse
        elif teacher_head is None:
            raise ValueError("teacher_head is None, but the teacher is hidden states: pass the teacher's lm_head")
        shift = (slice(None), slice(None, -1))
        student_hidden, teacher, labels = student_hidden[shift], _select(teacher, shift), labels[:, 1:]
        heads = dict(student_weight=student_head.weight, student_bias=student_head.bias,
                     teacher_weight=None if sparse is not None else teacher_head.weight,
                     teacher_bias=None if sparse is not None else teacher_head.bias,
                     softcap=_softcap(student_head, teacher_head))
        tail = dict(teacher_tail=self.teacher_tail if sparse is not None else "renormalize")
        t, s = slice(0, num_pairs), slice(num_pairs, 2 * num_pairs)
        if self.loss == "distillm2":
            loss, metrics = self.curriculum.from_hidden(
                student_hidden[t], _select(teacher, t), labels[t], student_hidden[s], _select(teacher, s), labels[s],
                **heads,
            )
            return loss, {
                "skl": metrics["skl"].mean(), "srkl": metrics["srkl"].mean(), "alpha_t": metrics["alpha_t"].mean(),
                "alpha_s": metrics["alpha_s"].mean(), "beta": metrics["beta"].float(),
            }
        config = self.curriculum.config
        if self.loss == "srkl":
            loss, outputs = fused_linear_srkl(
                student_hidden[s], heads["student_weight"], _select(teacher, s), heads["teacher_weight"], self.alpha,
                student_bias=heads["student_bias"], teacher_bias=heads["teacher_bias"], labels=labels[s],
                ignore_index=config.ignore_index, temperature=config.temperature, softcap=heads["softcap"],
                reduction=config.reduction, detach_mixture=config.detach_mixture, backend=self.backend,
                return_token_outputs=True, **tail,
            )
            valid = (labels[s] != config.ignore_index).to(torch.float32)
            srkl = sequence_mean(outputs.losses.detach(), valid).mean()
            return loss, {"srkl": srkl, "alpha_s": torch.tensor(self.alpha)}
        loss, outputs = fused_linear_skl(
            student_hidden[t], heads["student_weight"], _select(teacher, t), heads["teacher_weight"], self.alpha,
            student_bias=heads["student_bias"], teacher_bias=heads["teacher_bias"], labels=labels[t],
            ignore_index=config.ignore_index, temperature=config.temperature, softcap=heads["softcap"],
            reduction=config.reduction, backend=self.backend, return_token_outputs=True, **tail,
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
