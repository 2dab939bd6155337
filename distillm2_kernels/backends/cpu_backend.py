"""The C++ CPU backend: `distillm2_kernels._C`, compiled from csrc/ (see csrc/skew_divergence_kernel.h).

Same math, interface and row statistics as the Triton kernels (see `triton_backend`): one thread per row; per
row a max pass, an exponential pass (the log-sums and the label tokens' log-probabilities; in the forward the
exponentials are kept in a per-thread row scratch), the loss pass (loss and the row constant C, from the cached
exponentials), and the gradient, vectorised with ATen's `at::vec` at the instruction set ATen itself selects,
float32 accumulation, the gradient in the student dtype (docs/design.md §3, §7). `skew_forward_and_grad` writes
the gradient of a scalar reduction from the same scratch, so its logits are read from memory once.
Rows run in parallel on `torch.get_num_threads()` threads; each row is computed by one thread in a fixed order,
so results do not depend on the thread count.

float64 rows are not this module's: `backends.backend_module` sends them to the chunked `torch_backend`.

Where the extension comes from, looked up on first use (not at import): the module installed with the package
(setup.py builds it when the build environment has torch), if it was built against the running torch; else the
one compiled on first use and cached per torch version (`cpu_jit`). When neither can be had (no C++ compiler,
a failed compile), `unavailable_reason()` says why; `backend="auto"` then uses the "torch" backend with one
warning per process, and `backend="cpu"` raises. `extension_origin()` says which one serves.
"""

from __future__ import annotations

import importlib
import threading
from types import ModuleType
from typing import Optional

import torch

from .._inputs import SkewRows
from ..statistics import STATS
from . import cpu_build, cpu_jit

ROW_TEMPORARIES = 0  # [rows, V] temporaries the kernels allocate besides their output (see torch_backend)


def _load_installed_extension() -> tuple[Optional[ModuleType], str]:
    """(the module installed with the package, where it is), or (None, why it cannot be used)."""
    try:
        _C = importlib.import_module("distillm2_kernels._C")
    except ImportError as error:
        if isinstance(error, ModuleNotFoundError) and error.name == "distillm2_kernels._C":
            return None, "the install did not build distillm2_kernels._C"
        return None, f"the installed distillm2_kernels._C failed to load: {error}"
    except OSError as error:
        return None, f"the installed distillm2_kernels._C failed to load: {error}"
    if getattr(_C, "built_with_torch", None) != torch.__version__:
        return None, (
            f"the installed distillm2_kernels._C was built against torch {getattr(_C, 'built_with_torch', '?')} "
            f"but torch {torch.__version__} is running"
        )
    if cpu_build.CSRC.is_dir() and getattr(_C, "built_from_sources", None) != cpu_build.source_digest():
        return None, (
            f"the installed distillm2_kernels._C ({getattr(_C, '__file__', '?')}) was built from other sources than "
            f"this package's csrc/ (a stale build)"
        )
    return _C, f"installed with the package ({getattr(_C, '__file__', '?')})"


def _load_extension() -> tuple[Optional[ModuleType], Optional[str], str]:
    """(the module, None, where it came from), or (None, why it cannot be used, "")."""
    installed, installed_note = _load_installed_extension()
    if installed is not None:
        return installed, None, installed_note
    compiled, compiled_note = cpu_jit.load()
    if compiled is not None:
        if getattr(compiled, "built_with_torch", None) == torch.__version__:
            return compiled, None, compiled_note
        compiled_note = f"the compiled module reports torch {getattr(compiled, 'built_with_torch', '?')}"
    return None, f"{installed_note}, and {compiled_note}", ""


_lock = threading.Lock()
_state: Optional[tuple[Optional[ModuleType], Optional[str], str]] = None


def _extension_state() -> tuple[Optional[ModuleType], Optional[str], str]:
    global _state
    if _state is None:
        with _lock:
            if _state is None:
                _state = _load_extension()
    return _state


# torch.compile calls it while tracing (backend resolution) instead of tracing the loading, locking and compiling
@torch.compiler.assume_constant_result
def unavailable_reason() -> Optional[str]:
    """Why the cpu backend cannot run, or None when it can (the first call may compile the extension)."""
    return _extension_state()[1]


def extension_origin() -> Optional[str]:
    """Where the extension in use came from (installed module or first-use compile cache), None when none."""
    module, _, origin = _extension_state()
    return origin if module is not None else None


def kernel_isa() -> Optional[str]:
    """The instruction set the kernels run with ("AVX512", "AVX2" or "DEFAULT"), None when unavailable."""
    module = _extension_state()[0]
    return None if module is None else module.kernel_isa()


def loaded_extension() -> ModuleType:
    """The extension module (loaded, or compiled, on the first call); ValueError saying why when unavailable."""
    module, reason, _ = _extension_state()
    if module is None:
        raise ValueError(f"backend='cpu' cannot run here: {reason}")
    return module


def _extension(rows: SkewRows) -> ModuleType:
    module = loaded_extension()
    if rows.student.device.type != "cpu":
        raise ValueError(f"the cpu backend runs on CPU tensors, got tensors on {rows.student.device}")
    return module


def _labels(rows: SkewRows) -> Optional[torch.Tensor]:
    return None if rows.labels is None else rows.labels.to(torch.int64).contiguous()


def _extension_args(rows: SkewRows) -> tuple:
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
    """Sweep 1: the row statistics `[N, STATS]` (column `RowStat.C` is 0 until `skew_forward` fills it)."""
    extension = _extension(rows)
    stats = torch.empty((rows.num_rows, STATS), dtype=torch.float32)
    extension.skew_statistics(
        rows.student, rows.teacher, _labels(rows), rows.ignore_index, rows.inv_temperature, stats
    )
    return stats


def skew_forward(
    rows: SkewRows, reverse: bool, detach: bool, stats: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss `[N]` float32 and the statistics `[N, STATS]` the backward needs. `stats` from
    `skew_statistics` on the same rows skips sweep 1 (it is not modified)."""
    extension = _extension(rows)
    args = _extension_args(rows)
    loss = torch.empty(rows.num_rows, dtype=torch.float32)
    compute_statistics = stats is None
    if compute_statistics:
        stats = torch.empty((rows.num_rows, STATS), dtype=torch.float32)
    else:
        stats = stats.clone(memory_format=torch.contiguous_format)
    extension.skew_forward(*args, reverse, detach, compute_statistics, loss, stats)
    return loss, stats


def skew_backward(
    rows: SkewRows, reverse: bool, detach: bool, stats: torch.Tensor, grad_loss: torch.Tensor
) -> torch.Tensor:
    """Gradient w.r.t. the student logits, `[N, V]` contiguous in the student's dtype."""
    extension = _extension(rows)
    args = _extension_args(rows)
    grad = torch.empty((rows.num_rows, rows.vocab_size), dtype=rows.student.dtype)
    extension.skew_backward(*args, reverse, detach, stats.contiguous(), grad_loss.to(torch.float32), grad)
    return grad


def skew_forward_and_grad(
    rows: SkewRows, reverse: bool, detach: bool, row_grad_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward of a scalar reduction with its gradient: per-row loss `[N]`, statistics `[N, 7]`, and the
    gradient of `Σ_r row_grad_scale[r]·loss_r` w.r.t. the student logits (`[N, V]`, the student's dtype), which is
    `skew_backward(rows, reverse, detach, stats, row_grad_scale)` bit for bit, from one pass over the rows: each
    row's exponentials are evaluated once and its gradient written from the row scratch (no second read of the
    logits). `row_grad_scale[r]` = d(reduced loss)/d(loss_r), without the 1/T factor, which is applied here."""
    extension = _extension(rows)
    loss = torch.empty(rows.num_rows, dtype=torch.float32)
    stats = torch.empty((rows.num_rows, STATS), dtype=torch.float32)
    grad = torch.empty((rows.num_rows, rows.vocab_size), dtype=rows.student.dtype)
    grad_scale = row_grad_scale.to(torch.float32).contiguous()
    extension.skew_forward_and_grad(*_extension_args(rows), reverse, detach, grad_scale, loss, stats, grad)
    return loss, stats, grad
