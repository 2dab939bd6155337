"""Labels outside [0, V) are rejected by every public function that takes labels, with the same message, and
`ignore_index` (whatever its value) is accepted; the check does not change any value it lets through."""

import pytest
import torch

import distillm2_kernels as dk
from distillm2_kernels.backends import available_backends

B, T, V, H_S, H_T = 2, 3, 11, 8, 6
MESSAGE = r"labels must be token ids in \[0, 11\) or ignore_index"


def _logits_call(name):
    """(call(labels, ignore_index, backend), takes_logits) for each public entry point with labels."""
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(B, T, V, generator=gen, requires_grad=True), torch.randn(B, T, V, generator=gen)
    hidden_s, hidden_t = torch.randn(B, T, H_S, generator=gen, requires_grad=True), torch.randn(B, T, H_T, generator=gen)
    weights = dict(student_weight=torch.randn(V, H_S, generator=gen), teacher_weight=torch.randn(V, H_T, generator=gen))
    calls = {
        "fused_skl": lambda y, i, b: dk.fused_skl(student, teacher, 0.1, labels=y, ignore_index=i, backend=b),
        "fused_srkl": lambda y, i, b: dk.fused_srkl(student, teacher, 0.1, labels=y, ignore_index=i, backend=b),
        "SkewKLLoss": lambda y, i, b: dk.SkewKLLoss(0.1, ignore_index=i, backend=b)(student, teacher, y),
        "SkewReverseKLLoss": lambda y, i, b: dk.SkewReverseKLLoss(0.1, ignore_index=i, backend=b)(student, teacher, y),
        "FusedSKLFunction": lambda y, i, b: dk.FusedSKLFunction.apply(student, teacher, 0.1, y, i, 1.0, b),
        "FusedSRKLFunction": lambda y, i, b: dk.FusedSRKLFunction.apply(student, teacher, 0.1, y, i, 1.0, b, True),
        "token_statistics": lambda y, i, b: dk.token_statistics(student, teacher, y, ignore_index=i, backend=b).stats,
        "fused_linear_skl": lambda y, i, b: dk.fused_linear_skl(
            hidden_s, weights["student_weight"], hidden_t, weights["teacher_weight"], labels=y, ignore_index=i, backend=b),
        "fused_linear_srkl": lambda y, i, b: dk.fused_linear_srkl(
            hidden_s, weights["student_weight"], hidden_t, weights["teacher_weight"], labels=y, ignore_index=i, backend=b),
        "fused_linear_token_statistics": lambda y, i, b: dk.fused_linear_token_statistics(
            hidden_s, weights["student_weight"], hidden_t, weights["teacher_weight"], y, ignore_index=i,
            backend=b).stats,
        "distillm2_loss": lambda y, i, b: dk.distillm2_loss(
            student, teacher, y, student, teacher, y, ignore_index=i, backend=b)[0],
        "distillm2_loss_from_hidden": lambda y, i, b: dk.distillm2_loss_from_hidden(
            hidden_s, hidden_t, y, hidden_s, hidden_t, y, **weights, ignore_index=i, backend=b)[0],
        "DistiLLM2Loss": lambda y, i, b: dk.DistiLLM2Loss(ignore_index=i, backend=b)(
            student, teacher, y, student, teacher, y)[0],
        "DistiLLM2Loss.from_hidden": lambda y, i, b: dk.DistiLLM2Loss(ignore_index=i, backend=b).from_hidden(
            hidden_s, hidden_t, y, hidden_s, hidden_t, y, **weights)[0],
    }
    return calls[name]


ENTRY_POINTS = [
    "fused_skl", "fused_srkl", "SkewKLLoss", "SkewReverseKLLoss", "FusedSKLFunction", "FusedSRKLFunction",
    "token_statistics", "fused_linear_skl", "fused_linear_srkl", "fused_linear_token_statistics", "distillm2_loss",
    "distillm2_loss_from_hidden", "DistiLLM2Loss", "DistiLLM2Loss.from_hidden",
]
CPU_BACKENDS = list(available_backends(torch.device("cpu")))  # the triton one under the interpreter


def _labels(bad_value=None, ignore_index=-100):
    labels = torch.tensor([[ignore_index, 3, 10], [0, ignore_index, 5]])
    if bad_value is not None:
        labels[1, 2] = bad_value
    return labels


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", ENTRY_POINTS)
@pytest.mark.parametrize("bad_value", [-1, V, 2**40, -101])
def test_labels_outside_the_vocabulary_are_rejected_everywhere(name, bad_value, backend):
    with pytest.raises(ValueError, match=MESSAGE):
        _logits_call(name)(_labels(bad_value), -100, backend)


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_any_ignore_index_is_accepted_and_only_it(name):
    """ignore_index = -1 (a common padding label) is accepted; -100 is then an error like any other id < 0."""
    call = _logits_call(name)
    value = call(_labels(ignore_index=-1), -1, "torch")
    assert torch.isfinite(value).all()
    torch.testing.assert_close(value, call(_labels(), -100, "torch"), rtol=0, atol=0)  # same tokens ignored
    with pytest.raises(ValueError, match=r"or ignore_index \(-1\)"):
        call(_labels(bad_value=-100, ignore_index=-1), -1, "torch")


def test_statistics_given_are_not_rechecked_and_loss_unchanged():
    """With `statistics=` (whose labels token_statistics checked) the op reuses them: same loss as without."""
    gen = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(B, T, V, generator=gen), torch.randn(B, T, V, generator=gen)
    labels = _labels()
    statistics = dk.token_statistics(student, teacher, labels, backend="torch")
    with_stats = dk.FusedSKLFunction.apply(student, teacher, 0.1, labels, -100, 1.0, "torch", statistics)
    without = dk.FusedSKLFunction.apply(student, teacher, 0.1, labels, -100, 1.0, "torch")
    torch.testing.assert_close(with_stats, without, rtol=0, atol=0)
