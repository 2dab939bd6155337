"""The DistiLLM-2 objective: skew KL on the teacher's responses, skew reverse KL on the student's.

A batch holds B prompts x_i, each with a teacher response y_t,i (the "_t" rows) and a student response
y_s,i (the "_s" rows). SKL is computed on the _t rows only and SRKL on the _s rows only. Per sequence,
SKL_i and SRKL_i are token means over the response (`labels != ignore_index`).

Presets (`PRESETS`; every field of `ObjectiveConfig` can also be set directly):

"distillm2" (default) — the released DistiLLM-2 code:
    loss = 1/B Σ_i [SKL_α(x_i, y_t,i) + SRKL_α(x_i, y_s,i)],   α = 0.1 for both, SRKL's q inside the
    mixture detached.

"paper" — Algorithm 1 and Appendix B.3 of the paper:
    loss = 1/(2B) Σ_i [(1−β) SKL_{α_t,i} + β SRKL_{α_s,i}]
    α_t,i = clip(1 − (1−α₀)·A_t / (p̃_i − q̃_i), 0.01, 0.1) on the _t rows,
    α_s,i = clip(1 − (1−α₀)·A_s / (q̃_i − p̃_i), 0.01, 0.1) on the _s rows, α₀ = 0.1,
    with p̃_i = exp(mean_k log p(y_k)) the teacher's geometric-mean token probability of the row's
    response and q̃_i the student's; α = α₀ during the first epoch (no curriculum);
    β = clip(e/E + τ/T, β₀, 1), β₀ = 0.5.
    Choices the paper leaves open, and ours:
      - the anchors A_t, A_s ("a reference value of the gap fixed once"): the batch means of the gaps
        p̃ − q̃ (_t rows) and q̃ − p̃ (_s rows) on the first batch the objective sees, as the released
        code's unused adaptive-α path freezes the batch mean at its first logging step;
      - e is the 0-based epoch of E epochs and τ/T the global optimizer step over the total steps, so that
        β saturates halfway through training like the released code's disabled β variant;
      - SRKL's mixture is detached, as in the released code;
      - a row whose gap is exactly 0 with a zero anchor (0/0) gets α₀.

"distillm" — DistiLLM (v1) conventions: α = 0.1, SRKL not detached, SKL and SRKL each one token mean
    over the whole batch, loss = SKL + SRKL. (v1 reports SKL as the cross-entropy −Σ p log m, which is our
    SKL plus the teacher's entropy: the same gradient; we report the KL.)

The objective reads the label-token log-probabilities `log p(y_k)`, `log q(y_k)` from the kernels' first
sweep over the vocabulary (`token_statistics`), computes α from them, and then runs the loss sweep on
the same statistics: no extra pass over the vocabulary and no `[N, V]` log_softmax.

Two forms share the α, β, reduction, weighting and metrics (`_objective`):
- `distillm2_loss` / `DistiLLM2Loss.__call__` on logits `[B, T, V]`;
- `distillm2_loss_from_hidden` / `DistiLLM2Loss.from_hidden` on the last hidden states `[B, T, H]` and
  the lm_head weights, through `fused_linear.fused_linear_skl_plus_srkl` (the fused-linear SKL and SRKL
  in one op); the label log-probabilities are a by-product of its sweep 1, and only the adaptive α adds
  a statistics-only pass (two GEMMs per half, see `distillm2_loss_from_hidden`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Callable, NamedTuple, Optional, Union

import torch

from ._inputs import Alpha
from .fused_linear import Softcap, fused_linear_skl_plus_srkl, fused_linear_token_statistics
from .reductions import reduce_token_losses, sequence_mean
from .skew_divergence import TokenStatistics, skew_divergence, token_statistics
from .sparse_teacher import as_sparse_teacher, check_teacher_tail
from .statistics import LabelLogprob

__all__ = [
    "ObjectiveConfig",
    "PRESETS",
    "CurriculumState",
    "DistiLLM2Loss",
    "distillm2_loss",
    "distillm2_loss_from_hidden",
    "adaptive_alpha",
    "beta_schedule",
]


@dataclass(frozen=True)
class ObjectiveConfig:
    """Every knob of the objective. See the module docstring for the presets built from it."""

    alpha: float = 0.1  # α₀: the α of both terms, and the reference α of the curriculum
    adaptive_alpha: bool = False  # per-row α from the sequence probabilities (the paper)
    alpha_min: float = 0.01  # clipping bounds of the adaptive α
    alpha_max: float = 0.1
    curriculum_start_epoch: int = 1  # 0-based epoch from which the adaptive α applies (α₀ before)
    beta: float = 1.0  # β of the "beta" weighting when there is no schedule
    beta_schedule: bool = False  # β = clip(e/E + τ/T, β₀, 1)
    beta0: float = 0.5  # β₀
    weighting: str = "sum"  # "sum": SKL + SRKL;  "beta": ((1−β)·SKL + β·SRKL) / 2
    detach_mixture: bool = True  # SRKL: the q inside r = (1−α)p + αq is a constant
    reduction: str = "seqmean"  # "seqmean": token mean per sequence, mean over pairs; "mean": one token mean
    temperature: float = 1.0
    ignore_index: int = -100

    def __post_init__(self):
        for name in ("alpha", "alpha_min", "alpha_max", "beta", "beta0"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        if self.alpha_min > self.alpha_max:
            raise ValueError(f"alpha_min ({self.alpha_min}) exceeds alpha_max ({self.alpha_max})")
        if self.weighting not in ("sum", "beta"):
            raise ValueError(f"weighting must be 'sum' or 'beta', got {self.weighting!r}")
        if self.reduction not in ("seqmean", "mean"):
            raise ValueError(f"reduction must be 'seqmean' or 'mean', got {self.reduction!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


_CONFIG_FIELDS = tuple(f.name for f in fields(ObjectiveConfig))

PRESETS = {
    "distillm2": ObjectiveConfig(),
    "paper": ObjectiveConfig(adaptive_alpha=True, beta_schedule=True, weighting="beta"),
    "distillm": ObjectiveConfig(detach_mixture=False, reduction="mean"),
}


def resolve_config(preset: Union[str, ObjectiveConfig] = "distillm2", **overrides) -> ObjectiveConfig:
    """A preset's config with `overrides` applied (any field of `ObjectiveConfig`)."""
    if isinstance(preset, ObjectiveConfig):
        config = preset
    elif preset in PRESETS:
        config = PRESETS[preset]
    else:
        raise ValueError(f"preset must be one of {sorted(PRESETS)} or an ObjectiveConfig, got {preset!r}")
    if not overrides:  # the usual call, also under torch.compile (which cannot trace `dataclasses.replace`)
        return config
    unknown = set(overrides) - set(_CONFIG_FIELDS)
    if unknown:
        raise TypeError(f"unknown objective option(s) {sorted(unknown)}; options: {list(_CONFIG_FIELDS)}")
    return replace(config, **overrides)


@dataclass
class CurriculumState:
    """Where training stands, and the anchors of the adaptive α (fixed on the first batch)."""

    epoch: int = 0  # 0-based
    num_epochs: Optional[int] = None  # E, the run's length: the β schedule needs it (None: not given)
    step: int = 0  # global optimizer step, 0-based
    total_steps: Optional[int] = None  # T
    anchor_t: Optional[torch.Tensor] = None  # A_t: the reference gap p̃ − q̃ of the _t rows
    anchor_s: Optional[torch.Tensor] = None  # A_s: the reference gap q̃ − p̃ of the _s rows

    def state_dict(self) -> dict:
        return {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in asdict(self).items()}

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            if not hasattr(self, name):
                raise KeyError(f"unknown curriculum state entry {name!r}")
            setattr(self, name, value)


def _check_run_length(config: ObjectiveConfig, num_epochs: Optional[int], total_steps: Optional[int]) -> None:
    """The β schedule needs the run's length E and T: a missing one is an error, not a silent 1 (with E = T = 1,
    β would reach 1 after one step and the SKL term weigh 0 from then on)."""
    for name, value in (("num_epochs", num_epochs), ("total_steps", total_steps)):
        if value is None:
            if config.beta_schedule:
                raise ValueError(
                    f"the β schedule clip(e/E + τ/T, β₀, 1) needs the run's length: pass {name} (num_epochs = E, "
                    "the number of epochs; total_steps = T, the number of optimizer steps of the whole run), "
                    "e.g. DistiLLM2Loss(\"paper\", num_epochs=3, total_steps=3 * len(loader))"
                )
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def beta_schedule(config: ObjectiveConfig, state: CurriculumState) -> float:
    """β = clip(e/E + τ/T, β₀, 1) with the schedule on (E = `state.num_epochs`, T = `state.total_steps`,
    both required), else the constant `config.beta`."""
    if not config.beta_schedule:
        return config.beta
    _check_run_length(config, state.num_epochs, state.total_steps)
    progress = state.epoch / state.num_epochs + state.step / state.total_steps
    return min(1.0, max(config.beta0, progress))


def adaptive_alpha(gap: torch.Tensor, anchor: torch.Tensor, config: ObjectiveConfig) -> torch.Tensor:
    """α = clip(1 − (1−α₀)·A / gap, α_min, α_max) per row (α₀ where A / gap is 0/0)."""
    alpha = 1.0 - (1.0 - config.alpha) * (anchor / gap)
    return alpha.nan_to_num(nan=config.alpha).clamp(config.alpha_min, config.alpha_max)


def _first_step_state() -> CurriculumState:
    """The state of a call without one: the first step of a run, where β = clip(0, β₀, 1) = β₀ whatever its
    length (E = T = 1 stand for the unknown length; nothing steps this state)."""
    return CurriculumState(num_epochs=1, total_steps=1)


def _check_halves(kind: str, last: str, student_t, labels_t, student_s, labels_s) -> None:
    """Shapes of both halves: `[B, T, <last>]` student `kind` ("logits", "hidden") with `[B, T]` labels,
    the same B in both halves."""
    for half, inputs, labels in (("t", student_t, labels_t), ("s", student_s, labels_s)):
        if not isinstance(inputs, torch.Tensor) or inputs.dim() != 3:
            raise ValueError(f"student_{kind}_{half} / teacher_{kind}_{half} must be [B, T, {last}] tensors")
        if not isinstance(labels, torch.Tensor) or labels.shape != inputs.shape[:2]:
            raise ValueError(
                f"labels_{half} must have shape [B, T] = {tuple(inputs.shape[:2])} (aligned with the {kind}: "
                f"the caller does the causal shift), got "
                f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else labels}"
            )
    if labels_t.shape[0] != labels_s.shape[0]:
        raise ValueError(
            f"the _t and _s halves must hold the same B prompts, got B = {labels_t.shape[0]} and {labels_s.shape[0]}"
        )


class _HalfOutputs(NamedTuple):
    """One half's by-products of the loss (no gradient)."""

    token_losses: torch.Tensor  # [B, T] SKL (_t) or SRKL (_s) per token, 0 at ignored tokens
    label_logprobs: torch.Tensor  # [B, T, 2]: log q(y_k), log p(y_k), 0 at ignored tokens


def _objective(
    config: ObjectiveConfig,
    state: CurriculumState,
    labels_t: torch.Tensor,
    labels_s: torch.Tensor,
    statistics: Callable[[str, bool], Optional[TokenStatistics]],
    terms: Callable[..., tuple[torch.Tensor, _HalfOutputs, _HalfOutputs]],
) -> tuple[torch.Tensor, dict]:
    """The objective over either form of the inputs: α, β, the weighting and the metrics.

    `statistics(half, needed)` gives sweep 1's `TokenStatistics` of half "t" or "s" (it may return None
    when not `needed`, i.e. when nothing reads the label log-probabilities before the loss);
    `terms(alpha_t, alpha_s, statistics_t, statistics_s, (c_t, c_s))` gives
    `c_t · SKL(_t rows) + c_s · SRKL(_s rows)`, each reduced by `config.reduction`, and both halves'
    `_HalfOutputs`, reusing the statistics where given.
    """
    valid_t = (labels_t != config.ignore_index).to(torch.float32)
    valid_s = (labels_s != config.ignore_index).to(torch.float32)
    batch = labels_t.shape[0]

    # The adaptive α reads the sequence probabilities before the loss: to fix the anchors on the first
    # batch, and from the curriculum's first epoch on.
    needed = config.adaptive_alpha and (state.anchor_t is None or state.epoch >= config.curriculum_start_epoch)
    stats_t, stats_s = statistics("t", needed), statistics("s", needed)
    alpha_t: Alpha = config.alpha
    alpha_s: Alpha = config.alpha
    if needed:
        gap_t = sequence_mean(stats_t.teacher_label_logprobs, valid_t).exp() - sequence_mean(
            stats_t.student_label_logprobs, valid_t
        ).exp()  # p̃ − q̃ on the teacher's responses
        gap_s = sequence_mean(stats_s.student_label_logprobs, valid_s).exp() - sequence_mean(
            stats_s.teacher_label_logprobs, valid_s
        ).exp()  # q̃ − p̃ on the student's responses
        if state.anchor_t is None:
            state.anchor_t, state.anchor_s = gap_t.mean().detach(), gap_s.mean().detach()
        if state.epoch >= config.curriculum_start_epoch:
            alpha_t = adaptive_alpha(gap_t, state.anchor_t.to(gap_t.device), config)
            alpha_s = adaptive_alpha(gap_s, state.anchor_s.to(gap_s.device), config)
    beta = beta_schedule(config, state)

    coefficients = (1.0, 1.0) if config.weighting == "sum" else (0.5 * (1.0 - beta), 0.5 * beta)
    loss, skl, srkl = terms(alpha_t, alpha_s, stats_t, stats_s, coefficients)

    def per_row(alpha):
        if isinstance(alpha, torch.Tensor):
            return alpha.detach()
        return torch.full((batch,), alpha, device=labels_t.device)

    metrics = {
        "skl": sequence_mean(skl.token_losses, valid_t),
        "srkl": sequence_mean(srkl.token_losses, valid_s),
        "teacher_logprob_t": sequence_mean(skl.label_logprobs[..., LabelLogprob.TEACHER], valid_t),
        "student_logprob_t": sequence_mean(skl.label_logprobs[..., LabelLogprob.STUDENT], valid_t),
        "teacher_logprob_s": sequence_mean(srkl.label_logprobs[..., LabelLogprob.TEACHER], valid_s),
        "student_logprob_s": sequence_mean(srkl.label_logprobs[..., LabelLogprob.STUDENT], valid_s),
        "alpha_t": per_row(alpha_t),
        "alpha_s": per_row(alpha_s),
        "beta": torch.tensor(beta),
    }
    return loss, metrics


def distillm2_loss(
    student_logits_t: torch.Tensor,
    teacher_logits_t: torch.Tensor,
    labels_t: torch.Tensor,
    student_logits_s: torch.Tensor,
    teacher_logits_s: torch.Tensor,
    labels_s: torch.Tensor,
    *,
    preset: Union[str, ObjectiveConfig] = "distillm2",
    state: Optional[CurriculumState] = None,
    backend: str = "auto",
    teacher_tail: str = "renormalize",
    **overrides,
) -> tuple[torch.Tensor, dict]:
    """The DistiLLM-2 loss of one batch of B pairs, and its per-sequence metrics.

    `*_t`: the rows of the teacher responses y_t; `*_s`: the rows of the student responses y_s. Logits
    `[B, T, V]` and labels `[B, T]`, already aligned (position k's logits predict `labels[:, k]`; prompt and
    padding are `ignore_index`); the two halves may differ in T. `state` carries the curriculum (epoch and
    step for β, the α anchors, which are set on the first call when the adaptive α is on); without it the
    call is the first step of a fresh run (epoch 0, step 0: β = β₀, α = α₀, anchors from this batch, then
    discarded); a trainer holds a `DistiLLM2Loss` instead. Returns `(loss, metrics)`; metrics (detached)
    hold, per sequence, `skl` (_t rows), `srkl` (_s rows), the mean label log-probabilities `teacher_logprob_t`,
    `student_logprob_t`, `teacher_logprob_s`, `student_logprob_s`, the α of each row `alpha_t`,
    `alpha_s`, and the scalar `beta`.

    Either teacher may be sparse (`SparseTeacher` or an (ids, logprobs[, tail_logprob]) tuple, ids
    `[B, T, k]`, docs/design.md §8); `teacher_tail` ("renormalize" or "uniform") applies to the sparse halves
    and is ignored for a dense one. A sparse half's label log p(y) is read from its ids.

    Sweep 1 (`token_statistics`) runs on both halves first, whatever the preset: its label
    log-probabilities give the adaptive α and the metrics, and the loss sweep reuses it.
    """
    config = resolve_config(preset, **overrides)
    state = _first_step_state() if state is None else state
    check_teacher_tail(teacher_tail)
    _check_halves("logits", "V", student_logits_t, labels_t, student_logits_s, labels_s)
    halves = {"t": (student_logits_t, teacher_logits_t, labels_t), "s": (student_logits_s, teacher_logits_s, labels_s)}
    tails = {half: teacher_tail if as_sparse_teacher(teacher) is not None else "renormalize"
             for half, (_, teacher, _) in halves.items()}
    common = dict(ignore_index=config.ignore_index, temperature=config.temperature, backend=backend)

    def statistics(half: str, needed: bool) -> TokenStatistics:
        # needed or not: the loss sweep reuses it
        return token_statistics(*halves[half], teacher_tail=tails[half], **common)

    def terms(alpha_t, alpha_s, stats_t, stats_s, coefficients):
        loss, outputs = 0.0, []
        for half, alpha, stats, coefficient in (("t", alpha_t, stats_t, coefficients[0]), ("s", alpha_s, stats_s, coefficients[1])):
            student, teacher, labels = halves[half]
            reverse = half == "s"
            token_losses = skew_divergence(
                student, teacher, alpha, labels, reverse=reverse, detach_mixture=reverse and config.detach_mixture,
                statistics=stats, teacher_tail=tails[half], **common,
            )
            loss = loss + coefficient * reduce_token_losses(token_losses, labels, config.ignore_index, config.reduction)
            outputs.append(_HalfOutputs(token_losses.detach(), stats.label_logprobs))
        return loss, *outputs

    return _objective(config, state, labels_t, labels_s, statistics, terms)


def distillm2_loss_from_hidden(
    student_hidden_t: torch.Tensor,
    teacher_hidden_t: torch.Tensor,
    labels_t: torch.Tensor,
    student_hidden_s: torch.Tensor,
    teacher_hidden_s: torch.Tensor,
    labels_s: torch.Tensor,
    *,
    student_weight: torch.Tensor,
    teacher_weight: torch.Tensor,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    softcap: Softcap = None,
    preset: Union[str, ObjectiveConfig] = "distillm2",
    state: Optional[CurriculumState] = None,
    backend: str = "auto",
    memory_budget_bytes: Optional[int] = None,
    **overrides,
) -> tuple[torch.Tensor, dict]:
    """`distillm2_loss` from the models' last hidden states and lm_head weights, through the fused-linear
    ops: the logits `softcap(h Wᵀ + b)` are never built in full.

    Hidden states `[B, T, H_s]` (student) and `[B, T, H_t]` (teacher) in place of the logits, labels
    `[B, T]` aligned with them; `student_weight` `[V, H_s]`, `teacher_weight` `[V, H_t]` and the biases
    serve both halves; softcap, memory_budget_bytes: as in `fused_linear_skl`. The teacher must not
    require grad; gradients reach the student's hidden states, weight and bias (the weight's only if it
    requires grad). preset, state, backend, overrides and the returned `(loss, metrics)`: as in
    `distillm2_loss`.

    Both halves go through one op, `fused_linear_skl_plus_srkl`. Cost per half: four GEMMs (two logits,
    the hidden and weight gradients, done in the forward; a term weighted 0, SKL at β = 1, skips its two
    gradient GEMMs), with the label log-probabilities a by-product of sweep 1. When the adaptive α reads
    them before the loss (the "paper" preset from the curriculum's start epoch, and on the first batch to
    fix the anchors), `fused_linear_token_statistics` first runs the two logits GEMMs and sweep 1 alone,
    and the loss op reuses its statistics: two GEMMs more per half, no extra sweep over the vocabulary.
    A constant α ("distillm2", "distillm") costs no extra pass. Until the backward the op holds the
    finished gradients: the hidden states' and one `[V, H_s]` weight gradient for both halves.
    """
    config = resolve_config(preset, **overrides)
    state = _first_step_state() if state is None else state
    _check_halves("hidden", "H", student_hidden_t, labels_t, student_hidden_s, labels_s)
    halves = {"t": (student_hidden_t, teacher_hidden_t, labels_t), "s": (student_hidden_s, teacher_hidden_s, labels_s)}
    common = dict(
        student_bias=student_bias, teacher_bias=teacher_bias, ignore_index=config.ignore_index,
        temperature=config.temperature, softcap=softcap, backend=backend, memory_budget_bytes=memory_budget_bytes,
    )

    def statistics(half: str, needed: bool) -> Optional[TokenStatistics]:
        if not needed:  # the loss op's sweep 1 gives the label log-probabilities
            return None
        student, teacher, labels = halves[half]
        return fused_linear_token_statistics(student, student_weight, teacher, teacher_weight, labels, **common)

    def terms(alpha_t, alpha_s, stats_t, stats_s, coefficients):
        result = fused_linear_skl_plus_srkl(
            *halves["t"], *halves["s"], student_weight=student_weight, teacher_weight=teacher_weight,
            alpha_t=alpha_t, alpha_s=alpha_s, coefficients=coefficients, detach_mixture=config.detach_mixture,
            reduction=config.reduction, statistics_t=stats_t, statistics_s=stats_s, **common,
        )
        return result.loss, _HalfOutputs(*result.skl), _HalfOutputs(*result.srkl)

    return _objective(config, state, labels_t, labels_s, statistics, terms)


class DistiLLM2Loss:
    """The objective with its curriculum state, for a trainer to hold.

    `teacher_tail`: the tail mode of sparse teachers (`distillm2_loss`), for every call.
    `num_epochs` (E) and `total_steps` (T, optimizer steps of the whole run) are the run's length; the β
    schedule ("paper") needs both and a missing one raises ValueError. `step()` after every optimizer step
    advances τ; `set_epoch(e)` at the start of every epoch sets e, which the β schedule and the adaptive α
    read (the adaptive α applies from `curriculum_start_epoch`, the second epoch: it never starts without
    `set_epoch`). `state_dict()` / `load_state_dict()` carry the anchors and counters, so a resumed run
    continues exactly. Three epochs of two steps, on random logits `[B, T, V]` (B = 2, T = 5, V = 32):

    >>> import torch
    >>> def half():  # student logits, teacher logits, labels with the first two (prompt) tokens ignored
    ...     labels = torch.randint(0, 32, (2, 5)); labels[:, :2] = -100
    ...     return torch.randn(2, 5, 32, requires_grad=True), torch.randn(2, 5, 32), labels
    >>> loader = [half() + half() for _ in range(2)]  # (s_t, t_t, labels_t, s_s, t_s, labels_s) per step
    >>> objective = DistiLLM2Loss("paper", num_epochs=3, total_steps=3 * len(loader))
    >>> for epoch in range(3):
    ...     objective.set_epoch(epoch)                       # at the start of each epoch
    ...     for s_t, t_t, labels_t, s_s, t_s, labels_s in loader:
    ...         loss, metrics = objective(s_t, t_t, labels_t, s_s, t_s, labels_s)
    ...         loss.backward(); objective.step()            # and optimizer.step(), once per step
    ...         print(epoch, round(float(metrics["beta"]), 3))  # β = clip(e/E + τ/T, 0.5, 1)
    0 0.5
    0 0.5
    1 0.667
    1 0.833
    2 1.0
    2 1.0

    From hidden states `[B, T, H]` and lm_head weights `[V, H]` (teacher and student may differ in H),
    never building the logits:

    >>> W_s, W_t = torch.randn(32, 8, requires_grad=True), torch.randn(32, 16)
    >>> h_s_t, h_s_s = torch.randn(2, 5, 8, requires_grad=True), torch.randn(2, 5, 8, requires_grad=True)
    >>> h_t_t, h_t_s = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    >>> loss, metrics = objective.from_hidden(h_s_t, h_t_t, labels_t, h_s_s, h_t_s, labels_s,
    ...                                       student_weight=W_s, teacher_weight=W_t)
    >>> loss.backward()
    >>> W_s.grad.shape, sorted(metrics)[:3]
    (torch.Size([32, 8]), ['alpha_s', 'alpha_t', 'beta'])
    """

    def __init__(
        self,
        preset: Union[str, ObjectiveConfig] = "distillm2",
        *,
        num_epochs: Optional[int] = None,
        total_steps: Optional[int] = None,
        backend: str = "auto",
        teacher_tail: str = "renormalize",
        **overrides,
    ):
        self.config = resolve_config(preset, **overrides)
        _check_run_length(self.config, num_epochs, total_steps)
        self.state = CurriculumState(num_epochs=num_epochs, total_steps=total_steps)
        self.backend = backend
        self.teacher_tail = check_teacher_tail(teacher_tail)

    def __call__(self, student_logits_t, teacher_logits_t, labels_t, student_logits_s, teacher_logits_s, labels_s):
        return distillm2_loss(
            student_logits_t,
            teacher_logits_t,
            labels_t,
            student_logits_s,
            teacher_logits_s,
            labels_s,
            preset=self.config,
            state=self.state,
            backend=self.backend,
            teacher_tail=self.teacher_tail,
        )

    def from_hidden(
        self,
        student_hidden_t: torch.Tensor,
        teacher_hidden_t: torch.Tensor,
        labels_t: torch.Tensor,
        student_hidden_s: torch.Tensor,
        teacher_hidden_s: torch.Tensor,
        labels_s: torch.Tensor,
        *,
        student_weight: torch.Tensor,
        teacher_weight: torch.Tensor,
        student_bias: Optional[torch.Tensor] = None,
        teacher_bias: Optional[torch.Tensor] = None,
        softcap: Softcap = None,
        memory_budget_bytes: Optional[int] = None,
    ) -> tuple[torch.Tensor, dict]:
        """The objective from hidden states and lm_head weights (`distillm2_loss_from_hidden`), on this
        object's config and curriculum state, like `__call__` on logits."""
        return distillm2_loss_from_hidden(
            student_hidden_t,
            teacher_hidden_t,
            labels_t,
            student_hidden_s,
            teacher_hidden_s,
            labels_s,
            student_weight=student_weight,
            teacher_weight=teacher_weight,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            softcap=softcap,
            preset=self.config,
            state=self.state,
            backend=self.backend,
            memory_budget_bytes=memory_budget_bytes,
        )

    def step(self) -> None:
        """Advance the global optimizer step (τ of the β schedule)."""
        self.state.step += 1

    def set_epoch(self, epoch: int) -> None:
        """Set the 0-based epoch e (call at the start of every epoch): the β schedule's e/E and the
        adaptive α's start (`curriculum_start_epoch`) read it."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        if self.state.num_epochs is not None and epoch >= self.state.num_epochs:
            raise ValueError(f"epoch {epoch} is past the run's num_epochs = {self.state.num_epochs} (epochs are 0-based)")
        self.state.epoch = epoch

    def state_dict(self) -> dict:
        return {"config": asdict(self.config), "curriculum": self.state.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state["config"] != asdict(self.config):
            raise ValueError(
                f"the saved objective was configured as {state['config']}, this one as {asdict(self.config)}"
            )
        self.state.load_state_dict(state["curriculum"])
