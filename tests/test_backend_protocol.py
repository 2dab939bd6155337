"""The backend interface: every backend module implements `backends.protocol.SkewBackend` (names and
signatures), the statistics columns are named as the C++ names them, float64 is routed in one place, and
the optional `skew_forward_and_grad` is used where a backend has it (a fake backend here)."""

from __future__ import annotations

import inspect
import re
import types
from pathlib import Path

import pytest
import torch

import distillm2_kernels as dk
from distillm2_kernels import backends
from distillm2_kernels.backends import protocol, torch_backend
from distillm2_kernels.statistics import STATS, RowStat

CSRC = Path(dk.__file__).parent / "csrc"


def _protocol_methods(cls) -> dict[str, inspect.Signature]:
    methods = {}
    for name, member in vars(cls).items():
        if inspect.isfunction(member) and not name.startswith("_"):
            signature = inspect.signature(member)
            methods[name] = signature.replace(parameters=list(signature.parameters.values())[1:])  # drop self
    return methods


def _same_signature(function, expected: inspect.Signature) -> bool:
    actual = inspect.signature(function)
    strip = lambda sig: [(p.name, p.kind, p.default) for p in sig.parameters.values()]  # noqa: E731
    return strip(actual) == strip(expected)


@pytest.mark.parametrize("name", sorted(backends.BACKEND_MODULES))
def test_every_backend_implements_the_protocol(name):
    module = backends.BACKEND_MODULES[name]
    assert isinstance(module, protocol.SkewBackend)
    assert isinstance(module.ROW_TEMPORARIES, int) and module.ROW_TEMPORARIES >= 0
    for method, signature in _protocol_methods(protocol.SkewBackend).items():
        assert _same_signature(getattr(module, method), signature), f"{name}.{method}{inspect.signature(getattr(module, method))}"
    extension = protocol.forward_and_grad_of(module)
    if extension is not None:  # optional; when present, with the declared signature
        (signature,) = _protocol_methods(protocol.SkewForwardAndGrad).values()
        assert _same_signature(extension, signature)


def test_the_protocol_checks_signatures():
    """The check above fails a backend whose function differs from the protocol's."""
    signature = _protocol_methods(protocol.SkewBackend)["skew_forward"]
    assert not _same_signature(lambda rows, reverse, detach: None, signature)
    assert not _same_signature(lambda rows, reverse, detach, statistics=None: None, signature)


def test_row_stat_names_the_cpp_columns():
    header = (CSRC / "skew_divergence_kernel.h").read_text()
    body = re.search(r"enum RowStat \{(.*?)\};", header, re.S).group(1)
    cpp = {re.sub(r"(?<!^)(?=[A-Z])", "_", k[1:]).upper(): int(v) for k, v in re.findall(r"(k\w+)\s*=\s*(\d+)", body)}
    assert cpp == {m.name: m.value for m in RowStat}
    assert STATS == len(RowStat) == int(re.search(r"kStats = (\d+)", (CSRC / "skew_divergence.h").read_text()).group(1))


def test_float64_is_routed_to_the_torch_backend():
    assert backends.backend_module("cpu", torch.float64) is torch_backend
    assert backends.backend_module("cpu", torch.float32) is backends.BACKEND_MODULES["cpu"]
    assert backends.backend_module("triton", torch.float64) is backends.BACKEND_MODULES["triton"]  # which rejects it


def _fake_backend(calls: list) -> types.SimpleNamespace:
    """The torch backend plus a `skew_forward_and_grad` built from its forward and backward, recording calls."""

    def skew_backward(rows, reverse, detach, stats, grad_loss):
        calls.append("skew_backward")
        return torch_backend.skew_backward(rows, reverse, detach, stats, grad_loss)

    def skew_forward_and_grad(rows, reverse, detach, row_grad_scale):
        calls.append("skew_forward_and_grad")
        loss, stats = torch_backend.skew_forward(rows, reverse, detach)
        return loss, stats, torch_backend.skew_backward(rows, reverse, detach, stats, row_grad_scale)

    return types.SimpleNamespace(
        ROW_TEMPORARIES=torch_backend.ROW_TEMPORARIES,
        skew_statistics=torch_backend.skew_statistics,
        skew_forward=torch_backend.skew_forward,
        skew_backward=skew_backward,
        skew_forward_and_grad=skew_forward_and_grad,
    )


@pytest.mark.parametrize("reduction", ["sum", "mean", "seqmean"])
@pytest.mark.parametrize("op", ["skl", "srkl"])
def test_forward_and_grad_is_used_for_scalar_reductions(monkeypatch, op, reduction):
    gen = torch.Generator().manual_seed(3)
    student = torch.randn(2, 5, 17, generator=gen, requires_grad=True)
    teacher = torch.randn(2, 5, 17, generator=gen)
    labels = torch.randint(0, 17, (2, 5), generator=gen)
    labels[0, :3] = -100
    fn = dk.fused_skl if op == "skl" else lambda *a, **k: dk.fused_srkl(*a, detach_mixture=True, **k)
    kwargs = dict(labels=labels, temperature=1.5, reduction=reduction, backend="torch")

    expected = fn(student, teacher, torch.tensor([0.2, 0.6]), **kwargs)
    (expected_grad,) = torch.autograd.grad(2.5 * expected, student)

    calls = []
    monkeypatch.setitem(backends.BACKEND_MODULES, "torch", _fake_backend(calls))
    assert protocol.forward_and_grad_of(backends.BACKEND_MODULES["torch"]) is not None
    actual = fn(student, teacher, torch.tensor([0.2, 0.6]), **kwargs)
    assert calls == ["skew_forward_and_grad"]
    (actual_grad,) = torch.autograd.grad(2.5 * actual, student)
    assert calls == ["skew_forward_and_grad"]  # the backward only scales the saved gradient
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(actual_grad, expected_grad, rtol=1e-6, atol=1e-7)

    # without a gradient, and for reduction="none", the per-token path (no gradient computed in the forward)
    with torch.no_grad():
        fn(student, teacher, 0.1, **kwargs)
    fn(student, teacher, 0.1, **{**kwargs, "reduction": "none"}).sum().backward()
    assert calls == ["skew_forward_and_grad", "skew_backward"]


def test_forward_and_grad_under_torch_compile(monkeypatch):
    calls = []
    monkeypatch.setitem(backends.BACKEND_MODULES, "torch", _fake_backend(calls))
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(4)
    student = torch.randn(2, 3, 11, generator=gen, requires_grad=True)
    teacher, labels = torch.randn(2, 3, 11, generator=gen), torch.tensor([[-100, 1, 2], [3, 4, -100]])

    def step(student):
        return dk.fused_skl(student, teacher, 0.1, labels=labels, reduction="seqmean", backend="torch")

    expected = step(student)
    (expected_grad,) = torch.autograd.grad(expected, student)
    actual = torch.compile(step, fullgraph=True, backend="aot_eager")(student)
    (actual_grad,) = torch.autograd.grad(actual, student)
    assert "skew_backward" not in calls and calls.count("skew_forward_and_grad") >= 2
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(actual_grad, expected_grad, rtol=1e-6, atol=1e-7)
