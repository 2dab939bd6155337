"""What a run ran on: device, versions, commit and date, written on every row of the CSV."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    """`git rev-parse --short HEAD` of this checkout, with "-dirty" when tracked code outside
    benchmarks/results/ has uncommitted changes; "unknown" outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def package_version(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device) -> dict:
    """The device and software columns (run in a worker, so that the parent never initialises CUDA)."""
    import torch

    import distillm2_kernels
    from distillm2_kernels.backends import cpu_backend

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    threads = torch.get_num_threads()
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        name = f"{torch.cuda.get_device_name(device)} ({properties.total_memory / 2**30:.0f} GiB, sm_{properties.major}{properties.minor})"
    else:
        name = f"{cpu_name()} ({os.cpu_count()} cores, {threads} threads)"
    return {
        "device": device.type,
        "device_name": name,
        "library": distillm2_kernels.__version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "",
        "triton": triton_version,
        "liger_kernel": package_version("liger-kernel") or "not installed",
        "cpu_kernels": cpu_backend.kernel_isa() or "unavailable",
        "threads": threads,
    }
