"""`torch.compile(fullgraph=True)` of every public op, the modules and the objective: any graph break is an
error, and the compiled call gives the eager loss and gradients.

Tiny sizes on the CPU, float32 and bfloat16, with ignored tokens (the fused-linear ops drop them, a
data-dependent row count, inside their custom ops). The compiler backend is "aot_eager": it traces the
forward and the backward as torch.compile does (dynamo + AOT autograd, the custom ops' fake
implementations), without inductor's C++ compile of each graph; the slow test at the end runs inductor.
"""

from __future__ import annotations

import pytest
import torch

import distillm2_kernels as dk

B, T, H_S, H_T, V = 2, 4, 8, 6, 13
K = 4  # the sparse teacher's ids per token


def _inputs(dtype: torch.dtype, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, grad=False):
        return torch.randn(*shape, generator=gen).to(dtype).requires_grad_(grad)

    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[0, :2] = -100
    labels_s = torch.randint(0, V, (B, T), generator=gen)
    labels_s[1, 0] = -100
    top = torch.log_softmax(torch.randn(B, T, V, generator=gen), dim=-1).topk(K, dim=-1)
    return dict(
        sparse_teacher=dk.SparseTeacher(top.indices, top.values),
        student_logits=randn(B, T, V, grad=True), teacher_logits=randn(B, T, V),
        student_logits_s=randn(B, T, V, grad=True), teacher_logits_s=randn(B, T, V),
        student_hidden=randn(B, T, H_S, grad=True), teacher_hidden=randn(B, T, H_T),
        student_hidden_s=randn(B, T, H_S, grad=True), teacher_hidden_s=randn(B, T, H_T),
        student_weight=randn(V, H_S, grad=True), teacher_weight=randn(V, H_T), student_bias=randn(V, grad=True),
        labels=labels, labels_s=labels_s, alpha=torch.tensor([0.1, 0.3]),
    )


def _objective_from_hidden(x):
    return dk.distillm2_loss_from_hidden(
        x["student_hidden"], x["teacher_hidden"], x["labels"], x["student_hidden_s"], x["teacher_hidden_s"],
        x["labels_s"], student_weight=x["student_weight"], teacher_weight=x["teacher_weight"],
        student_bias=x["student_bias"], softcap=3.0,
    )[0]


def _module_from_hidden(x):
    return dk.DistiLLM2Loss().from_hidden(
        x["student_hidden"], x["teacher_hidden"], x["labels"], x["student_hidden_s"], x["teacher_hidden_s"],
        x["labels_s"], student_weight=x["student_weight"], teacher_weight=x["teacher_weight"],
    )[0]


def _linear(x):
    return x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"]


def _logits(x):
    return x["student_logits"], x["teacher_logits"]


def _pair(x):
    return (*_logits(x), x["labels"], x["student_logits_s"], x["teacher_logits_s"], x["labels_s"])


# name -> (the call, the inputs it differentiates)
OPS = {
    "fused_skl": (lambda x: dk.fused_skl(*_logits(x), x["alpha"], labels=x["labels"], reduction="seqmean"), ["student_logits"]),
    "fused_srkl": (lambda x: dk.fused_srkl(*_logits(x), 0.2, labels=x["labels"], temperature=2.0, detach_mixture=True), ["student_logits"]),
    "fused_skl_none": (lambda x: dk.fused_skl(*_logits(x), labels=x["labels"], reduction="none").sum(), ["student_logits"]),
    "SkewKLLoss": (lambda x: dk.SkewKLLoss(0.1, reduction="sum")(*_logits(x), x["labels"]), ["student_logits"]),
    "SkewReverseKLLoss": (lambda x: dk.SkewReverseKLLoss(0.1)(*_logits(x), x["labels"], alpha=x["alpha"]), ["student_logits"]),
    "FusedSKLFunction": (lambda x: dk.FusedSKLFunction.apply(*_logits(x), 0.1, x["labels"], -100, 1.0, "auto").sum(), ["student_logits"]),
    "FusedSRKLFunction": (lambda x: dk.FusedSRKLFunction.apply(*_logits(x), 0.1, x["labels"], -100, 1.0, "auto", True).sum(), ["student_logits"]),
    "token_statistics": (lambda x: dk.token_statistics(*_logits(x), x["labels"]).stats, []),
    "fused_skl_sparse": (
        lambda x: dk.fused_skl(x["student_logits"], x["sparse_teacher"], x["alpha"], labels=x["labels"], reduction="seqmean"),
        ["student_logits"],
    ),
    "fused_srkl_sparse_uniform": (
        lambda x: dk.fused_srkl(
            x["student_logits"], x["sparse_teacher"], 0.2, labels=x["labels"], temperature=2.0, teacher_tail="uniform"
        ),
        ["student_logits"],
    ),
    "token_statistics_sparse": (
        lambda x: dk.token_statistics(x["student_logits"], x["sparse_teacher"], x["labels"], teacher_tail="uniform").stats,
        [],
    ),
    "distillm2_loss_sparse": (
        lambda x: dk.distillm2_loss(
            x["student_logits"], x["sparse_teacher"], x["labels"], x["student_logits_s"], x["sparse_teacher"],
            x["labels_s"], preset="paper", teacher_tail="uniform",
        )[0],
        ["student_logits", "student_logits_s"],
    ),
    "fused_linear_skl": (
        lambda x: dk.fused_linear_skl(*_linear(x), x["alpha"], student_bias=x["student_bias"], labels=x["labels"], softcap=3.0, reduction="seqmean"),
        ["student_hidden", "student_weight", "student_bias"],
    ),
    "fused_linear_srkl": (
        lambda x: dk.fused_linear_srkl(*_linear(x), 0.2, labels=x["labels"], detach_mixture=True, memory_budget_bytes=4 * 4 * V * 3),
        ["student_hidden", "student_weight"],
    ),
    "fused_linear_srkl_none": (
        lambda x: dk.fused_linear_srkl(*_linear(x), labels=x["labels"], reduction="none").sum(), ["student_hidden", "student_weight"]
    ),
    "fused_linear_skl_token_outputs": (
        lambda x: sum(t.sum() for t in dk.fused_linear_skl(*_linear(x), labels=x["labels"], return_token_outputs=True)[1]),
        [],
    ),
    "FusedLinearSKLFunction": (
        lambda x: dk.FusedLinearSKLFunction.apply(*_linear(x), None, None, 0.1, x["labels"]), ["student_hidden", "student_weight"]
    ),
    "FusedLinearSRKLFunction": (
        lambda x: dk.FusedLinearSRKLFunction.apply(*_linear(x), None, None, 0.1, x["labels"], -100, 1.0, None, "sum"),
        ["student_hidden", "student_weight"],
    ),
    "fused_linear_token_statistics": (lambda x: dk.fused_linear_token_statistics(*_linear(x), x["labels"]).stats, []),
    "distillm2_loss": (lambda x: dk.distillm2_loss(*_pair(x))[0], ["student_logits", "student_logits_s"]),
    "distillm2_loss_paper": (
        lambda x: dk.distillm2_loss(*_pair(x), preset="paper")[0], ["student_logits", "student_logits_s"]
    ),
    "DistiLLM2Loss": (lambda x: dk.DistiLLM2Loss("distillm")(*_pair(x))[0], ["student_logits", "student_logits_s"]),
    "distillm2_loss_from_hidden": (_objective_from_hidden, ["student_hidden", "student_hidden_s", "student_weight", "student_bias"]),
    "DistiLLM2Loss.from_hidden": (_module_from_hidden, ["student_hidden", "student_hidden_s", "student_weight"]),
}


def test_every_public_op_is_covered():
    """Each public callable of the package has a case here (the dataclasses and NamedTuples are not ops)."""
    ops = {name for name in dk.__all__ if callable(getattr(dk, name)) and name not in (
        "FusedLinearTokenOutputs", "TokenStatistics", "SparseTeacher")}
    covered = {name.split(".")[0] for name in OPS}
    assert ops - covered == set()


def _run(fn, inputs: dict, wrt: list[str]):
    out = fn(inputs)
    grads = torch.autograd.grad(out, [inputs[k] for k in wrt]) if wrt else ()
    return out.detach(), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", sorted(OPS))
def test_fullgraph_matches_eager(name, dtype):
    fn, wrt = OPS[name]
    torch._dynamo.reset()
    inputs = _inputs(dtype)
    expected, expected_grads = _run(fn, inputs, wrt)
    actual, actual_grads = _run(torch.compile(fn, fullgraph=True, backend="aot_eager"), inputs, wrt)
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
    for key, a, e in zip(wrt, actual_grads, expected_grads):
        assert a.dtype == e.dtype, key
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6, msg=lambda m: f"grad {key}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fused_linear_skl", "distillm2_loss_from_hidden"])
def test_fullgraph_with_inductor_matches_eager(name):
    fn, wrt = OPS[name]
    torch._dynamo.reset()
    inputs = _inputs(torch.float32)
    expected, expected_grads = _run(fn, inputs, wrt)
    no_caches = torch._inductor.config.patch(fx_graph_cache=False, autotune_local_cache=False)
    with no_caches, torch._functorch.config.patch(enable_autograd_cache=False):
        actual, actual_grads = _run(torch.compile(fn, fullgraph=True), inputs, wrt)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    for a, e in zip(actual_grads, expected_grads):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_fused_linear_custom_ops_pass_opcheck(dtype):
    """The fused-linear ops' schemas, fake implementations (shapes, dtypes) and declared mutations."""
    x = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in _inputs(dtype).items()}
    models = (
        x["student_hidden"].reshape(-1, H_S), x["student_weight"], x["student_bias"], 3.0,
        x["teacher_hidden"].reshape(-1, H_T), x["teacher_weight"], None, None,
    )
    labels = x["labels"].reshape(-1)
    torch.library.opcheck(
        torch.ops.distillm2.fused_linear_statistics.default, (*models, labels, -100, 0.5, "torch", 4096)
    )
    stats = torch.ops.distillm2.fused_linear_statistics(*models, labels, -100, 0.5, "torch", 4096)
    alpha_rows = torch.rand(B * T)
    for want_loss, want_label_logprobs, want_hidden in ((True, True, True), (False, False, True), (True, False, False)):
        accumulators = (torch.zeros(V, H_S), torch.zeros(V))
        args = (
            *models, labels, alpha_rows, stats, torch.rand(B * T), *accumulators, 0.0, -100, 0.5, True, False,
            "torch", 4096, want_loss, want_label_logprobs, want_hidden,
        )
        torch.library.opcheck(torch.ops.distillm2.fused_linear_loss.default, args)
    # no row weights: no gradient, whatever want_hidden says, and no accumulator
    args = (*models, labels, None, None, None, None, None, 0.1, -100, 1.0, False, False, "torch", 4096, True, False, True)
    torch.library.opcheck(torch.ops.distillm2.fused_linear_loss.default, args)
