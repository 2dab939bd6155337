"""Time and memory of one benchmark case: one procedure for CPU and CUDA, with a device-specific clock and
memory probe.

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
- CPU (`CpuProbe`): the process's resident set (Linux /proc, `distillm2_kernels._measure`). Before the call the
  heap is trimmed (`malloc_trim`: freed memory goes back to the kernel, so the op cannot reuse earlier
  garbage unseen) and the peak resident size (VmHWM) is reset to the current one; the op's own increase is
  the peak minus the resident size before the call, the absolute peak is VmHWM. Each case runs in a worker
  process (`runner`), so other implementations' memory is never in it.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from distillm2_kernels._measure import peak_rss_bytes, reset_peak_rss, resident_bytes

L2_FLUSH_BYTES = 256 * 2**20  # larger than the L2 of any current GPU (H100: 50 MB, H200: 60 MB, B200: 126 MB)


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
