"""Time and memory of a call: one procedure for CPU and CUDA, with a device-specific clock and memory probe.

The benchmarks (`benchmarks/`) and the demo (`python -m distillm2_kernels.demo`) measure with it; it lives in
the package because the demo is shipped and the benchmarks are not.

`measure(run, zero_grad, probe, warmup, repeats)`:

1. warm-up: `warmup` calls of `run()` (the first one's wall time, compile and autotuning included, is
   reported as `warmup_s`, and its loss as `loss`);
2. memory: one call between `probe.start()` and `probe.peak()`;
3. time: `repeats` calls, each timed alone (`probe.time`), gradients reset and, on CUDA, the L2 cache
   flushed before each (outside the timed region). Reported: median, min and max.

Clocks: CUDA events around the call on CUDA; wall clock (`time.perf_counter`) on the CPU.

Memory probes:
- CUDA (`CudaProbe`): the caching allocator's statistics, in-process: `reset_peak_memory_stats()`, then the
  op's own increase is `max_memory_allocated()` minus `memory_allocated()` before the call, and the absolute
  peak is `max_memory_allocated()` (everything this process holds: inputs included).
- CPU (`CpuProbe`): the process's resident set (Linux only: /proc). Before the call the heap is trimmed
  (`malloc_trim`: freed memory goes back to the kernel, so the op cannot reuse earlier garbage unseen) and
  the peak resident size (VmHWM) is reset to the current one (`/proc/self/clear_refs`); the op's own increase
  is the peak minus the resident size before the call, the absolute peak is VmHWM. A high-water mark only
  rises, so each variant is measured in a process of its own: the benchmarks run each case in a worker
  (`benchmarks/runner.py`), the demo uses `peak_rss_in_subprocess`. (`ru_maxrss` would not do for a child:
  Linux carries it over from the parent across fork and exec.)
"""

from __future__ import annotations

import ctypes
import gc
import multiprocessing
import os
import resource
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

__all__ = [
    "measure",
    "Measurement",
    "CpuProbe",
    "CudaProbe",
    "probe_for",
    "peak_rss_in_subprocess",
    "resident_bytes",
    "reset_peak_rss",
    "peak_rss_bytes",
]

L2_FLUSH_BYTES = 256 * 2**20  # larger than the L2 of any current GPU (H100: 50 MB, H200: 60 MB, B200: 126 MB)


def resident_bytes() -> int:
    """This process's current resident set size in bytes (from /proc/self/statm)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Resets this process's peak resident size (VmHWM, what ru_maxrss reports) to the current one.

    Freed heap memory is handed back first (glibc `malloc_trim(0)`), so that an op cannot reuse set-up
    garbage unseen; read `resident_bytes()` after this call as the op's starting point. Returns False where
    /proc/self/clear_refs cannot be written (not Linux >= 4.0, or not permitted): the peak then still
    includes everything before."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """This process's peak resident size in bytes since start or the last `reset_peak_rss()` (VmHWM).

    Falls back to ru_maxrss (never reset, and inherited across fork and exec) where /proc has no VmHWM."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class CpuProbe:
    device = torch.device("cpu")

    def synchronize(self) -> None:
        pass

    def clean(self) -> int:
        """Frees what can be freed; returns the resident size in bytes."""
        gc.collect()
        reset_peak_rss()
        return resident_bytes()

    def start(self) -> int:
        gc.collect()
        if not reset_peak_rss():
            raise RuntimeError("cannot reset the peak resident size (/proc/self/clear_refs is not writable): "
                               "the op's own memory cannot be measured on this system")
        return resident_bytes()

    def peak(self) -> int:
        return peak_rss_bytes()

    def time(self, fn: Callable[[], object]) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def flush_cache(self) -> None:
        pass

    def begin_timing(self) -> None:
        pass

    def end_timing(self) -> None:
        pass


class CudaProbe:
    def __init__(self, device: torch.device):
        self.device = device
        self._flush: Optional[torch.Tensor] = None

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def clean(self) -> int:
        gc.collect()
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        return torch.cuda.memory_allocated(self.device)

    def start(self) -> int:
        gc.collect()
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)

    def time(self, fn: Callable[[], object]) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def begin_timing(self) -> None:
        """The L2-flush buffer exists only while timing, so the memory figures never include it."""
        self._flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=self.device)

    def end_timing(self) -> None:
        self._flush = None

    def flush_cache(self) -> None:
        if self._flush is not None:
            self._flush.zero_()


def probe_for(device: torch.device):
    return CudaProbe(device) if device.type == "cuda" else CpuProbe()


@dataclass
class Measurement:
    warmup_s: float  # the first call: compile, autotuning and one-time initialisation included
    times_s: list  # the timed calls
    loss: Optional[float]  # the loss of the first call
    before_bytes: int  # resident (CPU) / allocated (CUDA) just before the memory call
    peak_bytes: int  # the absolute peak during the memory call

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def increase_bytes(self) -> int:
        return max(self.peak_bytes - self.before_bytes, 0)


def measure(run: Callable[[], Optional[torch.Tensor]], zero_grad: Callable[[], None], probe, warmup: int = 1,
            repeats: int = 5) -> Measurement:
    """Warm-up, one memory call and `repeats` timed calls of `run()` (see the module docstring). `run`
    returns the loss (detached) or None; `zero_grad` drops the gradients of the previous call."""
    zero_grad()
    start = time.perf_counter()
    loss = run()
    probe.synchronize()
    warmup_s = time.perf_counter() - start
    loss_value = None if loss is None else float(loss)
    del loss
    for _ in range(warmup - 1):
        zero_grad()
        run()
    probe.synchronize()

    zero_grad()
    before = probe.start()
    run()
    peak = probe.peak()

    times = []
    probe.begin_timing()
    try:
        for _ in range(repeats):
            zero_grad()
            probe.flush_cache()
            probe.synchronize()
            times.append(probe.time(run))
    finally:
        probe.end_timing()
    zero_grad()
    return Measurement(warmup_s, times, loss_value, before, peak)


def _child(setup: Callable, run: Callable, args: tuple, connection) -> None:
    try:
        state = setup(*args)
        probe = CpuProbe()
        before = probe.start()
        run(state)
        connection.send((before, probe.peak(), None))
    except Exception as error:  # report instead of hanging the parent
        connection.send((0, 0, repr(error)))
    finally:
        connection.close()


def peak_rss_in_subprocess(setup: Callable, run: Callable, *args) -> tuple[int, int]:
    """(op's own increase, absolute peak) in bytes of `run(setup(*args))` in a fresh process (`CpuProbe`).

    `setup` and `run` must be module-level functions (they are pickled into a spawned process)."""
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(setup, run, args, child))
    process.start()
    child.close()
    before, after, error = parent.recv()
    process.join()
    if error is not None:
        raise RuntimeError(f"the measured process failed: {error}")
    return after - before, after
