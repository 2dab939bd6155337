"""The C++ CPU backend: `distillm2_kernels._C`, built from csrc/ by setup.py (see csrc/skew_divergence_kernel.h).

Same math, interface and row statistics as the Triton kernels (see `triton_backend`): one thread per row, three
sweeps per row (online log-sum-exp with the label tokens' log-probabilities; loss and the row constant C;
gradient), the vocabulary loop vectorised with ATen's `at::vec` at the instruction set ATen itself selects,
float32 accumulation, the gradient in the student dtype. `skew_forward` without precomputed statistics runs
sweeps 1 and 2 back to back on each row, while the row is still in cache.
Rows run in parallel on `torch.get_num_threads()` threads; each row is computed by one thread in a fixed order,
so results do not depend on the thread count.

float64 logits are computed by the chunked `torch_backend` in float64.

The extension is optional. When it is missing or cannot be loaded (for example built against another torch),
`unavailable_reason()` says why; `backend="auto"` then uses the "torch" backend with one warning per process,
and `backend="cpu"` raises.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional

import torch

from .._inputs import STATS, SkewRows
from . import torch_backend

ROW_TEMPORARIES = 0  # [rows, V] temporaries the kernels allocate besides their output (see torch_backend)

def _load_extension() -> tuple[Optional[ModuleType], Optional[str]]:
    """(the compiled module, None), or (None, why it cannot be used)."""
    try:
        _C = importlib.import_module("distillm2_kernels._C")
    except ImportError as error:
        if isinstance(error, ModuleNotFoundError) and error.name == "distillm2_kernels._C":
            return None, (
                "the C++ extension distillm2_kernels._C is not built (reinstall with "
                "`pip install --no-build-isolation .` where torch and a C++ compiler are available)"
            )
        return None, f"the C++ extension distillm2_kernels._C failed to load: {error}"
    except OSError as error:
        return None, f"the C++ extension distillm2_kernels._C failed to load: {error}"
    if _C.built_with_torch != torch.__version__:
        return None, (
            f"the C++ extension distillm2_kernels._C was built against torch {_C.built_with_torch} but torch "
            f"{torch.__version__} is installed; rebuild it (`pip install --no-build-isolation .`)"
        )
    return _C, None


_extension, _unavailable_reason = _load_extension()


def unavailable_reason() -> Optional[str]:
    """Why the cpu backend cannot run, or None when it can."""
    return _unavailable_reason


def kernel_isa() -> Optional[str]:
    """The instruction set the kernels run with ("AVX512", "AVX2" or "DEFAULT"), None when unavailable."""
    return None if _extension is None else _extension.kernel_isa()


def _runs_in_float64(rows: SkewRows) -> bool:
    return rows.student.dtype == torch.float64 or rows.teacher.dtype == torch.float64


def _check_runnable(rows: SkewRows) -> None:
    if _extension is None:
        raise ValueError(f"backend='cpu' cannot run here: {_unavailable_reason}")
    if rows.student.device.type != "cpu":
        raise ValueError(f"the cpu backend runs on CPU tensors, got tensors on {rows.student.device}")


def _labels(rows: SkewRows) -> Optional[torch.Tensor]:
    return None if rows.labels is None else rows.labels.to(torch.int64).contiguous()


def _extension_args(rows: SkewRows) -> tuple:
    _check_runnable(rows)
    return (
        rows.student,
        rows.teacher,
        _labels(rows),
        rows.alpha_rows,
        rows.alpha,
        rows.ignore_index,
        rows.inv_temperature,
    )


def skew_statistics(rows: SkewRows) -> torch.Tensor:
    """Sweep 1: the row statistics `[N, 7]` (column 4, C, is 0 until `skew_forward` fills it)."""
    if _runs_in_float64(rows):
        return torch_backend.skew_statistics(rows)
    _check_runnable(rows)
    stats = torch.empty((rows.num_rows, STATS), dtype=torch.float32)
    _extension.skew_statistics(
        rows.student, rows.teacher, _labels(rows), rows.ignore_index, rows.inv_temperature, stats
    )
    return stats


def skew_forward(
    rows: SkewRows, reverse: bool, detach: bool, stats: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss `[N]` float32 and the statistics `[N, 7]` the backward needs. `stats` from
    `skew_statistics` on the same rows skips sweep 1 (it is not modified)."""
    if _runs_in_float64(rows):
        return torch_backend.skew_forward(rows, reverse, detach, stats)
    args = _extension_args(rows)
    loss = torch.empty(rows.num_rows, dtype=torch.float32)
    compute_statistics = stats is None
    if compute_statistics:
        stats = torch.empty((rows.num_rows, STATS), dtype=torch.float32)
    else:
        stats = stats.clone(memory_format=torch.contiguous_format)
    _extension.skew_forward(*args, reverse, detach, compute_statistics, loss, stats)
    return loss, stats


def skew_backward(
    rows: SkewRows, reverse: bool, detach: bool, stats: torch.Tensor, grad_loss: torch.Tensor
) -> torch.Tensor:
    """Gradient w.r.t. the student logits, `[N, V]` contiguous in the student's dtype."""
    if _runs_in_float64(rows):
        return torch_backend.skew_backward(rows, reverse, detach, stats, grad_loss)
    args = _extension_args(rows)
    grad = torch.empty((rows.num_rows, rows.vocab_size), dtype=rows.student.dtype)
    _extension.skew_backward(*args, reverse, detach, stats.contiguous(), grad_loss.to(torch.float32), grad)
    return grad
