"""`python -m distillm2_kernels.env`: what this install runs with, for bug reports and for finding out why a device
gets the slower "torch" backend.

Prints the versions of the library and of torch, triton, transformers, peft and vLLM; the backend that
`backend="auto"` picks for CPU tensors and for each CUDA device, and why; the C++ CPU backend's instruction set,
where its module came from (installed with the package, or compiled on first use and cached) and the cache
folder; each GPU's name and compute capability, or "no CUDA device". Looking at the CPU backend compiles it
first if the install did not build it (once, cached).
"""

from __future__ import annotations

import importlib.metadata
import platform
import shutil
import sys
import warnings
from pathlib import Path

import torch

import distillm2_kernels

from .backends import cpu_backend, cpu_jit, resolve_backend_name, triton_backend

__all__ = ["report", "main"]
LIBRARIES = ("torch", "triton", "transformers", "peft", "vllm")


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _auto_backend(device: torch.device) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback warning: its reason is printed below instead
        return resolve_backend_name("auto", device)


def _cpu_lines() -> list[str]:
    lines = [f"CPU: {platform.machine()}, ATen instruction set {torch.backends.cpu.get_cpu_capability()}, "
             f"{torch.get_num_threads()} threads"]
    backend = _auto_backend(torch.device("cpu"))
    reason = cpu_backend.unavailable_reason()
    if reason is None:
        lines.append(f'  backend="auto" on CPU tensors: "{backend}" (the C++ kernels, {cpu_backend.kernel_isa()} build)')
        lines.append(f"  C++ CPU backend: {cpu_backend.extension_origin()}")
    else:
        lines.append(f'  backend="auto" on CPU tensors: "{backend}" (the C++ CPU backend is unavailable: {reason})')
    command, why_not = cpu_jit.compiler()
    lines.append(f"  first-use compile cache: {cpu_jit.build_dir()} (set {cpu_jit.CACHE_ENV} to move it)")
    found = f"{' '.join(command)} ({shutil.which(command[0])})" if command else why_not
    lines.append(f"  C++ compiler for the first-use compile: {found}")
    return lines


def _cuda_lines() -> list[str]:
    if not torch.cuda.is_available():
        built = f"torch built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only torch build"
        return [f"CUDA: no CUDA device ({built})"]
    lines = [f"CUDA: torch built with CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s)"]
    for index in range(torch.cuda.device_count()):
        device = torch.device("cuda", index)
        major, minor = torch.cuda.get_device_capability(device)
        backend = _auto_backend(device)
        why = "the fused Triton kernels" if backend == "triton" else triton_backend.unavailable_reason(device)
        lines.append(f"  {device}: {torch.cuda.get_device_name(device)}, compute capability {major}.{minor}; "
                     f'backend="auto": "{backend}" ({why})')
    return lines


def report() -> list[str]:
    """The lines `python -m distillm2_kernels.env` prints."""
    package = Path(distillm2_kernels.__file__).parent
    lines = [
        f"distillm2_kernels {distillm2_kernels.__version__} ({package})",
        f"python {platform.python_version()} ({sys.executable}), {platform.system()} {platform.machine()}",
    ]
    lines += [f"{name:<13} {_version(name)}" for name in LIBRARIES]
    return lines + _cpu_lines() + _cuda_lines()


def main() -> None:
    print("\n".join(report()))


if __name__ == "__main__":
    main()
