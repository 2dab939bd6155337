"""The implementations behind the public ops, and how one is chosen.

Each backend module provides the same three functions over flattened rows (`_inputs.SkewRows`)::

    skew_statistics(rows) -> stats [N, STATS]                                     sweep 1
    skew_forward(rows, reverse, detach, stats=None) -> (loss [N], stats [N, STATS])   sweeps 1 (unless
                                                                                  given stats) and 2
    skew_backward(rows, reverse, detach, stats, grad_loss [N]) -> grad_student [N, V]   sweep 3

with the same STATS = 7 row statistics: max z_s, log Σ exp((z_s − max z_s)/T), the same two for z_t, the
row constant C of the gradient, and the label tokens' log q(label), log p(label) (0 without labels; every
column 0 on ignored rows). `ROW_TEMPORARIES` says how many `[rows, V]` float32 temporaries a backend holds
(for callers that size their own row blocks).

| name     | runs on                                             | module           |
| -------- | --------------------------------------------------- | ---------------- |
| "triton" | CUDA tensors; CPU tensors with TRITON_INTERPRET=1   | `triton_backend` |
| "cpu"    | CPU tensors (the C++ extension from csrc/)          | `cpu_backend`    |
| "torch"  | any device (chunked pure PyTorch)                   | `torch_backend`  |

"auto" picks "triton" for CUDA tensors and "cpu" for CPU tensors; where that one cannot run it uses "torch"
(for CPU tensors with a one-time warning that the C++ extension is unavailable). The C++ extension is looked
up, or compiled and cached, the first time CPU tensors need it (see `cpu_backend`).
"""

from __future__ import annotations

import warnings
from types import ModuleType

import torch

from .._inputs import STATS  # noqa: F401  (re-exported: the layout every backend shares)
from . import cpu_backend, torch_backend, triton_backend

BACKENDS = ("auto", "triton", "cpu", "torch")
BACKEND_MODULES = {"triton": triton_backend, "cpu": cpu_backend, "torch": torch_backend}

_warned_cpu_fallback = False


def _warn_cpu_fallback_once() -> None:
    global _warned_cpu_fallback
    if not _warned_cpu_fallback:
        _warned_cpu_fallback = True
        warnings.warn(
            f"distillm2_kernels: the C++ CPU backend is unavailable ({cpu_backend.unavailable_reason()}); "
            "CPU tensors use the chunked pure-PyTorch 'torch' backend, several times slower than the C++ one "
            "(`python -m distillm2_kernels.env` shows what each device gets and why)",
            RuntimeWarning,
            stacklevel=3,
        )


# torch.compile runs it while tracing (its result is a constant), so that the warning does not break the graph
@torch.compiler.assume_constant_result
def _auto_cpu_backend_name() -> str:
    if cpu_backend.unavailable_reason() is None:
        return "cpu"
    _warn_cpu_fallback_once()
    return "torch"


def available_backends(device: torch.device) -> list[str]:
    """The backend names (other than "auto") that can run on tensors on `device`."""
    device = torch.device(device)
    names = ["torch"]
    if triton_backend.unavailable_reason(device) is None:
        names.append("triton")
    if device.type == "cpu" and cpu_backend.unavailable_reason() is None:
        names.append("cpu")
    return names


def resolve_backend_name(name: str, device: torch.device) -> str:
    """The concrete backend ("triton", "cpu" or "torch") for `name` and tensors on `device`."""
    if name == "auto":
        if device.type == "cuda" and triton_backend.unavailable_reason(device) is None:
            return "triton"
        if device.type == "cpu":
            return _auto_cpu_backend_name()
        return "torch"
    if name == "triton":
        reason = triton_backend.unavailable_reason(device)
        if reason is not None:
            raise ValueError(f"backend='triton' cannot run here: {reason}")
        return name
    if name == "cpu":
        reason = cpu_backend.unavailable_reason()
        if reason is not None:
            raise ValueError(f"backend='cpu' cannot run here: {reason}")
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' runs on CPU tensors, got tensors on {device}")
        return name
    if name == "torch":
        return name
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


def resolve_backend(name: str, device: torch.device) -> ModuleType:
    """The backend module for `name` ("auto", "triton", "cpu" or "torch") and tensors on `device`."""
    return BACKEND_MODULES[resolve_backend_name(name, device)]
