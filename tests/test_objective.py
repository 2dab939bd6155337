"""The DistiLLM-2 objective against the released code's formulas, the paper's curriculum, the presets."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
from conftest import kernel_device
from oracle import assert_matches_oracle

from distillm2_kernels import DistiLLM2Loss, distillm2_loss, distillm2_loss_from_hidden, reference
from distillm2_kernels.backends import available_backends
from distillm2_kernels.objective import (
    PRESETS,
    CurriculumState,
    ObjectiveConfig,
    adaptive_alpha,
    beta_schedule,
    resolve_config,
)

DEVICE = kernel_device()
BACKENDS = available_backends(DEVICE)


def make_pairs(batch=3, prompt=(2, 4, 3), lengths_t=(5, 2, 7), lengths_s=(3, 6, 1), vocab=97, seed=0):
    """Right-padded rows: prompt tokens and padding are −100; responses of different lengths."""
    gen = torch.Generator().manual_seed(seed)
    halves = []
    for lengths in (lengths_t, lengths_s):
        seq = max(p + n for p, n in zip(prompt, lengths)) + 1
        student = torch.randn(batch, seq, vocab, generator=gen) * 2
        teacher = torch.randn(batch, seq, vocab, generator=gen) * 2 + 0.5 * student
        labels = torch.randint(0, vocab, (batch, seq), generator=gen)
        for i, (p, n) in enumerate(zip(prompt, lengths)):
            labels[i, :p] = -100
            labels[i, p + n :] = -100
        halves.append((student.to(DEVICE), teacher.to(DEVICE), labels.to(DEVICE)))
    return halves


def released_code_loss(student_t, teacher_t, labels_t, student_s, teacher_s, labels_s, alpha=0.1):
    """The released DistiLLM-2 trainer's loss, written from docs/design.md §4: float32 log_softmax,
    mixtures as logsumexp over a stacked pair, SRKL's q detached in r, per-sequence token means,
    SKL_i + SRKL_i per pair, mean over pairs."""

    def per_sequence(per_token, labels):
        mask = (labels != -100).float()
        return (per_token * mask).sum(-1) / mask.sum(-1)

    log_q, log_p = torch.log_softmax(student_t.float(), -1), torch.log_softmax(teacher_t.float(), -1)
    log_m = torch.logsumexp(torch.stack([log_p + torch.log(torch.tensor(alpha)), log_q + torch.log(torch.tensor(1 - alpha))]), 0)
    skl = per_sequence((log_p.exp() * (log_p - log_m)).sum(-1), labels_t)
    log_q, log_p = torch.log_softmax(student_s.float(), -1), torch.log_softmax(teacher_s.float(), -1)
    log_r = torch.logsumexp(
        torch.stack([log_p + torch.log(torch.tensor(1 - alpha)), log_q.detach() + torch.log(torch.tensor(alpha))]), 0
    )
    srkl = per_sequence((log_q.exp() * (log_q - log_r)).sum(-1), labels_s)
    return (skl + srkl).mean()


def grads(loss_fn, halves):
    (s_t, t_t, l_t), (s_s, t_s, l_s) = halves
    s_t, s_s = s_t.clone().requires_grad_(True), s_s.clone().requires_grad_(True)
    out = loss_fn(s_t, t_t, l_t, s_s, t_s, l_s)
    loss = out[0] if isinstance(out, tuple) else out
    g_t, g_s = torch.autograd.grad(loss, (s_t, s_s))
    return loss.detach(), g_t, g_s


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_distillm2_preset_matches_released_code(backend, seed):
    halves = make_pairs(seed=seed)
    ours = grads(lambda *a: distillm2_loss(*a, backend=backend), halves)
    released = grads(released_code_loss, halves)
    for a, b in zip(ours, released):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_logits_match_released_code_on_the_same_values(backend):
    halves = [tuple(x.bfloat16() if x.is_floating_point() else x for x in half) for half in make_pairs(seed=2)]
    loss, g_t, g_s = grads(lambda *a: distillm2_loss(*a, backend=backend), halves)
    ref_loss, ref_t, ref_s = grads(released_code_loss, halves)
    torch.testing.assert_close(loss, ref_loss, rtol=2e-5, atol=2e-7)
    for ours, ref in ((g_t, ref_t), (g_s, ref_s)):  # the gradient is bf16: its rounding, 2^-9 relative
        assert ours.dtype == torch.bfloat16
        assert ((ours.float() - ref.float()).abs() <= 2.0**-8 * ref.float().abs() + 1e-7).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_distillm_preset(backend):
    """DistiLLM v1: one token mean over the whole batch, SRKL not detached."""
    halves = make_pairs(seed=3)
    (s_t, t_t, l_t), (s_s, t_s, l_s) = halves

    def v1(s_t, t_t, l_t, s_s, t_s, l_s):
        return reference.skl_reference(s_t, t_t, 0.1, labels=l_t, reduction="mean") + reference.srkl_reference(
            s_s, t_s, 0.1, labels=l_s, reduction="mean"
        )

    ours = grads(lambda *a: distillm2_loss(*a, preset="distillm", backend=backend), halves)
    for a, b in zip(ours, grads(v1, halves)):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-7)


def test_presets_differ_where_the_design_says():
    base = asdict(PRESETS["distillm2"])

    def differing(name):
        return {k for k, v in asdict(PRESETS[name]).items() if base[k] != v}

    assert differing("paper") == {"adaptive_alpha", "beta_schedule", "weighting"}
    assert differing("distillm") == {"detach_mixture", "reduction"}
    assert base["alpha"] == 0.1 and base["detach_mixture"] and base["weighting"] == "sum"
    assert PRESETS["paper"].alpha_min == 0.01 and PRESETS["paper"].alpha_max == 0.1 and PRESETS["paper"].beta0 == 0.5


def test_beta_schedule_hand_computed():
    paper = PRESETS["paper"]
    assert beta_schedule(paper, CurriculumState(epoch=0, num_epochs=3, step=0, total_steps=30)) == 0.5
    assert beta_schedule(paper, CurriculumState(epoch=0, num_epochs=3, step=6, total_steps=30)) == 0.5  # 0.2 → β₀
    assert beta_schedule(paper, CurriculumState(epoch=1, num_epochs=3, step=15, total_steps=30)) == pytest.approx(
        1 / 3 + 1 / 2
    )
    assert beta_schedule(paper, CurriculumState(epoch=2, num_epochs=3, step=25, total_steps=30)) == 1.0
    assert beta_schedule(PRESETS["distillm2"], CurriculumState(epoch=2, step=25, total_steps=30)) == 1.0


def test_adaptive_alpha_hand_computed():
    config = PRESETS["paper"]
    gap = torch.tensor([0.2, 0.1, 0.05, 0.0, -0.1, 0.1])
    anchor = torch.tensor(0.1)
    # 1 − 0.9·0.1/gap = [0.55, 0.1, −0.8, −inf, 1.9, 0.1], clipped to [0.01, 0.1]
    expected = torch.tensor([0.1, 0.1, 0.01, 0.01, 0.1, 0.1])
    torch.testing.assert_close(adaptive_alpha(gap, anchor, config), expected)
    alpha = adaptive_alpha(torch.tensor([0.12]), anchor, resolve_config("paper", alpha_max=1.0))
    torch.testing.assert_close(alpha, torch.tensor([1 - 0.9 * 0.1 / 0.12]))
    assert adaptive_alpha(torch.tensor([0.0]), torch.tensor(0.0), config).item() == pytest.approx(0.1)  # 0/0


@pytest.mark.parametrize("backend", BACKENDS)
def test_paper_preset(backend):
    """No curriculum in the first epoch; afterwards α per row from the anchors fixed on the first batch;
    loss 1/(2B) Σ [(1−β) SKL + β SRKL]."""
    halves = make_pairs(seed=4)
    (s_t, t_t, l_t), (s_s, t_s, l_s) = halves
    objective = DistiLLM2Loss("paper", num_epochs=2, total_steps=10, backend=backend)
    loss0, metrics0 = objective(s_t, t_t, l_t, s_s, t_s, l_s)
    assert torch.equal(metrics0["alpha_t"], torch.full((3,), 0.1, device=DEVICE))
    assert metrics0["beta"].item() == 0.5
    anchors = (objective.state.anchor_t.clone(), objective.state.anchor_s.clone())

    def sequence_probability(logits, labels):
        lp = torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        mask = (labels != -100).double()
        return ((lp * mask).sum(-1) / mask.sum(-1)).exp()

    gap_t = sequence_probability(t_t, l_t) - sequence_probability(s_t, l_t)
    gap_s = sequence_probability(s_s, l_s) - sequence_probability(t_s, l_s)
    torch.testing.assert_close(anchors[0].double(), gap_t.mean(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(anchors[1].double(), gap_s.mean(), rtol=1e-5, atol=1e-7)

    objective.set_epoch(1)
    for _ in range(4):
        objective.step()
    other = make_pairs(seed=5)  # a new batch: the anchors stay
    (s_t, t_t, l_t), (s_s, t_s, l_s) = other
    loss, metrics = objective(s_t, t_t, l_t, s_s, t_s, l_s)
    assert torch.equal(objective.state.anchor_t, anchors[0])
    beta = 1 / 2 + 4 / 10
    assert metrics["beta"].item() == pytest.approx(beta)
    gap_t = sequence_probability(t_t, l_t) - sequence_probability(s_t, l_t)
    gap_s = sequence_probability(s_s, l_s) - sequence_probability(t_s, l_s)
    alpha_t = (1 - 0.9 * anchors[0].double() / gap_t).clamp(0.01, 0.1)
    alpha_s = (1 - 0.9 * anchors[1].double() / gap_s).clamp(0.01, 0.1)
    torch.testing.assert_close(metrics["alpha_t"].double(), alpha_t, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(metrics["alpha_s"].double(), alpha_s, rtol=1e-5, atol=1e-7)
    skl = reference.skl_reference(s_t.double(), t_t.double(), alpha_t, labels=l_t, reduction="seqmean")
    srkl = reference.srkl_reference(s_s.double(), t_s.double(), alpha_s, labels=l_s, reduction="seqmean")
    torch.testing.assert_close(loss.double(), 0.5 * ((1 - beta) * skl + beta * srkl), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_paper_preset_with_student_logits_that_require_grad(backend):
    """The adaptive α comes from sweep 1's statistics, which carry no gradient: it is a constant of the
    loss even when the student logits require grad (it used to inherit requires_grad and be refused)."""
    (s_t, t_t, l_t), (s_s, t_s, l_s) = make_pairs(seed=4)
    s_t, s_s = s_t.requires_grad_(), s_s.requires_grad_()
    objective = DistiLLM2Loss("paper", num_epochs=2, total_steps=10, backend=backend)
    objective(s_t, t_t, l_t, s_s, t_s, l_s)
    objective.set_epoch(1)
    loss, metrics = objective(s_t, t_t, l_t, s_s, t_s, l_s)
    loss.backward()
    assert not metrics["alpha_t"].requires_grad and torch.isfinite(s_t.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_metrics(backend):
    halves = make_pairs(seed=6)
    (s_t, t_t, l_t), (s_s, t_s, l_s) = halves
    _, metrics = distillm2_loss(s_t, t_t, l_t, s_s, t_s, l_s, backend=backend)

    def mean_label_logprob(logits, labels):
        lp = torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        mask = (labels != -100).double()
        return (lp * mask).sum(-1) / mask.sum(-1)

    expected = {
        "teacher_logprob_t": mean_label_logprob(t_t, l_t),
        "student_logprob_t": mean_label_logprob(s_t, l_t),
        "teacher_logprob_s": mean_label_logprob(t_s, l_s),
        "student_logprob_s": mean_label_logprob(s_s, l_s),
        "skl": reference.skl_reference(s_t.double(), t_t.double(), 0.1, labels=l_t, reduction="none").sum(-1)
        / (l_t != -100).sum(-1),
        "srkl": reference.srkl_reference(s_s.double(), t_s.double(), 0.1, labels=l_s, reduction="none").sum(-1)
        / (l_s != -100).sum(-1),
    }
    for name, value in expected.items():
        assert metrics[name].shape == (3,)
        torch.testing.assert_close(metrics[name].double(), value, rtol=1e-5, atol=1e-6, msg=name)
    assert not any(m.requires_grad for m in metrics.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_round_trip(backend):
    halves = make_pairs(seed=7)
    args = [x for half in halves for x in half]
    first = DistiLLM2Loss("paper", num_epochs=2, total_steps=8, backend=backend)
    first(*args)
    first.set_epoch(1)
    first.step()
    saved = first.state_dict()
    resumed = DistiLLM2Loss("paper", num_epochs=2, total_steps=8, backend=backend)
    resumed.load_state_dict(saved)
    other = [x for half in make_pairs(seed=8) for x in half]
    loss_a, metrics_a = first(*other)
    loss_b, metrics_b = resumed(*other)
    assert torch.equal(loss_a, loss_b)
    assert torch.equal(metrics_a["alpha_t"], metrics_b["alpha_t"])
    with pytest.raises(ValueError, match="configured"):
        DistiLLM2Loss("distillm2").load_state_dict(saved)


def test_the_beta_schedule_needs_the_run_length():
    """A missing length is an error, not a silent E = T = 1 (β = 1 after one step, SKL weighted 0 from then on);
    presets without the schedule need none. `set_epoch` outside [0, E) is an error."""
    for missing in (dict(), dict(num_epochs=3), dict(total_steps=30)):
        with pytest.raises(ValueError, match="needs the run's length"):
            DistiLLM2Loss("paper", **missing)
        with pytest.raises(ValueError, match="needs the run's length"):
            beta_schedule(PRESETS["paper"], CurriculumState(**missing, step=1))
    for bad in (dict(num_epochs=0, total_steps=3), dict(num_epochs=2, total_steps=1.5)):
        with pytest.raises(ValueError, match="must be an int >= 1"):
            DistiLLM2Loss("paper", **bad)
    assert DistiLLM2Loss("distillm2").state.total_steps is None and DistiLLM2Loss("distillm").state.num_epochs is None
    objective = DistiLLM2Loss("paper", num_epochs=2, total_steps=10)
    for epoch in (-1, 2):
        with pytest.raises(ValueError, match="epoch"):
            objective.set_epoch(epoch)
    objective.step()  # after one step of ten, β is still β₀ (the schedule has its length)
    assert beta_schedule(objective.config, objective.state) == 0.5
    halves = make_pairs(seed=5)  # a call without a state is the first step of a run: β = β₀
    _, metrics = distillm2_loss(*halves[0], *halves[1], preset="paper", backend="torch")
    assert float(metrics["beta"]) == 0.5


def test_all_tokens_ignored_gives_zero():
    halves = make_pairs(seed=9)
    (s_t, t_t, l_t), (s_s, t_s, l_s) = halves
    s_t.requires_grad_(True)
    loss, _ = distillm2_loss(s_t, t_t, torch.full_like(l_t, -100), s_s, t_s, torch.full_like(l_s, -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(s_t.grad, torch.zeros_like(s_t.grad))


def test_bad_input():
    (s_t, t_t, l_t), (s_s, t_s, l_s) = make_pairs(seed=10)
    with pytest.raises(ValueError, match="preset must be one of"):
        distillm2_loss(s_t, t_t, l_t, s_s, t_s, l_s, preset="v3")
    with pytest.raises(TypeError, match="unknown objective option"):
        distillm2_loss(s_t, t_t, l_t, s_s, t_s, l_s, alhpa=0.2)
    with pytest.raises(ValueError, match="labels_t must have shape"):
        distillm2_loss(s_t, t_t, l_t[:, 1:], s_s, t_s, l_s)
    with pytest.raises(ValueError, match="same B"):
        distillm2_loss(s_t, t_t, l_t, s_s[:2], t_s[:2], l_s[:2])
    with pytest.raises(ValueError, match="alpha must lie"):
        ObjectiveConfig(alpha=2.0)
    with pytest.raises(ValueError, match="weighting"):
        resolve_config("distillm2", weighting="avg")


# ----------------------------------------------------------------------------------------------------
# The hidden-state form: the same objective through the fused-linear ops
# ----------------------------------------------------------------------------------------------------

H_S, H_T, V_H = 8, 12, 29
STUDENT_PARAMS = ("student_hidden_t", "student_hidden_s", "student_weight", "student_bias")


def make_hidden_batches(dtype, bias=False, seed=0):
    """lm_head weights shared by two batches of right-padded pairs (prompts and padding −100, ragged
    responses; the second batch has an empty student response). Values rounded through `dtype`."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(DEVICE)

    params = {
        "student_weight": randn(V_H, H_S, scale=3.0 / H_S**0.5),
        "teacher_weight": randn(V_H, H_T, scale=3.0 / H_T**0.5),
        "student_bias": randn(V_H, scale=0.5) if bias else None,
        "teacher_bias": randn(V_H, scale=0.5) if bias else None,
    }
    batches = []
    for lengths_t, lengths_s in (((5, 2, 7), (3, 6, 1)), ((4, 6, 1), (2, 5, 0))):
        batch = {}
        for half, lengths in (("t", lengths_t), ("s", lengths_s)):
            prompt = (2, 4, 3)
            seq = max(p + n for p, n in zip(prompt, lengths)) + 1
            labels = torch.randint(0, V_H, (3, seq), generator=gen)
            for i, (p, n) in enumerate(zip(prompt, lengths)):
                labels[i, :p] = -100
                labels[i, p + n :] = -100
            batch[f"student_hidden_{half}"] = randn(3, seq, H_S)
            batch[f"teacher_hidden_{half}"] = randn(3, seq, H_T)
            batch[f"labels_{half}"] = labels.to(DEVICE)
        batches.append(batch)
    return params, batches


def _leaves(params, batch, dtype, frozen_weight):
    """The student's tensors as fresh leaves in `dtype` (requiring grad unless frozen), the teacher's in
    `dtype`."""
    leaves = {}
    for name, value in {**params, **batch}.items():
        if value is None or not value.is_floating_point():
            leaves[name] = value
            continue
        value = value.to(dtype, copy=True)
        trainable = name in STUDENT_PARAMS and not (frozen_weight and name == "student_weight")
        leaves[name] = value.requires_grad_() if trainable else value
    return leaves


def _grads(loss, leaves, extra=()):
    names = [n for n in STUDENT_PARAMS if leaves[n] is not None and leaves[n].requires_grad]
    grads = torch.autograd.grad(loss, [leaves[n] for n in names] + list(extra))
    return dict(zip(names, grads[: len(names)])), grads[len(names) :]


def hidden_form_run(preset, backend, params, batches, dtype, softcap=None, frozen_weight=False):
    """Per batch (epoch 0, then epoch 1 after 4 steps): loss, metrics, student gradients, from the hidden
    states through `DistiLLM2Loss.from_hidden`; and the final curriculum state."""
    objective = DistiLLM2Loss(preset, num_epochs=2, total_steps=10, backend=backend)
    results = []
    for epoch, batch in enumerate(batches):
        objective.set_epoch(epoch)
        x = _leaves(params, batch, dtype, frozen_weight)
        loss, metrics = objective.from_hidden(
            x["student_hidden_t"], x["teacher_hidden_t"], batch["labels_t"],
            x["student_hidden_s"], x["teacher_hidden_s"], batch["labels_s"],
            student_weight=x["student_weight"], teacher_weight=x["teacher_weight"],
            student_bias=x["student_bias"], teacher_bias=x["teacher_bias"], softcap=softcap,
            memory_budget_bytes=4 * 4 * V_H * 5,  # 5-row chunks (at most, a backend may take fewer)
        )
        grads, _ = _grads(loss, x)
        results.append((loss.detach(), metrics, grads, None))
        for _ in range(4):
            objective.step()
    return results, objective.state


def logits_form_run(preset, backend, params, batches, dtype, softcap=None, frozen_weight=False):
    """The same through `DistiLLM2Loss.__call__` on the logits `softcap(h Wᵀ + b)` materialised in
    `dtype`; the fourth entry holds the gradients of the student logits (for the error scales)."""
    objective = DistiLLM2Loss(preset, num_epochs=2, total_steps=10, backend=backend)
    results = []
    for epoch, batch in enumerate(batches):
        objective.set_epoch(epoch)
        x = _leaves(params, batch, dtype, frozen_weight)

        def logits(side, half):
            z = x[f"{side}_hidden_{half}"] @ x[f"{side}_weight"].T
            if x[f"{side}_bias"] is not None:
                z = z + x[f"{side}_bias"]
            return z if softcap is None else softcap * torch.tanh(z / softcap)

        with torch.no_grad():
            teacher_t, teacher_s = logits("teacher", "t"), logits("teacher", "s")
        student_t, student_s = logits("student", "t"), logits("student", "s")
        loss, metrics = objective(student_t, teacher_t, batch["labels_t"], student_s, teacher_s, batch["labels_s"])
        grads, logits_grads = _grads(loss, x, (student_t, student_s))
        results.append((loss.detach(), metrics, grads, logits_grads))
        for _ in range(4):
            objective.step()
    return results, objective.state


def gradient_scales(params, batch, logits_grads):
    """Per student gradient, the largest sum of |summands| (as in test_fused_linear): G W for the hidden
    states, Σ_tokens Gᵀ H over both halves for the weight, Σ G for the bias; G from the float64 run."""
    g_t, g_s = (g.detach().double().abs() for g in logits_grads)
    h_t, h_s = (batch[f"student_hidden_{half}"].double().abs() for half in "ts")
    weight = params["student_weight"].double().abs()
    return {
        "student_hidden_t": (g_t @ weight).max().item(),
        "student_hidden_s": (g_s @ weight).max().item(),
        "student_weight": (g_t.flatten(0, 1).T @ h_t.flatten(0, 1) + g_s.flatten(0, 1).T @ h_s.flatten(0, 1)).max().item(),
        "student_bias": (g_t.sum((0, 1)) + g_s.sum((0, 1))).max().item(),
    }


def assert_forms_agree_tightly(hidden, logits, tolerance):
    (h_results, h_state), (l_results, l_state) = hidden, logits
    torch.testing.assert_close(h_state.anchor_t, l_state.anchor_t, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(h_state.anchor_s, l_state.anchor_s, rtol=tolerance, atol=tolerance)
    for (h_loss, h_metrics, h_grads, _), (l_loss, l_metrics, l_grads, _) in zip(h_results, l_results):
        torch.testing.assert_close(h_loss, l_loss, rtol=tolerance, atol=tolerance)
        assert h_metrics.keys() == l_metrics.keys()
        for name in l_metrics:
            torch.testing.assert_close(h_metrics[name], l_metrics[name], rtol=tolerance, atol=tolerance, msg=name)
        assert h_grads.keys() == l_grads.keys()
        for name in l_grads:
            scale = max(1.0, l_grads[name].abs().max().item())
            torch.testing.assert_close(h_grads[name], l_grads[name], rtol=0, atol=tolerance * scale, msg=name)


@pytest.mark.parametrize("preset", ["distillm2", "paper", "distillm"])
@pytest.mark.parametrize("variant", ["plain", "softcap_bias", "frozen_weight"])
def test_hidden_form_equals_logits_form_float64(preset, variant):
    """float64 inputs on the torch backend: both forms compute in float64, so they agree to ~1e-12 —
    loss, every metric, the anchors, the gradients of the hidden states, weight and bias, in the first
    epoch and (for "paper") with the adaptive α of the second."""
    params, batches = make_hidden_batches(torch.float64, bias=variant == "softcap_bias", seed=18)
    options = dict(softcap=(4.0 if variant == "softcap_bias" else None), frozen_weight=variant == "frozen_weight")
    hidden = hidden_form_run(preset, "torch", params, batches, torch.float64, **options)
    logits = logits_form_run(preset, "torch", params, batches, torch.float64, **options)
    if preset == "paper" and variant == "plain":  # the second batch's α per row, not all at a bound
        assert not torch.all(logits[0][1][1]["alpha_t"] == 0.1) and not torch.all(logits[0][1][1]["alpha_s"] == 0.1)
    if variant == "frozen_weight":
        assert "student_weight" not in hidden[0][0][2]
    assert_forms_agree_tightly(hidden, logits, 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "preset, dtype, variant",
    [
        ("distillm2", torch.float32, "plain"),
        ("paper", torch.float32, "softcap_bias"),
        ("distillm", torch.float32, "frozen_weight"),
        ("distillm2", torch.bfloat16, "softcap_bias"),
        ("paper", torch.bfloat16, "plain"),
    ],
)
def test_hidden_form_within_rounding(backend, preset, dtype, variant):
    """float32 and bf16 inputs: the hidden form's error against the float64 oracle (the logits form on
    float64 logits from the same values) is no worse than the logits form's on logits materialised in the
    input dtype, plus oracle.py's float32 allowance, and within the rounding of the output dtype (oracle.py's
    rule). bf16 gradients come back in bf16."""
    params, batches = make_hidden_batches(dtype, bias=variant == "softcap_bias", seed=18)
    options = dict(softcap=(4.0 if variant == "softcap_bias" else None), frozen_weight=variant == "frozen_weight")
    hidden, _ = hidden_form_run(preset, backend, params, batches, dtype, **options)
    baseline, _ = logits_form_run(preset, backend, params, batches, dtype, **options)
    oracle, _ = logits_form_run(preset, "torch", params, batches, torch.float64, **options)
    magnitude = 4.0 if options["softcap"] else 12.0  # bounds max |z| of these logits
    for batch, h, b, o in zip(batches, hidden, baseline, oracle):
        (h_loss, h_metrics, h_grads, _), (b_loss, b_metrics, b_grads, _), (o_loss, o_metrics, o_grads, o_logits) = h, b, o
        assert h_loss.dtype == torch.float32
        assert_matches_oracle(h_loss, o_loss, b_loss, out_dtype=torch.float32, magnitude=magnitude, what="loss")
        for name in o_metrics:
            if name.startswith("alpha"):  # exact at the clipping bounds; between them α = 1 − (1−α₀)·A/gap
                # scales the label log-probabilities' rounding by A/gap
                torch.testing.assert_close(h_metrics[name].double(), o_metrics[name].double(), rtol=1e-4, atol=0, msg=name)
                continue
            assert_matches_oracle(
                h_metrics[name], o_metrics[name], b_metrics[name], out_dtype=torch.float32, magnitude=magnitude, what=name
            )
        scales = gradient_scales(params, batch, o_logits)
        assert h_grads.keys() == o_grads.keys()
        for name in o_grads:
            assert h_grads[name].dtype == dtype, name
            assert_matches_oracle(
                h_grads[name], o_grads[name], b_grads[name], out_dtype=dtype, magnitude=magnitude,
                scale=scales[name], what=f"grad {name}",
            )


@pytest.mark.parametrize("preset, extra_passes", [("distillm2", [0, 0]), ("distillm", [0, 0]), ("paper", [2, 2])])
def test_statistics_pass_only_for_the_adaptive_alpha(monkeypatch, preset, extra_passes):
    """Constant α: no pass besides the loss ops. "paper": a statistics-only pass per half on the first
    batch (the anchors) and from the curriculum's epoch on; none for later first-epoch batches."""
    import distillm2_kernels.objective as objective_module

    calls = []
    original = objective_module.fused_linear_token_statistics
    monkeypatch.setattr(
        objective_module, "fused_linear_token_statistics", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    params, batches = make_hidden_batches(torch.float32, seed=13)
    objective = DistiLLM2Loss(preset, num_epochs=2, total_steps=10, backend="torch")
    counts = []
    for epoch in (0, 0, 1):
        objective.set_epoch(epoch)
        batch = batches[0]
        before = len(calls)
        objective.from_hidden(
            batch["student_hidden_t"], batch["teacher_hidden_t"], batch["labels_t"],
            batch["student_hidden_s"], batch["teacher_hidden_s"], batch["labels_s"],
            student_weight=params["student_weight"], teacher_weight=params["teacher_weight"],
        )
        counts.append(len(calls) - before)
    assert counts == [extra_passes[0], 0, extra_passes[1]]


def test_hidden_form_bad_input():
    params, (batch, _) = make_hidden_batches(torch.float32, seed=14)
    args = [batch[k] for k in ("student_hidden_t", "teacher_hidden_t", "labels_t", "student_hidden_s", "teacher_hidden_s", "labels_s")]
    weights = dict(student_weight=params["student_weight"], teacher_weight=params["teacher_weight"])
    with pytest.raises(ValueError, match=r"labels_t must have shape \[B, T\]"):
        distillm2_loss_from_hidden(*args[:2], args[2][:, 1:], *args[3:], **weights)
    with pytest.raises(ValueError, match=r"student_hidden_s / teacher_hidden_s must be \[B, T, H\]"):
        distillm2_loss_from_hidden(*args[:3], args[3][0], *args[4:], **weights)
    with pytest.raises(ValueError, match="teacher_weight requires grad"):
        distillm2_loss_from_hidden(*args, student_weight=params["student_weight"], teacher_weight=params["teacher_weight"].requires_grad_())
    with pytest.raises(TypeError, match="unknown objective option"):
        distillm2_loss_from_hidden(*args, **weights, alhpa=0.2)
