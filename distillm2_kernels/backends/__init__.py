"""The implementations behind the public ops, and how one is chosen.

Each backend module provides the same two functions over flattened rows (`_inputs.SkewRows`)::

    skew_forward(rows, reverse, detach) -> (loss [N], stats [N, 3])
    skew_backward(rows, reverse, detach, stats, grad_loss [N]) -> grad_student [N, V]

| name     | runs on                                        | module            |
| -------- | ---------------------------------------------- | ----------------- |
| "triton" | CUDA tensors; CPU tensors with TRITON_INTERPRET=1 | `triton_backend` |
| "torch"  | any device (chunked pure PyTorch)              | `torch_backend`   |
"""

from __future__ import annotations

from types import ModuleType

import torch

from . import torch_backend, triton_backend

BACKENDS = ("auto", "triton", "torch")


def available_backends(device: torch.device) -> list[str]:
    """The backend names (other than "auto") that can run on tensors on `device`."""
    names = ["torch"]
    if triton_backend.unavailable_reason(torch.device(device)) is None:
        names.append("triton")
    return names


def resolve_backend(name: str, device: torch.device) -> ModuleType:
    """The backend module for `name` ("auto", "triton" or "torch") and tensors on `device`."""
    if name == "auto":
        if device.type == "cuda" and triton_backend.unavailable_reason(device) is None:
            return triton_backend
        return torch_backend
    if name == "triton":
        reason = triton_backend.unavailable_reason(device)
        if reason is not None:
            raise ValueError(f"backend='triton' cannot run here: {reason}")
        return triton_backend
    if name == "torch":
        return torch_backend
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
