"""Bad input gives a clear error; backends are chosen as documented; no [N, V] temporaries."""

import pytest
import torch
from allocations import NewStorages
from conftest import kernel_device

from distillm2_kernels import fused_skl, fused_srkl
from distillm2_kernels.backends import (
    BACKEND_MODULES,
    available_backends,
    cpu_backend,
    resolve_backend,
    torch_backend,
    triton_backend,
)

DEVICE = kernel_device()


def pair(shape=(2, 3, 10), dtype=torch.float32):
    return torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(student=torch.randint(0, 5, (2, 10))), TypeError, "student_logits must be a floating tensor"),
        (dict(teacher=torch.randn(2, 3, 10).long()), TypeError, "teacher_logits must be a floating tensor"),
        (dict(teacher=torch.randn(2, 3, 12)), ValueError, r"V = 12.*slice the larger one"),
        (dict(teacher=torch.randn(2, 4, 10)), ValueError, "leading"),
        (dict(student=torch.randn(2, 3, 0), teacher=torch.randn(2, 3, 0)), ValueError, "V = 0"),
        (dict(student=torch.tensor(1.0), teacher=torch.tensor(1.0)), ValueError, "0-d"),
        (dict(teacher=torch.randn(2, 3, 10, requires_grad=True)), ValueError, "teacher_logits requires grad"),
        (dict(alpha=1.5), ValueError, r"alpha must lie in \[0, 1\]"),
        (dict(alpha=-0.1), ValueError, r"alpha must lie in \[0, 1\]"),
        (dict(alpha=float("nan")), ValueError, r"alpha must lie in \[0, 1\]"),
        (dict(alpha="0.1"), TypeError, "alpha must be a float or a tensor"),
        (dict(alpha=torch.tensor([0.1, 2.0])), ValueError, r"alpha must lie in \[0, 1\]"),
        (dict(alpha=torch.tensor([1, 0])), TypeError, "floating tensor"),
        (dict(alpha=torch.rand(5)), ValueError, "per sequence and needs length 2"),
        (dict(alpha=torch.rand(2, 4)), ValueError, "does not broadcast"),
        (dict(alpha=torch.rand(2, requires_grad=True)), ValueError, "alpha requires grad"),
        (dict(labels=torch.zeros(2, 4, dtype=torch.long)), ValueError, r"labels must have the logits' leading shape"),
        (dict(labels=torch.zeros(2, 3)), TypeError, "labels must be an integer tensor"),
        (dict(labels=[[0, 1, 2]]), TypeError, "labels must be a torch.Tensor"),
        (dict(ignore_index=-100.0), TypeError, "ignore_index must be an int"),
        (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
        (dict(temperature=float("inf")), ValueError, "temperature must be a finite number > 0"),
        (dict(temperature=torch.tensor(1.0)), TypeError, "temperature must be a Python float"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(reduction="seqmean", student=torch.randn(6, 10), teacher=torch.randn(6, 10)), ValueError, r"\[B, T, V\]"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
    ],
)
@pytest.mark.parametrize("fn", [fused_skl, fused_srkl])
def test_bad_input(fn, kwargs, error, match):
    student, teacher = pair()
    args = dict(student=student, teacher=teacher, alpha=0.1)
    args.update(kwargs)
    student, teacher, alpha = args.pop("student"), args.pop("teacher"), args.pop("alpha")
    with pytest.raises(error, match=match):
        fn(student, teacher, alpha, **args)


def test_mixed_dtypes_are_accepted():
    """Teacher and student may come in different dtypes (e.g. a bf16 teacher and an fp32 student)."""
    student, teacher = pair(dtype=torch.float32)
    a = fused_skl(student, teacher.bfloat16(), backend="torch")
    b = fused_skl(student, teacher.bfloat16().float(), backend="torch")
    torch.testing.assert_close(a, b)


def test_backend_selection(monkeypatch):
    """auto: the C++ backend for CPU tensors where it is built (else torch, see test_cpu_backend's fallback
    test); triton only with the interpreter on CPU tensors."""
    assert resolve_backend("torch", torch.device("cpu")) is torch_backend
    expected = cpu_backend if cpu_backend.unavailable_reason() is None else torch_backend
    assert resolve_backend("auto", torch.device("cpu")) is expected
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", torch.device("cpu")) is triton_backend
    assert "triton" in available_backends(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.device("cpu"))
    assert "triton" not in available_backends(torch.device("cpu"))


@pytest.mark.skipif("triton" not in available_backends(DEVICE), reason="needs triton (CUDA, or TRITON_INTERPRET=1)")
def test_triton_rejects_float64():
    student, teacher = pair(dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        fused_skl(student.to(DEVICE), teacher.to(DEVICE), backend="triton")


@pytest.mark.parametrize("op", ["skl", "srkl"])
def test_torch_backend_gradcheck_float64(op):
    """The chunked backend's closed-form backward against finite differences, in float64."""
    student = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 3, 7, dtype=torch.float64)
    labels = torch.tensor([[1, -100, 2], [0, 3, 4]])
    alpha = torch.tensor([0.2, 0.6], dtype=torch.float64)
    fn = fused_skl if op == "skl" else fused_srkl

    def loss(s):
        return fn(s, teacher, alpha, labels=labels, temperature=0.8, reduction="none", backend="torch")

    assert torch.autograd.gradcheck(loss, (student,))


@pytest.mark.parametrize("fn", [fused_skl, fused_srkl])
def test_non_tensor_logits(fn):
    with pytest.raises(TypeError, match="student_logits must be a torch.Tensor"):
        fn([[1.0, 2.0]], torch.randn(1, 2))


@pytest.mark.parametrize("backend", available_backends(DEVICE))
@pytest.mark.parametrize("fn", [fused_skl, fused_srkl])
def test_no_full_size_temporaries(backend, fn, monkeypatch):
    """Forward and backward allocate nothing of N·V elements but the gradient (the torch backend's
    temporaries are bounded by its chunk size)."""
    n, v = 64, 3000
    monkeypatch.setattr(torch_backend, "CHUNK_BYTES", 16 * v * 4)  # 16 rows per chunk
    student = torch.randn(n, v, device=DEVICE, requires_grad=True)
    teacher = torch.randn(n, v, device=DEVICE)
    with NewStorages() as forward:
        loss = fn(student, teacher, 0.1, backend=backend)
    with NewStorages() as backward:
        loss.backward()
    # the gradient itself, the only allocation of N·V: in the forward where the backend computes a scalar
    # reduction's gradient there (skew_forward_and_grad), else in the backward
    full = [op for size, op in forward.sizes + backward.sizes if size >= n * v]
    assert len(full) == 1, full
    fused = hasattr(BACKEND_MODULES[backend], "skew_forward_and_grad")
    assert any(size >= n * v for size, _ in (forward.sizes if fused else backward.sizes))
    assert max([size for size, _ in forward.sizes + backward.sizes if size < n * v], default=0) <= 16 * v
