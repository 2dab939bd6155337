"""The implementations behind the public ops, and how one is chosen.

Each backend module implements `protocol.SkewBackend`: three functions over flattened rows
(`_inputs.SkewRows`), sweep 1 (`skew_statistics`), sweeps 1-2 (`skew_forward`) and sweep 3 (`skew_backward`),
with the row statistics `[N, STATS]` whose columns are `RowStat` (`statistics`). Both op families reach them
the same way: a concrete name from `resolve_backend_name` (at trace time under torch.compile), then
`backend_module(name, compute dtype)`, the one place that routes float64 rows (to the torch backend).

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

from .._inputs import SkewRows, prepare_rows
from . import cpu_backend, torch_backend, torch_sparse, triton_backend
from .protocol import STATS, RowStat, SkewBackend

__all__ = [
    "BACKENDS",
    "BACKEND_MODULES",
    "STATS",
    "RowStat",
    "SkewBackend",
    "SkewRows",
    "prepare_rows",
    "available_backends",
    "resolve_backend_name",
    "resolve_backend",
    "backend_module",
    "SPARSE_BACKEND_MODULES",
    "sparse_backend_module",
]

BACKENDS = ("auto", "triton", "cpu", "torch")
BACKEND_MODULES: dict[str, SkewBackend] = {"triton": triton_backend, "cpu": cpu_backend, "torch": torch_backend}

# The sparse-teacher sweeps (`torch_sparse` is their spec): the cpu and triton modules join this map as
# they land; until then those names run the torch sweeps.
SPARSE_BACKEND_MODULES: dict[str, ModuleType] = {"triton": torch_sparse, "cpu": torch_sparse, "torch": torch_sparse}

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


def backend_module(name: str, dtype: torch.dtype) -> SkewBackend:
    """The module that runs rows of compute dtype `dtype` (`_inputs.compute_dtype` of the logits) for the
    concrete backend `name`: the one place that routes float64. float64 rows on "cpu" run on the torch
    backend in float64 (the C++ kernels are float32; Triton rejects float64 with a TypeError)."""
    if name == "cpu" and dtype == torch.float64:
        return torch_backend
    return BACKEND_MODULES[name]


def sparse_backend_module(name: str, dtype: torch.dtype) -> ModuleType:
    """The module of the sparse-teacher sweeps (`torch_sparse`'s three functions) for the concrete backend
    `name` and rows of compute dtype `dtype`: float64 rows run on `torch_sparse` whatever the name."""
    if dtype == torch.float64:
        return torch_sparse
    return SPARSE_BACKEND_MODULES[name]
